"""An independent reader of ckpt stores: store format 1, manifest formats 1, 2
and 3 (a version slimmed by retention), chunk formats 1 (full chunks) and 2
(delta chunks).

Written from ``docs/format.md`` alone (section numbers below refer to it) and
using only numpy, ``zstandard`` and ``blake3`` (plus ``ml_dtypes`` for the
bfloat16 / float8 dtypes when it is importable). It deliberately does not
import ``ckpt``: it exists to show that the document is sufficient and to catch
the implementation drifting away from it.

A delta chunk is decoded by following its chain of bases through the
manifest's chunk table (never into objects the table does not list), at most
64 links, then applying each link's patch to the raw bytes of its base from
the full chunk up, each result verified against its own id.

A slimmed version's dropped tensors (7.7) have no bytes; :func:`read_version`
puts :data:`DROPPED` in their place in the tree.

Entry point: :func:`read_version` ``(root, version_id) -> (tree, manifest)``.
"""

from __future__ import annotations

import fnmatch
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
    "DROPPED",
    "DTYPES",
    "ChunkHeader",
    "ReaderError",
    "apply_patch",
    "decode_chunk",
    "decode_plane",
    "dtype_of",
    "object_path",
    "parse_chunk_header",
    "read_chunk",
    "read_object",
    "read_manifest",
    "read_version",
    "validate_manifest",
]

# ---------------------------------------------------------------- constants (sections 5, 13)
MAGIC = b"CKPTCHNK"
CHUNK_VERSION = 1
DELTA_VERSION = 2
ROTATED_VERSION = 3
MANIFEST_VERSIONS = (1, 2, 3)
SLIM_VERSION = 3  # 7.7
FIXED_HEADER = 24
PLANE_ENTRY = 16
DELTA_EXTRA = 40  # base id (32), depth (4), patch length (4): section 5.5
MAX_RAW_LEN = 1 << 30
MAX_PLANES = 16
ZSTD_SLACK = 64  # a zstd plane is at most its plane length + 64 bytes
MAX_DELTA_DEPTH = 64
MAX_VARINT = 10  # bytes of one LEB128 number in a patch
MAX_MARKER = 64 << 10
MAX_MANIFEST = 256 << 20
MAX_DEPTH = 64
MAX_DIMS = 64
MAX_NUMEL = 1 << 62
MAX_TENSORS = 10_000_000
FILTER_NONE, FILTER_BYTEGROUP, FILTER_XOR, FILTER_BYTEGROUP_ROT = 0, 1, 2, 3
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


class _Dropped:
    """What :func:`read_version` returns for a leaf whose tensor retention dropped (7.7)."""

    def __repr__(self) -> str:
        return "DROPPED"


DROPPED = _Dropped()


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
    """A parsed chunk header (sections 5.1 and 5.5)."""

    version: int
    filter: int
    n: int
    raw_len: int
    planes: tuple[tuple[int, int], ...]  # (codec, stored length) per plane
    base: str | None = None  # delta chunks (version 2): the base's object id
    depth: int = 0  # delta chunks: 1 + the base's depth; full chunks: 0
    patch_len: int = 0  # delta chunks: bytes the zstd frame decodes to

    @property
    def header_len(self) -> int:
        extra = DELTA_EXTRA if self.base is not None else 0
        return FIXED_HEADER + PLANE_ENTRY * self.n + extra

    @property
    def plane_len(self) -> int:
        return self.raw_len // self.n

    @property
    def file_len(self) -> int:
        return self.header_len + sum(s for _, s in self.planes)


def parse_chunk_header(data: bytes) -> ChunkHeader:
    """Parses and checks the header at the start of ``data`` (sections 5.1, 5.5)."""
    if len(data) < FIXED_HEADER:
        raise ReaderError(f"chunk of {len(data)} bytes is shorter than the fixed header")
    if data[:8] != MAGIC:
        raise ReaderError("bad chunk magic")
    (version,) = struct.unpack_from("<H", data, 8)
    if version not in (CHUNK_VERSION, DELTA_VERSION, ROTATED_VERSION):
        raise ReaderError(f"unsupported chunk format version {version}")
    filt, n = data[10], data[11]
    if not (
        (version == CHUNK_VERSION and filt == FILTER_NONE and n == 1)
        or (version == CHUNK_VERSION and filt == FILTER_BYTEGROUP and 2 <= n <= MAX_PLANES)
        or (version == DELTA_VERSION and filt == FILTER_XOR and n == 1)
        or (version == ROTATED_VERSION and filt == FILTER_BYTEGROUP_ROT and n in (2, 4, 8))
    ):
        raise ReaderError(f"bad filter {filt} with {n} planes in a version {version} chunk")
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
        if codec == CODEC_ZSTD and stored > raw_len // n + ZSTD_SLACK:
            raise ReaderError(
                f"plane {i}: stored length {stored} exceeds the plane's {raw_len // n} bytes + 64"
            )
        planes.append((codec, stored))
    if version in (CHUNK_VERSION, ROTATED_VERSION):
        return ChunkHeader(version, filt, n, raw_len, tuple(planes))
    # a delta chunk (section 5.5): one zstd plane, then base id, depth, patch length
    if planes[0][0] != CODEC_ZSTD:
        raise ReaderError("a delta chunk's plane must be zstd")
    at = FIXED_HEADER + PLANE_ENTRY
    if len(data) < at + DELTA_EXTRA:
        raise ReaderError("chunk is shorter than its delta header")
    depth, patch_len = struct.unpack_from("<II", data, at + 32)
    if not 1 <= depth <= MAX_DELTA_DEPTH:
        raise ReaderError(f"delta depth {depth} is outside 1..={MAX_DELTA_DEPTH}")
    if patch_len > raw_len + raw_len // 4 + 32:
        raise ReaderError(f"patch length {patch_len} exceeds the limit for {raw_len} raw bytes")
    if planes[0][1] > patch_len + ZSTD_SLACK:
        raise ReaderError(f"stored length {planes[0][1]} exceeds the patch's {patch_len} + 64")
    base = data[at : at + 32].hex()
    return ChunkHeader(version, filt, n, raw_len, tuple(planes), base, depth, patch_len)


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


def rotate_right(raw: bytes, n: int) -> bytes:
    """Undoes the one-bit left rotation of every n-byte little-endian item (section 5.6)."""
    kind = {2: np.uint16, 4: np.uint32, 8: np.uint64}[n]
    items = np.frombuffer(raw, dtype=np.dtype(kind).newbyteorder("<"))
    top = kind(8 * n - 1)
    return ((items >> kind(1)) | (items << top)).astype(items.dtype).tobytes()


def _varint(patch: bytes, pos: int) -> tuple[int, int]:
    """One LEB128 number of a patch at ``pos`` and the position after it (section 5.5)."""
    value = 0
    for k in range(MAX_VARINT):
        if pos >= len(patch):
            raise ReaderError("patch ends inside a run header")
        b = patch[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * k)
        if b < 0x80:
            return value, pos
    raise ReaderError(f"patch number longer than {MAX_VARINT} bytes")


def apply_patch(base_raw: bytes, patch: bytes) -> bytes:
    """The base's raw bytes with the runs of ``patch`` XORed in (section 5.5)."""
    out = np.frombuffer(base_raw, dtype=np.uint8).copy()
    pos = at = 0
    while pos < len(patch):
        skip, pos = _varint(patch, pos)
        length, pos = _varint(patch, pos)
        start = at + skip
        end = start + length
        if length == 0 or end > len(out) or pos + length > len(patch):
            raise ReaderError(
                f"patch run of {length} bytes at {start} lies outside the chunk or the patch"
            )
        out[start:end] ^= np.frombuffer(patch, dtype=np.uint8, count=length, offset=pos)
        pos += length
        at = end
    return out.tobytes()


def decode_chunk(
    data: bytes,
    object_id: str | None = None,
    raw_len: int | None = None,
    base_raw: bytes | None = None,
) -> bytes:
    """The raw bytes of a chunk file (section 5.3), verified against ``object_id`` if given.

    A delta chunk (section 5.5) needs ``base_raw``, the raw bytes of its base
    (already decoded and verified); a full chunk must not be given one.
    """
    h = parse_chunk_header(data)
    if raw_len is not None and h.raw_len != raw_len:
        raise ReaderError(f"chunk holds {h.raw_len} raw bytes, the manifest records {raw_len}")
    if len(data) != h.file_len:
        raise ReaderError(f"chunk file is {len(data)} bytes, its header says {h.file_len}")
    pos = h.header_len
    if h.base is None:
        if base_raw is not None:
            raise ReaderError("a full chunk was given a base")
        planes = []
        for codec, stored in h.planes:
            planes.append(decode_plane(data[pos : pos + stored], codec, h.plane_len))
            pos += stored
        raw = ungroup(b"".join(planes), h.n)
        if h.filter == FILTER_BYTEGROUP_ROT:
            raw = rotate_right(raw, h.n)
    else:
        if base_raw is None:
            raise ReaderError(f"delta chunk on {h.base} needs its base's raw bytes")
        if len(base_raw) != h.raw_len:
            raise ReaderError(f"delta chunk of {h.raw_len} bytes on a base of {len(base_raw)}")
        raw = apply_patch(base_raw, decode_plane(data[pos:], CODEC_ZSTD, h.patch_len))
    if object_id is not None and blake3.blake3(raw).hexdigest() != object_id:
        raise ReaderError(f"object {object_id} is damaged: content hash mismatch")
    return raw


def object_path(root: str | os.PathLike[str], object_id: str) -> str:
    """``objects/<id[0:2]>/<id[2:]>`` (section 4)."""
    if not _HEX64.fullmatch(object_id):
        raise ReaderError(f"bad object id {object_id!r}")
    return os.path.join(root, "objects", object_id[:2], object_id[2:])


def read_object(
    root: str | os.PathLike[str], object_id: str, raw_len: int
) -> tuple[ChunkHeader, bytes]:
    """Reads one chunk file and checks its header (section 5.3 steps 1 and 2)."""
    if raw_len > MAX_RAW_LEN:
        raise ReaderError(f"recorded raw length {raw_len} exceeds 2^30")
    # the largest valid file of raw_len bytes: 16 planes, each zstd at its limit
    limit = FIXED_HEADER + (PLANE_ENTRY + ZSTD_SLACK) * MAX_PLANES + raw_len
    data = _read_regular(object_path(root, object_id), limit, f"object {object_id}")
    h = parse_chunk_header(data)
    if h.raw_len != raw_len:
        raise ReaderError(f"chunk holds {h.raw_len} raw bytes, the manifest records {raw_len}")
    if len(data) != h.file_len:
        raise ReaderError(f"chunk file is {len(data)} bytes, its header says {h.file_len}")
    return h, data


def read_chunk(
    root: str | os.PathLike[str],
    chunks: list[list[Any]],
    index: int,
    cache: dict[int, tuple[bytes, int]] | None = None,
) -> bytes:
    """Reads, decodes and verifies entry ``index`` of a manifest's chunk table (5.3).

    A delta chunk's base must be the table entry its fourth element names
    (7.3); the chain is followed through the table down to a full chunk,
    each base's depth exactly one less (at most 64 links, 5.5), then decoded
    from the full chunk up, every link verified against its own id.
    ``cache`` maps table indices already decoded to ``(raw bytes, depth)``.
    """
    if cache is None:
        cache = {}
    chain: list[tuple[int, ChunkHeader, bytes]] = []  # from the wanted chunk down
    i = index
    while i not in cache:
        cid, raw_len = chunks[i][0], chunks[i][1]
        h, data = read_object(root, cid, raw_len)
        if chain and h.depth != chain[-1][1].depth - 1:
            below = chain[-1][1]
            raise ReaderError(
                f"delta chunk {chunks[chain[-1][0]][0]} of depth {below.depth} "
                f"has base {cid} of depth {h.depth}"
            )
        chain.append((i, h, data))
        listed = chunks[i][3] if len(chunks[i]) == 4 else None
        if h.base is None:
            if listed is not None:
                raise ReaderError(f"chunk {cid} is a full chunk, the manifest gives it a base")
            break
        if listed is None or chunks[listed][0] != h.base:
            raise ReaderError(
                f"delta chunk {cid}: its base {h.base} is not the base the manifest lists"
            )
        if len(chain) > MAX_DELTA_DEPTH:  # pragma: no cover - the depth checks end it first
            raise ReaderError(f"delta chain of {cid} is longer than {MAX_DELTA_DEPTH}")
        i = listed
    raw: bytes | None = None
    if i in cache:
        raw, depth = cache[i]
        if chain and depth != chain[-1][1].depth - 1:
            raise ReaderError(
                f"delta chunk {chunks[chain[-1][0]][0]} of depth {chain[-1][1].depth} "
                f"has base {chunks[i][0]} of depth {depth}"
            )
    for j, h, data in reversed(chain):
        raw = decode_chunk(data, chunks[j][0], chunks[j][1], raw)
        cache[j] = (raw, h.depth)
    assert raw is not None
    return raw


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
    version = m.get("version")
    if not _is_int(version) or version not in MANIFEST_VERSIONS:
        raise ReaderError(f"unsupported manifest version {version!r}")
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
    slim = version == SLIM_VERSION
    if slim != ("slimmed" in m):
        raise ReaderError("slimmed is required in manifest format 3 and refused in 1 and 2")

    chunks = m.get("chunks")
    if not isinstance(chunks, list):
        raise ReaderError("chunks must be a list")
    entry_lens = (3,) if version == 1 else (3, 4)  # 7.3: a 4th element in format 2 only
    for c in chunks:
        if not isinstance(c, list) or len(c) not in entry_lens or not isinstance(c[0], str):
            raise ReaderError(f"bad chunk entry {c!r}")
        if not _HEX64.fullmatch(c[0]):
            raise ReaderError(f"bad chunk id {c[0]!r}")
        if _nonneg(c[1], "chunk raw length") > MAX_RAW_LEN:
            raise ReaderError(f"chunk raw length {c[1]} exceeds 2^30")
        _nonneg(c[2], "chunk stored length")
    for i, c in enumerate(chunks):
        if len(c) == 4:
            b = _nonneg(c[3], "chunk base index")
            if b >= len(chunks) or b == i or chunks[b][1] != c[1]:
                raise ReaderError(f"chunk {c[0]}: base index {b} is not another entry of its size")

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
        if "dropped" in t:  # 7.2, 7.7
            if not slim or t["dropped"] is not True:
                raise ReaderError(f"tensor {t['path']!r}: dropped is true, in format 3 only")
            if spans:
                raise ReaderError(f"tensor {t['path']!r}: a dropped tensor has spans")
            continue
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
    if slim:
        _check_slimmed(m)
    return m


def _data_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, int]]:
    """(leaf path, tensor index) of every tensor and view node (7.4 paths)."""
    t = node["t"]
    if t in ("tensor", "view"):
        return [(path, node["i"])]
    out: list[tuple[str, int]] = []
    if t == "dict":
        children = zip(node["k"], node["v"], strict=True)
    elif t in ("list", "tuple"):
        children = enumerate(node["v"])
    else:
        return out
    for key, child in children:
        part = str(key).replace("~", "~0").replace("/", "~1")
        out += _data_nodes(child, f"{path}/{part}" if path else part)
    return out


def _check_slimmed(m: dict[str, Any]) -> None:
    """The rules of 7.7 for the ``slimmed`` record and the dropped entries."""
    record = m["slimmed"]
    if not isinstance(record, dict) or sorted(record) != ["dropped", "patterns"]:
        raise ReaderError("slimmed must hold exactly patterns and dropped")
    patterns, listed = record["patterns"], record["dropped"]
    for name, values in (("patterns", patterns), ("dropped", listed)):
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(x, str) for x in values)
            or len(set(values)) != len(values)
        ):
            raise ReaderError(f"slimmed {name} must be a non-empty list of distinct strings")
    if not all(patterns):
        raise ReaderError("slimmed patterns must not be empty strings")
    nodes = _data_nodes(m["tree"])
    dropped = {i for i, t in enumerate(m["tensors"]) if t.get("dropped")}
    if not dropped <= {i for _, i in nodes}:
        raise ReaderError("a dropped tensor is referenced by no tree node")
    if sorted(p for p, i in nodes if i in dropped) != sorted(listed):
        raise ReaderError("slimmed dropped does not name the nodes of the dropped tensors")
    for path in listed:
        if not any(fnmatch.fnmatchcase(path, p) for p in patterns):
            raise ReaderError(f"dropped leaf {path!r} matches no pattern")


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
        if base is DROPPED:
            return DROPPED
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

    Returns ``(tree, manifest)``. Every chunk, and every base of a delta
    chunk, is decoded once and verified against its BLAKE3 name; tensors are
    numpy arrays in native byte order, ``"scalar": true`` tensors numpy
    scalars, the leaves of ``"dropped"`` tensors (7.7) :data:`DROPPED`.

    Raises:
        ReaderError: anything that violates docs/format.md.
    """
    check_marker(root)
    m = read_manifest(root, version_id)
    raw_cache: dict[int, tuple[bytes, int]] = {}  # table index -> (raw bytes, depth)
    tensors: list[Any] = []
    for t in m["tensors"]:
        if t.get("dropped"):  # 7.7: no bytes to read
            tensors.append(DROPPED)
            continue
        dt = dtype_of(t["dtype"])
        buf = bytearray()
        for ci, off, ln in t["spans"]:
            buf += read_chunk(root, m["chunks"], ci, raw_cache)[off : off + ln]
        assert len(buf) == t["nbytes"]
        arr = np.frombuffer(bytes(buf), dtype=dt).reshape(tuple(t["shape"])).copy()
        if arr.dtype.byteorder == "<" and arr.dtype.isnative is False:  # pragma: no cover
            arr = arr.astype(arr.dtype.newbyteorder("="))
        tensors.append(arr[()] if t.get("scalar") else arr)
    return _build(m["tree"], tensors), m
