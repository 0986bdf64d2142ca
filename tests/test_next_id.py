"""Choosing the next version id: cheap at many versions, never a reused id.

A writer remembers the newest id it saw in ``versions/`` (with a stamp of the
directory and of the listing cache) and lists ``versions/`` again only when
something changed. These tests change the store behind its back in every way
a writer can, and check that ids keep increasing and that no manifest is ever
overwritten.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import index as index_module


def tiny(i: int) -> dict[str, object]:
    return {"w": np.full(4, i, np.float32), "i": i}


def save(store: ckpt.Store, i: int) -> ckpt.Version:
    return store.save(tiny(i), step=i)


def manifests(root: str) -> dict[int, bytes]:
    out = {}
    for p in Path(root, "versions").iterdir():
        vid = index_module.version_id_of(p.name)
        if vid is not None:
            out[vid] = p.read_bytes()
    return out


def listed_steps(store: ckpt.Store) -> dict[int, int | None]:
    return {v.id: v.step for v in ckpt.Store(store.root).versions()}


OTHER_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ckpt
    from ckpt import index

    root, steps, delete, append = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    if append == "no":  # a writer whose cache append failed and could not remove the cache
        index.ListingCache.append = lambda self, version: None
    store = ckpt.Store(root, durable=False)
    ids = [store.save({"w": np.full(4, int(s), np.float32)}, step=int(s)).id
           for s in steps.split(",")]
    for vid in filter(None, delete.split(",")):
        store.delete(int(vid))
    print(",".join(map(str, ids)))
    """
)


def other_process(
    root: str, steps: list[int], delete: tuple[int, ...] = (), append: bool = True
) -> list[int]:
    """Saves ``steps`` (then deletes ``delete``) in a real separate process; its ids."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            OTHER_PROCESS,
            root,
            ",".join(map(str, steps)),
            ",".join(map(str, delete)),
            "yes" if append else "no",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [int(x) for x in out.stdout.strip().split(",")]


def test_ids_increase_within_one_store_object_and_across_reopen(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s", durable=False)
    assert [save(s, i).id for i in range(3)] == [1, 2, 3]
    assert save(s, 3).parent == 3
    s.close()
    again = ckpt.Store(tmp_path / "s", durable=False)
    v = save(again, 4)
    assert (v.id, v.parent) == (5, 4)


def test_ids_are_not_reused_after_deleting_the_newest_version(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s", durable=False)
    for i in range(3):
        save(s, i)
    s.delete(3)
    v = save(s, 3)  # the same object, which remembered the newest id
    assert (v.id, v.parent) == (4, 2)
    s.delete(4)
    s.delete(2)  # not the newest: no last-id change, but id 4 stays taken
    v = ckpt.Store(s.root, durable=False).save(tiny(9))  # a fresh object lists versions/
    assert (v.id, v.parent) == (5, 1)
    assert Path(s.root, "last-id").read_text() == "4\n"


def test_the_newest_version_deleted_by_another_writer_is_noticed(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s", durable=False)
    for i in range(3):
        save(s, i)
    ckpt.Store(s.root).delete(3)  # behind s's back
    v = save(s, 3)
    assert (v.id, v.parent) == (4, 2)  # not 3 again, and the parent exists


def test_versions_saved_by_another_process_meanwhile(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s", durable=False)
    save(s, 0)
    save(s, 1)
    # the other process saves 3 and 4, then retention-like deletes 3: a gap above
    # the id that s remembers, which probing for the next free name would fall into
    assert other_process(s.root, [2, 3]) == [3, 4]
    ckpt.Store(s.root).delete(3)
    v = save(s, 4)
    assert (v.id, v.parent) == (5, 4)
    assert other_process(s.root, [5, 6], delete=(7,)) == [6, 7]  # the newest: last-id
    v = save(s, 7)
    assert (v.id, v.parent) == (8, 6)
    assert sorted(manifests(s.root)) == [1, 2, 4, 5, 6, 8]
    assert listed_steps(s) == {1: 0, 2: 1, 4: 3, 5: 4, 6: 5, 8: 7}


def test_another_process_that_leaves_no_line_in_the_cache(tmp_path: Path) -> None:
    """The worst writer: its commit leaves the cache as it was (the directory's
    stamp notices it)."""
    s = ckpt.Store(tmp_path / "s", durable=False)
    save(s, 0)
    assert other_process(s.root, [1, 2], append=False) == [2, 3]
    ckpt.Store(s.root).delete(2)
    v = save(s, 3)
    assert (v.id, v.parent) == (4, 3)


def test_a_deleted_cache_file(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s", durable=False)
    save(s, 0)
    cache = Path(s.root, "cache", "versions.jsonl")
    cache.unlink()
    assert save(s, 1).id == 2
    cache.unlink()
    assert other_process(s.root, [2, 3]) == [3, 4]  # recreates the cache with 2 lines
    ckpt.Store(s.root).delete(3)
    assert (save(s, 4).id, len(cache.read_text().splitlines())) == (5, 3)
    assert listed_steps(s) == {1: 0, 2: 1, 4: 3, 5: 4}


@pytest.mark.parametrize(
    "damage",
    [
        b"garbage\n",
        b'{"id": 1}\n{"id": 99}\n',
        b"",
        b'{"id":' + b"9" * 5000 + b"}\n",
    ],
)
def test_a_corrupted_cache_file(tmp_path: Path, damage: bytes) -> None:
    s = ckpt.Store(tmp_path / "s", durable=False)
    for i in range(3):
        save(s, i)
    cache = Path(s.root, "cache", "versions.jsonl")
    cache.write_bytes(damage)
    assert other_process(s.root, [3, 4]) == [4, 5]
    ckpt.Store(s.root).delete(4)
    cache.write_bytes(damage)  # what the cache says never decides the id
    v = save(s, 5)
    assert (v.id, v.parent) == (6, 5)
    assert listed_steps(s) == {1: 0, 2: 1, 3: 2, 5: 4, 6: 5}


def test_a_failed_cache_append_removes_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other writers watch the cache's size to notice a commit; a writer that
    cannot append its line removes the cache instead (readers rebuild it)."""
    s = ckpt.Store(tmp_path / "s", durable=False)
    other = ckpt.Store(s.root, durable=False)
    save(s, 0)
    save(other, 1)  # other remembers id 2

    def failing(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(index_module.os, "write", failing)
    assert save(s, 2).id == 3
    monkeypatch.undo()
    assert not Path(s.root, "cache", "versions.jsonl").exists()
    assert save(other, 3).id == 4
    assert listed_steps(s) == {1: 0, 2: 1, 3: 2, 4: 3}


def test_a_stale_memory_never_overwrites_a_manifest(tmp_path: Path) -> None:
    """Even when what the writer remembers is wrong (here: forged), the id it
    picks never names an existing manifest: no commit can clash."""
    s = ckpt.Store(tmp_path / "s", durable=False)
    for i in range(3):
        save(s, i)
    before = manifests(s.root)
    cache = s._cache
    cache._known = (1, cache._stamp() or ())  # forged: "the newest is 1"
    v = save(s, 3)
    assert (v.id, v.parent) == (4, 3)
    after = manifests(s.root)
    assert {k: after[k] for k in before} == before  # no manifest rewritten
    assert sorted(after) == [1, 2, 3, 4]


def test_a_manifest_that_appears_under_the_lock_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a program that ignores the store lock can make a fresh listing's id
    taken; then nothing is saved and nothing is overwritten."""
    s = ckpt.Store(tmp_path / "s", durable=False)
    save(s, 0)
    planted = Path(s.root, "versions", "000000000002.json")
    real_committed = index_module.ListingCache.committed_ids

    def stale_listing(self: index_module.ListingCache) -> set[int]:
        ids = real_committed(self)
        if not planted.exists():
            planted.write_bytes(b"{}")  # "written by another program" right after the listing
        return ids - {2}

    s._cache.forget()
    monkeypatch.setattr(index_module.ListingCache, "committed_ids", stale_listing)
    with pytest.raises(ckpt.StoreLockedError, match="without ckpt's lock"):
        save(s, 1)
    monkeypatch.undo()
    assert planted.read_bytes() == b"{}"
    assert sorted(manifests(s.root)) == [1, 2]


def test_two_processes_saving_at_once_get_distinct_increasing_ids(tmp_path: Path) -> None:
    root = tmp_path / "s"
    ckpt.Store(root, durable=False)
    child = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, str(root), ",".join(map(str, range(100, 160))), ""]
        + ["yes"],
        stdout=subprocess.PIPE,
        text=True,
    )
    s = ckpt.Store(root, durable=False)
    mine = [save(s, i).id for i in range(60)]
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    theirs = [int(x) for x in out.strip().split(",")]
    assert mine == sorted(mine) and theirs == sorted(theirs)
    assert len(set(mine) | set(theirs)) == 120
    assert sorted(manifests(str(root))) == list(range(1, 121))
    steps = listed_steps(s)
    assert sorted(steps[i] for i in mine) == list(range(60))
    assert sorted(steps[i] for i in theirs) == list(range(100, 160))
    parents = {v.id: v.parent for v in s.versions()}
    assert all(parents[i] == i - 1 for i in range(2, 121))  # no writer missed a version


def test_retention_and_overwrite_keep_the_remembered_id_right(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(
        str(tmp_path / "run"), keep=ckpt.Keep(last=2), overwrite=True, durable=False
    ) as mgr:
        for step in range(6):
            mgr.save(step, tiny(step))
        mgr.save(5, tiny(50), force=True)  # replaces step 5's version (deleted after the commit)
        mgr.save(6, tiny(6))
    store = ckpt.Store(tmp_path / "run")
    assert [(v.id, v.step) for v in store.versions()] == [(7, 5), (8, 6)]
    assert store.load(7)["i"] == 50
