"""safetensors files: writing, reading, exporting a version and importing one.

The safetensors format is small enough to implement here, which keeps the
``safetensors`` package an optional (test and benchmark) dependency and lets
tensors be written as they are read from the store, one batch at a time:

* 8 bytes: little-endian u64 ``N``, the header length;
* ``N`` bytes: a JSON object ``{"__metadata__": {str: str}?, NAME: {"dtype",
  "shape", "data_offsets": [begin, end]}, ...}``, padded with spaces to a
  multiple of 8;
* the tensor data, back to back, offsets relative to the end of the header.

Layout, as ``safetensors`` (0.4 to 0.8) writes it, so that a file written
here is byte-identical to ``safetensors.numpy.save_file`` on the same arrays:
tensors are sorted by dtype, descending in safetensors' ``Dtype`` order
(which is by alignment), then by name; the header is compact JSON
(``serde_json``: no spaces, non-ASCII as UTF-8, the same escapes as
Python's ``json`` with ``ensure_ascii=False``), ``__metadata__`` first. One
difference: safetensors writes the ``__metadata__`` entries in hash-map order
(random for more than one key); here they are sorted, so output is
deterministic (identical to safetensors' whenever there are 0 or 1 keys).

dtype names are ckpt's own, which are safetensors' (``F32``, ``BF16``,
``F8_E4M3``, ...). ``C128`` and ``F8_E4M3B11FNUZ`` have no safetensors name
and are refused on write.

Export and import (``ckpt export`` / ``ckpt import``): the tensors are the
version's array leaves, named by leaf path (views of shared storage become
tensors of their own). Everything else is one JSON document under the
``__metadata__`` key ``"ckpt"``: ``{"format": "ckpt-export", "version": 1,
"step", "epoch", "metrics", "meta", "trainer", "tree"}``, where ``tree`` is
the manifest's skeleton (docs/format.md 7.4) with each array node written
``{"t": "tensor", "n": NAME}`` (plus ``"scalar": true`` for numpy scalars).
Import rebuilds the exact tree (int keys, tuples, scalars) from it; a file
without that key (any safetensors file) imports as a flat ``{name: array}``
dict (a ``/`` in a name is then part of the key, so its leaf path spells it
``~1``), its own metadata kept in ``meta["safetensors_metadata"]``. The
document holds no id, time or path, so export -> import -> export gives the
same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from ..adapters import numpy as npa
from ..errors import FormatError
from ..index import Version, decode_metrics
from ..store import Store
from ..tree import unflatten
from .leaves import LeafInfo, list_leaves, read_leaves

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "METADATA_KEY",
    "Imported",
    "SAFETENSORS_DTYPES",
    "Layout",
    "SafetensorsWriter",
    "TensorSpec",
    "export_version",
    "import_file",
    "layout",
    "load_file",
    "read_header",
    "read_import",
    "save_file",
]

#: safetensors' ``Dtype`` enum in declaration (ascending alignment) order, for
#: the names ckpt knows. Files list tensors in the reverse of this order.
SAFETENSORS_DTYPES: tuple[str, ...] = (
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
_RANK = {name: i for i, name in enumerate(SAFETENSORS_DTYPES)}
#: Largest header safetensors reads.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "ckpt"
EXPORT_FORMAT = "ckpt-export"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype name, shape and byte length of one tensor of a file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where everything goes in a safetensors file.

    Attributes:
        header: the 8-byte length and the padded JSON header.
        offsets: name -> (begin, end) of its data, from the start of the file.
        order: tensor names in file order.
        size: total file size.
    """

    header: bytes
    offsets: dict[str, tuple[int, int]]
    order: tuple[str, ...]
    size: int


def _dumps(obj: object) -> str:
    # serde_json::to_string: compact, UTF-8, control characters escaped like Python's.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def layout(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> Layout:
    """The header and data offsets safetensors would choose for these tensors.

    Raises:
        ValueError: a dtype safetensors has no name for, a duplicate name, a
            byte length that does not match the shape, or non-string metadata.
    """
    items = list(specs)
    names = set()
    for s in items:
        if s.dtype not in _RANK:
            raise ValueError(
                f"tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot hold;"
                " write .npz or a directory of .npy files instead"
            )
        if s.name in names:
            raise ValueError(f"two tensors are named {s.name!r}")
        if s.name == "__metadata__":
            raise ValueError(
                "a tensor cannot be named '__metadata__' in safetensors (the header's metadata"
                " key); write .npz or a directory of .npy files instead"
            )
        names.add(s.name)
    items.sort(key=lambda s: (-_RANK[s.dtype], s.name))
    head: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata maps str to str")
        head["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offsets = {}
    position = 0
    for s in items:
        head[s.name] = {
            "dtype": s.dtype,
            "shape": [int(d) for d in s.shape],
            "data_offsets": [position, position + s.nbytes],
        }
        offsets[s.name] = (position, position + s.nbytes)
        position += s.nbytes
    text = _dumps(head).encode("utf-8")
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text)) + text
    start = len(header)
    return Layout(
        header,
        {k: (a + start, b + start) for k, (a, b) in offsets.items()},
        tuple(s.name for s in items),
        start + position,
    )


def _spec_of(name: str, array: np.ndarray[Any, Any]) -> TensorSpec:
    return TensorSpec(name, npa.dtype_name(array.dtype), tuple(array.shape), int(array.nbytes))


class SafetensorsWriter:
    """Writes a safetensors file whose tensors arrive in any order.

    The header is written first and the file extended to its final size;
    each :meth:`write` puts one tensor's bytes at its offset. The file is
    built under a temporary name next to ``path`` and renamed into place by
    :meth:`commit`, so a failed write never leaves a truncated file there.

    Not thread-safe. Use as a context manager: leaving it by an exception
    removes the temporary file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: see :func:`layout`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        specs = list(specs)
        self.layout = layout(specs, metadata)
        self._sizes = {s.name: s.nbytes for s in specs}
        self._written: set[str] = set()
        if not overwrite and os.path.lexists(self.path):
            raise FileExistsError(17, "file exists (pass --force to overwrite)", self.path)
        folder = os.path.dirname(os.path.abspath(self.path))
        self._tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        self._fd: int | None = os.open(self._tmp, flags, 0o644)
        self.overwrite = overwrite
        try:
            self._pwrite(self.layout.header, 0)
            os.ftruncate(self._fd, self.layout.size)
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, data: Any, offset: int) -> None:
        assert self._fd is not None
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, data: np.ndarray[Any, Any] | bytes) -> None:
        """Writes one tensor's bytes (C order, little-endian)."""
        if name not in self._sizes:
            raise KeyError(f"no tensor {name!r} in this file's layout")
        arr = np.ascontiguousarray(
            np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
        )
        raw = arr.reshape(-1).view(np.uint8)
        if raw.nbytes != self._sizes[name]:
            raise ValueError(
                f"tensor {name!r}: {raw.nbytes} bytes for a slot of {self._sizes[name]}"
            )
        if raw.nbytes:
            self._pwrite(raw, self.layout.offsets[name][0])
        self._written.add(name)

    def commit(self, durable: bool = False) -> None:
        """Renames the finished file into place.

        Raises:
            ValueError: some tensors were not written.
        """
        missing = set(self._sizes) - self._written
        if missing:
            raise ValueError(f"{len(missing)} tensors were not written, e.g. {min(missing)!r}")
        assert self._fd is not None
        if durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        if not self.overwrite and os.path.lexists(self.path):
            self.abort()
            raise FileExistsError(17, "file exists (pass --force to overwrite)", self.path)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Removes the temporary file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.abort()


def save_file(
    tensors: Mapping[str, np.ndarray[Any, Any]],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
) -> None:
    """Like ``safetensors.numpy.save_file`` (same bytes), for every dtype ckpt stores."""
    arrays = {k: npa.as_saveable(np.asarray(v)) for k, v in tensors.items()}
    with SafetensorsWriter(
        path, [_spec_of(k, a) for k, a in arrays.items()], metadata, overwrite=overwrite
    ) as w:
        for k, a in arrays.items():
            w.write(k, npa.byte_view(a))
        w.commit()


# ----------------------------------------------------------------- reading
def read_header(f: BinaryIO, where: str) -> tuple[dict[str, TensorSpec], dict[str, str], int]:
    """Parses and validates a safetensors header.

    Returns:
        (tensors by name in file order, metadata, data start offset).

    Raises:
        FormatError: not a valid safetensors file (the message says why).
    """
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise FormatError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise FormatError(f"{where}: not a safetensors file (header length {n} is impossible)")
    try:
        head = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{where}: not a safetensors file (bad JSON header: {exc})") from None
    if not isinstance(head, dict):
        raise FormatError(f"{where}: safetensors header is not a JSON object")
    meta = head.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    entries = []
    for name, info in head.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in npa.DTYPE_NAMES:
                raise ValueError(f"dtype {dtype!r} is not one ckpt stores")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise ValueError(f"bad shape {shape!r}")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            ):
                raise ValueError(f"bad data_offsets {offsets!r}")
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * _itemsize(dtype)
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(
                    f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes,"
                    f" {dtype} {shape} needs {nbytes}"
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{where}: tensor {name!r}: {exc}") from None
        entries.append((offsets[0], offsets[1], TensorSpec(name, dtype, tuple(shape), nbytes)))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, spec in entries:
        if begin != position:
            raise FormatError(
                f"{where}: tensor {spec.name!r} does not start where the previous ends"
            )
        position = end
    if 8 + n + position != file_size:
        raise FormatError(
            f"{where}: the data section holds {file_size - 8 - n} bytes, the header describes"
            f" {position} (truncated or trailing data)"
        )
    return {spec.name: spec for _, _, spec in entries}, meta, 8 + n


def _itemsize(name: str) -> int:
    try:
        return int(npa.dtype_from_name(name).itemsize)
    except ValueError:
        return {"BF16": 2, "C128": 16}.get(name, 1)


def load_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, str]]:
    """Reads a safetensors file: (arrays by name, in file order; metadata).

    Raises:
        FormatError: a malformed file, or a dtype that needs ``ml_dtypes``
            when it is not installed.
    """
    where = os.fspath(path)
    with open(path, "rb") as f:
        specs, meta, start = read_header(f, where)
        out = {}
        f.seek(start)
        for spec in specs.values():
            try:
                dtype = npa.dtype_from_name(spec.dtype)
            except ValueError as exc:
                raise FormatError(f"{where}: tensor {spec.name!r}: {exc}") from None
            buf = np.empty(spec.nbytes, np.uint8)
            if f.readinto(buf.data) != spec.nbytes:
                raise FormatError(f"{where}: truncated while reading {spec.name!r}")
            out[spec.name] = npa.to_native(buf.view(dtype).reshape(spec.shape))
    return out, meta


# ------------------------------------------------------- export and import
def _export_tree(node: Any, leaves_by_path: Mapping[str, LeafInfo], path: str = "") -> Any:
    """The manifest skeleton with array nodes naming their tensor."""
    from ..tree import escape_key

    def join(key: str | int) -> str:
        part = escape_key(key)
        return f"{path}/{part}" if path else part

    t = node.get("t")
    if t == "dict":
        return {
            "t": "dict",
            "k": list(node["k"]),
            "v": [
                _export_tree(v, leaves_by_path, join(k))
                for k, v in zip(node["k"], node["v"], strict=True)
            ],
        }
    if t in ("list", "tuple"):
        return {
            "t": t,
            "v": [_export_tree(v, leaves_by_path, join(i)) for i, v in enumerate(node["v"])],
        }
    if t in ("tensor", "view"):
        leaf = leaves_by_path[path]
        out: dict[str, Any] = {"t": "tensor", "n": path}
        if leaf.scalar:
            out["scalar"] = True
        return out
    if t == "pickle":
        raise ValueError(
            f"leaf {path!r} is a pickled object; safetensors holds arrays and JSON only"
            " (ckpt restore --only can write the arrays)"
        )
    return dict(node)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_version` wrote."""

    path: str
    version: int
    tensors: int
    bytes: int


def export_version(
    store: Store,
    version: int | Version | str,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Writes a version as a safetensors file that :func:`import_file` restores exactly.

    Args:
        progress: called with the byte count of each tensor as it is written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: the version holds pickled objects or dtypes safetensors lacks.
        IntegrityError, FormatError: the store is damaged.
    """
    m = store.manifest(version)
    leaves = list_leaves(m)
    by_path = {leaf.path: leaf for leaf in leaves}
    if len(by_path) != len(leaves):
        raise FormatError(f"version {m['id']}: two array leaves share a path")
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "step": m.get("step"),
        "epoch": m.get("epoch"),
        "metrics": m.get("metrics", {}),
        "meta": m.get("meta", {}),
        "trainer": m.get("trainer", {}),
        "tree": _export_tree(m["tree"], by_path),
    }
    metadata = {METADATA_KEY: json.dumps(doc, separators=(",", ":"), allow_nan=False)}
    specs = [TensorSpec(x.path, x.dtype, x.shape, x.nbytes) for x in leaves]
    total = 0
    with SafetensorsWriter(path, specs, metadata, overwrite=overwrite) as w:
        for leaf, raw in read_leaves(store, m, leaves):
            w.write(leaf.path, raw)
            total += raw.nbytes
            if progress is not None:
                progress(raw.nbytes)
        w.commit(durable=True)
    return ExportResult(os.fspath(path), int(m["id"]), len(leaves), total)


def _import_tree(
    node: Any,
    arrays: Mapping[str, np.ndarray[Any, Any]],
    table: list[object],
    used: set[str],
    path: str = "",
    depth: int = 0,
) -> Any:
    """The export skeleton with tensor names replaced by indices into ``table``."""
    from ..tree import MAX_DEPTH, escape_key

    if depth > MAX_DEPTH:
        raise ValueError(f"tree nests deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise ValueError(f"malformed tree node at {path!r}")

    def join(key: object) -> str:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"dict key {key!r} at {path!r} is not str or int")
        part = escape_key(key)
        return f"{path}/{part}" if path else part

    t = node.get("t")
    if t == "dict":
        keys, values = node.get("k"), node.get("v")
        if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
            raise ValueError(f"malformed dict node at {path!r}")
        return {
            "t": "dict",
            "k": keys,
            "v": [
                _import_tree(v, arrays, table, used, join(k), depth + 1)
                for k, v in zip(keys, values, strict=True)
            ],
        }
    if t in ("list", "tuple"):
        values = node.get("v")
        if not isinstance(values, list):
            raise ValueError(f"malformed {t} node at {path!r}")
        return {
            "t": t,
            "v": [
                _import_tree(v, arrays, table, used, join(i), depth + 1)
                for i, v in enumerate(values)
            ],
        }
    if t == "tensor":
        name = node.get("n")
        if name != path:
            raise ValueError(f"tensor node at {path!r} names {name!r}")
        if name not in arrays:
            raise ValueError(f"tensor {name!r} is not in the file")
        if name in used:
            raise ValueError(f"tensor {name!r} is used twice")
        used.add(name)
        a = arrays[name]
        table.append(a[()] if node.get("scalar") is True else a)
        return {"t": "tensor", "i": len(table) - 1}
    return node


@dataclass(frozen=True)
class Imported:
    """A safetensors file read for import: the tree and what to save with it."""

    tree: object
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    trainer: dict[str, Any] | None = None

    def save(self, store: Store, step: int | None = None) -> Version:
        """Saves it as a new version (``step`` overrides the file's)."""
        return store.save(
            self.tree,
            step=step if step is not None else self.step,
            epoch=self.epoch,
            metrics=self.metrics,
            meta=self.meta,
            trainer=self.trainer,
        )


def _opt_count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def read_import(path: str | os.PathLike[str], *, flat: bool = False) -> Imported:
    """Reads and checks a safetensors file for :func:`import_file` (writes nothing).

    Raises:
        FormatError: the file is malformed, its ckpt metadata does not match
            its tensors, or it was exported by a newer ckpt.
    """
    where = os.fspath(path)
    arrays, meta = load_file(path)
    text = meta.get(METADATA_KEY)
    if text is None or flat:
        others = {k: v for k, v in meta.items() if k != METADATA_KEY}
        return Imported(
            {name: arrays[name] for name in sorted(arrays)},
            meta={"safetensors_metadata": others} if others else None,
        )
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
            raise ValueError("not a ckpt export document")
        v = doc.get("version")
        if isinstance(v, int) and not isinstance(v, bool) and v > EXPORT_VERSION:
            raise FormatError(
                f"{where} was exported by a newer ckpt (export format {v}; this one reads"
                f" {EXPORT_VERSION}); upgrade ckpt-store, or pass --flat"
            )
        if v != EXPORT_VERSION:
            raise ValueError(f"unknown export format version {v!r}")
        table: list[object] = []
        used: set[str] = set()
        skeleton = _import_tree(doc["tree"], arrays, table, used)
        if used != set(arrays):
            extra = sorted(set(arrays) - used)
            raise ValueError(f"tensor {extra[0]!r} is in the file but not in the tree")
        meta_doc, trainer = doc.get("meta", {}), doc.get("trainer", {})
        if not isinstance(meta_doc, dict) or not isinstance(trainer, dict):
            raise ValueError("meta and trainer must be objects")
        return Imported(
            unflatten(skeleton, dict(enumerate(table))),
            step=_opt_count(doc.get("step"), "step"),
            epoch=_opt_count(doc.get("epoch"), "epoch"),
            metrics=decode_metrics(doc.get("metrics", {})),
            meta=meta_doc,
            trainer=trainer,
        )
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise FormatError(
            f"{where}: the {METADATA_KEY!r} metadata does not describe this file ({exc});"
            " pass --flat to import the tensors as a flat dict"
        ) from None


def import_file(
    store: Store,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    flat: bool = False,
) -> Version:
    """Saves a safetensors file as a new version of ``store``.

    Args:
        step: the version's step (default: the exported one, else none).
        flat: ignore ckpt's metadata and import a flat ``{name: array}`` dict.

    Raises:
        FormatError: the file is malformed, its ckpt metadata does not match
            its tensors, or it was exported by a newer ckpt.
    """
    return read_import(path, flat=flat).save(store, step)
