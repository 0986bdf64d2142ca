"""Bit-exact round trips over every dtype, shape and tree shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckpt

NUMPY_DTYPES = [
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]
ML_DTYPES = [
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz,
]


def same(a: Any, b: Any) -> None:
    """Equal type, dtype, shape and bytes (NaN payloads included)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def random_bytes_array(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES + ML_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (300, 257)], ids=str)
def test_every_dtype_and_shape_round_trips(store: ckpt.Store, dtype: Any, shape: tuple) -> None:
    rng = np.random.default_rng(0)
    a = random_bytes_array(rng, dtype, shape)  # any bit pattern, NaNs included
    store.save({"x": a})
    same(store.load()["x"], a)


def test_the_numpy_free_dtype_table_agrees_with_numpy() -> None:
    """Manifests are validated with ckpt.dtypes (no numpy import); it must match the adapter."""
    from ckpt import dtypes
    from ckpt.adapters import numpy as npa

    assert npa.DTYPE_NAMES == dtypes.DTYPE_NAMES
    for name in dtypes.DTYPE_NAMES:  # every one loads here: ml_dtypes is a test dependency
        assert dtypes.itemsize_of(name) == npa.dtype_from_name(name).itemsize, name
        assert npa.dtype_name(npa.dtype_from_name(name)) == name


def test_large_tensor_spans_many_chunks_and_small_ones_share(store: ckpt.Store) -> None:
    rng = np.random.default_rng(1)
    big = rng.standard_normal(200_000).astype(np.float32)  # 800 KB -> 13 chunks of 64 KiB
    smalls = {f"b{i}": rng.standard_normal(10).astype(np.float32) for i in range(20)}
    store.save({"big": big, **smalls})
    m = store.manifest()
    spans = {t["path"]: t["spans"] for t in m["tensors"]}
    assert len(spans["big"]) == 13
    assert len({s[0][0] for k, s in spans.items() if k != "big"}) == 1  # one shared pack
    out = store.load()
    same(out["big"], big)
    for k, v in smalls.items():
        same(out[k], v)


def test_trees_keep_key_types_tuples_and_scalars(store: ckpt.Store) -> None:
    tree = {
        "model": {"w": np.ones((2, 3), np.float32), 0: np.arange(4), 7: "seven"},
        "opt": {"state": {0: {"step": np.float64(3.0), "exp_avg": np.zeros(5)}}, "lr": 1e-3},
        "hist": [1, 2.5, None, True, "x", float("nan"), float("inf"), -float("inf"), 2**70],
        "pair": (np.int64(5), (np.bool_(True), [])),
        "empty": {},
        "slash/key~": 1,
    }
    store.save(tree)
    same(store.load(), tree)


def test_non_contiguous_and_big_endian_arrays_are_saved_by_value(store: ckpt.Store) -> None:
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    strided = base[::2, ::3]
    transposed = base.T
    big_endian = np.arange(10, dtype=">i4")
    store.save({"s": strided, "t": transposed, "be": big_endian})
    out = store.load()
    np.testing.assert_array_equal(out["s"], strided)
    np.testing.assert_array_equal(out["t"], transposed)
    assert out["be"].dtype == np.dtype("int32") and out["be"].dtype.isnative
    np.testing.assert_array_equal(out["be"], big_endian)


keys = st.one_of(st.text(max_size=8), st.integers(-5, 1000))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
arrays = st.sampled_from(NUMPY_DTYPES + ["bfloat16"]).flatmap(
    lambda d: (
        hnp.arrays(
            np.dtype(ml_dtypes.bfloat16) if d == "bfloat16" else np.dtype(d),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
            elements=None if d == "bfloat16" else {"allow_nan": True} if "float" in d else None,
        )
        if d != "bfloat16"
        else hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40).map(
            lambda s: (
                np.arange(int(np.prod(s)), dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(s)
            )
        )
    )
)
trees = st.recursive(
    st.one_of(scalars, arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees)
def test_property_any_tree_round_trips(tmp_path: Path, tree: Any) -> None:
    store = ckpt.Store(
        tmp_path / f"s{np.random.default_rng().integers(1 << 62)}",
        chunk_size=4096,
        small_threshold=1024,
        durable=False,
    )
    store.save(tree)
    same(store.load(), tree)


def test_threads_do_not_change_the_bytes_on_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tree = {f"t{i}": rng.standard_normal((100, 70 + i)).astype(np.float32) for i in range(30)}
    files = []
    for threads in (1, 2):
        s = ckpt.Store(tmp_path / f"t{threads}", chunk_size=16 * 1024, threads=threads)
        s.save(tree)
        objs = sorted(p for p in Path(s.root, "objects").rglob("*") if p.is_file())
        files.append({p.relative_to(s.root).as_posix(): p.read_bytes() for p in objs})
        m = s.manifest()
        assert m["chunks"] and m["tensors"]
    assert files[0] == files[1]


def test_partial_restore_by_glob(store: ckpt.Store) -> None:
    tree = {
        "model": {"enc": {"w": np.ones(3)}, "dec": {"w": np.zeros(2)}},
        "optim": {"m": np.ones(4)},
        "layers": [np.ones(1), {"x": np.zeros(1)}],
        "step": 5,
    }
    store.save(tree)
    out = store.load(only="model/*")
    assert set(out) == {"model"}
    same(out["model"], tree["model"])
    out = store.load(only=["model/dec/*", "step"])
    assert set(out) == {"model", "step"} and set(out["model"]) == {"dec"}
    out = store.load(only="layers/1/*")
    same(out, {"layers": [{"x": np.zeros(1)}]})
    assert store.load(only="nothing*") == {}
