"""Flattening a state tree into leaves and back.

A state tree is nested ``dict`` / ``list`` / ``tuple`` whose leaves are arrays
(numpy, or whatever an adapter turns into numpy) or JSON-like scalars
(``int``, ``float``, ``bool``, ``str``, ``None``). :func:`flatten` turns it
into a JSON skeleton, where every array is replaced by ``{"t": "tensor", "i":
k}``, plus the list of arrays; :func:`unflatten` reverses it. Keys keep their
type (``int`` dict keys stay ints, tuples stay tuples); ``dict`` subclasses
such as ``OrderedDict`` come back as plain ``dict`` (insertion order kept).

Leaf paths join the keys with ``/``; inside a key ``~`` is written ``~0`` and
``/`` is written ``~1`` (as in JSON Pointer). Paths are unique within a tree:
a dict holding both ``1`` and ``"1"`` is refused on save.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where it is used: `import ckpt` and `ckpt ls`
    # stay free of its 50-70 ms import (docs/performance.md)
    import numpy as np

__all__ = [
    "MAX_DEPTH",
    "Leaf",
    "LeafHook",
    "Opaque",
    "View",
    "escape_key",
    "flatten",
    "iter_data_nodes",
    "iter_tensor_nodes",
    "unflatten",
]

#: Node types that refer to an entry of the tensor table by "i".
DATA_NODES = ("tensor", "view", "pickle")

#: Deepest nesting of containers accepted on save and on load.
MAX_DEPTH = 64

Node = dict[str, Any]


class Leaf:
    """An array leaf found by :func:`flatten`.

    Attributes:
        path: the leaf path (``/``-joined escaped keys).
        array: the numpy array holding the bytes (any layout; the store makes
            it contiguous and little-endian).
        scalar: a numpy scalar (comes back as one).
        dtype_name: the format's dtype name when the array's own dtype is only
            a same-width carrier (e.g. ``uint16`` bytes of a torch ``bfloat16``).
        extra: fields added to the tensor's manifest entry (e.g. ``leaf``,
            ``torch``, ``role``).
    """

    __slots__ = ("array", "dtype_name", "extra", "path", "scalar")

    def __init__(
        self,
        path: str,
        array: np.ndarray[Any, Any],
        scalar: bool = False,
        dtype_name: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.array = array
        self.scalar = scalar
        self.dtype_name = dtype_name
        self.extra = extra or {}


class View:
    """A tensor that shares memory with others: a strided view of a base leaf.

    An adapter returns a View for each tensor of a group that shares one
    storage (tied weights, views of one buffer); all views of a group name the
    same ``base_key`` and carry the same ``base`` leaf, which is stored once.
    """

    __slots__ = ("base", "base_key", "offset", "shape", "stride")

    def __init__(
        self, base_key: object, base: Leaf, offset: int, shape: list[int], stride: list[int]
    ) -> None:
        self.base_key = base_key
        self.base = base
        self.offset = offset
        self.shape = shape
        self.stride = stride


class Opaque:
    """An object an adapter stores as bytes under a node type of its own (pickle)."""

    __slots__ = ("kind", "leaf")

    def __init__(self, kind: str, leaf: Leaf) -> None:
        self.kind = kind
        self.leaf = leaf


LeafHook = Callable[[str, object], "Leaf | View | Opaque | None"]


def escape_key(key: str | int) -> str:
    """Path component of a dict key or sequence index."""
    return str(key).replace("~", "~0").replace("/", "~1")


def _join(prefix: str, key: str | int) -> str:
    part = escape_key(key)
    return f"{prefix}/{part}" if prefix else part


def _float_node(value: float) -> Node:
    if math.isfinite(value):
        return {"t": "float", "v": value}
    return {"t": "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _describe(obj: object) -> str:
    kind = type(obj)
    return (
        f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__name__
    )


def flatten(tree: object, to_leaf: LeafHook | None = None) -> tuple[Node, list[Leaf]]:
    """Splits ``tree`` into a JSON skeleton and its array leaves.

    Args:
        tree: the state tree.
        to_leaf: optional adapter hook, called for objects that are not
            containers, scalars or numpy arrays: returns a :class:`Leaf`
            (a tensor), a :class:`View` (a tensor sharing memory with
            others), an :class:`Opaque` (bytes under its own node type), or
            None when it does not recognise the object.

    Returns:
        ``(skeleton, leaves)``; ``skeleton`` is JSON-serialisable.

    Raises:
        TypeError: a leaf or key is of an unsupported type (the message names
            its path), or the tree nests deeper than :data:`MAX_DEPTH`.
    """
    import numpy as np

    leaves: list[Leaf] = []
    bases: dict[object, int] = {}

    def walk(obj: object, path: str, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise TypeError(
                f"the state tree nests deeper than {MAX_DEPTH} levels at {path or '<root>'!r}"
                " (is there a reference cycle?)"
            )
        if isinstance(obj, np.generic):  # before float: np.float64 subclasses float
            leaves.append(Leaf(path, np.asarray(obj), scalar=True))
            return {"t": "tensor", "i": len(leaves) - 1}
        if obj is None:
            return {"t": "none"}
        if isinstance(obj, bool):
            return {"t": "bool", "v": obj}
        if isinstance(obj, int):
            return {"t": "int", "v": int(obj)}
        if isinstance(obj, float):
            return _float_node(float(obj))
        if isinstance(obj, str):
            return {"t": "str", "v": obj}
        if isinstance(obj, np.ndarray):
            leaves.append(Leaf(path, obj, scalar=False))
            return {"t": "tensor", "i": len(leaves) - 1}
        if isinstance(obj, dict):
            keys: list[str | int] = []
            values: list[Node] = []
            seen: dict[str, object] = {}
            for key, value in obj.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TypeError(
                        f"dict key {key!r} at {path or '<root>'!r} is a {_describe(key)};"
                        " keys must be str or int"
                    )
                if str(key) in seen:
                    raise TypeError(
                        f"dict keys {seen[str(key)]!r} and {key!r} at {path or '<root>'!r} give"
                        " the same leaf path; rename one of them"
                    )
                seen[str(key)] = key
                keys.append(key if isinstance(key, str) else int(key))
                values.append(walk(value, _join(path, key), depth + 1))
            return {"t": "dict", "k": keys, "v": values}
        if isinstance(obj, (list, tuple)):
            items = [walk(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]
            return {"t": "tuple" if isinstance(obj, tuple) else "list", "v": items}
        if to_leaf is not None:
            found = to_leaf(path, obj)
            if isinstance(found, Leaf):
                found.path = path
                leaves.append(found)
                return {"t": "tensor", "i": len(leaves) - 1}
            if isinstance(found, View):
                if found.base_key not in bases:
                    found.base.path = f"#storage/{len(bases)}"
                    leaves.append(found.base)
                    bases[found.base_key] = len(leaves) - 1
                return {
                    "t": "view",
                    "i": bases[found.base_key],
                    "offset": found.offset,
                    "shape": found.shape,
                    "stride": found.stride,
                }
            if isinstance(found, Opaque):
                found.leaf.path = path
                leaves.append(found.leaf)
                return {"t": found.kind, "i": len(leaves) - 1}
        raise TypeError(
            f"leaf {path or '<root>'!r} is a {_describe(obj)}, which ckpt cannot store without"
            " pickle; a state tree holds dict/list/tuple of arrays, int, float, bool, str and"
            " None (convert objects to their state_dict() or to arrays first)"
        )

    return walk(tree, "", 0), leaves


def iter_tensor_nodes(node: object) -> Iterator[tuple[str, int]]:
    """Yields ``(path, tensor index)`` for every node that refers to the tensor table."""
    for path, n in iter_data_nodes(node):
        yield path, n["i"]


def iter_data_nodes(node: object, path: str = "", depth: int = 0) -> Iterator[tuple[str, Node]]:
    """Yields ``(path, node)`` for every tensor, view and pickle node of a skeleton.

    Checks every node on the way: its type tag, its keys and values, and that
    the keys of a dict give distinct leaf paths.

    Raises:
        ValueError: a node is malformed (unknown type, missing or mistyped
            field, two dict keys with the same path), a tensor index is not a
            non-negative int, or the tree nests deeper than :data:`MAX_DEPTH`.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"tree nests deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise ValueError(f"malformed tree node at {path!r}")
    t = node.get("t")
    if t in DATA_NODES:
        index = node.get("i")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{t} node at {path!r} has index {index!r}")
        if t == "view":
            for field in ("shape", "stride"):
                dims = node.get(field)
                if (
                    not isinstance(dims, list)
                    or len(dims) > 64
                    or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims
                    )
                ):
                    raise ValueError(f"view node at {path!r} has a bad {field}")
            offset = node.get("offset")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"view node at {path!r} has a bad offset")
            if len(node["shape"]) != len(node["stride"]):
                raise ValueError(f"view node at {path!r}: shape and stride differ in length")
        yield path, node
    elif t == "dict":
        keys, values = node.get("k"), node.get("v")
        if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
            raise ValueError(f"malformed dict node at {path!r}")
        seen: set[str] = set()
        for key, value in zip(keys, values, strict=True):
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(f"dict key {key!r} at {path!r} is not str or int")
            if str(key) in seen:
                raise ValueError(f"dict at {path!r} holds key {key!r} twice (duplicate leaf path)")
            seen.add(str(key))
            yield from iter_data_nodes(value, _join(path, key), depth + 1)
    elif t in ("list", "tuple"):
        values = node.get("v")
        if not isinstance(values, list):
            raise ValueError(f"malformed {t} node at {path!r}")
        for i, value in enumerate(values):
            yield from iter_data_nodes(value, _join(path, i), depth + 1)
    elif not _is_scalar_node(t, node.get("v")):
        raise ValueError(f"malformed leaf node {t!r} at {path!r}")


def _is_scalar_node(t: object, v: object) -> bool:
    """Whether ``{"t": t, "v": v}`` is a well-formed scalar leaf node."""
    if t == "none":
        return True
    if t == "bool":
        return isinstance(v, bool)
    if t == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "str":
        return isinstance(v, str)
    if t == "float":
        return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in (
            "nan",
            "inf",
            "-inf",
        )
    return False


_MISSING = object()


def unflatten(
    node: Node,
    tensors: dict[int, object],
    keep: Callable[[str], bool] | None = None,
    make: Callable[[Node, object], object] | None = None,
) -> object:
    """Rebuilds a tree from its skeleton and the loaded tensors.

    Args:
        node: the skeleton made by :func:`flatten` (from a manifest).
        tensors: loaded tensors by index.
        keep: when given, only leaves whose path it accepts are rebuilt;
            containers left empty by the selection are dropped (except the root).
        make: builds the object of a ``view`` or ``pickle`` node from the
            node and its loaded base tensor.

    Raises:
        ValueError: the skeleton is malformed (unknown node type, bad keys,
            too deep, a tensor index that was not loaded).
    """

    def build(n: Node, path: str, depth: int) -> object:
        if depth > MAX_DEPTH:
            raise ValueError(f"tree nests deeper than {MAX_DEPTH} levels")
        if not isinstance(n, dict):
            raise ValueError(f"malformed tree node at {path!r}")
        t = n.get("t")
        if t in ("dict", "list", "tuple"):
            if t == "dict":
                keys = n.get("k")
                values = n.get("v")
                if not isinstance(keys, list) or not isinstance(values, list):
                    raise ValueError(f"malformed dict node at {path!r}")
                if len(keys) != len(values):
                    raise ValueError(
                        f"dict node at {path!r} has {len(keys)} keys, {len(values)} values"
                    )
                out: dict[str | int, object] = {}
                for key, value in zip(keys, values, strict=True):
                    if isinstance(key, bool) or not isinstance(key, (str, int)):
                        raise ValueError(f"dict key {key!r} at {path!r} is not str or int")
                    child = build(value, _join(path, key), depth + 1)
                    if child is not _MISSING:
                        out[key] = child
                if keep is not None and not out and path:
                    return _MISSING
                return out
            values = n.get("v")
            if not isinstance(values, list):
                raise ValueError(f"malformed {t} node at {path!r}")
            items = [build(v, _join(path, i), depth + 1) for i, v in enumerate(values)]
            kept = [x for x in items if x is not _MISSING]
            if keep is not None and not kept and path:
                return _MISSING
            return tuple(kept) if t == "tuple" else kept
        if keep is not None and not keep(path):
            return _MISSING
        if t in DATA_NODES:
            index = n.get("i")
            if not isinstance(index, int) or index not in tensors:
                raise ValueError(f"{t} node at {path!r} refers to unknown tensor {index!r}")
            if t == "tensor":
                return tensors[index]
            if make is None:
                raise ValueError(f"no loader for {t} node at {path!r}")
            return make(n, tensors[index])
        if t == "none":
            return None
        v = n.get("v")
        if t == "bool" and isinstance(v, bool):
            return v
        if t == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if t == "str" and isinstance(v, str):
            return v
        if t == "float":
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            if v in ("nan", "inf", "-inf"):
                return float(v)
        raise ValueError(f"malformed leaf node {t!r} at {path!r}")

    result = build(node, "", 0)
    return {} if result is _MISSING else result
