"""numpy arrays as stored tensors: dtype names, byte order, byte views.

dtype names follow safetensors (``F32``, ``BF16``, ``F8_E4M3``, ...).
``bfloat16`` and the float8 types come from ``ml_dtypes`` when it is
installed; a store that holds them can only be loaded where it is.

Decisions:
    * Bytes are little-endian on disk. Big-endian arrays are converted on
      save (a copy) and come back in native byte order.
    * Non-contiguous arrays (slices with steps, transposes) are copied to a
      contiguous array on save; that copy lives for the duration of the save.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..dtypes import DTYPE_NAMES

__all__ = [
    "DTYPE_NAMES",
    "as_saveable",
    "byte_view",
    "dtype_from_name",
    "dtype_name",
    "group_width",
]

_BASE: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "C128": "complex128",
}

# name -> ml_dtypes attribute
_ML_DTYPES: dict[str, str] = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E4M3B11FNUZ": "float8_e4m3b11fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


_BY_DTYPE: dict[np.dtype[Any], str] = {np.dtype(v): k for k, v in _BASE.items()}
# optional: bfloat16 / float8, by format name
_ML: dict[str, np.dtype[Any]] = {}
try:
    import ml_dtypes

    for _name, _attr in _ML_DTYPES.items():
        if hasattr(ml_dtypes, _attr):
            _ML[_name] = np.dtype(getattr(ml_dtypes, _attr))
            _BY_DTYPE[_ML[_name]] = _name
except ImportError:  # pragma: no cover - exercised where ml_dtypes is absent
    pass

_FLOAT_NAMES = {"F16": 2, "F32": 4, "F64": 8, "C64": 4, "C128": 8, "BF16": 2}
#: The engine's flag for byte groups of items rotated left by one bit first
#: (chunk format 3): the sign leaves the top byte, which then holds exactly
#: the 8 exponent bits of a bfloat16 or float32 (the top 8 of a float64's
#: 11), and compresses better. Not for float16, whose 5 exponent bits never
#: fill a byte.
ROTATE = 0x100
_ROTATED = {"F32", "F64", "C64", "C128", "BF16"}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The format's name of a numpy dtype (byte order ignored).

    Raises:
        TypeError: the dtype cannot be stored (object, str, datetime,
            structured, platform-specific long double, ...).
    """
    name = _BY_DTYPE.get(dtype.newbyteorder("="))
    if name is None:
        raise TypeError(
            f"dtype {dtype} cannot be stored; supported: bool, int8-64, uint8-64, float16/32/64,"
            " complex64/128, and bfloat16/float8 via ml_dtypes"
        )
    return name


def dtype_from_name(name: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of a format dtype name.

    Raises:
        ValueError: the name is unknown, or needs ``ml_dtypes`` which is missing.
    """
    if name in _BASE:
        return np.dtype(_BASE[name]).newbyteorder("<")
    if name in _ML:
        return _ML[name]
    if name in _ML_DTYPES:
        raise ValueError(
            f"dtype {name} needs the ml_dtypes package (pip install ml_dtypes), or a newer one"
        )
    raise ValueError(f"unknown dtype {name!r}")


def group_width(name: str) -> int:
    """Byte-group width for a dtype: its float component size, or 1 (no
    grouping); with :data:`ROTATE` set for the dtypes that gain from it."""
    width = _FLOAT_NAMES.get(name, 1)
    return width | ROTATE if name in _ROTATED else width


def as_saveable(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A C-contiguous little-endian array with the same values (no copy when it already is)."""
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # np.ascontiguousarray would turn 0-d into 1-d
    return array


def byte_view(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A flat ``uint8`` view of a C-contiguous array (shares its memory)."""
    return array.reshape(-1).view(np.uint8)


def to_native(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Native byte order (a no-op on little-endian hosts)."""
    if sys.byteorder == "big" and array.dtype.byteorder == "<":
        return array.astype(array.dtype.newbyteorder("="))
    return array
