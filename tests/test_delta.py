"""Delta chunks: a changed chunk of a tensor that mostly kept its previous
bytes (an embedding table where a few rows moved) is stored as a patch on the
previous version's chunk. Every version still loads bit-exact, chains stay
within ``delta_depth``, gc keeps the bases live deltas need, damage anywhere
in a chain is noticed and names the damaged object, and forged delta headers
are refused.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.index import seal_manifest

CHUNKS = {"chunk_size": 256 << 10, "small_threshold": 64 << 10}
ROWS, DIM = 16384, 16  # 1 MiB of float32: 4 chunks of 256 KiB


def table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, DIM), dtype=np.float32)


def touch_rows(t: np.ndarray, seed: int, frac: float = 0.01) -> None:
    rng = np.random.default_rng(1000 + seed)
    rows = rng.choice(len(t), max(1, int(len(t) * frac)), replace=False)
    t[rows] = rng.standard_normal((len(rows), t.shape[1]), dtype=np.float32)


def object_path(store: ckpt.Store, oid: str) -> Path:
    return Path(store.root, "objects", oid[:2], oid[2:])


def depth_of(store: ckpt.Store, oid: str) -> int:
    head = object_path(store, oid).read_bytes()[:80]
    (version,) = struct.unpack_from("<H", head, 8)
    if version in (1, 3):  # full chunks (3: rotated byte groups)
        return 0
    assert version == 2 and head[10] == 2
    (depth,) = struct.unpack_from("<I", head, 72)
    return int(depth)


def span_chunks(m: dict[str, Any], path: str) -> list[list[Any]]:
    (t,) = [t for t in m["tensors"] if t["path"] == path]
    return [m["chunks"][ci] for ci, _, _ in t["spans"]]


def test_sparse_updates_become_small_deltas_in_bounded_chains(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s", delta_depth=3, **CHUNKS)
    t = table()
    saved: list[tuple[int, bytes]] = []
    new_bytes = []
    for v in range(10):
        if v:
            touch_rows(t, v)
        version = store.save({"emb": t, "bias": np.arange(4.0)})
        saved.append((version.id, t.tobytes()))
        new_bytes.append(version.new_bytes)
    for vid, data in saved:
        assert store.load(vid)["emb"].tobytes() == data

    depths = []
    for vid, _ in saved:
        m = store.manifest(vid)
        rows = span_chunks(m, "emb")
        depths.append([depth_of(store, r[0]) for r in rows])
        if any(d > 0 for d in depths[-1]):
            assert m["version"] == 2
            for r in rows:  # a delta's entry names its base, listed in the same table
                if len(r) == 4:
                    assert m["chunks"][r[3]][1] == r[1]
        else:
            assert m["version"] == 1
            assert all(len(c) == 3 for c in m["chunks"])
    # every chunk position cycles full, 1, 2, 3, full, ...
    assert depths == [[v % 4] * 4 for v in range(10)]
    full = new_bytes[0]
    assert all(b < full * 0.05 for v, b in enumerate(new_bytes) if v % 4)
    assert all(r.ok for r in store.verify())


def test_delta_depth_zero_and_rewritten_tensors_write_full_chunks(tmp_path: Path) -> None:
    off = ckpt.Store(tmp_path / "off", delta_depth=0, **CHUNKS)
    on = ckpt.Store(tmp_path / "on", **CHUNKS)
    t = table()
    for v in range(3):
        if v:
            touch_rows(t, v)
        off.save({"emb": t})
        # a tensor rewritten as a whole (fine-tuned weights): no delta is tried
        on.save({"emb": table(seed=v)})
    for store in (off, on):
        for version in store.versions():
            m = store.manifest(version.id)
            assert m["version"] == 1
            assert all(depth_of(store, c[0]) == 0 for c in m["chunks"])


def test_shape_or_dtype_change_means_no_base(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s", **CHUNKS)
    t = table()
    store.save({"emb": t})
    v2 = store.save({"emb": t.astype(np.float64)})
    v3 = store.save({"emb": np.concatenate([t, t[:8]])})
    for v in (v2, v3):
        assert store.manifest(v.id)["version"] == 1
    assert store.load(v3.id)["emb"].tobytes() == np.concatenate([t, t[:8]]).tobytes()


def test_gc_keeps_the_bases_of_live_deltas_and_drops_dead_chains(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s", delta_depth=10, **CHUNKS)
    t = table()
    for v in range(6):
        if v:
            touch_rows(t, v)
        store.save({"emb": t})
    latest = store.latest()
    assert latest is not None
    chain = {c[0] for c in store.manifest(latest.id)["chunks"]}
    first = {c[0] for c in store.manifest(1)["chunks"]}
    assert first <= chain  # the full chunks of version 1 are the chains' roots
    for vid in range(1, latest.id):
        store.delete(vid)
    store.gc()
    assert all(object_path(store, oid).exists() for oid in chain)
    assert store.load(latest.id)["emb"].tobytes() == t.tobytes()
    assert all(r.ok for r in store.verify())

    plain = ckpt.Store(store.root, delta_depth=0)
    fresh = plain.save({"emb": t + 1})
    plain.delete(latest.id)
    plain.gc()
    left = {oid for oid, _ in ckpt._core.list_objects(store.root)}
    assert left == {c[0] for c in plain.manifest(fresh.id)["chunks"]}


def test_retention_by_bytes_counts_the_bases(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s", delta_depth=10, **CHUNKS)
    t = table()
    for v in range(4):
        if v:
            touch_rows(t, v)
        store.save({"emb": t}, step=v)
    latest = store.latest()
    assert latest is not None
    sizes = store.chunk_map(latest.id)
    # the latest version needs its chain's full chunks: about one full copy
    assert sum(sizes.values()) > 0.8 * t.nbytes


def damaged_setup(tmp_path: Path) -> tuple[ckpt.Store, str, list[int]]:
    store = ckpt.Store(tmp_path / "s", delta_depth=5, **CHUNKS)
    t = table()
    ids = []
    for v in range(4):
        if v:
            touch_rows(t, v)
        ids.append(store.save({"emb": t}).id)
    base = span_chunks(store.manifest(ids[0]), "emb")[1][0]
    assert depth_of(store, base) == 0
    return store, base, ids


def test_a_damaged_base_is_named_by_loads_of_the_deltas_on_it(tmp_path: Path) -> None:
    store, base, ids = damaged_setup(tmp_path)
    path = object_path(store, base)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # a raw mantissa byte: decodes, but hashes wrong
    path.write_bytes(bytes(data))
    for vid in ids:
        with pytest.raises(ckpt.IntegrityError) as exc:
            store.load(vid)
        assert base in str(exc.value)
    bad = {r.version for r in store.verify() if not r.ok}
    assert bad == set(ids)


def test_a_missing_base_is_a_missing_object_error(tmp_path: Path) -> None:
    store, base, ids = damaged_setup(tmp_path)
    object_path(store, base).unlink()
    with pytest.raises(ckpt.MissingObjectError) as exc:
        store.load(ids[-1])
    assert base in str(exc.value)


def forge(store: ckpt.Store, oid: str, edit: Any) -> None:
    path = object_path(store, oid)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: struct.pack_into("<I", d, 72, 5), id="depth-mismatch"),
        pytest.param(lambda d: struct.pack_into("<I", d, 72, 0), id="depth-zero"),
        pytest.param(lambda d: struct.pack_into("<I", d, 72, 65), id="depth-over-limit"),
        pytest.param(lambda d: struct.pack_into("<I", d, 76, 1 << 30), id="patch-too-long"),
        pytest.param(lambda d: d.__setitem__(10, 1), id="filter-1-in-version-2"),
        pytest.param(lambda d: d.__setitem__(24, 0), id="raw-codec"),
    ],
)
def test_forged_delta_headers_are_refused(tmp_path: Path, edit: Any) -> None:
    store, _, ids = damaged_setup(tmp_path)
    delta = span_chunks(store.manifest(ids[2]), "emb")[0][0]
    assert depth_of(store, delta) == 2
    forge(store, delta, edit)
    with pytest.raises((ckpt.FormatError, ckpt.IntegrityError)) as exc:
        store.load(ids[2])
    assert delta in str(exc.value)
    assert store.load(ids[0])["emb"].shape == (ROWS, DIM)  # the chain's root still loads


def test_a_delta_whose_base_is_itself_is_refused(tmp_path: Path) -> None:
    store, _, ids = damaged_setup(tmp_path)
    delta = span_chunks(store.manifest(ids[1]), "emb")[0][0]
    forge(store, delta, lambda d: d.__setitem__(slice(40, 72), bytes.fromhex(delta)))
    with pytest.raises(ckpt.FormatError, match="does not record"):
        store.load(ids[1])
    # the same chunk in a manifest that records it so: the depth check refuses it
    path = Path(store.root, "versions", f"{ids[1]:012d}.json")
    m = json.loads(path.read_text())
    for i, c in enumerate(m["chunks"]):
        if c[0] == delta:
            c[3] = i
    with pytest.raises(ckpt.FormatError):
        reseal(path, m)
        ckpt.Store(store.root).load(ids[1])


def test_a_patch_that_runs_outside_the_chunk_is_an_integrity_error(tmp_path: Path) -> None:
    import zstandard

    store, _, ids = damaged_setup(tmp_path)
    delta = span_chunks(store.manifest(ids[1]), "emb")[0][0]
    patch = bytes([0x80, 0x80, 0x10, 4]) + b"\1\2\3\4"  # skip 256 KiB, then 4 bytes
    frame = zstandard.ZstdCompressor().compress(patch)

    def edit(d: bytearray) -> None:
        struct.pack_into("<Q", d, 32, len(frame))
        struct.pack_into("<I", d, 76, len(patch))
        del d[80:]
        d += frame

    forge(store, delta, edit)
    with pytest.raises(ckpt.IntegrityError, match="outside"):
        store.load(ids[1])


def reseal(path: Path, m: dict[str, Any]) -> None:
    m.pop("checksum", None)
    os.chmod(path, 0o644)
    path.write_bytes(seal_manifest(json.dumps(m, separators=(",", ":")).encode()))


def test_manifest_base_entries_are_validated(tmp_path: Path) -> None:
    store, _, ids = damaged_setup(tmp_path)
    path = Path(store.root, "versions", f"{ids[1]:012d}.json")
    good = json.loads(path.read_text())
    assert good["version"] == 2
    delta_rows = [i for i, c in enumerate(good["chunks"]) if len(c) == 4]
    assert delta_rows
    cases = []
    m = json.loads(json.dumps(good))
    m["chunks"][delta_rows[0]][3] = len(m["chunks"])  # out of range
    cases.append(m)
    m = json.loads(json.dumps(good))
    m["chunks"][delta_rows[0]][3] = delta_rows[0]  # itself
    cases.append(m)
    m = json.loads(json.dumps(good))
    m["version"] = 1  # format 1 has no base fields
    cases.append(m)
    for m in cases:
        reseal(path, m)
        fresh = ckpt.Store(store.root)
        with pytest.raises(ckpt.FormatError):
            fresh.load(ids[1])


def test_a_manifest_that_omits_or_misnames_bases_is_refused(tmp_path: Path) -> None:
    store, _, ids = damaged_setup(tmp_path)
    path = Path(store.root, "versions", f"{ids[2]:012d}.json")
    good = json.loads(path.read_text())
    # drop the base fields (as if the deltas were full chunks)
    dropped = json.loads(json.dumps(good))
    dropped["chunks"] = [c[:3] for c in dropped["chunks"]]
    # point each delta at another entry of the same size
    swapped = json.loads(json.dumps(good))
    sizes = [c[1] for c in swapped["chunks"]]
    for i, c in enumerate(swapped["chunks"]):
        if len(c) == 4:
            c[3] = next(j for j in range(len(sizes)) if j not in (i, c[3]) and sizes[j] == c[1])
    # or claim format 1, which has no deltas
    plain = json.loads(json.dumps(dropped))
    plain["version"] = 1
    for m in (dropped, swapped, plain):
        reseal(path, m)
        fresh = ckpt.Store(store.root)
        with pytest.raises(ckpt.FormatError, match="manifest"):
            fresh.load(ids[2])
        (report,) = fresh.verify(ids[2])
        assert not report.ok
        assert any("manifest" in p.message for p in report.problems)


edits = st.lists(
    st.one_of(
        st.tuples(st.just("rows"), st.floats(0.001, 0.05)),
        st.tuples(st.just("all"), st.just(0.0)),
        st.tuples(st.just("same"), st.just(0.0)),
        st.tuples(st.just("grow"), st.just(0.0)),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=edits, depth=st.integers(1, 3), seed=st.integers(0, 1000))
def test_any_edit_sequence_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    edits: list[tuple[str, float]],
    depth: int,
    seed: int,
) -> None:
    root = tmp_path_factory.mktemp("prop") / "s"
    store = ckpt.Store(root, delta_depth=depth, durable=False, **CHUNKS)
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((4096, 40), dtype=np.float32)  # 640 KiB: 256 + 256 + 128
    saved = {}
    for k, (kind, frac) in enumerate(edits):
        if kind == "rows":
            touch_rows(t, seed + k, frac)
        elif kind == "all":
            t = rng.standard_normal(t.shape, dtype=np.float32)
        elif kind == "grow":
            t = np.concatenate([t, rng.standard_normal((64, 40), dtype=np.float32)])
        saved[store.save({"emb": t, "n": k}).id] = t.tobytes()
    for vid, data in saved.items():
        assert store.load(vid)["emb"].tobytes() == data
        for c in store.manifest(vid)["chunks"]:
            assert depth_of(store, c[0]) <= depth
    assert all(r.ok for r in store.verify())
    # drop all but the newest, collect, and the newest still loads
    newest = max(saved)
    for vid in saved:
        if vid != newest:
            store.delete(vid)
    store.gc()
    assert store.load(newest)["emb"].tobytes() == saved[newest]


# ---------------------------------------------------------------- fingerprints
def engine_save(root: str, data: bytes, bases: list[tuple[int, int, str, int | None]]) -> Any:
    return ckpt._core.save_chunks(
        root,
        [data],
        [4],
        chunk_size=256 << 10,
        small_threshold=64 << 10,
        level=1,
        min_saving=0.05,
        durable=False,
        bases=[bases],
    )


def test_a_matching_fingerprint_stands_in_for_the_blake3_pass(tmp_path: Path) -> None:
    root = ckpt.Store(tmp_path / "s").create().root
    x = table(1)[:4096].tobytes()  # 256 KiB: one chunk
    y = table(2)[:4096].tobytes()
    (cx, *_), _, _ = engine_save(root, x, [])
    (cy, *_), _, _ = engine_save(root, y, [])
    fx = cx[5]
    assert isinstance(fx, int) and fx != cy[5]
    # offered y's id with x's fingerprint, the engine takes x to be y: proof
    # that a match skips hashing (what the Store only ever offers for the
    # parent's chunk at the same place, with that chunk's own fingerprint)
    (got, *_), _, _ = engine_save(root, x, [(0, len(x), cy[0], fx)])
    assert got[0] == cy[0]
    # any other fingerprint, or none: the real id
    for fp in (cy[5], None):
        (got, *_), _, _ = engine_save(root, x, [(0, len(x), cy[0], fp)])
        assert got[0] == cx[0] and got[5] == fx


def test_saves_with_fingerprints_match_saves_without(tmp_path: Path) -> None:
    fast = ckpt.Store(tmp_path / "fast", **CHUNKS)
    slow = ckpt.Store(tmp_path / "slow", fingerprints=False, **CHUNKS)
    t = table()
    frozen = table(9)
    for v in range(5):
        if v:
            touch_rows(t, v, frac=0.002 * v)
        a = fast.save({"emb": t, "frozen": frozen})
        b = slow.save({"emb": t, "frozen": frozen})
        assert fast.manifest(a.id)["chunks"] == slow.manifest(b.id)["chunks"]
        assert fast.load(a.id)["emb"].tobytes() == t.tobytes()
    assert fast._fingerprints and all(isinstance(f, int) for f in fast._fingerprints.values())


def test_torch_parameters_get_deltas_and_load_as_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    store = ckpt.Store(tmp_path / "s", **CHUNKS)
    emb = torch.nn.Embedding(ROWS, DIM)
    saved = []
    for v in range(3):
        if v:
            with torch.no_grad():
                emb.weight[torch.arange(v, ROWS, 97)] += 1.0  # ~1% of the rows
        saved.append((store.save({"emb": emb.state_dict()}).id, emb.weight.detach().clone()))
    assert store.manifest(saved[-1][0])["version"] == 2
    for vid, want in saved:
        got = store.load(vid)["emb"]["weight"]
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, want)
