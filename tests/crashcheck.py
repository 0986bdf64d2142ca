"""What a store must look like after a crash, a power loss or a failed write.

Shared by the reliability tests (test_faults.py, test_powerloss.py,
test_concurrency.py) and their child processes (crash_child.py): the
deterministic trees the children save, and :func:`check_store`, the
invariants checked after every interruption.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from treecmp import assert_same

import ckpt
from ckpt import _core

__all__ = [
    "CHUNKS",
    "TOP_LEVEL",
    "Children",
    "Result",
    "check_store",
    "committed_after",
    "record",
    "referenced_objects",
    "tree_for",
]

#: Small chunks, so that a few hundred KiB make several chunk files.
CHUNKS = {"chunk_size": 64 * 1024, "small_threshold": 16 * 1024}

#: Every entry a store's root may hold.
TOP_LEVEL = {
    "ckpt-store.json",
    "objects",
    "versions",
    "pins",
    "tmp",
    "cache",
    "lock",
    "last-id",
    "history.jsonl",
}


def tree_for(k: int) -> dict[str, object]:
    """The state saved as "tree k": a part shared by every k (deduplicated
    across versions), a part of its own, a packed small tensor and scalars."""
    shared = np.random.default_rng(7).standard_normal(40_000).astype(np.float32)
    own = np.random.default_rng(1000 + k).standard_normal(20_000).astype(np.float32)
    return {
        "frozen": shared,  # 160 KiB: 3 chunks, written once
        "w": own,  # 80 KiB: 2 new chunks per version
        "bias": np.full(10, k, np.int64),  # packed with other small tensors
        "step": k,
        "name": f"tree {k}",
    }


def committed_after(ops: list[str], before: list[int]) -> set[int]:
    """The version ids after ``ops`` ran on a store holding ``before`` (a model of crash_child)."""
    ids, next_id = list(before), max(before, default=0) + 1
    for op in ops:
        name, _, arg = op.partition(":")
        if name == "save":
            ids.append(next_id)
            next_id += 1
        elif name == "delete":
            ids.remove(int(arg))
        elif name == "retain":
            ids = ids[-int(arg) :]
    return set(ids)


def record(test: str, what: str, count: int) -> None:
    """Appends how many cases a reliability test ran to $CKPT_TEST_COUNTS (a JSON-lines
    file), when set: docs/reliability.md reports these numbers."""
    path = os.environ.get("CKPT_TEST_COUNTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "count": count}) + "\n")


def referenced_objects(store: ckpt.Store) -> set[str]:
    return {c[0] for v in store.versions() for c in store.manifest(v.id)["chunks"]}


def check_store(
    root: str | os.PathLike[str],
    saved: Mapping[int, int],
    must_have: Iterable[int] = (),
    *,
    then_write: bool = True,
) -> list[int]:
    """Checks the invariants of a store after an interruption; returns its version ids.

    Args:
        root: the store.
        saved: every version id that may exist -> the k of the :func:`tree_for`
            it holds (versions the interrupted process may or may not have committed).
        must_have: ids that must exist (committed before the interruption).
        then_write: also check that the next writer sweeps the debris, saves,
            and that gc leaves exactly the referenced objects.

    The store opens; every version is one of ``saved`` and loads bit-exact;
    verify is clean; the root holds only the store's own entries.
    """
    store = ckpt.Store(root, **CHUNKS)
    ids = [v.id for v in store.versions()]
    assert set(must_have) <= set(ids), f"committed versions lost: have {ids}, need {must_have}"
    assert set(ids) <= set(saved), f"unexpected versions {ids} (expected some of {sorted(saved)})"
    for vid in ids:
        assert_same(store.load(vid), tree_for(saved[vid]))
    report = store.verify()
    assert all(r.ok for r in report), [r for r in report if not r.ok]
    extra = {p.name for p in Path(root).iterdir()} - TOP_LEVEL
    assert not extra, f"unexpected entries in the store root: {extra}"
    if then_write:
        v = store.save(tree_for(99), step=99)
        assert not list(Path(root, "tmp").iterdir()), "the next writer did not sweep tmp/"
        store.gc()
        assert {oid for oid, _ in _core.list_objects(store.root)} == referenced_objects(store)
        assert_same(store.load(v), tree_for(99))
        for vid in ids:
            assert_same(store.load(vid), tree_for(saved[vid]))
        store.delete(v)  # leave the store as the interruption left it, minus debris
        store.gc()
    return ids


@dataclass
class Result:
    """What a child run reports: its exit status (negative: killed by that signal),
    its stderr, and when it opened the store (``time.time()``)."""

    returncode: int
    stderr: str
    ready_at: float


class Children:
    """Runs crash_child.py ops in child processes forked from one server
    (``crash_child.py --serve``), so that a run costs its work, not the imports."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_FAULT")}
        env["OPENBLAS_NUM_THREADS"] = "1"  # no threads in the process that forks
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("crash_child.py")), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(
        self,
        root: str | os.PathLike[str],
        ops: list[str],
        fault: str | None = None,
        log: str | os.PathLike[str] | None = None,
        fsize: int | None = None,
        marks: str | os.PathLike[str] | None = None,
        kill_after: float | None = None,
        kill_after_marks: int = 0,
    ) -> Result:
        env = {}
        if fault:
            env["CKPT_FAULT"] = fault
        if log:
            env["CKPT_FAULT_LOG"] = str(log)
        if marks:
            env["CKPT_MARKS"] = str(marks)
        request = {
            "root": str(root),
            "ops": ops,
            "env": env,
            "fsize": fsize,
            "kill_after": kill_after,
            "kill_after_marks": kill_after_marks,
        }
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        assert answer, "the fork server died"
        return Result(**json.loads(answer))

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
        self._proc.stdout.close()
