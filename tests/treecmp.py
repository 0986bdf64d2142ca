"""Bit-exact comparison of state trees, shared by the format tests."""

from __future__ import annotations

import math
import struct

import numpy as np

__all__ = ["assert_same", "to_native"]


def assert_same(got: object, want: object, path: str = "") -> None:
    """Equality of trees: container and key types, dtypes, shapes and bytes of every tensor.

    Floats compare by bit pattern (so ``-0.0 != 0.0``), except that any NaN equals any NaN.
    """
    where = path or "<root>"
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert isinstance(got, dict)
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for (kg, vg), (kw, vw) in zip(got.items(), want.items(), strict=True):
            assert type(kg) is type(kw), f"{where}: key {kg!r} is a {type(kg)}, not {type(kw)}"
            assert_same(vg, vw, f"{path}/{kw}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple))
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{path}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        g, w = np.asarray(got), np.asarray(want)
        assert g.dtype == w.dtype, f"{where}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{where}: shape {g.shape} != {w.shape}"
        gb = np.ascontiguousarray(g).reshape(-1).view(np.uint8)
        wb = np.ascontiguousarray(w).reshape(-1).view(np.uint8)
        assert np.array_equal(gb, wb), f"{where}: bytes differ"
    elif isinstance(want, float):
        assert isinstance(got, float)
        same_bits = struct.pack("<d", got) == struct.pack("<d", want)
        assert same_bits or (math.isnan(got) and math.isnan(want)), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def to_native(tree: object) -> object:
    """What a load gives back for ``tree``: big-endian arrays in native byte order."""
    if isinstance(tree, dict):
        return {k: to_native(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [to_native(v) for v in tree]
        return tuple(items) if isinstance(tree, tuple) else items
    if isinstance(tree, np.ndarray) and tree.dtype.byteorder == ">":
        return tree.astype(tree.dtype.newbyteorder("="))
    return tree
