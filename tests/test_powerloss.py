"""Power loss: only what was fsynced survives (SQLite's test6.c idea, one layer down).

tests/powerloss_shim.c, preloaded into a writer process, records every
create, fsync (with the file's content at that moment), rename, unlink and
mkdir under the test's directory. tests/powerloss.py replays the record and
builds, after each step that changes what is durable, the state a power
loss at that moment could leave: file contents as of their last fsync,
directory entries only once their directory was fsynced. Each such state is
reopened and checked like a crash (crashcheck.check_store), and every
version whose save had returned before the power failed must be there.

A missing file or directory fsync anywhere in the commit protocol makes a
committed version vanish at some cut; the last tests prove it with writers
sabotaged to skip one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from crashcheck import CHUNKS, check_store, committed_after, record, tree_for
from powerloss import Disk, read_log

import ckpt

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shim") / "powerloss_shim.so"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(HERE / "powerloss_shim.c"), "-ldl"],
        check=True,
    )
    return out


class Recording:
    """A directory whose changes the shim records, holding a store and the writer's marks."""

    def __init__(self, base: Path, shim: Path) -> None:
        self.top = Path(os.path.realpath(base)) / "top"
        self.store = self.top / "store"
        self.marks = self.top / "marks"
        self.log = base / "log"
        self.blobs = base / "blobs"
        self.shim = shim
        self.marks.mkdir(parents=True)
        for run in range(4):  # one marks directory per writer run, made before recording
            (self.marks / f"run{run}").mkdir()
        self.blobs.mkdir()
        self.runs = 0
        self.disk: Disk | None = None

    def start(self) -> None:
        """Everything written so far counts as durable."""
        self.disk = Disk(self.top, self.marks)

    def run(self, ops: list[str], fault: str | None = None, broken: str | None = None) -> int:
        if self.disk is None:
            self.start()
        marks = self.marks / f"run{self.runs}"
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
        env.update(
            LD_PRELOAD=str(self.shim),
            PLSIM_ROOT=str(self.top),
            PLSIM_LOG=str(self.log),
            PLSIM_BLOBS=str(self.blobs),
            CKPT_MARKS=str(marks),
        )
        if fault:
            env["CKPT_FAULT"] = fault
        if broken:
            env["CKPT_TEST_BROKEN"] = broken
        child = subprocess.run(
            [sys.executable, str(HERE / "crash_child.py"), str(self.store), *ops],
            env=env,
            timeout=120,
            check=False,
        )
        return child.returncode


def prepare(base: Path, shim: Path, before: list[int]) -> Recording:
    rec = Recording(base, shim)
    if before:
        store = ckpt.Store(rec.store, **CHUNKS)
        for k in before:
            store.save(tree_for(k), step=k)
    rec.start()
    return rec


def check_every_cut(rec: Recording, ops: list[str], before: list[int], work: Path) -> int:
    """Checks the state after a power loss at every moment; returns how many moments.

    ``ops`` are the ops that returned, in order (each made a mark): a power
    loss after the i-th mark keeps the versions of the first i ops and may
    or may not keep the effect of the next one.
    """
    assert rec.disk is not None
    log = read_log(rec.log)
    saved = {}
    for i in range(len(ops) + 1):
        for vid in committed_after(ops[:i], before):
            saved.setdefault(vid, vid if vid in before else _tree_of(ops, before, vid))
    cuts = 0
    for cut in rec.disk.states(log):
        done = len(cut.marks)
        now, then = committed_after(ops[:done], before), committed_after(ops[: done + 1], before)
        state = work / "state"
        rec.disk.materialize(state)
        try:
            if (state / "store").exists():
                check_store(state / "store", {v: saved[v] for v in now | then}, now & then)
            else:
                assert not now, f"the whole store is gone although versions {now} were committed"
        except Exception as exc:
            raise AssertionError(
                f"power loss after record {cut.index}/{len(log)}: {type(exc).__name__}: {exc}"
            ) from exc
        cuts += 1
    return cuts


def _tree_of(ops: list[str], before: list[int], vid: int) -> int:
    """The tree k saved as version ``vid`` by ``ops``."""
    next_id = max(before, default=0) + 1
    for op in ops:
        name, _, arg = op.partition(":")
        if name == "save":
            if next_id == vid:
                return int(arg)
            next_id += 1
    raise KeyError(vid)


SCENARIOS = {
    # name: (versions saved before, [(child ops, fault)], the ops that return)
    "save": ([1, 2], [(["save:3", "save:4"], None)], ["save:3", "save:4"]),
    "create": ([], [(["save:1", "save:2"], None)], ["save:1", "save:2"]),
    "delete-gc-retain": (
        [1, 2, 3],
        [(["delete:2", "gc", "retain:1", "save:4", "delete:4", "save:5"], None)],
        ["delete:2", "gc", "retain:1", "save:4", "delete:4", "save:5"],
    ),
    "pin": ([1, 2], [(["pin:1", "unpin:1", "pin:2"], None)], ["pin:1", "unpin:1", "pin:2"]),
    # A writer killed after renaming its chunks but before fsyncing their
    # directories, then a second writer that saves the same data: it
    # deduplicates against those chunks, so it must make them durable first.
    "crash-then-dedup": (
        [1, 2],
        [(["save:3"], "objects.before_dir_fsync:1:kill"), (["save:3"], None)],
        ["save:3"],
    ),
    "crash-in-gc": (
        [1, 2, 3],
        [(["delete:2", "gc"], "gc.before_dir_fsync:1:kill"), (["save:2"], None)],
        ["delete:2", "save:2"],
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_power_loss_at_any_moment_keeps_every_committed_version(
    scenario: str, shim: Path, tmp_path: Path
) -> None:
    before, runs, returned = SCENARIOS[scenario]
    rec = prepare(tmp_path, shim, before)
    for ops, fault in runs:
        code = rec.run(ops, fault)
        assert code == (-9 if fault else 0), (ops, fault, code)
    cuts = check_every_cut(rec, returned, before, tmp_path / "work")
    assert cuts > 5
    record("test_a_power_loss_at_any_moment_keeps_every_committed_version", scenario, cuts)


@pytest.mark.parametrize("broken", ["no-dir-fsync", "no-file-fsync"])
def test_the_simulation_catches_a_missing_fsync(broken: str, shim: Path, tmp_path: Path) -> None:
    """A commit that skips the directory (or file) fsync loses a committed version
    at some moment: the checker must say so."""
    rec = prepare(tmp_path, shim, [1, 2])
    assert rec.run(["save:3"], broken=broken) == 0
    with pytest.raises(AssertionError, match="power loss after record") as info:
        check_every_cut(rec, ["save:3"], [1, 2], tmp_path / "work")
    assert "committed versions lost" in str(info.value) or "not a" in str(info.value)


def test_the_shim_records_rust_and_python_file_operations(shim: Path, tmp_path: Path) -> None:
    rec = prepare(tmp_path, shim, [1])
    assert rec.run(["save:2", "gc"]) == 0
    kinds = {r[0] for r in read_log(rec.log)}
    assert {"C", "F", "D", "R", "M"} <= kinds  # chunks (Rust) and manifests (Rust), marks (Python)
    paths = "\n".join(r[-1] for r in read_log(rec.log))
    assert "/objects/" in paths and "/versions/" in paths and "/tmp/" in paths
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
