"""Damaged chunk files and manifests: flipped, truncated, zeroed, emptied, swapped.

Every damage is noticed on load (IntegrityError or FormatError naming the
version and, for chunks, the tensors), versions that do not use the damaged
file keep loading, verify reports exactly the damaged versions, gc never
deletes a damaged chunk that a version references (evidence), and
CheckpointManager.restore_latest(fallback=True) resumes from the newest
version that is intact.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from crashcheck import CHUNKS, record, tree_for
from treecmp import assert_same

import ckpt
from ckpt import _core

Damage = Callable[[bytes, random.Random], bytes]


def flip(data: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(len(data))
    return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]


DAMAGE: dict[str, Damage] = {
    "flip": flip,
    "truncate": lambda d, rng: d[: rng.randrange(len(d))],
    "zero": lambda d, rng: bytes(len(d)),
    "empty": lambda d, rng: b"",
    "append": lambda d, rng: d + b"\0",
}


@pytest.fixture
def store(tmp_path: Path) -> ckpt.Store:
    """Versions 1..3 of tree_for(k): "frozen" chunks shared by all, the rest their own."""
    s = ckpt.Store(tmp_path / "store", **CHUNKS)
    for k in (1, 2, 3):
        s.save(tree_for(k), step=k)
    return s


def chunk_path(store: ckpt.Store, cid: str) -> Path:
    return Path(store.root, "objects", cid[:2], cid[2:])


def users(store: ckpt.Store, cid: str) -> dict[int, set[str]]:
    """version -> paths of its tensors that use chunk ``cid``."""
    out: dict[int, set[str]] = {}
    for v in store.versions():
        m = store.manifest(v.id)
        idx = {i for i, c in enumerate(m["chunks"]) if c[0] == cid}
        paths = {t["path"] for t in m["tensors"] if any(s[0] in idx for s in t["spans"])}
        if paths:
            out[v.id] = paths
    return out


def check_damaged_chunk(store: ckpt.Store, cid: str) -> None:
    using = users(store, cid)
    for v in store.versions():
        if v.id not in using:
            assert_same(store.load(v.id), tree_for(v.step))
            continue
        with pytest.raises((ckpt.IntegrityError, ckpt.FormatError)) as info:
            store.load(v.id)
        message = str(info.value)
        assert f"version {v.id}: tensor " in message and cid in message, message
        assert any(repr(p) in message for p in using[v.id]), message
    report = {r.version: r for r in store.verify()}
    assert {vid for vid, r in report.items() if not r.ok} == set(using)
    for vid in using:
        (problem,) = report[vid].problems
        assert problem.chunk == cid and set(problem.tensors) == using[vid]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damaged_chunk_is_caught_and_named(store: ckpt.Store, damage: str) -> None:
    rng = random.Random(damage)
    objects = _core.list_objects(store.root)
    tries = 3 if damage in ("flip", "truncate") else 1
    for cid, _ in objects:
        path = chunk_path(store, cid)
        original = path.read_bytes()
        for _ in range(tries):
            damaged = DAMAGE[damage](original, rng)
            if damaged == original:
                continue
            path.write_bytes(damaged)
            check_damaged_chunk(store, cid)
            path.write_bytes(original)
    record("test_every_damaged_chunk_is_caught_and_named", damage, len(objects) * tries)
    assert all(r.ok for r in store.verify())


def test_every_header_bit_and_sampled_payload_bits_of_chunks(store: ckpt.Store) -> None:
    """Each bit of every chunk header, and 64 random payload bits of each chunk:
    the engine's verify finds every one (load goes through the same check)."""
    rng = random.Random(11)
    cases = 0
    raw_len = {c[0]: c[1] for v in store.versions() for c in store.manifest(v.id)["chunks"]}
    for cid, _ in _core.list_objects(store.root):
        path = chunk_path(store, cid)
        original = path.read_bytes()
        header = 24 + 16 * original[11]
        positions = [(p, b) for p in range(header) for b in range(8)]
        positions += [(rng.randrange(header, len(original)), rng.randrange(8)) for _ in range(64)]
        for pos, bit in positions:
            damaged = bytearray(original)
            damaged[pos] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            (problem,) = _core.verify_chunks(store.root, [(cid, raw_len[cid])])
            assert problem is not None and problem[0] in ("integrity", "format"), (pos, bit)
            cases += 1
        vid = min(users(store, cid))
        path.write_bytes(flip(original, rng))
        with pytest.raises((ckpt.IntegrityError, ckpt.FormatError), match=f"version {vid}"):
            store.load(vid)
        path.write_bytes(original)
    record("test_every_header_bit_and_sampled_payload_bits_of_chunks", "bit flips", cases)
    assert all(r.ok for r in store.verify())


def test_swapped_chunks_are_caught(store: ckpt.Store) -> None:
    objects = [cid for cid, _ in _core.list_objects(store.root)]
    for a, b in itertools.pairwise(objects):
        pa, pb = chunk_path(store, a), chunk_path(store, b)
        da, db = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(db)
        pb.write_bytes(da)
        damaged = set(users(store, a)) | set(users(store, b))
        for v in store.versions():
            if v.id in damaged:
                with pytest.raises(
                    (ckpt.IntegrityError, ckpt.FormatError), match=f"version {v.id}"
                ):
                    store.load(v.id)
            else:
                assert_same(store.load(v.id), tree_for(v.step))
        assert {r.version for r in store.verify() if not r.ok} == damaged
        pa.write_bytes(da)
        pb.write_bytes(db)
    record("test_swapped_chunks_are_caught", "swapped pairs", len(objects) - 1)


def test_every_single_byte_flip_of_a_manifest_is_caught(store: ckpt.Store) -> None:
    path = Path(store.root, "versions", "000000000002.json")
    original = path.read_bytes()
    for pos in range(len(original)):
        damaged = bytearray(original)
        damaged[pos] ^= 0x01 if pos % 2 else 0x20
        path.write_bytes(bytes(damaged))
        with pytest.raises(ckpt.FormatError, match="version 2"):
            store.load(2)
    path.write_bytes(original)
    record("test_every_single_byte_flip_of_a_manifest_is_caught", "flips", len(original))
    assert_same(store.load(2), tree_for(2))


@pytest.mark.parametrize("damage", ["truncate", "zero", "empty", "append", "swap"])
def test_damaged_manifests_are_caught_and_other_versions_stay(
    store: ckpt.Store, damage: str
) -> None:
    path = Path(store.root, "versions", "000000000002.json")
    objects = sorted(_core.list_objects(store.root))
    if damage == "swap":
        other = Path(store.root, "versions", "000000000003.json")
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
    else:
        path.write_bytes(DAMAGE[damage](path.read_bytes(), random.Random(2)))
    with pytest.raises(ckpt.FormatError, match="version 2"):
        store.load(2)
    assert_same(store.load(1), tree_for(1))
    report = {r.version: r for r in store.verify()}
    assert not report[2].ok and report[2].problems[0].kind == "format"
    assert report[1].ok
    with pytest.raises(ckpt.FormatError, match="gc stopped before deleting anything"):
        store.gc()
    assert sorted(_core.list_objects(store.root)) == objects


def test_gc_keeps_damaged_and_reports_missing_referenced_chunks(store: ckpt.Store) -> None:
    store.delete(2)
    m1 = store.manifest(1)
    damaged_id, missing_id = m1["chunks"][0][0], m1["chunks"][-1][0]
    damaged = chunk_path(store, damaged_id)
    evidence = flip(damaged.read_bytes(), random.Random(3))
    damaged.write_bytes(evidence)
    chunk_path(store, missing_id).unlink()
    result = store.gc()
    assert result.deleted_objects > 0  # version 2's own chunks went
    assert result.missing == (missing_id,)
    assert damaged.read_bytes() == evidence  # the damaged chunk stays, untouched
    report = {r.version: r for r in store.verify()}
    assert {p.chunk for p in report[1].problems} == {damaged_id, missing_id}


def test_restore_latest_falls_back_to_the_newest_intact_version(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root), **CHUNKS) as mgr:
        for step in range(4):
            mgr.save(step, {"w": np.full(50_000, step, np.float32), "step": step})
    store = ckpt.Store(root)
    own = {v.step: store.manifest(v.id)["chunks"][0][0] for v in store.versions()}
    chunk_path(store, own[3]).write_bytes(b"junk")  # the newest is damaged
    Path(store.root, "versions", "000000000003.json").write_bytes(b"{")  # and the one before

    with ckpt.CheckpointManager(str(root), **CHUNKS) as mgr:
        with pytest.raises(ckpt.FormatError):
            mgr.restore_latest()  # without fallback: the damage is an error
        with pytest.warns(RuntimeWarning, match=r"resuming from version 2 \(step 1\).*version 4"):
            state = mgr.restore_latest(fallback=True)
        assert state["step"] == 1 and mgr.next_step == 2
        mgr.save(2, {"w": np.full(50_000, 2, np.float32), "step": 2})  # its step is free again
        assert mgr.restore_latest()["step"] == 2
    assert not ckpt.Store(root).verify(4)[0].ok  # the damaged versions stay as evidence

    for cid in own.values():
        chunk_path(store, cid).write_bytes(b"junk")
    new = ckpt.Store(root).manifest(5)["chunks"][0][0]  # the version saved after the fallback
    chunk_path(store, new).write_bytes(b"junk")
    with (
        ckpt.CheckpointManager(str(root), **CHUNKS) as mgr,
        pytest.raises(ckpt.FormatError, match="version 5: tensor 'w'"),
    ):
        mgr.restore_latest(fallback=True)  # nothing intact: the newest one's error
