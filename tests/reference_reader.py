"""An independent reader of ckpt stores, format version 1.

Written from ``docs/format.md`` alone (section numbers below refer to it) and
using only numpy, ``zstandard`` and ``blake3`` (plus ``ml_dtypes`` for the
bfloat16 / float8 dtypes when it is importable). It deliberately does not
import ``ckpt``: it exists to show that the document is sufficient and to catch
the implementation drifting away from it.

Entry point: :func:`read_version` ``(root, version_id) -> (tree, manifest)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import zstandard

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is in the test extras
    ml_dtypes = None

__all__ = [
    "DTYPES",
    "ChunkHeader",
    "ReaderError",
    "decode_chunk",
    "decode_plane",
    "dtype_of",
    "object_path",
    "parse_chunk_header",
    "read_chunk",
    "read_manifest",
    "read_version",
    "validate_manifest",
]

# ---------------------------------------------------------------- constants (sections 5, 13)
MAGIC = b"CKPTCHNK"
CHUNK_VERSION = 1
FIXED_HEADER = 24
PLANE_ENTRY = 16
MAX_RAW_LEN = 1 << 30
MAX_PLANES = 16
MAX_ZSTD_STORED = 1 << 31
MAX_MARKER = 64 << 10
MAX_MANIFEST = 256 << 20
MAX_DEPTH = 64
MAX_DIMS = 64
MAX_NUMEL = 1 << 62
MAX_TENSORS = 10_000_000
FILTER_NONE, FILTER_BYTEGROUP = 0, 1
CODEC_RAW, CODEC_ZSTD = 0, 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")

# name -> (numpy dtype spec or ml_dtypes attribute, itemsize, group width)  (section 7.5)
DTYPES: dict[str, tuple[str, int, int]] = {
    "BOOL": ("bool", 1, 1),
    "U8": ("u1", 1, 1),
    "I8": ("i1", 1, 1),
    "U16": ("<u2", 2, 1),
    "I16": ("<i2", 2, 1),
    "U32": ("<u4", 4, 1),
    "I32": ("<i4", 4, 1),
    "U64": ("<u8", 8, 1),
    "I64": ("<i8", 8, 1),
    "F16": ("<f2", 2, 2),
    "F32": ("<f4", 4, 4),
    "F64": ("<f8", 8, 8),
    "C64": ("<c8", 8, 4),
    "C128": ("<c16", 16, 8),
    "BF16": ("ml_dtypes.bfloat16", 2, 2),
    "F8_E4M3": ("ml_dtypes.float8_e4m3fn", 1, 1),
    "F8_E5M2": ("ml_dtypes.float8_e5m2", 1, 1),
    "F8_E4M3FNUZ": ("ml_dtypes.float8_e4m3fnuz", 1, 1),
    "F8_E5M2FNUZ": ("ml_dtypes.float8_e5m2fnuz", 1, 1),
    "F8_E4M3B11FNUZ": ("ml_dtypes.float8_e4m3b11fnuz", 1, 1),
    "F8_E8M0": ("ml_dtypes.float8_e8m0fnu", 1, 1),
}


class ReaderError(ValueError):
    """The store violates docs/format.md (malformed, damaged or missing data)."""


def dtype_of(name: str) -> np.dtype[Any]:
    """The numpy dtype of a format dtype name (section 7.5)."""
    if name not in DTYPES:
        raise ReaderError(f"unknown dtype {name!r}")
    spec, itemsize, _ = DTYPES[name]
    if spec.startswith("ml_dtypes."):
        attr = spec.split(".", 1)[1]
        if ml_dtypes is None or not hasattr(ml_dtypes, attr):
            raise ReaderError(f"dtype {name} needs ml_dtypes.{attr}")
        dt = np.dtype(getattr(ml_dtypes, attr))
    else:
        dt = np.dtype(spec)
    assert dt.itemsize == itemsize
    return dt


# ---------------------------------------------------------------- JSON helpers (section 1)
def _reject_constant(name: str) -> Any:
    raise ReaderError(f"JSON literal {name} is not allowed (non-finite floats are strings)")


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ReaderError(f"{what}: not JSON ({exc})") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg(v: object, what: str) -> int:
    if not _is_int(v) or v < 0:  # type: ignore[operator]
        raise ReaderError(f"{what} must be a non-negative integer, got {v!r}")
    return v  # type: ignore[return-value]


def _read_regular(path: str, limit: int, what: str) -> bytes:
    """Reads a regular file without following a symlink, refusing more than ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ReaderError(f"{what}: {path} is missing") from None
    except OSError as exc:
        raise ReaderError(f"{what}: cannot open {path} ({exc})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ReaderError(f"{what}: {path} is not a regular file")
        if st.st_size > limit:
            raise ReaderError(f"{what}: {path} exceeds {limit} bytes")
        data = f.read(st.st_size + 1)
    if len(data) != st.st_size:
        raise ReaderError(f"{what}: {path} changed while being read")
    return data


# ---------------------------------------------------------------- marker (section 3)
def check_marker(root: str | os.PathLike[str]) -> dict[str, Any]:
    data = _read_regular(os.path.join(root, "ckpt-store.json"), MAX_MARKER, "marker")
    info = _loads(data, "marker")
    if not isinstance(info, dict) or info.get("format") != "ckpt-store":
        raise ReaderError("not a ckpt store marker")
    if info.get("version") != 1:
        raise ReaderError(f"unsupported store format version {info.get('version')!r}")
    for d in ("objects", "versions"):
        if not os.path.isdir(os.path.join(root, d)):
            raise ReaderError(f"store layout damaged: {d}/ is missing")
    return info


# ---------------------------------------------------------------- chunk files (section 5)
@dataclass(frozen=True)
class ChunkHeader:
    """A parsed chunk header (section 5.1)."""

    version: int
    filter: int
    n: int
    raw_len: int
    planes: tuple[tuple[int, int], ...]  # (codec, stored length) per plane

    @property
    def header_len(self) -> int:
        return FIXED_HEADER + PLANE_ENTRY * self.n

    @property
    def plane_len(self) -> int:
        return self.raw_len // self.n

    @property
    def file_len(self) -> int:
        return self.header_len + sum(s for _, s in self.planes)


def parse_chunk_header(data: bytes) -> ChunkHeader:
    """Parses and checks the header at the start of ``data`` (section 5.1)."""
    if len(data) < FIXED_HEADER:
        raise ReaderError(f"chunk of {len(data)} bytes is shorter than the fixed header")
    if data[:8] != MAGIC:
        raise ReaderError("bad chunk magic")
    (version,) = struct.unpack_from("<H", data, 8)
    if version != CHUNK_VERSION:
        raise ReaderError(f"unsupported chunk format version {version}")
    filt, n = data[10], data[11]
    if not (
        (filt == FILTER_NONE and n == 1) or (filt == FILTER_BYTEGROUP and 2 <= n <= MAX_PLANES)
    ):
        raise ReaderError(f"bad filter {filt} with {n} planes")
    if data[12:16] != b"\0\0\0\0":
        raise ReaderError("reserved header bytes are not zero")
    (raw_len,) = struct.unpack_from("<Q", data, 16)
    if raw_len > MAX_RAW_LEN:
        raise ReaderError(f"raw length {raw_len} exceeds 2^30")
    if raw_len % n:
        raise ReaderError(f"raw length {raw_len} is not a multiple of {n}")
    if len(data) < FIXED_HEADER + PLANE_ENTRY * n:
        raise ReaderError("chunk is shorter than its plane table")
    planes = []
    for i in range(n):
        base = FIXED_HEADER + PLANE_ENTRY * i
        codec = data[base]
        if codec not in (CODEC_RAW, CODEC_ZSTD):
            raise ReaderError(f"plane {i}: unknown codec {codec}")
        if data[base + 1 : base + 8] != b"\0" * 7:
            raise ReaderError(f"plane {i}: reserved bytes are not zero")
        (stored,) = struct.unpack_from("<Q", data, base + 8)
        if codec == CODEC_RAW and stored != raw_len // n:
            raise ReaderError(f"plane {i}: raw plane of {stored} bytes, expected {raw_len // n}")
        if codec == CODEC_ZSTD and stored > MAX_ZSTD_STORED:
            raise ReaderError(f"plane {i}: stored length {stored} exceeds 2^31")
        planes.append((codec, stored))
    return ChunkHeader(version, filt, n, raw_len, tuple(planes))


_DCTX = zstandard.ZstdDecompressor()


def decode_plane(payload: bytes, codec: int, plane_len: int) -> bytes:
    """One plane's bytes from its payload (section 5.2), never more than ``plane_len``."""
    if codec == CODEC_RAW:
        if len(payload) != plane_len:
            raise ReaderError("raw plane has the wrong length")
        return bytes(payload)
    if payload[:4] != ZSTD_MAGIC:
        raise ReaderError("zstd plane does not start with a zstd frame")
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise ReaderError(f"zstd plane: bad frame header ({exc})") from None
    if declared not in (-1, plane_len):  # -1: the frame does not record its size
        raise ReaderError(f"zstd frame declares {declared} bytes, the plane has {plane_len}")
    try:
        out = _DCTX.decompress(
            payload, max_output_size=plane_len, read_across_frames=False, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ReaderError(f"zstd plane: {exc}") from None
    if len(out) != plane_len:
        raise ReaderError(f"zstd plane decodes to {len(out)} bytes, expected {plane_len}")
    return out


def ungroup(filtered: bytes, n: int) -> bytes:
    """Raw bytes from the concatenated byte planes of bytegroup(n) (section 5.2)."""
    if n == 1:
        return filtered
    k = len(filtered) // n
    arr = np.frombuffer(filtered, dtype=np.uint8).reshape(n, k)
    return arr.T.tobytes()


def decode_chunk(data: bytes, object_id: str | None = None, raw_len: int | None = None) -> bytes:
    """The raw bytes of a chunk file (section 5.3), verified against ``object_id`` if given."""
    h = parse_chunk_header(data)
    if raw_len is not None and h.raw_len != raw_len:
        raise ReaderError(f"chunk holds {h.raw_len} raw bytes, the manifest records {raw_len}")
    if len(data) != h.file_len:
        raise ReaderError(f"chunk file is {len(data)} bytes, its header says {h.file_len}")
    pos = h.header_len
    planes = []
    for codec, stored in h.planes:
        planes.append(decode_plane(data[pos : pos + stored], codec, h.plane_len))
        pos += stored
    raw = ungroup(b"".join(planes), h.n)
    if object_id is not None and blake3.blake3(raw).hexdigest() != object_id:
        raise ReaderError(f"object {object_id} is damaged: content hash mismatch")
    return raw


def object_path(root: str | os.PathLike[str], object_id: str) -> str:
    """``objects/<id[0:2]>/<id[2:]>`` (section 4)."""
    if not _HEX64.fullmatch(object_id):
        raise ReaderError(f"bad object id {object_id!r}")
    return os.path.join(root, "objects", object_id[:2], object_id[2:])


def read_chunk(root: str | os.PathLike[str], object_id: str, raw_len: int) -> bytes:
    """Reads, decodes and verifies one chunk (section 5.3)."""
    if raw_len > MAX_RAW_LEN:
        raise ReaderError(f"recorded raw length {raw_len} exceeds 2^30")
    limit = FIXED_HEADER + PLANE_ENTRY * MAX_PLANES + MAX_PLANES * MAX_ZSTD_STORED
    data = _read_regular(object_path(root, object_id), limit, f"object {object_id}")
    return decode_chunk(data, object_id, raw_len)


# ---------------------------------------------------------------- manifest (section 7)
def _check_tree(node: object, n_tensors: int, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ReaderError(f"tree deeper than {MAX_DEPTH}")
    if not isinstance(node, dict):
        raise ReaderError("tree node is not an object")
    t = node.get("t")
    if t == "dict":
        keys, values = node.get("k"), node.get("v")
        if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
            raise ReaderError("malformed dict node")
        for k in keys:
            if not (isinstance(k, str) or _is_int(k)):
                raise ReaderError(f"dict key {k!r} is not a string or an integer")
        for v in values:
            _check_tree(v, n_tensors, depth + 1)
    elif t in ("list", "tuple"):
        values = node.get("v")
        if not isinstance(values, list):
            raise ReaderError(f"malformed {t} node")
        for v in values:
            _check_tree(v, n_tensors, depth + 1)
    elif t in ("tensor", "view"):
        i = node.get("i")
        if not _is_int(i) or not 0 <= i < n_tensors:
            raise ReaderError(f"{t} node index {i!r} out of range")
        if t == "view":
            shape, stride, offset = node.get("shape"), node.get("stride"), node.get("offset")
            if not (
                isinstance(shape, list)
                and isinstance(stride, list)
                and len(shape) == len(stride) <= 64
                and all(_is_int(d) and d >= 0 for d in shape + stride)
                and _is_int(offset)
                and offset >= 0
            ):
                raise ReaderError("malformed view node")
    elif t == "pickle":
        raise ReaderError("the reference reader never unpickles (a pickle node)")
    elif t == "none":
        pass
    elif t == "bool":
        if not isinstance(node.get("v"), bool):
            raise ReaderError("malformed bool node")
    elif t == "int":
        if not _is_int(node.get("v")):
            raise ReaderError("malformed int node")
    elif t == "float":
        v = node.get("v")
        if not (
            (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("nan", "inf", "-inf")
        ):
            raise ReaderError("malformed float node")
    elif t == "str":
        if not isinstance(node.get("v"), str):
            raise ReaderError("malformed str node")
    else:
        raise ReaderError(f"unknown tree node type {t!r}")


def validate_manifest(m: object, version_id: int) -> dict[str, Any]:
    """Checks every rule of section 7 and returns the manifest."""
    if not isinstance(m, dict) or m.get("format") != "ckpt-manifest":
        raise ReaderError("not a ckpt manifest")
    if m.get("version") != 1:
        raise ReaderError(f"unsupported manifest version {m.get('version')!r}")
    if _nonneg(m.get("id"), "id") != version_id:
        raise ReaderError(f"manifest records id {m['id']}, its file name says {version_id}")
    if not isinstance(m.get("created"), str) or not _TIME.fullmatch(m["created"]):
        raise ReaderError(f"bad created time {m.get('created')!r}")
    for key in ("parent", "step", "epoch"):
        if m.get(key) is not None:
            _nonneg(m[key], key)
    metrics = m.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ReaderError("metrics must be an object")
    for name, value in metrics.items():
        if isinstance(value, bool) or not (
            isinstance(value, (int, float)) or value in ("nan", "inf", "-inf")
        ):
            raise ReaderError(f"metric {name!r} has value {value!r}")
    for key in ("meta", "trainer"):
        if not isinstance(m.get(key, {}), dict):
            raise ReaderError(f"{key} must be an object")
    if "stats" in m and not isinstance(m["stats"], dict):
        raise ReaderError("stats must be an object")

    chunks = m.get("chunks")
    if not isinstance(chunks, list):
        raise ReaderError("chunks must be a list")
    for c in chunks:
        if not isinstance(c, list) or len(c) != 3 or not isinstance(c[0], str):
            raise ReaderError(f"bad chunk entry {c!r}")
        if not _HEX64.fullmatch(c[0]):
            raise ReaderError(f"bad chunk id {c[0]!r}")
        if _nonneg(c[1], "chunk raw length") > MAX_RAW_LEN:
            raise ReaderError(f"chunk raw length {c[1]} exceeds 2^30")
        _nonneg(c[2], "chunk stored length")

    tensors = m.get("tensors")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise ReaderError("tensors must be a list of at most 10M entries")
    for t in tensors:
        if not isinstance(t, dict) or not isinstance(t.get("path"), str):
            raise ReaderError(f"bad tensor entry {t!r}")
        if t.get("dtype") not in DTYPES:
            raise ReaderError(f"tensor {t['path']!r}: unknown dtype {t.get('dtype')!r}")
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise ReaderError(f"tensor {t['path']!r}: bad shape")
        numel = 1
        for d in shape:
            numel *= _nonneg(d, "dim")
            if numel > MAX_NUMEL:
                raise ReaderError(f"tensor {t['path']!r}: too many elements")
        nbytes = _nonneg(t.get("nbytes"), "nbytes")
        if nbytes != numel * DTYPES[t["dtype"]][1]:
            raise ReaderError(f"tensor {t['path']!r}: nbytes {nbytes} does not match shape")
        spans = t.get("spans")
        if not isinstance(spans, list):
            raise ReaderError(f"tensor {t['path']!r}: spans must be a list")
        total = 0
        for s in spans:
            if not isinstance(s, list) or len(s) != 3:
                raise ReaderError(f"tensor {t['path']!r}: bad span {s!r}")
            ci, off, ln = (_nonneg(x, "span field") for x in s)
            if ci >= len(chunks) or ln == 0 or off + ln > chunks[ci][1]:
                raise ReaderError(f"tensor {t['path']!r}: span {s!r} lies outside its chunk")
            total += ln
        if total != nbytes:
            raise ReaderError(f"tensor {t['path']!r}: spans hold {total} bytes, not {nbytes}")
        if "scalar" in t and t["scalar"] is not True:
            raise ReaderError(f"tensor {t['path']!r}: scalar must be true when present")

    if not isinstance(m.get("tree"), dict):
        raise ReaderError("tree must be an object")
    _check_tree(m["tree"], len(tensors))
    return m


def read_manifest(root: str | os.PathLike[str], version_id: int) -> dict[str, Any]:
    """Reads and validates ``versions/<12-digit id>.json`` (section 7)."""
    if not _is_int(version_id) or not 1 <= version_id <= 999_999_999_999:
        raise ReaderError(f"bad version id {version_id!r}")
    path = os.path.join(root, "versions", f"{version_id:012d}.json")
    data = _read_regular(path, MAX_MANIFEST, f"version {version_id}")
    return validate_manifest(_loads(data, f"version {version_id}"), version_id)


def list_versions(root: str | os.PathLike[str]) -> list[int]:
    """Ids of the committed versions, ascending (section 2)."""
    out = []
    for name in os.listdir(os.path.join(root, "versions")):
        if re.fullmatch(r"[0-9]{12}\.json", name, flags=re.ASCII):
            out.append(int(name[:12]))
    return sorted(out)


# ---------------------------------------------------------------- tree (sections 7.4, 8)
def _build(node: dict[str, Any], tensors: list[Any]) -> Any:
    t = node["t"]
    if t == "dict":
        return {k: _build(v, tensors) for k, v in zip(node["k"], node["v"], strict=True)}
    if t == "list":
        return [_build(v, tensors) for v in node["v"]]
    if t == "tuple":
        return tuple(_build(v, tensors) for v in node["v"])
    if t == "tensor":
        return tensors[node["i"]]
    if t == "view":  # section 7.4: strided elements of a 1-D base
        base = tensors[node["i"]]
        shape, stride, offset = node["shape"], node["stride"], node["offset"]
        if 0 not in shape:
            last = offset + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
            if last >= base.size:
                raise ReaderError("view reaches outside its base")
        return np.lib.stride_tricks.as_strided(
            base[offset:],
            shape=shape,
            strides=[st * base.itemsize for st in stride],
            writeable=False,
        )
    if t == "none":
        return None
    if t in ("bool", "int", "str"):
        return node["v"]
    if t == "float":
        v = node["v"]
        return (
            float(v)
            if not isinstance(v, str)
            else {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[v]
        )
    raise ReaderError(f"unknown node type {t!r}")  # pragma: no cover - validated before


def read_version(root: str | os.PathLike[str], version_id: int) -> tuple[Any, dict[str, Any]]:
    """Reads version ``version_id`` of the store at ``root`` (section 8).

    Returns ``(tree, manifest)``. Every chunk is decoded once and verified
    against its BLAKE3 name; tensors are numpy arrays in native byte order,
    ``"scalar": true`` tensors numpy scalars.

    Raises:
        ReaderError: anything that violates docs/format.md.
    """
    check_marker(root)
    m = read_manifest(root, version_id)
    raw_cache: dict[int, bytes] = {}
    tensors: list[Any] = []
    for t in m["tensors"]:
        dt = dtype_of(t["dtype"])
        buf = bytearray()
        for ci, off, ln in t["spans"]:
            if ci not in raw_cache:
                cid, raw_len, _ = m["chunks"][ci]
                raw_cache[ci] = read_chunk(root, cid, raw_len)
            buf += raw_cache[ci][off : off + ln]
        assert len(buf) == t["nbytes"]
        arr = np.frombuffer(bytes(buf), dtype=dt).reshape(tuple(t["shape"])).copy()
        if arr.dtype.byteorder == "<" and arr.dtype.isnative is False:  # pragma: no cover
            arr = arr.astype(arr.dtype.newbyteorder("="))
        tensors.append(arr[()] if t.get("scalar") else arr)
    return _build(m["tree"], tensors), m
