"""Damage is detected on load and by verify, naming the version, tensor and chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import object_files

import ckpt


def saved(store: ckpt.Store) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    tree = {
        "big": rng.standard_normal(50_000).astype(np.float32),  # several chunks
        "small": np.arange(10, dtype=np.int64),  # a packed chunk
    }
    store.save(tree)
    store.save({"other": rng.standard_normal(40_000).astype(np.float32)})
    return tree


def chunk_path(store: ckpt.Store, chunk_id: str) -> Path:
    return Path(store.root, "objects", chunk_id[:2], chunk_id[2:])


@pytest.mark.parametrize("where", ["header", "payload-start", "payload-middle", "last-byte"])
def test_one_flipped_byte_in_any_object_is_detected(store: ckpt.Store, where: str) -> None:
    saved(store)
    m = store.manifest(1)
    for ci, (cid, _raw, _stored) in enumerate(m["chunks"]):
        path = chunk_path(store, cid)
        original = path.read_bytes()
        pos = {
            "header": 17,  # inside the raw length field
            "payload-start": 300 if len(original) > 400 else len(original) - 1,
            "payload-middle": len(original) // 2,
            "last-byte": len(original) - 1,
        }[where]
        damaged = bytearray(original)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        users = [t["path"] for t in m["tensors"] if any(s[0] == ci for s in t["spans"])]
        with pytest.raises((ckpt.IntegrityError, ckpt.FormatError)) as info:
            store.load(1)
        message = str(info.value)
        assert "version 1" in message and cid in message
        assert all(repr(u) in message for u in users)
        if isinstance(info.value, ckpt.IntegrityError):
            assert info.value.version == 1 and info.value.object == cid
            assert set(info.value.tensors) == set(users)
        report = {r.version: r for r in store.verify()}
        assert not report[1].ok and report[2].ok
        (problem,) = report[1].problems
        assert problem.chunk == cid and set(problem.tensors) == set(users)
        store.load(2)  # other versions stay readable
        path.write_bytes(original)
    assert all(r.ok for r in store.verify())


def test_missing_truncated_and_swapped_chunks(store: ckpt.Store) -> None:
    saved(store)
    m = store.manifest(1)
    a, b = m["chunks"][0][0], m["chunks"][1][0]
    pa, pb = chunk_path(store, a), chunk_path(store, b)
    da, db = pa.read_bytes(), pb.read_bytes()

    pa.write_bytes(da[: len(da) // 2])
    with pytest.raises(ckpt.IntegrityError, match=f"version 1: tensor 'big'.*{a}"):
        store.load(1)
    pa.write_bytes(db)  # a well-formed chunk under the wrong name
    with pytest.raises(ckpt.IntegrityError, match="content hashes to"):
        store.load(1)
    pa.unlink()
    with pytest.raises(ckpt.MissingObjectError, match=f"{a} is missing") as info:
        store.load(1)
    assert isinstance(info.value, ckpt.IntegrityError)
    (problem,) = store.verify(1)[0].problems
    assert problem.kind == "missing"
    pa.write_bytes(da)
    assert store.verify(1)[0].ok


def test_partial_restore_does_not_touch_damaged_chunks_it_does_not_need(store: ckpt.Store) -> None:
    tree = saved(store)
    m = store.manifest(1)
    big = next(t for t in m["tensors"] if t["path"] == "big")
    chunk_path(store, m["chunks"][big["spans"][0][0]][0]).write_bytes(b"junk")
    out = store.load(1, only="small")
    assert out["small"].tobytes() == tree["small"].tobytes()
    with pytest.raises(ckpt.FormatError, match="bad magic|shorter than a chunk header"):
        store.load(1)


def test_object_store_files_are_only_chunks(store: ckpt.Store) -> None:
    saved(store)
    for p in object_files(store.root):
        assert p.read_bytes()[:8] == b"CKPTCHNK"
        assert len(p.parent.name) == 2 and len(p.name) == 62


def test_a_zstd_plane_with_trailing_frames_is_refused(store: ckpt.Store) -> None:
    import struct

    store.save({"z": np.zeros(50_000, np.int64)})  # one zstd plane per chunk
    cid = store.manifest(1)["chunks"][0][0]
    path = chunk_path(store, cid)
    blob = bytearray(path.read_bytes())
    assert blob[10] == 0 and blob[24] == 1
    stored = struct.unpack_from("<Q", blob, 32)[0]
    extra = bytes(blob[40 : 40 + stored])  # the same frame again, appended to the plane
    struct.pack_into("<Q", blob, 32, stored + len(extra))
    path.write_bytes(bytes(blob) + extra)
    with pytest.raises(ckpt.IntegrityError, match="not exactly one zstd frame"):
        store.load(1)
