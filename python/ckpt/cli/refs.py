"""What STORE and VERSION arguments mean, and which metric "best" uses.

VERSION, everywhere a command takes one:

* an id (``7``), ``latest``, or ``step=N`` (the newest version saved at step N),
  all resolved by :meth:`ckpt.Store.resolve`;
* ``best``: the best version by the metric the :class:`~ckpt.CheckpointManager`
  recorded (its ``monitor`` and ``mode``), or by ``--metric``/``--mode``;
* ``best:METRIC`` and ``best:METRIC:max`` name the metric (and mode) inline.

The metric of ``best`` (and of ``ls``, ``best``, ``gc``, ``plot``): ``--metric``
when given, else the manager's recorded monitor. The mode: ``--mode`` when
given, else the recorded mode if the metric is the recorded monitor, else
``min``.
"""

from __future__ import annotations

import argparse
import errno
import os
from dataclasses import dataclass
from typing import Any

from ..errors import StoreNotFoundError
from ..index import Version
from ..retention import best_of
from ..store import Store
from .errors import EXIT_USAGE, CliError

__all__ = [
    "Monitor",
    "add_metric_options",
    "best_version",
    "monitor_of",
    "not_a_store",
    "open_store",
    "resolve",
]


def open_store(path: str) -> Store:
    """Opens an existing store (never creates one, nor anything else at ``path``).

    Every command but ``import`` opens its STORE through here, so that a
    mistyped path is refused, naming the path and what is there instead.

    Raises:
        StoreNotFoundError: ``path`` is not a store.
        FormatError: a store of a newer or unknown format.
    """
    try:
        return Store(path, create=False)
    except StoreNotFoundError as exc:
        raise StoreNotFoundError(errno.ENOENT, not_a_store(path), path) from exc


def not_a_store(path: str) -> str:
    """Why ``path`` is not a store, and what to do: one line for ``ckpt: error:``."""
    if not os.path.lexists(path):
        what = "no such directory"
    elif not os.path.isdir(path):
        what = "a file, not a directory"
    else:
        try:
            empty = not os.listdir(path)
        except OSError:
            empty = False
        what = "an empty directory" if empty else "no ckpt-store.json in it"
    return f"{path} is not a ckpt store ({what}); check the path"


def add_metric_options(p: argparse.ArgumentParser, what: str = "best") -> None:
    """``--metric`` and ``--mode``, which define what "best" means."""
    p.add_argument(
        "--metric",
        metavar="NAME",
        help=f"metric that defines {what} (default: the monitor the manager recorded)",
    )
    p.add_argument(
        "--mode",
        choices=("min", "max"),
        help="whether lower or higher is better (default: as recorded, else min)",
    )


@dataclass(frozen=True)
class Monitor:
    """The metric that defines "best", and whether lower or higher is better."""

    metric: str | None
    mode: str

    def describe(self) -> str:
        return f"{self.metric} ({self.mode})" if self.metric else "no metric"


def monitor_of(
    store: Store, metric: str | None, mode: str | None, latest: Version | None = None
) -> Monitor:
    """The metric and mode of "best": explicit options first, then what the manager recorded."""
    manager: dict[str, Any] = {}
    latest = latest if latest is not None else store.latest()
    if latest is not None and isinstance(latest.trainer.get("manager"), dict):
        manager = latest.trainer["manager"]
    recorded_metric = manager.get("monitor") if isinstance(manager.get("monitor"), str) else None
    recorded_mode = str(manager["mode"]) if manager.get("mode") in ("min", "max") else "min"
    chosen = metric if metric is not None else recorded_metric
    if mode is None:
        mode = recorded_mode if chosen is not None and chosen == recorded_metric else "min"
    return Monitor(chosen, mode)


def best_version(versions: list[Version], monitor: Monitor) -> Version | None:
    """The best version (NaN ignored, ties to the earliest), as :meth:`Store.best` decides."""
    return best_of(versions, monitor.metric, monitor.mode)


_FORMS = "an id, latest, best, best:METRIC[:min|max] or step=N"


def resolve(
    store: Store,
    ref: str,
    metric: str | None = None,
    mode: str | None = None,
    versions: list[Version] | None = None,
) -> Version:
    """The version a VERSION argument names.

    Raises:
        VersionNotFoundError: no such version (or no version has the metric).
        CliError: ``ref`` is not one of the accepted forms, or ``best`` has no metric.
    """
    from ..errors import VersionNotFoundError

    text = ref.strip()
    versions = versions if versions is not None else store.versions()
    if text == "best" or text.startswith("best:"):
        parts = text.split(":")
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("min", "max")):
            raise CliError(
                f"bad version {ref!r}: use best:METRIC or best:METRIC:min|max", EXIT_USAGE
            )
        if len(parts) >= 2:
            metric = parts[1] or None
        if len(parts) == 3:
            mode = parts[2]
        monitor = monitor_of(store, metric, mode, versions[-1] if versions else None)
        if monitor.metric is None:
            raise CliError(
                "'best' needs a metric: the store records no monitor; pass --metric NAME"
                " or write best:NAME",
                EXIT_USAGE,
            )
        found = best_version(versions, monitor)
        if found is None:
            raise VersionNotFoundError(
                f"no version of {store.root} has the metric {monitor.metric!r}"
            )
        return found
    if text == "latest":
        if not versions:
            raise VersionNotFoundError(f"{store.root} has no versions yet")
        return versions[-1]
    if text.startswith("step="):
        digits = text[5:]
        if not (digits.isascii() and digits.isdigit()):
            raise CliError(f"bad version {ref!r}: step=N needs a non-negative integer", EXIT_USAGE)
    elif not (text.isascii() and text.isdigit()):
        raise CliError(f"unknown version {ref!r}: use {_FORMS}", EXIT_USAGE)
    vid = store.resolve(text)
    for v in versions:
        if v.id == vid:
            return v
    raise VersionNotFoundError(f"version {vid} is not in {store.root}")
