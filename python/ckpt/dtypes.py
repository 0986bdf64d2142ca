"""The format's dtype names and their item sizes (docs/format.md), without numpy.

Reading and validating a manifest needs only these; keeping them apart from
:mod:`ckpt.adapters.numpy` keeps numpy's 50-70 ms import out of the commands
that only list (``ckpt ls`` on 10,000 versions answers within 0.3 s).
"""

from __future__ import annotations

__all__ = ["DTYPE_NAMES", "itemsize_of"]

#: Item size in bytes of each dtype name (safetensors' names), numpy's first,
#: then those numpy knows only through ``ml_dtypes``.
ITEMSIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "U32": 4,
    "I32": 4,
    "U64": 8,
    "I64": 8,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "C64": 8,
    "C128": 16,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E4M3B11FNUZ": 1,
    "F8_E8M0": 1,
}

#: Every dtype name of the format.
DTYPE_NAMES: tuple[str, ...] = tuple(ITEMSIZES)


def itemsize_of(name: str) -> int:
    """Item size in bytes of a format dtype name.

    Raises:
        KeyError: the name is not a dtype of the format.
    """
    return ITEMSIZES[name]
