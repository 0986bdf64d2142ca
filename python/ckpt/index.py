"""Manifests, version ids and the listing cache.

A version exists exactly when its manifest ``versions/<12-digit id>.json`` is
in the store (docs/format.md, "Manifest" and "Commit protocol"). Manifests are
never modified, with one exception: retention may replace a version's
manifest by a slimmed one (format 3, same id; docs/format.md 7.7). The
listing cache ``cache/versions.jsonl`` holds one summary line per version (the
last line of an id wins: a slimmed version's line is appended before its
manifest is replaced); it is derived, checked against the directory listing
on every read, and rebuilt from manifests when missing or stale. A writer finds the
next version id without listing ``versions/`` while nothing has changed since
its last look (:meth:`ListingCache.next_id`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .dtypes import DTYPE_NAMES, itemsize_of
from .errors import FormatError, StoreLockedError

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MAX_MANIFEST_BYTES",
    "ListingCache",
    "Version",
    "decode_metrics",
    "encode_metrics",
    "manifest_name",
    "parse_manifest",
    "read_regular_file",
    "seal_manifest",
    "version_id_of",
]

MANIFEST_FORMAT = "ckpt-manifest"
#: The newest manifest format this release reads.
MANIFEST_VERSION = 3
#: Manifests without delta chunks are written as format 1 (readable by older
#: releases); format 2 adds a fourth field to delta chunk entries: the index
#: of the chunk's base in the same table.
MANIFEST_VERSION_PLAIN = 1
MANIFEST_VERSION_DELTA = 2
#: A version slimmed by retention (``Keep(subtrees=...)``): some tensor entries
#: are ``"dropped"`` and a top-level ``"slimmed"`` record says which; chunk
#: entries as in format 2. Older releases refuse it as newer instead of
#: misreading a dropped tensor.
MANIFEST_VERSION_SLIM = 3
#: A manifest larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 256 << 20
#: Most tensors one version may hold.
MAX_TENSORS = 10_000_000
#: Largest raw length of a chunk (docs/format.md, section 4).
MAX_CHUNK_BYTES = 1 << 30
#: The last entry of a sealed manifest.
_SEAL = re.compile(rb',"checksum":"([0-9a-f]{64})"}\Z')
#: A sealed manifest that a JSON tool re-serialised (spaces after "," and ":").
_RESERIALISED = re.compile(rb',\s+"checksum":\s+"[0-9a-f]{64}"\s*}\s*\Z')
#: What a damaged seal still looks like: a last entry of a short key and a ~64-character string.
_SEAL_LIKE = re.compile(rb',"[^"\\]{6,10}":"[^"\\]{56,72}"}\Z')
_HEX = re.compile(r"^[0-9a-f]{64}$")


def read_regular_file(path: str, limit: int) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, else None.

    Never follows a symlink, never blocks on a FIFO, and checks the size
    before reading (a store from someone else may hold any of these).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return f.read(limit + 1)[:limit]


def manifest_name(version_id: int) -> str:
    """File name of a version's manifest."""
    return f"{version_id:012d}.json"


def version_id_of(name: str) -> int | None:
    """The version id of a manifest file name (12 ASCII digits + ``.json``), or None."""
    if len(name) == 17 and name[12:] == ".json":
        digits = name[:12]
        if digits.isascii() and digits.isdigit():
            return int(digits)
    return None


def encode_metrics(metrics: Mapping[str, object] | None) -> dict[str, int | float | str]:
    """Validates metrics (name -> real number) into their JSON form.

    Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Raises:
        TypeError: a name is not a string or a value is not a real number.
    """
    out: dict[str, int | float | str] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"metric name {name!r} must be a str")
        if isinstance(value, bool) or not hasattr(value, "__float__"):
            raise TypeError(f"metric {name!r} = {value!r} is not a real number")
        if isinstance(value, int):
            out[name] = int(value)
            continue
        try:
            f = float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metric {name!r} = {value!r} is not a real number") from exc
        if math.isfinite(f):
            out[name] = f
        else:
            out[name] = "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    return out


def decode_metrics(raw: object) -> dict[str, float | int]:
    """The inverse of :func:`encode_metrics`."""
    if not isinstance(raw, dict):
        raise ValueError("metrics must be an object")
    out: dict[str, float | int] = {}
    for name, value in raw.items():
        if isinstance(value, bool):
            raise ValueError(f"metric {name!r} is a bool")
        if isinstance(value, (int, float)):
            out[name] = value
        elif value in ("nan", "inf", "-inf"):
            out[name] = float(value)
        else:
            raise ValueError(f"metric {name!r} has value {value!r}")
    return out


def format_time(t: datetime) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parses :func:`format_time` output into an aware datetime."""
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError(f"bad timestamp {text!r}")
    # "+00:00" rather than .replace(tzinfo=...): a third of the time, and a
    # listing parses one timestamp per version.
    return datetime.fromisoformat(text[:-1] + "+00:00")


@dataclass(frozen=True)
class Version:
    """A committed version, as listed by :meth:`ckpt.Store.versions`.

    Attributes:
        id: version id (ascending in commit order).
        step, epoch: training position given at save time (or None).
        metrics: metric name -> number.
        meta: user metadata (JSON).
        created: commit time, timezone-aware UTC.
        raw_bytes: sum of the tensor sizes of the version.
        new_bytes: bytes this version added to the store (new chunks as stored).
        parent: id of the previous latest version at save time.
        n_tensors: number of tensor leaves.
        trainer: the trainer state recorded with the version (a read-only
            mapping; ``dict(v.trainer)`` for a dict).
        slimmed: the ``Keep(subtrees=...)`` patterns whose leaves retention
            dropped from this version (empty for a full version). A slimmed
            version loads only with ``only=`` patterns that avoid them; a
            resume should pick the newest version with ``not v.slimmed``.
    """

    id: int
    step: int | None
    epoch: int | None
    metrics: Mapping[str, float | int]
    meta: Mapping[str, Any]
    created: datetime
    raw_bytes: int
    new_bytes: int
    parent: int | None = None
    n_tensors: int = 0
    trainer: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    slimmed: tuple[str, ...] = ()

    def summary(self, *, with_trainer: bool = True) -> dict[str, Any]:
        """The version's fields in JSON form, as the listing cache holds them."""
        out: dict[str, Any] = {
            "id": self.id,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": encode_metrics(self.metrics),
            "meta": dict(self.meta),
            "created": format_time(self.created),
            "raw_bytes": self.raw_bytes,
            "new_bytes": self.new_bytes,
            "parent": self.parent,
            "n_tensors": self.n_tensors,
            "slimmed": list(self.slimmed),
        }
        if with_trainer:
            out["trainer"] = dict(self.trainer)
        return out

    @classmethod
    def _plain(
        cls,
        vid: Any,
        step: Any,
        epoch: Any,
        metrics: Any,
        meta: Any,
        created: Any,
        raw_bytes: Any,
        new_bytes: Any,
        parent: Any,
        n_tensors: Any,
        trainer: Any,
        slimmed: Any = (),
    ) -> Version | None:
        """The Version of fields that have their plain types, else None.

        Runs once per version on every listing (10,000 times for a store of
        10,000 versions), so the checks (non-negative ints, float or int
        metrics, objects) are inline and the fields go straight into
        ``__dict__``: a frozen dataclass's ``__init__`` sets each one through
        ``object.__setattr__``, which was 5 of the 7 us per version. None
        sends the caller to :meth:`from_summary`'s general path, which
        converts what it can and names what is wrong.

        Raises:
            ValueError: a bad timestamp or metric.
        """
        if not (
            type(vid) is int
            and vid >= 0
            and type(raw_bytes) is int
            and raw_bytes >= 0
            and type(new_bytes) is int
            and new_bytes >= 0
            and type(n_tensors) is int
            and n_tensors >= 0
            and (step is None or (type(step) is int and step >= 0))
            and (epoch is None or (type(epoch) is int and epoch >= 0))
            and (parent is None or (type(parent) is int and parent >= 0))
            and type(metrics) is dict
            and type(meta) is dict
            and (type(trainer) is _CachedTrainer or type(trainer) is dict)
            and (slimmed == () or _patterns(slimmed) is not None)
        ):
            return None
        for value in metrics.values():
            if type(value) is not float and type(value) is not int:
                metrics = decode_metrics(metrics)  # "nan"/"inf" strings, or an error
                break
        v = cls.__new__(cls)
        v.__dict__.update(
            id=vid,
            step=step,
            epoch=epoch,
            metrics=metrics,
            meta=meta,
            created=parse_time(created),
            raw_bytes=raw_bytes,
            new_bytes=new_bytes,
            parent=parent,
            n_tensors=n_tensors,
            trainer=trainer,
            slimmed=slimmed if slimmed == () else _patterns(slimmed),
        )
        return v

    @classmethod
    def from_summary(cls, d: Mapping[str, Any]) -> Version:
        """Builds a Version from a manifest or a summary (same field names).

        Raises:
            ValueError, KeyError, TypeError: a field is missing or malformed.
        """
        get = d.get
        vid, step, epoch, parent = d["id"], get("step"), get("epoch"), get("parent")
        raw_bytes, new_bytes, n_tensors = get("raw_bytes"), get("new_bytes"), get("n_tensors")
        metrics, meta, trainer = get("metrics", {}), get("meta", {}), get("trainer", {})
        slimmed = get("slimmed", ())
        if isinstance(slimmed, dict):  # a manifest's record (a summary holds the patterns)
            slimmed = slimmed.get("patterns")
        if slimmed != () and _patterns(slimmed) is None:
            raise ValueError(f"slimmed must be a list of distinct patterns, got {slimmed!r}")
        plain = cls._plain(
            vid, step, epoch, metrics, meta, d["created"], raw_bytes, new_bytes, parent,
            n_tensors, trainer, slimmed,
        )  # fmt: skip
        if plain is not None:
            return plain
        if raw_bytes is None:
            raw_bytes = get("stats", {}).get("raw_bytes", 0)
        if new_bytes is None:
            new_bytes = get("stats", {}).get("new_bytes", 0)
        if n_tensors is None:
            n_tensors = len(get("tensors", ()))
        if not isinstance(trainer, (dict, _CachedTrainer)):
            raise ValueError("trainer must be an object")
        return cls(
            id=_int(vid, "id"),
            step=None if step is None else _int(step, "step"),
            epoch=None if epoch is None else _int(epoch, "epoch"),
            metrics=decode_metrics(metrics),
            meta=_obj(meta, "meta"),
            created=parse_time(d["created"]),
            raw_bytes=_int(raw_bytes, "raw_bytes"),
            new_bytes=_int(new_bytes, "new_bytes"),
            parent=None if parent is None else _int(parent, "parent"),
            n_tensors=_int(n_tensors, "n_tensors"),
            trainer=trainer,
            slimmed=() if slimmed == () else _patterns(slimmed) or (),
        )


def _patterns(value: object) -> tuple[str, ...] | None:
    """``value`` as a tuple of distinct non-empty strings (a list or a tuple of them), else None."""
    if type(value) is not list and type(value) is not tuple:
        return None
    if not all(type(p) is str and p for p in value) or len(set(value)) != len(value):
        return None
    return tuple(value)


class _CachedTrainer(Mapping[str, Any]):
    """A version's trainer state as its listing-cache line holds it: JSON, parsed on first use.

    The trainer state (the manager's configuration and the early-stopping
    state) is more than half of every cache line, and a listing needs it for
    the latest version only; parsing it for all 10,000 versions of a store
    took longer than the rest of the line. Text that does not parse to an
    object (damage: the cache is not checksummed) is read from the version's
    manifest instead.
    """

    __slots__ = ("_id", "_raw", "_value", "_versions_dir")

    def __init__(self, raw: bytes, versions_dir: str, version_id: int) -> None:
        self._raw = raw
        self._versions_dir = versions_dir
        self._id = version_id
        self._value: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        value = self._value
        if value is None:
            try:
                value = json.loads(self._raw)
            except (ValueError, RecursionError):
                value = None
            if not isinstance(value, dict):
                value = self._from_manifest()
            self._value = value  # _raw stays: a rewrite in another thread may be copying it
        return value

    def _from_manifest(self) -> dict[str, Any]:
        path = os.path.join(self._versions_dir, manifest_name(self._id))
        data = read_regular_file(path, MAX_MANIFEST_BYTES)
        if data is None:
            raise FormatError(
                f"the trainer state of version {self._id} in the listing cache is damaged and its"
                f" manifest {path} cannot be read"
            )
        trainer = parse_manifest(data, f"version {self._id}").get("trainer", {})
        return trainer if isinstance(trainer, dict) else {}

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self._get(),))


def _int(v: object, what: str) -> int:
    if type(v) is int and v >= 0:  # the common case first (bool is not int here)
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    return v


def _obj(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"{what} must be an object")
    return v


def seal_manifest(body: bytes) -> bytes:
    """Appends the ``checksum`` entry to a manifest's compact JSON ``body``.

    The checksum is the SHA-256 (hex) of every byte before ``,"checksum"``, so
    that a reader notices any damage to the manifest, scalar leaves and
    metrics included (chunks carry their own hash).
    """
    if not body.endswith(b"}") or body == b"{}":
        raise ValueError("a manifest is a non-empty JSON object")
    head = body[:-1]
    return head + b',"checksum":"' + hashlib.sha256(head).hexdigest().encode() + b'"}'


def _check_seal(data: bytes, m: dict[str, Any], where: str) -> None:
    """Verifies a sealed manifest's checksum (manifests of older writers have none).

    A manifest with a ``checksum`` key must end with exactly the entry
    :func:`seal_manifest` writes, and the digest must match; one without it
    must not end with what looks like a damaged checksum entry. The checksum
    covers the writer's bytes: a manifest that a JSON tool rewrote with the
    usual spaces (``json.dumps``'s default, never the writer's compact form,
    and never the result of damage) is read without it.
    """
    seal = _SEAL.search(data)
    if "checksum" in m:
        ok = (
            seal is not None
            and hashlib.sha256(data[: seal.start()]).hexdigest() == seal.group(1).decode()
        ) or (seal is None and _RESERIALISED.search(data) is not None)
    else:
        ok = _SEAL_LIKE.search(data) is None
    if not ok:
        raise FormatError(
            f"{where}: the manifest is damaged (its checksum does not match its content)"
        )


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parses and validates a manifest. Loading one never runs code.

    Checks the checksum (when the writer sealed the manifest), the format
    marker and version, the types of every field, and the tensor table: dtype
    names, shapes (checked products), ``nbytes == numel * itemsize``, spans
    that tile each tensor and stay inside their chunk, chunk ids of 64 hex
    digits, unique leaf paths and a well-formed tree.

    Raises:
        FormatError: anything malformed, naming ``where`` and the field.
    """
    from .tree import iter_data_nodes

    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: manifest of {len(data)} bytes exceeds the limit")
    try:
        m = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also int literals past Python's digit limit
        raise FormatError(f"{where}: not a JSON manifest ({exc})") from None
    if not isinstance(m, dict):
        raise FormatError(f"{where}: not a ckpt manifest")
    v = m.get("version")
    if isinstance(v, int) and not isinstance(v, bool) and v > MANIFEST_VERSION:
        # Before the checksum: a newer format may seal its manifests differently.
        raise FormatError(
            f"{where}: manifest format {v} is newer than this ckpt reads ({MANIFEST_VERSION});"
            " upgrade ckpt-store"
        )
    _check_seal(data, m, where)
    if m.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{where}: not a ckpt manifest")
    if v not in (MANIFEST_VERSION_PLAIN, MANIFEST_VERSION_DELTA, MANIFEST_VERSION_SLIM):
        raise FormatError(f"{where}: unknown manifest format version {v!r}")
    try:
        slim = v == MANIFEST_VERSION_SLIM
        if slim:
            record = _check_slimmed(m.get("slimmed"))
        elif "slimmed" in m:
            raise ValueError(f"slimmed is a field of manifest format 3, not {v}")
        Version.from_summary(m)
        chunks = m["chunks"]
        if not isinstance(chunks, list):
            raise ValueError("chunks must be a list")
        entry_lens = (3,) if v == MANIFEST_VERSION_PLAIN else (3, 4)
        for c in chunks:
            if (
                not isinstance(c, list)
                or len(c) not in entry_lens
                or not isinstance(c[0], str)
                or not _HEX.match(c[0])
            ):
                raise ValueError(f"bad chunk entry {c!r}")
            if _int(c[1], "chunk raw length") > MAX_CHUNK_BYTES:
                raise ValueError(f"chunk {c[0]} of {c[1]} bytes exceeds the limit")
            _int(c[2], "chunk stored length")
        for i, c in enumerate(chunks):
            if len(c) == 4:
                base = _int(c[3], "chunk base index")
                if base >= len(chunks) or base == i or chunks[base][1] != c[1]:
                    raise ValueError(f"chunk {c[0]}: base index {base} is not a chunk of its size")
        tensors = m["tensors"]
        if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
            raise ValueError("tensors must be a list of at most 10M entries")
        paths: set[str] = set()
        for t in tensors:
            _check_tensor(t, chunks, DTYPE_NAMES, itemsize_of, slim=slim)
            if t["path"] in paths:
                raise ValueError(f"tensor path {t['path']!r} appears twice")
            paths.add(t["path"])
        if not isinstance(m.get("stats", {}), dict):
            raise ValueError("stats must be an object")
        leaves: set[int] = set()
        for path, node in iter_data_nodes(m.get("tree")):
            index = node["i"]
            if index >= len(tensors):
                raise ValueError(f"tree leaf {path!r} refers to tensor {index} of {len(tensors)}")
            if node["t"] == "view":
                _check_view(path, node, tensors[index])
            elif index in leaves:  # views share a base; tensors and pickles never do
                raise ValueError(f"tree leaf {path!r} reuses tensor {index}")
            else:
                leaves.add(index)
        if slim:
            _check_dropped(m["tree"], tensors, record)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FormatError(f"{where}: malformed manifest: {exc}") from None
    return m


def _check_slimmed(record: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ``slimmed`` record of a format-3 manifest: (patterns, dropped leaf paths)."""
    if not isinstance(record, dict) or set(record) != {"patterns", "dropped"}:
        raise ValueError("slimmed must be an object of exactly patterns and dropped")
    patterns, dropped = _patterns(record["patterns"]), record["dropped"]
    if type(record["patterns"]) is not list or not patterns:
        raise ValueError("slimmed patterns must be a non-empty list of distinct globs")
    if (
        type(dropped) is not list
        or not dropped
        or not all(type(p) is str for p in dropped)
        or len(set(dropped)) != len(dropped)
    ):
        raise ValueError("slimmed dropped must be a non-empty list of distinct leaf paths")
    return patterns, tuple(dropped)


def _check_dropped(
    tree: object, tensors: list[Any], record: tuple[tuple[str, ...], tuple[str, ...]]
) -> None:
    """The dropped entries of a format-3 manifest are exactly those of the
    recorded leaf paths, and each path matches a recorded pattern."""
    import fnmatch

    from .tree import iter_data_nodes

    patterns, dropped = record
    by_entry: dict[int, list[str]] = {}
    for path, node in iter_data_nodes(tree):
        by_entry.setdefault(node["i"], []).append(path)
    found: list[str] = []
    for i, t in enumerate(tensors):
        if t.get("dropped"):
            if i not in by_entry:
                raise ValueError(f"dropped tensor {t['path']!r} is no leaf of the tree")
            found += by_entry[i]
    if sorted(found) != sorted(dropped):
        raise ValueError("slimmed dropped does not list the leaves of the dropped tensors")
    for path in dropped:
        if not any(fnmatch.fnmatchcase(path, p) for p in patterns):
            raise ValueError(f"dropped leaf {path!r} matches no slimmed pattern")


def _check_tensor(
    t: object,
    chunks: list[Any],
    names: tuple[str, ...],
    itemsize_of: Any,
    *,
    slim: bool = False,
) -> None:
    if not isinstance(t, dict):
        raise ValueError("tensor entry must be an object")
    path = t.get("path")
    if not isinstance(path, str):
        raise ValueError("tensor path must be a string")
    dropped = "dropped" in t
    if dropped and (not slim or t["dropped"] is not True):
        raise ValueError(f"tensor {path!r}: dropped must be true, in manifest format 3 only")
    if t.get("dtype") not in names:
        raise ValueError(f"tensor {path!r}: unknown dtype {t.get('dtype')!r}")
    shape = t.get("shape")
    if not isinstance(shape, list) or len(shape) > 64:
        raise ValueError(f"tensor {path!r}: shape must be a list of at most 64 dims")
    numel = 1
    for d in shape:
        numel *= _int(d, f"tensor {path!r} dim")
        if numel > 1 << 62:
            raise ValueError(f"tensor {path!r}: shape {shape} is too large")
    nbytes = _int(t.get("nbytes"), f"tensor {path!r} nbytes")
    if nbytes != numel * itemsize_of(t["dtype"]):
        raise ValueError(f"tensor {path!r}: nbytes {nbytes} != numel {numel} x itemsize")
    spans = t.get("spans")
    if not isinstance(spans, list):
        raise ValueError(f"tensor {path!r}: spans must be a list")
    if dropped:
        if spans:
            raise ValueError(f"tensor {path!r}: a dropped tensor has no spans")
        return
    total = 0
    for s in spans:
        if not isinstance(s, list) or len(s) != 3:
            raise ValueError(f"tensor {path!r}: bad span {s!r}")
        ci, off, ln = (_int(x, f"tensor {path!r} span") for x in s)
        if ci >= len(chunks) or ln == 0 or off + ln > chunks[ci][1]:
            raise ValueError(f"tensor {path!r}: span {s!r} lies outside its chunk")
        total += ln
    if total != nbytes:
        raise ValueError(f"tensor {path!r}: spans hold {total} bytes, expected {nbytes}")


def _check_view(path: str, node: dict[str, Any], base: dict[str, Any]) -> None:
    """A view must stay inside its base tensor (a 1-D run of elements)."""
    numel = 1
    for d in base["shape"]:
        numel *= d
    shape, stride = node["shape"], node["stride"]
    if 0 in shape:
        return
    last = node["offset"] + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    if last >= numel:
        raise ValueError(f"view {path!r} reaches element {last} of a base of {numel}")


class ListingCache:
    """The derived listing ``cache/versions.jsonl`` of one store.

    Not thread-safe by itself; the store serialises writers. Readers never
    write it: they merge what is missing from the manifests in memory.

    It also remembers, for the writer that owns it, the newest id in
    ``versions/`` together with a stamp of what another writer's commit
    changes (see :meth:`next_id`), so that a save does not list
    ``versions/`` (milliseconds at 10,000 versions) when nothing changed.
    """

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "cache", "versions.jsonl")
        self.versions_dir = os.path.join(root, "versions")
        #: (newest id in versions/, stamp when it was true); see next_id.
        self._known: tuple[int | None, tuple[int, ...]] | None = None

    def _stamp(self) -> tuple[int, ...] | None:
        """What any other writer's commit changes, or None (cannot tell: list instead).

        ``versions/``'s inode, mtime and ctime change with every rename or unlink
        in it, and every ckpt writer appends a line to the cache after its commit
        (or removes the cache when it cannot), which changes the cache's size,
        mtime and ctime; a rewrite replaces its inode. Timestamps alone could
        miss a change made within one clock tick of the stamp; the cache's size
        cannot.
        """
        try:
            d = os.lstat(self.versions_dir)
            c = os.lstat(self.path)
        except OSError:
            return None
        if not stat.S_ISDIR(d.st_mode) or not stat.S_ISREG(c.st_mode):
            return None
        return (
            d.st_dev, d.st_ino, d.st_mtime_ns, d.st_ctime_ns,
            c.st_ino, c.st_size, c.st_mtime_ns, c.st_ctime_ns,
        )  # fmt: skip

    def _exists(self, version_id: int) -> bool:
        return os.path.lexists(os.path.join(self.versions_dir, manifest_name(version_id)))

    def newest_id(self) -> int | None:
        """The largest id in ``versions/`` now (None: no version); only under the writer lock.

        From memory when the stamp is what this object recorded and that
        version's manifest is still there (another writer may have deleted
        it), else from a listing of ``versions/``, which is then remembered.
        """
        known = self._known
        if (
            known is not None
            and known[1] == self._stamp()
            and (known[0] is None or self._exists(known[0]))
        ):
            return known[0]
        newest = max(self.committed_ids(), default=None)
        self.remember(newest)
        return newest

    def next_id(self, deleted_high_water: int) -> tuple[int, int | None]:
        """The id of the next version and its parent; only under the writer lock.

        The id is 1 + max(largest id in ``versions/``, ``last-id``)
        (docs/format.md, section 10), so ids are never given out twice. An
        id whose manifest exists already is never returned: the remembered
        newest id is then dropped and ``versions/`` listed. The lock keeps
        other (ckpt) writers out until the caller's commit.

        Args:
            deleted_high_water: the value of ``last-id`` (0 when absent).

        Returns:
            (new id, newest id now or None), the latter the new version's parent.

        Raises:
            StoreLockedError: the id of a fresh listing is taken: something
                writes ``versions/`` without holding the store's lock.
        """
        newest = self.newest_id()
        new_id = max(newest or 0, deleted_high_water) + 1
        if self._exists(new_id):
            self.forget()
            newest = self.newest_id()
            new_id = max(newest or 0, deleted_high_water) + 1
            if self._exists(new_id):
                self.forget()
                raise StoreLockedError(
                    f"{os.path.join(self.versions_dir, manifest_name(new_id))} appeared while"
                    " this writer held the store lock: another program writes versions/"
                    " without ckpt's lock; nothing was saved"
                )
        return new_id, newest

    def remember(self, newest: int | None) -> None:
        """Records that ``newest`` is the largest id in ``versions/`` now.

        Only under the writer lock, when this writer knows it for certain (it
        just listed ``versions/``, or changed it after such a look in the same
        hold of the lock).
        """
        stamp = self._stamp()
        self._known = None if stamp is None else (newest, stamp)

    def forget(self) -> None:
        """Drops the remembered newest id: the next :meth:`newest_id` lists ``versions/``."""
        self._known = None

    def committed_ids(self) -> set[int]:
        """Ids of the manifests present now (the truth the cache is checked against)."""
        return {
            int(name[:12])
            for name in os.listdir(self.versions_dir)
            if len(name) == 17
            and name[12:] == ".json"
            and name[:12].isascii()
            and name[:12].isdigit()
        }  # version_id_of, inline: a listing of 10,000 names

    def read(self) -> dict[int, Version]:
        """Cached summaries by id (undecodable lines are skipped).

        A line is a JSON array of the summary's fields, a tab, and the trainer
        state's JSON (docs/format.md, section 12). The trainer part is parsed
        only when a caller looks at it (:class:`_CachedTrainer`), and arrays
        decode in half the time of objects: both matter at 10,000 lines.
        Lines of older writers (one JSON object, the trainer inside, no tab)
        are read as well.
        """
        out: dict[int, Version] = {}
        data = read_regular_file(self.path, MAX_MANIFEST_BYTES)
        if data is None:
            return out  # absent, not a regular file, or too large: rebuilt from manifests
        heads: list[bytes] = []
        tails: list[bytes | None] = []
        for line in data.splitlines():
            head, tab, rest = line.partition(b"\t")
            heads.append(head)
            tails.append(rest if tab else None)
        records: list[Any] = []
        with contextlib.suppress(ValueError, RecursionError):  # fast path: one parse
            records = json.loads(b"[" + b",".join(heads) + b"]")
        # One record per line, an array exactly where the line has a tab: a
        # damaged byte can split a line inside a JSON string (a newline) and
        # still leave the joined text valid, with records and lines paired wrongly.
        if len(records) != len(heads) or any(
            (tail is None) == (type(record) is list)
            for record, tail in zip(records, tails, strict=True)
        ):
            records = []
            for head in heads:
                try:
                    records.append(json.loads(head))
                except (ValueError, RecursionError):
                    records.append(None)  # a torn last line after a crash, or damage
        plain, versions_dir = Version._plain, self.versions_dir
        for record, tail in zip(records, tails, strict=True):
            try:
                if tail is None:  # an older writer's line
                    v = Version.from_summary(record)
                else:
                    # a slimmed version's line has its patterns before the trainer's length
                    slimmed = record.pop(10) if len(record) == 12 and record[10] else ()
                    vid, step, epoch, metrics, meta, created, raw, new, parent, n, size = record
                    # the length tells a whole line from a torn one that a later append continued
                    if size != len(tail) or tail[:1] != b"{" or tail[-1:] != b"}":
                        continue
                    trainer = _CachedTrainer(tail, versions_dir, vid)
                    # every field of an array line has its plain type, or the line is damaged
                    found = plain(
                        vid, step, epoch, metrics, meta, created, raw, new, parent, n, trainer,
                        slimmed,
                    )  # fmt: skip
                    if found is None:
                        continue
                    v = found
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            out[v.id] = v
        return out

    def append(self, version: Version) -> None:
        """Adds one committed version (best effort; the cache is derived).

        When the line cannot be written, the cache is removed (readers rebuild
        it): other writers watch its size to notice this commit (:meth:`_stamp`).
        """
        line = _cache_line(version)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:  # O_NONBLOCK: a FIFO planted there fails (ENXIO) instead of blocking the save
            fd = os.open(self.path, flags | os.O_NONBLOCK, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def rewrite(self, versions: Iterable[Version]) -> None:
        """Replaces the cache atomically with exactly ``versions``."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        text = b"".join(_cache_line(v) for v in versions)
        with contextlib.suppress(OSError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            os.replace(tmp, self.path)


#: The summary fields of a listing-cache line's array, in order; the trainer
#: part's length follows them (docs/format.md, section 12).
_CACHE_FIELDS = (
    "id", "step", "epoch", "metrics", "meta", "created", "raw_bytes", "new_bytes", "parent",
    "n_tensors",
)  # fmt: skip


def _cache_line(version: Version) -> bytes:
    """One line of the listing cache: the summary's fields as a JSON array, a tab, the trainer JSON.

    Compact JSON escapes tabs and newlines inside strings, so the first tab
    ends the array and the newline ends the line. The array's last item is
    the length of the trainer part.
    """
    summary = version.summary(with_trainer=False)
    cached = version.trainer
    if isinstance(cached, _CachedTrainer) and cached._value is None:
        trainer = cached._raw  # a rewrite of 10,000 lines need not parse every trainer state
    else:
        trainer = json.dumps(dict(cached), separators=(",", ":"), allow_nan=False).encode()
    row = [summary[k] for k in _CACHE_FIELDS]
    if version.slimmed:  # lines of full versions stay as older releases write and read them
        row.append(list(version.slimmed))
    row.append(len(trainer))
    head = json.dumps(row, separators=(",", ":"), allow_nan=False).encode()
    return head + b"\t" + trainer + b"\n"
