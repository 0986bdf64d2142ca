"""The committed golden store of format 1 (tests/data/golden-v1) stays readable.

The store was written once by tests/data/make_golden.py; the expected values
are recomputed here from the same deterministic generator
(``make_golden.golden_versions``). Every test works on a copy in ``tmp_path``,
so nothing is ever written into tests/data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt

HERE = Path(__file__).resolve().parent
COMMITTED = HERE / "data" / "golden-v1"


def _load_module(name: str, path: Path) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


golden = _load_module("make_golden", HERE / "data" / "make_golden.py")
import reference_reader as ref  # noqa: E402  (tests/ is on sys.path, as for conftest)
import treecmp  # noqa: E402
from conftest import set_packing  # noqa: E402

assert_same = treecmp.assert_same

EXPECTED = golden.golden_versions()
IDS = list(range(1, len(EXPECTED) + 1))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def committed_snapshot() -> dict[str, bytes]:
    return _snapshot(COMMITTED)


@pytest.fixture
def golden_copy(tmp_path: Path, committed_snapshot: dict[str, bytes]) -> Path:
    root = tmp_path / "golden-v1"
    shutil.copytree(COMMITTED, root)
    yield root
    assert _snapshot(COMMITTED) == committed_snapshot, "a test wrote into tests/data"


def _metrics_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        assert (math.isnan(g) and math.isnan(w)) or g == w, k


def test_committed_store_holds_only_format_files(committed_snapshot: dict[str, bytes]) -> None:
    names = set(committed_snapshot)
    assert "ckpt-store.json" in names
    assert {f"versions/{i:012d}.json" for i in IDS} <= names
    assert "pins/000000000002.json" in names
    for name in names:
        top = name.split("/")[0]
        assert top in ("ckpt-store.json", "objects", "versions", "pins"), name
    assert sum(len(b) for b in committed_snapshot.values()) < 200 * 1024
    marker = json.loads(committed_snapshot["ckpt-store.json"])
    assert marker["format"] == "ckpt-store" and marker["version"] == 1


def test_store_lists_the_golden_versions(golden_copy: Path) -> None:
    store = ckpt.Store(golden_copy, create=False)
    versions = store.versions()
    assert [v.id for v in versions] == IDS
    for v, spec in zip(versions, EXPECTED, strict=True):
        assert v.step == spec["step"] and v.epoch == spec["epoch"]
        _metrics_equal(dict(v.metrics), spec["metrics"])
        assert dict(v.meta) == spec["meta"]
        assert dict(v.trainer) == spec["trainer"]
        assert v.parent == (v.id - 1 if v.id > 1 else None)
    assert store.pinned() == set(golden.PINNED)
    assert store.best("loss", "min").id == 2
    assert store.latest().id == 3


@pytest.mark.parametrize("vid", IDS)
def test_store_loads_each_version_exactly(golden_copy: Path, vid: int) -> None:
    store = ckpt.Store(golden_copy, create=False)
    assert_same(store.load(vid), EXPECTED[vid - 1]["tree"])


def test_verify_is_clean(golden_copy: Path) -> None:
    store = ckpt.Store(golden_copy, create=False)
    results = store.verify()
    assert [r.version for r in results] == IDS
    assert all(r.ok for r in results), [r.problems for r in results]


@pytest.mark.parametrize("vid", IDS)
def test_reference_reader_reads_the_golden_store(vid: int) -> None:
    # read-only: the reference reader never writes, so it may read the committed store itself
    tree, manifest = ref.read_version(COMMITTED, vid)
    assert_same(tree, EXPECTED[vid - 1]["tree"])
    assert manifest["step"] == EXPECTED[vid - 1]["step"]


def test_golden_store_covers_the_format(golden_copy: Path) -> None:
    store = ckpt.Store(golden_copy, create=False)
    manifests = [store.manifest(i) for i in IDS]
    by_path = [{t["path"]: t for t in m["tensors"]} for m in manifests]

    def chunk_ids(m: dict[str, Any], t: dict[str, Any]) -> list[str]:
        return [m["chunks"][s[0]][0] for s in t["spans"]]

    embed = [chunk_ids(m, p["model/embed"]) for m, p in zip(manifests, by_path, strict=True)]
    assert len(embed[0]) == 2 and embed[0] == embed[1] == embed[2]  # multi-chunk, deduplicated
    assert manifests[1]["stats"]["new_chunks"] < len(manifests[1]["chunks"])
    packed = {s[0] for t in manifests[0]["tensors"] for s in t["spans"] if s[1] > 0}
    assert packed  # small tensors share chunks
    assert by_path[0]["model/norm"]["dtype"] == "BF16"
    assert by_path[0]["rng/0"]["dtype"] == "U32"  # int key 0
    assert by_path[0]["misc/path~1with~0chars"]["shape"] == []
    headers = set()
    for m in manifests:
        for cid, raw_len, stored in m["chunks"]:
            data = (golden_copy / "objects" / cid[:2] / cid[2:]).read_bytes()
            h = ref.parse_chunk_header(data)
            assert (h.raw_len, h.file_len) == (raw_len, stored)
            headers.add((h.filter, h.n, tuple(c for c, _ in h.planes)))
    assert any(f == 1 and 0 in codecs and 1 in codecs for f, _, codecs in headers)
    assert any(f == 0 for f, _, _ in headers)


def test_the_current_writer_reproduces_the_golden_chunks(tmp_path: Path) -> None:
    """Saving the same trees today gives the same chunk ids, tables and skeletons,
    under the packing rule the golden store was made with ("width": no key)."""
    params = {"chunk_size": golden.CHUNK_SIZE, "small_threshold": golden.SMALL_THRESHOLD}
    set_packing(ckpt.Store(tmp_path / "fresh", **params).create().root, None)
    store = ckpt.Store(tmp_path / "fresh", **params)
    assert not store.size_classes
    for vid, spec in zip(IDS, EXPECTED, strict=True):
        kwargs = {k: v for k, v in spec.items() if k != "tree"}
        assert store.save(spec["tree"], **kwargs).id == vid
        old = ref.read_manifest(COMMITTED, vid)
        new = store.manifest(vid)
        assert [c[:2] for c in new["chunks"]] == [c[:2] for c in old["chunks"]]
        for key in ("tree", "tensors", "step", "epoch", "metrics", "meta", "trainer", "parent"):
            assert new[key] == old[key], key


def test_golden_store_accepts_a_new_version(golden_copy: Path) -> None:
    # chunking parameters are not recorded in a store: dedup needs the same ones
    store = ckpt.Store(
        golden_copy,
        create=False,
        chunk_size=golden.CHUNK_SIZE,
        small_threshold=golden.SMALL_THRESHOLD,
    )
    v = store.save(EXPECTED[0]["tree"], step=400)
    assert v.id == 4
    assert store.manifest(4)["stats"]["new_chunks"] == 0  # everything deduplicated
    assert store.gc().deleted_objects == 0
    for vid in IDS:
        assert_same(store.load(vid), EXPECTED[vid - 1]["tree"])
    tree, _ = ref.read_version(golden_copy, 4)
    assert_same(tree, EXPECTED[0]["tree"])
