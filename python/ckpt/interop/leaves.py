"""The array leaves of a stored version, listed from its manifest and read in batches.

Writing a version in another format (``ckpt restore``, ``ckpt export``) or
comparing two versions (``ckpt diff``) needs every array of the tree under
its leaf path, not the rebuilt tree. :func:`list_leaves` lists them from the
manifest's skeleton:

* a ``tensor`` node is one entry of the tensor table;
* a ``view`` node (a tensor that shared memory with others when it was saved,
  e.g. tied weights) is materialised as an array of its own: its elements
  are gathered from the base entry (``offset``, ``shape``, ``stride`` in
  elements, checked to stay inside the base);
* a ``pickle`` node holds the bytes of a pickled object; it is listed (kind
  ``"pickle"``) so that callers can refuse or skip it, and is never unpickled.

Non-array leaves (ints, floats, strings, None) live in the skeleton only and
are not listed.

:func:`read_leaves` yields the bytes of the leaves a batch at a time (each
batch at most ``batch_bytes`` of table entries, or one entry when it is
larger), through :meth:`ckpt.Store.read_tensor_bytes`, which verifies every
chunk. Memory stays bounded by the batch, whatever the size of the version.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..adapters import numpy as npa
from ..errors import FormatError
from ..store import Store
from ..tree import iter_tensor_nodes

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "LeafInfo",
    "list_leaves",
    "read_leaves",
    "select",
    "stored_share",
    "typed",
]

#: Table bytes read per batch by :func:`read_leaves`.
DEFAULT_BATCH_BYTES = 256 << 20

#: dtype names numpy knows only through ml_dtypes.
_ML_DTYPES = frozenset(n for n in npa.DTYPE_NAMES if n == "BF16" or n.startswith("F8"))
_FLOAT_DTYPES = frozenset(
    {"F16", "F32", "F64", "BF16", "C64", "C128"}
    | {n for n in npa.DTYPE_NAMES if n.startswith("F8")}
)


@dataclass(frozen=True)
class LeafInfo:
    """One array leaf of a version.

    Attributes:
        path: the leaf path (the name in exported files).
        kind: ``"tensor"``, ``"view"`` or ``"pickle"``.
        index: the tensor-table entry holding its bytes (the base, for a view).
        dtype: dtype name (``F32``, ``BF16``, ...).
        shape: the leaf's shape.
        itemsize: bytes per element.
        scalar: the leaf was a numpy scalar.
        view: ``(offset, stride)`` in elements for a view, else None.
    """

    path: str
    kind: str
    index: int
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    scalar: bool = False
    view: tuple[int, tuple[int, ...]] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _data_nodes(tree: object) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, node) of every node that refers to the tensor table."""
    from .. import tree as tree_mod

    walker = getattr(tree_mod, "iter_data_nodes", None)
    if walker is not None:
        yield from walker(tree)
    else:  # a tree module without views and pickles
        for path, i in iter_tensor_nodes(tree):
            yield path, {"t": "tensor", "i": i}


def list_leaves(manifest: dict[str, Any]) -> list[LeafInfo]:
    """The array leaves of a manifest, in tree order.

    Raises:
        FormatError: the skeleton is malformed, or a view reaches outside its base.
    """
    vid = manifest.get("id")
    tensors = manifest["tensors"]
    out = []
    try:
        nodes = list(_data_nodes(manifest["tree"]))
    except ValueError as exc:
        raise FormatError(f"version {vid}: malformed tree: {exc}") from None
    for path, node in nodes:
        i = node["i"]
        if i >= len(tensors):
            raise FormatError(f"version {vid}: leaf {path!r} refers to a missing tensor {i}")
        t = tensors[i]
        numel = _numel(t["shape"])
        itemsize = int(t["nbytes"]) // numel if numel else _zero_itemsize(t["dtype"])
        kind = node.get("t", "tensor")
        if kind == "view":
            shape = tuple(int(d) for d in node["shape"])
            stride = tuple(int(s) for s in node["stride"])
            offset = int(node["offset"])
            if _numel(shape):
                last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
                if last >= numel:
                    raise FormatError(
                        f"version {vid}: view {path!r} reaches element {last} of a base of {numel}"
                    )
            out.append(
                LeafInfo(path, "view", i, t["dtype"], shape, itemsize, view=(offset, stride))
            )
        else:
            out.append(
                LeafInfo(
                    path,
                    "pickle" if kind == "pickle" else "tensor",
                    i,
                    t["dtype"],
                    tuple(int(d) for d in t["shape"]),
                    itemsize,
                    scalar=bool(t.get("scalar")),
                )
            )
    return out


def _zero_itemsize(name: str) -> int:
    try:
        return int(npa.dtype_from_name(name).itemsize)
    except ValueError:
        return 2 if name == "BF16" else 1


def select(leaves: Iterable[LeafInfo], patterns: Sequence[str] | None) -> list[LeafInfo]:
    """The leaves whose path matches any glob (``fnmatch``; ``*`` crosses ``/``); all for None."""
    if not patterns:
        return list(leaves)
    return [x for x in leaves if any(fnmatch.fnmatchcase(x.path, p) for p in patterns)]


def stored_share(entry: dict[str, Any], chunks: Sequence[Sequence[Any]]) -> int:
    """A tensor's share of the stored bytes: sum over its spans of len/raw_len*stored_len."""
    total = 0.0
    for ci, _, ln in entry["spans"]:
        _, raw_len, stored_len = chunks[ci][:3]
        if raw_len:
            total += ln / raw_len * stored_len
    return round(total)


def _materialise(leaf: LeafInfo, base: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The contiguous bytes of a view, gathered from its base's bytes."""
    assert leaf.view is not None
    offset, stride = leaf.view
    if leaf.numel == 0:
        return np.empty(0, np.uint8)
    items = base.view(np.dtype(f"V{leaf.itemsize}"))
    gathered = np.lib.stride_tricks.as_strided(
        items[offset:],
        shape=leaf.shape,
        strides=[s * leaf.itemsize for s in stride],
        writeable=False,
    )
    return np.ascontiguousarray(gathered).reshape(-1).view(np.uint8)


def read_leaves(
    store: Store,
    manifest: dict[str, Any],
    leaves: Sequence[LeafInfo],
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> Iterator[tuple[LeafInfo, np.ndarray[Any, Any]]]:
    """Yields ``(leaf, bytes)`` for each leaf, in the given order.

    ``bytes`` is a flat, C-contiguous ``uint8`` array of the leaf's elements in
    little-endian order (a view's elements gathered). Entries are read a
    batch at a time; a batch is verified before any of its leaves is yielded.

    Raises:
        IntegrityError: a chunk is damaged or missing.
        FormatError: a chunk or the manifest is malformed.
    """
    tensors = manifest["tensors"]
    batch: list[LeafInfo] = []
    wanted: set[int] = set()
    size = 0

    def flush() -> Iterator[tuple[LeafInfo, np.ndarray[Any, Any]]]:
        data = store.read_tensor_bytes(manifest, sorted(wanted))
        for leaf in batch:
            raw = data[leaf.index]
            yield leaf, (_materialise(leaf, raw) if leaf.kind == "view" else raw)

    for leaf in leaves:
        if leaf.index not in wanted:
            n = int(tensors[leaf.index]["nbytes"])
            if batch and size + n > batch_bytes:
                yield from flush()
                batch, wanted, size = [], set(), 0
            wanted.add(leaf.index)
            size += n
        batch.append(leaf)
    if batch:
        yield from flush()


def typed(
    leaf: LeafInfo, raw: np.ndarray[Any, Any], *, numpy_only: bool = False
) -> np.ndarray[Any, Any]:
    """The leaf's bytes as an array of its dtype and shape (native byte order).

    Args:
        numpy_only: return dtypes that come from ``ml_dtypes`` (bfloat16,
            float8) as raw ``V<itemsize>`` items, the only form a ``.npy``
            file can hold them in (numpy writes bfloat16 as ``<V2`` itself,
            and float8 with a header, ``<f1``, that it cannot read back).

    Raises:
        ValueError: the dtype is unknown, or needs ``ml_dtypes`` and it is
            missing (unless ``numpy_only``).
    """
    if numpy_only and leaf.dtype in _ML_DTYPES:
        dtype = np.dtype(f"V{leaf.itemsize}")
    else:
        dtype = npa.dtype_from_name(leaf.dtype)
    arr = raw.view(dtype).reshape(leaf.shape)
    return npa.to_native(arr)
