"""The metric history of a store: one line per save, kept apart from the versions.

Retention deletes versions; what the training measured on the way stays:
``STORE/history.jsonl`` holds one JSON object per line, appended under the
writer lock by every save (``Store.save``) and by the
:class:`~ckpt.CheckpointManager` for the steps its schedule did not write
(docs/format.md, section "Metric history")::

    {"step": 3, "epoch": 3, "metrics": {"val_loss": 0.31}, "time": "2026-...Z", "version": 4}

``version`` is the version that save committed, or null for a step that was
evaluated but not written. The file is derived from nothing and deleted by
nothing but the user: ``ckpt plot`` draws it. A line torn by a crash is
skipped when read, and the next append starts on a new line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .index import decode_metrics, parse_time, read_regular_file

__all__ = ["HISTORY_FILE", "HistoryEntry", "append_history", "read_history"]

HISTORY_FILE = "history.jsonl"
#: A history larger than this is not read (64 MiB: ~500,000 saves).
MAX_HISTORY_BYTES = 64 << 20


@dataclass(frozen=True)
class HistoryEntry:
    """One save's metrics, as the history records them.

    Attributes:
        step, epoch: the training position given to the save (or None).
        metrics: metric name -> number (NaN and infinities included).
        time: when it was recorded (UTC).
        version: the version the save committed; None for a step that the
            manager's schedule evaluated without writing a version.
    """

    step: int | None
    epoch: int | None
    metrics: Mapping[str, float | int]
    time: datetime
    version: int | None


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"not a non-negative int: {value!r}")
    return value


def _entry(line: bytes) -> HistoryEntry | None:
    try:
        d = json.loads(line)
        if not isinstance(d, dict):
            return None
        return HistoryEntry(
            step=_opt_int(d.get("step")),
            epoch=_opt_int(d.get("epoch")),
            metrics=decode_metrics(d.get("metrics", {})),
            time=parse_time(d["time"]),
            version=_opt_int(d.get("version")),
        )
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def read_history(root: str) -> list[HistoryEntry]:
    """Every readable entry of ``root``'s history, in the order recorded (empty if none)."""
    data = read_regular_file(os.path.join(root, HISTORY_FILE), MAX_HISTORY_BYTES)
    if not data:
        return []
    out = []
    for line in data.split(b"\n"):
        if line.strip():
            entry = _entry(line)
            if entry is not None:
                out.append(entry)
    return out


def append_history(root: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends ``records`` (JSON-ready dicts) to ``root``'s history in one write.

    The caller holds the store's writer lock. Never follows a symlink; a
    last line left without its newline (a crash mid-append) is closed first.
    Not fsynced: the history is a record of what was measured, not a part
    of any version, and an fsync per save cost 1.5 ms of a 4 ms save of
    1 MiB; a power loss may take its newest entries, never a version.

    Raises:
        OSError: the file system failed (the store's versions are unaffected).
    """
    lines = b"".join(
        json.dumps(r, separators=(",", ":"), allow_nan=False).encode() + b"\n" for r in records
    )
    if not lines:
        return
    path = os.path.join(root, HISTORY_FILE)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with contextlib.suppress(OSError):
                rfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if os.pread(rfd, 1, size - 1) != b"\n":
                        lines = b"\n" + lines
                finally:
                    os.close(rfd)
        view = memoryview(lines)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
