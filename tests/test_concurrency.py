"""Several processes on one store: writers serialise, readers never block or see half a version.

Writers (save, delete, gc, retention, pin) hold an flock on STORE/lock; the
lock dies with its process, so a killed writer leaves no stale lock (there is
nothing to time out or take over) and the next writer recovers its debris.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from crashcheck import CHUNKS, Children, check_store, tree_for
from treecmp import assert_same

import ckpt

HERE = Path(__file__).parent
CHILD = HERE / "crash_child.py"


def writer(root: Path, ops: list[str], marks: Path) -> subprocess.Popen[bytes]:
    marks.mkdir()
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(root), *ops],
        env={**os.environ, "CKPT_MARKS": str(marks)},
        stderr=subprocess.PIPE,
    )


def ids_of(marks: Path) -> list[int]:
    """The version ids a crash_child saved, from its marks (``<i>-save-id<V>``)."""
    return [int(m.name.rsplit("-id", 1)[1]) for m in marks.iterdir()]


READER = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[2])
    import ckpt
    from crashcheck import CHUNKS, tree_for
    from treecmp import assert_same

    import ckpt.adapters.numpy  # imports numpy and ml_dtypes (~1 s here) before the clock runs

    store = ckpt.Store(sys.argv[1], **CHUNKS)
    deadline, seen, loads, slowest = time.monotonic() + float(sys.argv[3]), set(), 0, 0.0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        versions = store.versions()
        if versions:
            v = versions[len(seen) % len(versions)]
            try:
                assert_same(store.load(v), tree_for(v.step))  # complete, bit-exact
            except ckpt.VersionNotFoundError:
                pass  # deleted by retention meanwhile: never half a version
            loads += 1
            seen.add(v.id)
        slowest = max(slowest, time.monotonic() - t0)
    print(json.dumps({"seen": len(seen), "loads": loads, "slowest": slowest}))
    """
)


def reader(root: Path, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(root), str(HERE), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_concurrent_writers_all_commit_with_distinct_ids_while_readers_read(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    ckpt.Store(root, **CHUNKS).save(tree_for(1), step=1)
    reading = reader(root, 2.0)
    writers = [
        writer(root, [f"save:{k}" for k in range(base, base + 8)], tmp_path / f"marks{i}")
        for i, base in enumerate((10, 30, 50))
    ]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    out, _ = reading.communicate(timeout=120)
    assert reading.returncode == 0
    got = [ids_of(tmp_path / f"marks{i}") for i in range(3)]
    all_ids = [vid for g in got for vid in g]
    assert len(all_ids) == len(set(all_ids)) == 24  # distinct ids, nothing lost
    store = ckpt.Store(root, **CHUNKS)
    assert [v.id for v in store.versions()] == list(range(1, 26))
    for v in store.versions():  # each one holds exactly what its writer saved
        assert_same(store.load(v), tree_for(v.step))
    steps = {v.id: v.step for v in store.versions()}
    for g, base in zip(got, (10, 30, 50), strict=True):
        assert sorted(steps[vid] for vid in g) == list(range(base, base + 8))
    assert all(r.ok for r in store.verify())
    stats = json.loads(out)
    assert stats["loads"] > 10 and stats["seen"] > 3, stats


def test_gc_and_retention_beside_saves_never_delete_a_needed_chunk(tmp_path: Path) -> None:
    """One process saves (deduplicating against old chunks) while another collects
    garbage and applies retention in a loop: every version that stays loads."""
    root = tmp_path / "store"
    ckpt.Store(root, **CHUNKS).save(tree_for(1), step=1)
    saving = writer(root, [f"save:{k}" for k in range(2, 40)], tmp_path / "m1")
    collecting = writer(root, ["gc", "retain:4"] * 40, tmp_path / "m2")
    reading = reader(root, 2.0)
    for p in (saving, collecting):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    out, _ = reading.communicate(timeout=120)
    assert reading.returncode == 0, out
    store = ckpt.Store(root, **CHUNKS)
    for v in store.versions():
        assert_same(store.load(v), tree_for(v.step))
    assert all(r.ok for r in store.verify())
    assert store.versions()[-1].step == 39


def test_readers_do_not_wait_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ckpt.Store(root, **CHUNKS)
    store.save(tree_for(1), step=1)
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        other = ckpt.Store(root, **CHUNKS)
        with other._writer():
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        t0 = time.monotonic()
        assert [v.id for v in store.versions()] == [1]
        assert_same(store.load(1), tree_for(1))
        assert store.verify()[0].ok
        assert time.monotonic() - t0 < 5.0  # nobody waited for the lock (held 10 s)
        with pytest.raises(ckpt.StoreLockedError, match="locked by another writer"):
            ckpt.Store(root, lock_timeout=0.2).save(tree_for(2))
    finally:
        release.set()
        t.join()
    assert ckpt.Store(root, **CHUNKS).save(tree_for(2), step=2).id == 2


def test_threads_of_one_process_share_a_store_safely(tmp_path: Path) -> None:
    root = tmp_path / "store"
    shared = ckpt.Store(root, **CHUNKS)
    errors: list[BaseException] = []

    def work(base: int, store: ckpt.Store) -> None:
        try:
            for k in range(base, base + 5):
                store.save(tree_for(k), step=k)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(10, shared))]
    threads += [threading.Thread(target=work, args=(20, shared))]
    threads += [threading.Thread(target=work, args=(30, ckpt.Store(root, **CHUNKS)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = ckpt.Store(root).versions()
    assert sorted(v.step for v in versions) == [*range(10, 15), *range(20, 25), *range(30, 35)]
    assert [v.id for v in versions] == list(range(1, 16))


def test_a_killed_writer_leaves_no_stale_lock_and_the_next_one_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    store = ckpt.Store(root, **CHUNKS)
    store.save(tree_for(1), step=1)
    children = Children()
    try:
        # dies holding the lock, after renaming chunks, before fsyncing their directories
        result = children.run(root, ["save:2"], fault="objects.before_dir_fsync:1:kill")
    finally:
        children.close()
    assert result.returncode == -signal.SIGKILL
    holder = Path(root, "lock").read_text()
    assert holder.startswith("pid ") and f" on {os.uname().nodename}" in holder  # a dead pid
    pid = int(holder.split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    recovered = []
    real = ckpt.Store._recover
    monkeypatch.setattr(ckpt.Store, "_recover", lambda self: recovered.append(real(self)))
    # a lock still held would raise StoreLockedError after 0.5 s: the flock died with
    # its process (no wall-clock bound on the save itself, which a loaded machine slows)
    v = ckpt.Store(root, lock_timeout=0.5, **CHUNKS).save(tree_for(2), step=2)
    assert recovered == [None]  # the unclean holder line made it fsync the store first
    assert Path(root, "lock").read_text() == ""  # a clean release leaves no holder
    assert not list(Path(root, "tmp").iterdir())
    check_store(root, {1: 1, 2: 2}, {1, 2})
    assert v.id == 2
    # a clean writer's successor does not recover again
    ckpt.Store(root, **CHUNKS).pin(1)
    assert recovered == [None]


def test_a_writer_that_failed_leaves_its_line_so_the_next_one_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ckpt.Store(tmp_path / "store", **CHUNKS)
    store.save(tree_for(1), step=1)
    recovered = []
    real = ckpt.Store._recover
    monkeypatch.setattr(ckpt.Store, "_recover", lambda self: recovered.append(real(self)))

    def failing(*args: object, **kw: object) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(ckpt.store._core, "save_chunks", failing)
        with pytest.raises(OSError, match="Input/output"):
            store.save(tree_for(2))
    assert Path(store.root, "lock").read_text().startswith(f"pid {os.getpid()} ")
    store.pin(1)  # the next writer finds the line and recovers first
    assert recovered == [None]
    with pytest.raises(ckpt.VersionPinnedError):
        store.delete(1)
    assert Path(store.root, "lock").read_text() == ""  # a refusal releases cleanly
    store.save(tree_for(2), step=2)
    assert recovered == [None]
