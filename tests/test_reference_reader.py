"""The independent reader of tests/reference_reader.py against stores written by ckpt.

Everything the reader knows comes from docs/format.md; these tests check that
what ckpt writes matches that document: the values round-trip bit-exact, every
chunk header field is as documented, every zstd plane decodes with the
``zstandard`` package, and the chunk table follows the planning rules.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import blake3
import ml_dtypes
import numpy as np
import pytest
import zstandard

import ckpt

HERE = Path(__file__).resolve().parent


import reference_reader as ref  # noqa: E402  (tests/ is on sys.path, as for conftest)
from conftest import set_packing  # noqa: E402
from treecmp import assert_same, to_native  # noqa: E402

CHUNK = 64 * 1024
SMALL = 16 * 1024


def small_store(root: Path) -> ckpt.Store:
    return ckpt.Store(root, chunk_size=CHUNK, small_threshold=SMALL)


# ------------------------------------------------------------------ trees
def varied_tree(seed: int = 0) -> dict[Any, Any]:
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((150, 130)) * 0.02).astype(np.float32)  # 78000 B: 2 chunks
    return {
        "model": {
            "w": weights,
            "w64": rng.standard_normal(20_000),  # 160000 B: 3 chunks of F64
            "half": rng.standard_normal(40_000).astype(np.float16),  # 80000 B
            "bf16": rng.standard_normal((300, 100)).astype(ml_dtypes.bfloat16),  # 60000 B
            "bias": rng.standard_normal(33).astype(np.float32),  # packed
            "cplx": (rng.standard_normal(12) + 1j * rng.standard_normal(12)).astype(np.complex64),
            "cplx128": rng.standard_normal(9) + 1j * rng.standard_normal(9),
            "f8": rng.standard_normal(40).astype(ml_dtypes.float8_e4m3fn),
            "big_endian": np.arange(7, dtype=">i4"),
            "transposed": np.arange(12, dtype=np.int16).reshape(3, 4).T,
        },
        "ints": {
            "i8": np.arange(-5, 5, dtype=np.int8),
            "u16": np.arange(100, dtype=np.uint16),
            "i32": rng.integers(-1000, 1000, size=25, dtype=np.int32),
            "u64": np.array([0, 1, 2**64 - 1], dtype=np.uint64),
            "i64": rng.integers(0, 2**40, size=(4, 5), dtype=np.int64),
            "ramp": np.arange(30_000, dtype=np.int32),  # 120000 B, group 1: filter none
        },
        "mask": rng.random(50) > 0.5,
        "zero_d": np.array(3.25),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "empty_bf16": np.zeros((2, 0), dtype=ml_dtypes.bfloat16),
        "scalars": (np.float32(1.5), np.int64(-7), np.bool_(True), np.float16(np.inf)),
        7: [1, 2.5, None, True, "text ~/ é", -(2**70)],
        -3: {0: np.float64(np.nan), "nested": ([np.ones(3)], (np.zeros(2, np.uint8),))},
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-310, 0.1],
        "a/b~c": np.array([1, 2], dtype=np.int16),
        "empty_containers": {"d": {}, "l": [], "t": ()},
    }


# ------------------------------------------------------------------ round trips
def test_reference_reader_restores_a_varied_tree_bit_exact(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    tree = varied_tree()
    v = store.save(tree, step=3, epoch=1, metrics={"loss": 0.25, "bad": float("nan")})
    got, manifest = ref.read_version(store.root, v.id)
    assert_same(got, to_native(tree))
    assert_same(got, store.load(v.id))
    assert manifest["id"] == v.id and manifest["step"] == 3 and manifest["epoch"] == 1
    assert manifest["metrics"] == {"loss": 0.25, "bad": "nan"}
    # multi-chunk and packed tensors are both present
    spans = {t["path"]: t["spans"] for t in manifest["tensors"]}
    assert len(spans["model/w"]) == 2 and len(spans["model/w64"]) == 3
    assert len(spans["ints/ramp"]) == 2
    assert spans["empty"] == [] and spans["empty_bf16"] == []
    packed = [
        c
        for c in range(len(manifest["chunks"]))
        if sum(s[0] == c for sp in spans.values() for s in sp) > 1
    ]
    assert packed, "expected at least one chunk shared by several small tensors"
    # escaped leaf paths (section 7.4)
    assert "a~1b~0c" in spans
    assert "-3/nested/0/0" in spans
    # scalar flags
    flags = {t["path"]: t.get("scalar", False) for t in manifest["tensors"]}
    assert flags["scalars/0"] is True and flags["zero_d"] is False


def test_scalars_come_back_as_numpy_scalars(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    tree = {
        "a": np.float32(2.5),
        "b": np.array(2.5, dtype=np.float32),
        "c": ml_dtypes.bfloat16(1.5),
    }
    v = store.save(tree)
    got, _ = ref.read_version(store.root, v.id)
    assert isinstance(got["a"], np.float32) and not isinstance(got["a"], np.ndarray)
    assert isinstance(got["b"], np.ndarray) and got["b"].shape == ()
    assert got["c"].dtype == ml_dtypes.bfloat16 and np.ndim(got["c"]) == 0
    assert_same(got, tree)


def test_root_may_be_any_node(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    for tree in (np.arange(5.0), [1, (2, 3)], 42, None, (np.int8(3),)):
        v = store.save(tree)
        got, m = ref.read_version(store.root, v.id)
        assert_same(got, tree)
        if isinstance(tree, np.ndarray):
            assert m["tensors"][0]["path"] == ""


def test_every_dtype_of_the_table(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    rng = np.random.default_rng(5)
    tree = {}
    for name in ref.DTYPES:
        dt = ref.dtype_of(name)
        raw = rng.integers(0, 256, size=24 * dt.itemsize, dtype=np.uint8)
        if name == "BOOL":
            raw = raw & 1
        tree[name] = raw.view(dt).reshape(4, -1)
    v = store.save(tree)
    got, m = ref.read_version(store.root, v.id)
    assert [t["dtype"] for t in m["tensors"]] == list(ref.DTYPES)
    assert_same(got, tree)


def test_versions_dedup_and_reader_agree(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    first = varied_tree(1)
    second = varied_tree(1)
    second["model"]["bias"] = second["model"]["bias"] + 1  # one small tensor changes
    v1 = store.save(first, step=1)
    v2 = store.save(second, step=2)
    m1, m2 = store.manifest(v1.id), store.manifest(v2.id)
    ids1 = {c[0] for c in m1["chunks"]}
    ids2 = {c[0] for c in m2["chunks"]}
    shared = ids1 & ids2
    assert shared and ids1 != ids2
    w_chunks = {
        m2["chunks"][s[0]][0] for t in m2["tensors"] if t["path"] == "model/w" for s in t["spans"]
    }
    assert w_chunks <= shared
    assert m2["stats"]["new_chunks"] == len(ids2 - ids1)
    assert m2["parent"] == v1.id
    for v, tree in ((v1, first), (v2, second)):
        got, _ = ref.read_version(store.root, v.id)
        assert_same(got, to_native(tree))


# ------------------------------------------------------------------ chunk files
def _chunks_with_dtypes(manifest: dict[str, Any]) -> dict[int, list[str]]:
    """Chunk index -> dtypes of the tensors that have bytes in it, in tensor order."""
    out: dict[int, list[str]] = {}
    for t in manifest["tensors"]:
        for ci, _, _ in t["spans"]:
            out.setdefault(ci, []).append(t["dtype"])
    return out


#: dtypes whose items the writer rotates before byte grouping (section 5.6)
ROTATED = {"F32", "F64", "C64", "C128", "BF16"}


def test_every_chunk_header_field_is_as_documented(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    v = store.save(varied_tree(2))
    m = store.manifest(v.id)
    dtypes = _chunks_with_dtypes(m)
    dctx = zstandard.ZstdDecompressor()
    codecs_seen = set()
    filters_seen = set()
    for ci, (cid, raw_len, stored_len) in enumerate(m["chunks"]):
        path = Path(store.root) / "objects" / cid[:2] / cid[2:]
        data = path.read_bytes()
        assert len(data) == stored_len  # chunk table: stored length = file size
        assert data[:8] == b"CKPTCHNK"
        version = struct.unpack_from("<H", data, 8)[0]
        filt, n = data[10], data[11]
        assert data[12:16] == b"\0\0\0\0"
        assert struct.unpack_from("<Q", data, 16)[0] == raw_len
        (g,) = {ref.DTYPES[d][2] for d in dtypes[ci]}
        # writer rules (5.2, 5.6): bytegroup(g) iff 2 <= g <= 16, raw_len % g == 0,
        # raw_len >= 1024; rotated first when the chunk's first tensor is a
        # float32/float64/bfloat16 (or complex of those)
        rotated = dtypes[ci][0] in ROTATED
        if 2 <= g <= 16 and raw_len % g == 0 and raw_len >= 1024:
            assert (version, filt, n) == ((3, 3, g) if rotated else (1, 1, g))
        else:
            assert (version, filt, n) == (1, 0, 1)
        filters_seen.add(filt)
        plane_len = raw_len // n
        pos = 24 + 16 * n
        planes = []
        for i in range(n):
            entry = data[24 + 16 * i : 24 + 16 * (i + 1)]
            codec = entry[0]
            assert entry[1:8] == b"\0" * 7
            (stored,) = struct.unpack_from("<Q", entry, 8)
            payload = data[pos : pos + stored]
            assert len(payload) == stored
            pos += stored
            codecs_seen.add(codec)
            if codec == 0:
                assert stored == plane_len
                planes.append(payload)
            else:
                assert codec == 1
                assert plane_len >= 64  # writer rule: short planes stay raw
                assert stored <= 0.95 * plane_len  # writer rule: min_saving 0.05
                params = zstandard.get_frame_parameters(payload)
                assert params.content_size == plane_len
                assert params.dict_id == 0
                plane = dctx.decompress(payload, max_output_size=plane_len, allow_extra_data=False)
                assert len(plane) == plane_len
                planes.append(plane)
        assert pos == len(data)
        filtered = b"".join(planes)
        raw = filtered if n == 1 else np.frombuffer(filtered, np.uint8).reshape(n, -1).T.tobytes()
        if filt == 3:
            raw = ref.rotate_right(raw, n)
        assert blake3.blake3(raw).hexdigest() == cid
        assert ref.decode_chunk(data, cid, raw_len) == raw
        header = ref.parse_chunk_header(data)
        assert header.file_len == len(data) and header.raw_len == raw_len
    assert codecs_seen == {0, 1}
    assert filters_seen == {0, 1, 3}


def test_worked_example_of_the_document(tmp_path: Path) -> None:
    """docs/format.md section 5.4, byte for byte."""
    store = small_store(tmp_path / "s")
    v = store.save({"w": np.array([1.0, -2.0], dtype=np.float32)})
    cid = "54847fa2028a3457068a78ba8e6a086cccf672def025d7e4cb2761b538edbf3f"
    assert store.manifest(v.id)["chunks"] == [[cid, 8, 48]]
    data = (Path(store.root) / "objects" / "54" / cid[2:]).read_bytes()
    expected = bytes.fromhex(
        "434b50544348 4e4b 0100 00 01 00000000 0800000000000000"
        "00 00000000000000 0800000000000000"
        "0000803f 000000c0"
    )
    assert data == expected
    assert ref.decode_chunk(data, cid, 8) == np.array([1.0, -2.0], "<f4").tobytes()


def test_zstd_header_example_of_the_document(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    v = store.save({"a": np.arange(10, dtype=np.int64)})
    ((cid, raw_len, stored),) = store.manifest(v.id)["chunks"]
    data = (Path(store.root) / "objects" / cid[:2] / cid[2:]).read_bytes()
    assert raw_len == 80 and len(data) == stored
    assert data[:32] == bytes.fromhex(
        "434b50544348 4e4b 0100 00 01 00000000 5000000000000000 01 00000000000000"
    )
    assert data[40:44] == b"\x28\xb5\x2f\xfd"
    assert struct.unpack_from("<Q", data, 32)[0] == len(data) - 40


# ------------------------------------------------------------------ planning (section 6)
def plan(
    tensors: list[tuple[int, int]], chunk_size: int, small_threshold: int, size_classes: bool
) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """docs/format.md section 6: planned chunks as (group, [(tensor, offset, length)])."""
    small_threshold = min(small_threshold, chunk_size)
    large: list[tuple[int, list[tuple[int, int, int]]]] = []
    # (width, tiny?) -> packs; insertion order = first appearance
    packs: dict[tuple[int, bool], list[list[Any]]] = {}
    for t, (length, group) in enumerate(tensors):
        group = max(group, 1)
        if length == 0:
            continue
        if length >= small_threshold:
            step = max(chunk_size // group, 1) * group
            for off in range(0, length, step):
                large.append((group, [(t, off, min(step, length - off))]))
            continue
        tiny = size_classes and length < small_threshold // 16
        capacity = chunk_size if tiny or not size_classes else min(chunk_size, 2 * small_threshold)
        lst = packs.setdefault((group, tiny), [])
        if not lst or lst[-1][0] + length > capacity:
            lst.append([0, []])
        lst[-1][0] += length
        lst[-1][1].append((t, 0, length))
    out = list(large)
    for (group, _), lst in packs.items():
        out.extend((group, pieces) for _, pieces in lst)
    return out


def expected_tables(
    manifest: dict[str, Any],
    arrays: list[bytes],
    chunk_size: int,
    small_threshold: int,
    size_classes: bool,
) -> tuple[list[list[Any]], list[list[list[int]]]]:
    sizes = [(t["nbytes"], ref.DTYPES[t["dtype"]][2]) for t in manifest["tensors"]]
    table: list[list[Any]] = []
    index: dict[str, int] = {}
    spans: list[list[list[int]]] = [[] for _ in sizes]
    for _, pieces in plan(sizes, chunk_size, small_threshold, size_classes):
        raw = b"".join(arrays[t][o : o + n] for t, o, n in pieces)
        cid = blake3.blake3(raw).hexdigest()
        if cid not in index:
            index[cid] = len(table)
            table.append([cid, len(raw)])
        offset = 0
        for t, _, n in pieces:
            spans[t].append([index[cid], offset, n])
            offset += n
    return table, spans


@pytest.mark.parametrize("packing", ["size-classes", None])
@pytest.mark.parametrize(
    ("chunk_size", "small_threshold"), [(CHUNK, SMALL), (4096, 1000), (20_000, 20_000)]
)
def test_chunk_table_follows_the_planning_rules(
    tmp_path: Path, chunk_size: int, small_threshold: int, packing: str | None
) -> None:
    """Section 6, under either packing rule (None: a marker without the key)."""
    params = {"chunk_size": chunk_size, "small_threshold": small_threshold}
    set_packing(ckpt.Store(tmp_path / "s", **params).create().root, packing)
    store = ckpt.Store(tmp_path / "s", **params)
    assert store.size_classes == (packing is not None)
    tree = varied_tree(3)
    tree["dup"] = tree["model"]["w"].copy()  # equal bytes: one chunk table entry each
    # mid-size tensors enough to fill several capped packs (rule 3), between tiny ones
    tree["mid"] = [
        np.arange(n, dtype=np.float32) + i for i, n in enumerate([300, 3000, 700, 3000, 1500, 20])
    ]
    v = store.save(tree)
    m = store.manifest(v.id)
    got, _ = ref.read_version(store.root, v.id)
    arrays = []
    for t in m["tensors"]:  # bytes per tensor, in table order, from the reference reader
        leaf: Any = got
        for part in t["path"].split("/") if t["path"] else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(leaf, dict):
                key = part if part in leaf else int(part)
                leaf = leaf[key]
            else:
                leaf = leaf[int(part)]
        arrays.append(np.asarray(leaf).tobytes())
    table, spans = expected_tables(m, arrays, chunk_size, small_threshold, packing is not None)
    assert [c[:2] for c in m["chunks"]] == table
    assert [t["spans"] for t in m["tensors"]] == spans


# ------------------------------------------------------------------ rejection
def _one_chunk_store(tmp_path: Path) -> tuple[ckpt.Store, int, Path]:
    store = small_store(tmp_path / "s")
    v = store.save({"w": np.linspace(0, 1, 5000, dtype=np.float32)})
    ((cid, _, _),) = store.manifest(v.id)["chunks"]
    return store, v.id, Path(store.root) / "objects" / cid[:2] / cid[2:]


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 0x41, "magic"),
        (8, 2, "version"),
        (10, 2, "filter"),
        (11, 17, "filter"),
        (13, 1, "reserved"),
        (16, 1, "multiple"),
        (25, 1, "reserved"),
        (24, 7, "codec"),
        (-1, None, "damaged|zstd|hash"),
    ],
)
def test_reader_rejects_damaged_chunks(
    tmp_path: Path, offset: int, value: int | None, message: str
) -> None:
    store, vid, path = _one_chunk_store(tmp_path)
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] ^ 0x01) if value is None else value
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ref.ReaderError, match=message):
        ref.read_version(store.root, vid)
    assert not store.verify(vid)[0].ok  # the implementation agrees that the chunk is bad


def test_reader_caps_zstd_output_at_the_plane_length(tmp_path: Path) -> None:
    bomb = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\0" * (1 << 20))
    with pytest.raises(ref.ReaderError):
        ref.decode_plane(bomb, 1, 1000)
    sized = zstandard.ZstdCompressor(level=3).compress(b"\0" * (1 << 20))
    with pytest.raises(ref.ReaderError, match="declares"):
        ref.decode_plane(sized, 1, 1000)
    two = zstandard.ZstdCompressor().compress(b"a" * 100) * 2
    with pytest.raises(ref.ReaderError):
        ref.decode_plane(two, 1, 200)


def test_reader_rejects_malformed_manifests(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    v = store.save({"a": np.arange(4), "b": [1.5]})
    path = Path(store.root) / "versions" / f"{v.id:012d}.json"
    good = json.loads(path.read_bytes())

    def attempt(mutate: Any) -> None:
        m = json.loads(json.dumps(good))
        mutate(m)
        path.write_text(json.dumps(m))
        with pytest.raises(ref.ReaderError):
            ref.read_version(store.root, v.id)

    attempt(lambda m: m.update(version=3))
    attempt(lambda m: m.update(id=v.id + 1))
    attempt(lambda m: m["tensors"][0].update(dtype="F128"))
    attempt(lambda m: m["tensors"][0].update(nbytes=31))
    attempt(lambda m: m["tensors"][0]["spans"][0].__setitem__(2, 0))
    attempt(lambda m: m["tree"]["v"].__setitem__(0, {"t": "tensor", "i": 5}))
    attempt(lambda m: m["tree"]["v"].__setitem__(0, {"t": "tensor", "i": -1}))
    attempt(lambda m: m["tree"].update(t="set"))
    attempt(lambda m: m["chunks"][0].__setitem__(0, m["chunks"][0][0].upper()))
    attempt(lambda m: m.update(stats=[]))
    path.write_text(json.dumps(good, separators=(",", ":")).replace('"v":1.5', '"v":NaN'))
    with pytest.raises(ref.ReaderError, match="NaN"):
        ref.read_version(store.root, v.id)
    path.write_text(json.dumps(good))
    tree, _ = ref.read_version(store.root, v.id)
    assert_same(tree, {"a": np.arange(4), "b": [1.5]})


# ------------------------------------------------------------------ deltas
def test_reader_follows_delta_chains_bit_exactly(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s", chunk_size=256 << 10, small_threshold=64 << 10)
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((32768, 16)).astype(np.float32)  # 2 MiB: 8 chunks
    saved = {}
    for v in range(14):  # chains of 10 deltas, then a full chunk again
        if v:
            rows = rng.choice(len(emb), 300, replace=False)
            emb[rows] = rng.standard_normal((300, 16)).astype(np.float32)
        saved[store.save({"emb": emb, "step": v}).id] = emb.copy()
    formats = set()
    for vid, want in saved.items():
        tree, m = ref.read_version(store.root, vid)
        formats.add(m["version"])
        assert tree["emb"].tobytes() == want.tobytes()
        assert_same(tree, to_native(store.load(vid)))
    assert formats == {1, 2}
