"""The Store: save / load / list / delete / pin / gc / verify on one root.

Thread- and process-safety: any number of threads and processes may read a
store (``versions``, ``load``, ``verify``) while one writes; readers take no
lock and never see a half-written version, because a version exists exactly
when its manifest has been renamed into ``versions/``. Writers (``save``,
``delete``, ``pin``, ``unpin``, ``gc``) take the store's advisory lock
(``flock`` on ``STORE/lock``) for their whole duration, so writers in other
processes and threads wait for each other (up to ``lock_timeout`` seconds, then
:class:`~ckpt.errors.StoreLockedError`). The lock dies with its process: a
killed writer leaves no stale lock (there is nothing to time out or take
over), only debris in ``tmp/`` that the next writer sweeps. ``flock`` is
local to one machine: do not share a store between hosts over NFS.

A writer that did not finish cleanly (killed, or failed with an I/O error)
leaves its ``pid ... on HOST`` line in ``STORE/lock``; the next writer sees
it and, before anything else, fsyncs the store's directories, so that
objects the dead writer renamed into place are durable before a new version
deduplicates against them (docs/format.md, section 10).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import functools
import json
import logging
import os
import pickle
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, overload

from . import _core, refs
from .errors import (
    CheckpointError,
    FormatError,
    IntegrityError,
    SlimmedError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnsafeLoadError,
    VersionNotFoundError,
)
from .history import HistoryEntry, append_history, read_history
from .index import (
    MANIFEST_VERSION_DELTA,
    MANIFEST_VERSION_PLAIN,
    MANIFEST_VERSION_SLIM,
    MAX_MANIFEST_BYTES,
    ListingCache,
    Version,
    encode_metrics,
    format_time,
    manifest_name,
    parse_manifest,
    read_regular_file,
    seal_manifest,
    version_id_of,
)
from .retention import Keep, Plan, best_of, plan_retention
from .slim import dropped_entries, leaf_users, only_hint, slim_manifest
from .tree import Leaf, LeafHook, Opaque, View, flatten, iter_data_nodes, unflatten

if TYPE_CHECKING:  # numpy is imported where it is used: `import ckpt` and `ckpt ls`
    # stay free of its 50-70 ms import (docs/performance.md)
    import numpy as np

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "GcResult",
    "Problem",
    "RetentionResult",
    "SaveHandle",
    "Store",
    "VerifyResult",
    "VersionPinnedError",
]

log = logging.getLogger(__name__)

STORE_FORMAT = "ckpt-store"
STORE_VERSION = 1
#: The directories of a store; each must be a real directory, never a symlink.
LAYOUT = ("objects", "versions", "pins", "tmp", "cache")
#: errnos of a full store.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Raw size of a chunk (see benches/bench_store.py for the measurement behind it).
DEFAULT_CHUNK_SIZE = 8 << 20
#: Tensors below this size are packed together into shared chunks, tiny ones
#: (below 1/16 of it: biases, norms) apart from mid-size ones, and mid-size
#: packs of at most twice this size: a changing bias never rewrites a frozen
#: matrix, and a small model is a few dozen files (docs/format.md section 6).
DEFAULT_SMALL_THRESHOLD = 1 << 20
#: The packing rule new stores record (docs/format.md sections 3 and 6); a
#: store whose marker names none was made with the older "width" rule.
PACKING = "size-classes"
#: zstd level of compressed planes.
DEFAULT_LEVEL = 1
#: A plane is stored compressed only if that saves at least this fraction.
DEFAULT_MIN_SAVING = 0.05
#: Longest chain of delta chunks a save may extend (see ``Store(delta_depth=)``).
DEFAULT_DELTA_DEPTH = 10
#: The engine's limit on delta chains (chunk format, docs/format.md).
MAX_DELTA_DEPTH = 64


def listed_bases(m: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Every object a manifest lists, with the base it records for it (None
    for a full chunk; format-1 manifests have no deltas at all)."""
    table = m["chunks"]
    return [(c[0], table[c[3]][0] if len(c) == 4 else None) for c in table]


def chunk_table(
    chunks: list[tuple[str, int, int, bool, str | None, int | None]],
    deps: list[tuple[str, int, int, str | None]],
) -> list[list[Any]]:
    """A manifest's chunk table: the chunks the spans index, then the bases
    of delta chunks that are not chunks themselves; a delta chunk's entry
    ends with the index of its base."""
    rows: list[list[Any]] = [[c[0], c[1], c[2]] for c in chunks]
    rows += [[d[0], d[1], d[2]] for d in deps]
    index = {row[0]: i for i, row in enumerate(rows)}
    for row, base in zip(rows, [c[4] for c in chunks] + [d[3] for d in deps], strict=True):
        if base is not None:
            row.append(index[base])
    return rows


#: ``Store.save(check=...)``: (newest committed id, listing of the committed versions).
SaveCheck = Callable[[int | None, Callable[[], list[Version]]], object]


class VersionPinnedError(CheckpointError):
    """The version is pinned; unpin it before deleting it."""


@dataclass(frozen=True)
class Problem:
    """One damaged chunk of a version: which tensors use it and what is wrong."""

    chunk: str
    kind: str
    message: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one version."""

    version: int
    problems: tuple[Problem, ...]
    chunks: int
    bytes: int

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class GcResult:
    """Outcome of a garbage collection.

    ``missing`` lists chunks that committed versions reference but the store
    lacks (damage to report; ``verify`` says which versions it breaks). Gc
    never deletes a referenced chunk, damaged or not.
    """

    deleted_objects: int
    freed_bytes: int
    kept_objects: int
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionResult:
    """Outcome of applying a retention policy.

    Attributes:
        deleted: ids of the versions deleted (or that would be, dry run).
        freed_bytes: stored bytes freed by deleting and slimming.
        kept: per version, why it is kept (:meth:`Store.explain`).
        slimmed: ids of the versions this pass slimmed (or would slim):
            those that lost leaves now, not those slimmed before.
    """

    deleted: tuple[int, ...]
    freed_bytes: int
    kept: dict[int, tuple[str, ...]]
    slimmed: tuple[int, ...] = ()


class SaveHandle:
    """A save running in the background (``Store.save(..., blocking=False)``)."""

    def __init__(self, future: Future[Version]) -> None:
        self._future = future

    def wait(self, timeout: float | None = None) -> Version:
        """Blocks until the version is committed and returns it; raises the save's error."""
        return self._future.result(timeout)

    def done(self) -> bool:
        """True once the save finished (committed or failed)."""
        return self._future.done()


class Store:
    """A versioned checkpoint store on a local directory.

    Args:
        root: the store directory. A missing store is created by the first
            write (``save``, ``pin``, ...), not by opening it: a Store opened
            on a mistyped path for reading lists no versions and leaves
            nothing behind.
        create: when False, a missing store is an error at once
            (:class:`~ckpt.errors.StoreNotFoundError`), as the ``ckpt``
            command's read commands do.
        chunk_size: raw bytes per chunk of large tensors. None: the value
            recorded when the store was created (so that later versions cut
            tensors the same way and deduplicate), else 8 MiB.
        small_threshold: tensors smaller than this are packed together
            (None: as recorded, else 1 MiB): those under 1/16 of it in packs
            of up to ``chunk_size``, the others in packs of up to twice it.
        level: zstd level for compressible byte planes.
        min_saving: a plane is compressed only if that saves this fraction.
        durable: fsync chunks, manifests and directories (False: scratch use).
        threads: worker threads for hashing and compression (None: all cores).
        fingerprints: remember an XXH3-128 fingerprint of each chunk this
            Store saves; at the next save, a tensor chunk whose bytes have
            the fingerprint of the parent version's chunk at the same place
            is taken to be that chunk without a BLAKE3 pass (2.5x faster on
            unchanged weights; only a 128-bit collision, about 2^-128, could
            keep a chunk's previous bytes). False hashes every chunk with
            BLAKE3 at every save.
        delta_depth: a changed chunk of a tensor whose previous version is
            mostly unchanged (e.g. an embedding table where a few rows moved)
            is stored as a delta on the previous version's chunk: the XOR
            with it, compressed. This caps the chain of deltas a restore
            applies (each costs about one decompression pass over the
            chunk); the next chunk after a full chain is stored whole. 0
            turns deltas off.
        lock_timeout: seconds a writer waits for the store lock.

    Raises:
        StoreNotFoundError: ``create=False`` and ``root`` is not a store.
        FormatError: ``root`` holds a store of an unknown or newer format, or
            is a non-empty directory that is not a store.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = True,
        chunk_size: int | None = None,
        small_threshold: int | None = None,
        level: int = DEFAULT_LEVEL,
        min_saving: float = DEFAULT_MIN_SAVING,
        durable: bool = True,
        threads: int | None = None,
        lock_timeout: float = 60.0,
        delta_depth: int = DEFAULT_DELTA_DEPTH,
        fingerprints: bool = True,
    ) -> None:
        self.root = os.fspath(root)
        if isinstance(delta_depth, bool) or not isinstance(delta_depth, int):
            raise TypeError(f"delta_depth must be an int, got {type(delta_depth).__name__}")
        if not 0 <= delta_depth <= MAX_DELTA_DEPTH:
            raise ValueError(
                f"delta_depth must be between 0 and {MAX_DELTA_DEPTH}, got {delta_depth}"
            )
        self.delta_depth = delta_depth
        self.fingerprints = bool(fingerprints)
        self._last_manifest: tuple[int, dict[str, Any]] | None = None
        self._staging: np.ndarray[Any, Any] | None = None
        #: XXH3-128 of the raw bytes of the chunks of this Store's last save,
        #: by chunk id (content-derived both, so never stale; see _parent_chunks)
        self._fingerprints: dict[str, int] = {}
        self.level = int(level)
        self.min_saving = float(min_saving)
        self.durable = bool(durable)
        self.threads = threads
        self.lock_timeout = float(lock_timeout)
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._unclean = False
        self._read_only = False
        self._exists = True
        self._made_root = False
        self._given = (chunk_size, small_threshold)
        self._apply_marker(self._open(create, chunk_size, small_threshold))
        self._cache = ListingCache(self.root)
        #: per version: (its manifest's stamp, its chunks); see chunk_map
        self._chunk_maps: dict[int, tuple[tuple[int, ...], dict[str, int]]] = {}
        #: per version: (its manifest's stamp, subtrees patterns it needs no
        #: slimming for); apply_retention reads a manifest to slim it only once
        self._slim_done: dict[int, tuple[tuple[int, ...], frozenset[str]]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: SaveHandle | None = None

    # ----------------------------------------------------------------- layout
    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _open(
        self, create: bool, chunk_size: int | None, small_threshold: int | None
    ) -> dict[str, Any]:
        """Creates or checks the layout; returns the store marker's contents."""
        marker = self._p("ckpt-store.json")
        if not os.path.lexists(marker):
            if not create:
                raise StoreNotFoundError(
                    errno.ENOENT, f"{self.root} is not a ckpt store (no ckpt-store.json)", self.root
                )
            if os.path.isdir(self.root) and not _is_blank(self.root):
                raise FormatError(
                    f"{self.root} is a non-empty directory that is not a ckpt store;"
                    " choose an empty or new directory"
                )
            if os.path.lexists(self.root) and not os.path.isdir(self.root):
                raise FormatError(f"{self.root} is a file, not a ckpt store; choose a directory")
            self._exists = False  # created by the first write (_create)
            return {
                "chunk_size": int(chunk_size or DEFAULT_CHUNK_SIZE),
                "small_threshold": int(small_threshold or DEFAULT_SMALL_THRESHOLD),
                "packing": PACKING,
            }
        try:
            data = read_regular_file(marker, 1 << 16)
            if data is None:
                raise ValueError("not a regular file of at most 64 KiB")
            info = json.loads(data)
        except (OSError, ValueError, RecursionError) as exc:
            raise FormatError(f"{marker}: unreadable store marker ({exc})") from None
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise FormatError(f"{marker}: not a ckpt store marker")
        v = info.get("version")
        if v != STORE_VERSION:
            if isinstance(v, int) and v > STORE_VERSION:
                raise FormatError(
                    f"{self.root} was written by a newer ckpt (store format {v}; this one reads"
                    f" {STORE_VERSION}); upgrade ckpt-store"
                )
            raise FormatError(f"{marker}: unknown store format version {v!r}")
        for d in LAYOUT:
            if not os.path.lexists(self._p(d)):
                if d in ("objects", "versions"):
                    raise FormatError(f"{self.root}: store layout is damaged ({d}/ is missing)")
                with contextlib.suppress(OSError):
                    os.makedirs(self._p(d), exist_ok=True)
        self._check_layout()
        for key in ("chunk_size", "small_threshold"):
            if key in info and (isinstance(info[key], bool) or not isinstance(info[key], int)):
                raise FormatError(f"{marker}: {key} must be an int")
        if not isinstance(info.get("packing", ""), str):
            raise FormatError(f"{marker}: packing must be a string")
        return info

    def _apply_marker(self, recorded: dict[str, Any]) -> None:
        """Takes the chunking the store records, where the caller did not choose one."""
        chunk_size, small_threshold = self._given
        self.chunk_size = int(chunk_size or recorded.get("chunk_size") or DEFAULT_CHUNK_SIZE)
        self.small_threshold = min(
            int(small_threshold or recorded.get("small_threshold") or DEFAULT_SMALL_THRESHOLD),
            self.chunk_size,
        )
        # the rule this store's chunks were planned with: another one would
        # still read back, but would not deduplicate against them
        self.size_classes = recorded.get("packing", "width") != "width"

    def _make_root(self) -> None:
        """The root directory of a store about to be created (its first writer's lock is there)."""
        if os.path.isdir(self.root) and not _is_blank(self.root):
            raise FormatError(
                f"{self.root} is a non-empty directory that is not a ckpt store;"
                " choose an empty or new directory"
            )
        self._made_root = not os.path.isdir(self.root)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise self._read_only_error(exc) from None

    def _create(self) -> None:
        """Makes the layout and the marker of a new store, under the writer lock (so
        that two first writers, or a first writer and another's tmp/ sweep, never race)."""
        if os.path.lexists(self._p("ckpt-store.json")):  # another writer made it before us
            self._apply_marker(self._open(False, None, None))
            self._exists = True
            return
        if not _is_blank(self.root):
            raise FormatError(
                f"{self.root} is a non-empty directory that is not a ckpt store;"
                " choose an empty or new directory"
            )
        try:
            for d in LAYOUT:
                os.makedirs(self._p(d), exist_ok=True)
        except OSError as exc:
            raise self._read_only_error(exc) from None
        self._check_layout()
        info = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "created": _now_text(),
            "chunk_size": self.chunk_size,
            "small_threshold": self.small_threshold,
            "packing": PACKING,
        }
        # The layout's entries and the marker become durable with the root;
        # a new root also needs its own entry in its parent fsynced.
        self._commit("", "ckpt-store.json", json.dumps(info, indent=1).encode() + b"\n")
        if self._made_root:
            self._fsync_dir(os.path.dirname(os.path.abspath(self.root)))
        self._exists = True

    def create(self) -> Store:
        """Makes the store on disk now (otherwise its first write does); returns self.

        Raises:
            FormatError: ``root`` is a non-empty directory that is not a store.
            StoreReadOnlyError: the file system refuses the write.
        """
        with self._writer():
            pass  # the first writer makes the store
        return self

    @property
    def exists(self) -> bool:
        """True once the store is on disk (a new one is made by its first write)."""
        if not self._exists and os.path.lexists(self._p("ckpt-store.json")):
            self._apply_marker(self._open(False, None, None))  # made by another process since
            self._exists = True
        return self._exists

    def _read_only_error(self, exc: OSError) -> OSError:
        """A write refused by the file system, as a StoreReadOnlyError when that is what it is."""
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            return exc
        self._read_only = True
        return StoreReadOnlyError(
            exc.errno,
            f"store {self.root} is read-only ({exc.strerror}: {exc.filename}): it can be"
            " listed, loaded and verified, not written. Save to a writable store, or copy"
            " this one (cp -r) to write to it.",
            exc.filename,
        )

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # ------------------------------------------------------------------ files
    def _fsync_dir(self, path: str) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _commit(self, directory: str, name: str, data: bytes) -> None:
        """Writes ``directory/name`` atomically and durably (docs/format.md, section 10).

        The engine does it: a temp file in tmp/ (O_EXCL, no symlinks), fsync,
        rename, fsync of the directory, with the fault points around each step.
        """
        _core.commit_file(self.root, directory, name, data, durable=self.durable)

    def _check_layout(self) -> None:
        """Every layout directory must be a real directory: a symlink planted
        there would make writes, renames and deletions land outside the store."""
        for d in LAYOUT:
            path = self._p(d)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise FormatError(
                    f"{path} is not a directory (a symlink or file where the store expects one);"
                    " the store is damaged or tampered with"
                )

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """The store's writer lock (re-entrant within this Store object).

        A writer that fails with an OS error (or is interrupted) may have
        renamed objects into place without fsyncing their directories; it
        leaves the lock file's holder line, so that the next writer recovers.
        """
        with self._thread_lock:
            if self._lock_depth == 0:
                if not self.exists:
                    self._make_root()  # the lock file lives in it; the layout is made under it
                self._acquire_flock()
                self._unclean = False
            self._lock_depth += 1
            try:
                yield
            except BaseException as exc:
                # Refusals (CheckpointErrors that are not OS errors) change nothing on disk;
                # anything else, even if an outer block catches it, makes the release unclean.
                if not isinstance(exc, CheckpointError) or isinstance(exc, OSError):
                    self._unclean = True
                raise
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    self._release_flock(clean=not self._unclean)

    def _acquire_flock(self) -> None:
        path = self._p("lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self._read_only_error(exc) from None
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = ""
                    with contextlib.suppress(OSError):
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise StoreLockedError(
                        f"{self.root} is locked by another writer ({holder or 'unknown holder'});"
                        f" waited {self.lock_timeout:g} s. Retry later or raise lock_timeout."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        self._lock_fd = fd
        try:
            previous = b""
            with contextlib.suppress(OSError):
                previous = os.pread(fd, 200, 0)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            if not self.exists:
                self._create()
            self._check_layout()
            if previous.strip():
                self._cache.forget()  # it may have committed without a trace in the cache
                self._recover()
                self._sweep_orphans(previous.decode(errors="replace").strip())
            self._sweep_tmp()
        except BaseException:
            self._release_flock(clean=False)
            raise

    def _release_flock(self, clean: bool = True) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            if clean:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _recover(self) -> None:
        """After a writer that did not finish: make what it renamed durable.

        A killed writer may have renamed chunks into ``objects/ab/`` (or its
        manifest into ``versions/``) without fsyncing the directory. A new
        version that deduplicates against such a chunk would reference an
        entry that a power loss can still take away, so every store
        directory is fsynced once before this writer goes on.
        """
        if not self.durable:
            return
        with os.scandir(self._p("objects")) as it:
            prefixes = [e.path for e in it if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        for path in [*prefixes, self._p("objects"), self._p("versions"), self._p("pins")]:
            self._fsync_dir(path)
        self._fsync_dir(self.root)

    def _sweep_orphans(self, holder: str) -> None:
        """After a writer that did not finish: delete the chunks its save left.

        A save interrupted after some of its chunks were renamed into
        ``objects/`` (Ctrl-C, SIGKILL, a full disk) leaves them unreferenced:
        hundreds of MiB for a large model. Under the writer lock no other save
        is in flight (every write of ``objects/`` happens under it), so every
        chunk that no committed manifest references is such debris, and goes
        as :meth:`gc` would delete it. A manifest that cannot be read may
        reference chunks: then nothing is deleted (``ckpt verify`` tells).
        """
        try:
            result = self._collect()
        except FormatError as exc:
            log.warning("%s: not sweeping after %s: %s", self.root, holder, exc)
            return
        if result.deleted_objects:
            log.info(
                "%s: removed %d chunks (%d bytes) left by an interrupted writer (%s)",
                self.root, result.deleted_objects, result.freed_bytes, holder,
            )  # fmt: skip

    def _sweep_tmp(self) -> None:
        """Removes debris of dead writers (only called under the writer lock).

        Works through a descriptor of ``tmp/`` opened without following
        symlinks, and unlinks entries relative to it: a symlink is removed,
        never followed.
        """
        try:
            dfd = os.open(self._p("tmp"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            with os.scandir(dfd) as it:
                names = [e.name for e in it if not e.is_dir(follow_symlinks=False)]
            for name in names:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)

    # ----------------------------------------------------------------- saving
    @overload
    def save(
        self,
        tree: object,
        *,
        step: int | None = ...,
        epoch: int | None = ...,
        metrics: dict[str, float] | None = ...,
        meta: dict[str, Any] | None = ...,
        trainer: dict[str, Any] | None = ...,
        allow_pickle: bool = ...,
        blocking: Literal[True] = ...,
        copy: bool = ...,
        then: Callable[[Version], object] | None = ...,
        check: SaveCheck | None = ...,
        history: Sequence[Mapping[str, Any]] = ...,
    ) -> Version: ...

    @overload
    def save(
        self,
        tree: object,
        *,
        step: int | None = ...,
        epoch: int | None = ...,
        metrics: dict[str, float] | None = ...,
        meta: dict[str, Any] | None = ...,
        trainer: dict[str, Any] | None = ...,
        allow_pickle: bool = ...,
        blocking: Literal[False],
        copy: bool = ...,
        then: Callable[[Version], object] | None = ...,
        check: SaveCheck | None = ...,
        history: Sequence[Mapping[str, Any]] = ...,
    ) -> SaveHandle: ...

    def save(
        self,
        tree: object,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
        trainer: dict[str, Any] | None = None,
        allow_pickle: bool = False,
        blocking: bool = True,
        copy: bool = True,
        then: Callable[[Version], object] | None = None,
        check: SaveCheck | None = None,
        history: Sequence[Mapping[str, Any]] = (),
    ) -> Version | SaveHandle:
        """Saves ``tree`` as a new version.

        Chunks already in the store are not written again, so unchanged
        tensors cost (almost) nothing. With ``blocking=True`` (the default)
        the version exists when this returns (with ``durable=True``, also
        after a power loss) and the :class:`Version` is returned.

        With ``blocking=False`` the call validates the tree, copies the leaves
        to host memory (training may change them right away; the copies go
        to a staging buffer the store keeps for its next background save
        until :meth:`close`, so the host holds one extra copy of the state)
        and returns a :class:`SaveHandle`; hashing, compression, writes and the commit run
        on the store's background thread, with the GIL released for the heavy
        part. An error surfaces on ``handle.wait()`` and is raised again by
        the next ``save`` (which then does not save); a failed background save
        never commits a manifest. ``copy=False`` skips the copy: the caller
        then promises not to modify the leaves until ``handle.wait()``
        returns. Saves of one store run one at a time, in call order.

        Args:
            tree: nested dict/list/tuple of numpy arrays and JSON scalars.
            step, epoch: training position (non-negative ints), for listing.
            metrics: metric name -> real number.
            meta: any JSON-serialisable dict (e.g. git commit, config).
            trainer: state of the training loop (early stopping, counters).
            allow_pickle: store objects that are neither tensors nor JSON
                (e.g. a scheduler holding a lambda) with pickle. Loading them
                then needs ``allow_pickle=True`` too. Off by default: a pickle
                runs code when it is loaded.
            blocking: False to save in the background (see above).
            copy: with ``blocking=False``, copy the leaves first (default).
            then: called with the new Version after the commit, on the thread
                that committed it (the manager applies retention there).
            check: called under the writer lock before anything is written,
                with the id of the newest committed version (None: empty
                store) and a function that lists the committed versions; an
                exception it raises aborts the save with nothing written
                (the manager refuses stale steps and concurrent runs there).
            history: earlier entries for the store's metric history (dicts
                with ``step``, ``epoch``, ``metrics``, ``time``), appended
                with this save's own entry after the commit (see
                :mod:`ckpt.history`).

        Raises:
            TypeError: a leaf, key, metric or meta value cannot be stored (the
                message names it); nothing is written.
            StoreLockedError: another writer kept the lock past ``lock_timeout``.
            OSError: the file system failed; no version is committed.
        """
        import numpy as np

        from .adapters import numpy as npa

        self._raise_pending()
        started = time.perf_counter()
        for name, value in (("step", step), ("epoch", epoch)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise TypeError(f"{name} must be a non-negative int or None, got {value!r}")
        enc_metrics = encode_metrics(metrics)
        meta = dict(meta or {})
        trainer = dict(trainer or {})
        for what, obj in (("meta", meta), ("trainer", trainer)):
            try:
                json.dumps(obj, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{what} must be JSON-serialisable (no NaN): {exc}") from None
        skeleton, leaves = flatten(tree, _leaf_hook(tree, allow_pickle))
        arrays, names = [], []
        for leaf in leaves:
            try:
                names.append(leaf.dtype_name or npa.dtype_name(leaf.array.dtype))
            except TypeError as exc:
                raise TypeError(f"leaf {leaf.path!r}: {exc}") from None
            arrays.append(npa.as_saveable(leaf.array))
        if not blocking and copy:
            # the caller may change the leaves right away
            arrays = self._stage(
                arrays,
                [
                    np.may_share_memory(a, leaf.array)
                    for a, leaf in zip(arrays, leaves, strict=True)
                ],
            )
        job = functools.partial(
            self._write_version, started, leaves, names, arrays, skeleton,
            step, epoch, enc_metrics, meta, trainer, check, list(history),
        )  # fmt: skip
        if blocking:
            version = job()
            if then is not None:
                then(version)
            return version
        return self._submit(job, then)

    def _write_version(
        self,
        started: float,
        leaves: list[Leaf],
        names: list[str],
        arrays: list[np.ndarray[Any, Any]],
        skeleton: dict[str, Any],
        step: int | None,
        epoch: int | None,
        enc_metrics: dict[str, Any],
        meta: dict[str, Any],
        trainer: dict[str, Any],
        check: SaveCheck | None,
        history: list[Mapping[str, Any]],
    ) -> Version:
        """Writes the chunks and commits the manifest, under the writer lock."""
        from .adapters import numpy as npa

        views = [npa.byte_view(a) for a in arrays]
        groups = [npa.group_width(n) for n in names]
        with self._writer(), self._full_store_errors():
            new_id, parent = self._cache.next_id(self._deleted_high_water())
            if check is not None:
                check(parent, self.versions)
            bases = self._parent_chunks(parent, leaves, names, arrays)
            chunks, spans, deps = _core.save_chunks(
                self.root,
                views,
                groups,
                chunk_size=self.chunk_size,
                small_threshold=self.small_threshold,
                level=self.level,
                min_saving=self.min_saving,
                durable=self.durable,
                threads=self.threads,
                bases=bases,
                delta_depth=self.delta_depth,
                size_classes=self.size_classes,
            )
            table = chunk_table(chunks, deps)
            # fingerprints of this save's chunks, for the next save's bases
            self._fingerprints = {c[0]: c[5] for c in chunks if c[5] is not None}
            tensors = [
                {
                    "path": leaf.path,
                    "dtype": name,
                    "shape": list(a.shape),
                    "nbytes": int(a.nbytes),
                    "spans": [list(s) for s in sp],
                    **({"scalar": True} if leaf.scalar else {}),
                    **leaf.extra,
                }
                for leaf, name, a, sp in zip(leaves, names, arrays, spans, strict=True)
            ]
            raw_bytes = sum(int(a.nbytes) for a in arrays)
            new_bytes = sum(c[2] for c in chunks if c[3])
            created = datetime.now(timezone.utc)
            manifest = {
                "format": "ckpt-manifest",
                "version": (
                    MANIFEST_VERSION_DELTA
                    if any(len(c) == 4 for c in table)
                    else MANIFEST_VERSION_PLAIN
                ),
                "id": new_id,
                "parent": parent,
                "created": format_time(created),
                "step": step,
                "epoch": epoch,
                "metrics": enc_metrics,
                "meta": meta,
                "trainer": trainer,
                "tree": skeleton,
                "tensors": tensors,
                "chunks": table,
                "stats": {
                    "raw_bytes": raw_bytes,
                    "new_bytes": new_bytes,
                    "new_chunks": sum(1 for c in chunks if c[3]),
                    "seconds": round(time.perf_counter() - started, 6),
                },
            }
            data = seal_manifest(
                json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
            )
            self._commit("versions", manifest_name(new_id), data)  # the commit point
            self._last_manifest = (new_id, manifest)
            version = Version.from_summary(manifest)
            self._cache.append(version)
            self._cache.remember(new_id)  # the newest id now (nothing is newer: see next_id)
            own = {
                "step": step,
                "epoch": epoch,
                "metrics": enc_metrics,
                "time": manifest["created"],
            }
            try:
                append_history(self.root, [*history, {**own, "version": new_id}])
            except OSError as exc:  # the version is committed: a lost history line is no failure
                log.warning("%s: metric history not written: %s", self.root, exc)
        return version

    def history(self) -> list[HistoryEntry]:
        """The metric history: one entry per save, also of versions retention deleted,
        and of the steps a :class:`~ckpt.CheckpointManager` evaluated without
        writing a version (in the order recorded; see :mod:`ckpt.history`)."""
        return read_history(self.root) if self.exists else []

    def append_history(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Appends entries (dicts with ``step``, ``epoch``, ``metrics``, ``time``) to
        the metric history, under the writer lock, without a version."""
        if records:
            with self._writer():
                append_history(self.root, [{**r, "version": None} for r in records])

    def _parent_chunks(
        self,
        parent: int | None,
        leaves: list[Leaf],
        names: list[str],
        arrays: list[np.ndarray[Any, Any]],
    ) -> list[list[tuple[int, int, str, int | None]]] | None:
        """Per leaf, the parent version's whole chunks of the same tensor
        ``(offset, length, id, fingerprint)``: new chunks of the same bytes
        may be deltas against them, and are taken to be them without a
        BLAKE3 pass when their XXH3-128 fingerprint matches the one this
        Store saw when it last saved that chunk (None if unknown). None when
        there is no parent or it cannot be read (a save never fails for want
        of a base)."""
        if parent is None:
            return None
        if self._last_manifest is not None and self._last_manifest[0] == parent:
            m = self._last_manifest[1]
        else:
            try:
                m = self.manifest(parent)
            except (CheckpointError, OSError):
                return None
        by_path = {t["path"]: t for t in m["tensors"]}
        table = m["chunks"]
        prints = self._fingerprints if self.fingerprints else {}
        out: list[list[tuple[int, int, str, int | None]]] = []
        for leaf, name, a in zip(leaves, names, arrays, strict=True):
            t = by_path.get(leaf.path)
            found: list[tuple[int, int, str, int | None]] = []
            if t is not None and t["dtype"] == name and t["nbytes"] == a.nbytes:
                offset = 0
                for ci, coff, ln in t["spans"]:
                    if coff == 0 and ln == table[ci][1]:  # the whole chunk is this tensor's
                        cid = table[ci][0]
                        found.append((offset, ln, cid, prints.get(cid)))
                    offset += ln
            out.append(found)
        return out if any(out) else None

    # ------------------------------------------------------- background saves
    def _submit(
        self, job: Callable[[], Version], then: Callable[[Version], object] | None
    ) -> SaveHandle:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-save")

        def run() -> Version:
            version = job()
            if then is not None:
                then(version)
            return version

        handle = SaveHandle(self._executor.submit(run))
        self._pending = handle
        return handle

    def _stage(
        self, arrays: list[np.ndarray[Any, Any]], shared: list[bool]
    ) -> list[np.ndarray[Any, Any]]:
        """Copies the arrays that share the caller's memory into one staging
        buffer, which the next background save reuses (the previous one has
        finished by then: ``save`` waits for it first). Copying into memory
        that is already mapped costs a fraction of faulting in fresh pages;
        the buffer lives until :meth:`close`."""
        import numpy as np

        aligned = [
            (a.nbytes + 63) & ~63 if want else 0 for a, want in zip(arrays, shared, strict=True)
        ]
        total = sum(aligned)
        if total == 0:
            return arrays
        if self._staging is None or self._staging.nbytes < total:
            self._staging = None  # free the old one before allocating the new one
            self._staging = np.empty(total, np.uint8)
        out = []
        offset = 0
        for a, n in zip(arrays, aligned, strict=True):
            if n == 0:
                out.append(a)
                continue
            staged = self._staging[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape)
            np.copyto(staged, a, casting="no")
            out.append(staged)
            offset += n
        return out

    def _raise_pending(self) -> None:
        """Waits for the previous background save; raises its error (once)."""
        handle, self._pending = self._pending, None
        if handle is not None:
            handle.wait()

    def wait(self) -> None:
        """Waits for the background save in flight, if any, and raises its error."""
        self._raise_pending()

    def close(self) -> None:
        """Waits for background saves and stops the background thread."""
        try:
            self._raise_pending()
        finally:
            self._staging = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _full_store_errors(self) -> Iterator[None]:
        """Turns a full file system (ENOSPC, EDQUOT, EFBIG) into one clear StoreFullError."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            if exc.errno == errno.EFBIG:
                what = "cannot grow a file that large (a file-size limit, RLIMIT_FSIZE?)"
            elif exc.errno == errno.EDQUOT:
                what = "is over its disk quota"
            else:
                what = "is full"
                with contextlib.suppress(OSError):
                    st = os.statvfs(self._p("objects"))
                    what += f" ({st.f_bavail * st.f_frsize} bytes free now)"
            detail = exc.strerror if isinstance(exc, StoreFullError) else str(exc)
            raise StoreFullError(
                exc.errno,
                f"store {self.root} {what}: {detail}. The version was not saved; its"
                " temporary files are removed and every earlier version is intact. Free space"
                " (delete versions, then gc) or save to another store.",
                exc.filename,
            ) from None

    # ---------------------------------------------------------------- listing
    def versions(self) -> list[Version]:
        """Every committed version, ascending by id (served from the listing cache)."""
        if not self.exists:
            return []
        result, dirty = self._listing()
        if dirty and self._lock_fd is None and self._writable():
            # Refresh the derived cache when the lock is free right now; the
            # listing is recomputed under the lock so no concurrent append is lost.
            with contextlib.suppress(StoreLockedError, OSError), self._try_writer():
                self._cache.rewrite(self._listing()[0])
        return result

    def _writable(self) -> bool:
        """False for a store this process cannot write (read-only mount, permissions):
        reads then leave the derived cache as it is rather than try to lock."""
        if self._read_only or not os.access(self.root, os.W_OK):
            self._read_only = True
        return not self._read_only

    def _listing(self) -> tuple[list[Version], bool]:
        """The versions now committed, and whether the cache disagreed with them."""
        ids = self._cache.committed_ids()
        cached = self._cache.read()
        missing = ids - cached.keys()
        for vid in sorted(missing):
            with contextlib.suppress(VersionNotFoundError, FormatError):
                cached[vid] = Version.from_summary(self.manifest(vid))
        result = [cached[i] for i in sorted(ids) if i in cached]
        dirty = bool(missing) or len(cached) != len(result)
        if result:
            # The latest version's trainer state (the recorded monitor and
            # policy) is read by most callers; a cache line whose trainer part
            # is damaged, of a version whose manifest cannot be read either,
            # leaves that version out, as a damaged line always did.
            try:
                len(result[-1].trainer)
            except FormatError:
                result.pop()
                dirty = True
        return result, dirty

    @contextlib.contextmanager
    def _try_writer(self) -> Iterator[None]:
        """The writer lock if it is free right now (a background save may hold it)."""
        if not self._thread_lock.acquire(blocking=False):
            raise StoreLockedError("a save of this store is in progress")
        saved, self.lock_timeout = self.lock_timeout, 0.0
        try:
            with self._writer():
                self.lock_timeout = saved
                yield
        finally:
            self.lock_timeout = saved
            self._thread_lock.release()

    def latest(self) -> Version | None:
        """The newest version (the resume target), or None for an empty store."""
        vs = self.versions()
        return vs[-1] if vs else None

    def best(self, metric: str | None = None, mode: str | None = None) -> Version | None:
        """The version with the best value of ``metric``.

        ``metric`` defaults to the monitor the manager recorded, and ``mode``
        to the recorded mode when ``metric`` is that monitor; for any other
        metric ``mode`` must be given (lower or higher is not guessed).
        Versions without the metric, or with a NaN value, are ignored; ties
        go to the earliest version.

        Returns:
            The best version, or None when no version has the metric (or no
            metric is given and none is recorded).

        Raises:
            ValueError: ``mode`` is not "min" or "max".
            MetricModeError: ``metric`` is not the recorded monitor and no ``mode`` is given.
        """
        versions = self.versions()
        monitor = refs.choose_monitor(
            metric,
            mode,
            refs.recorded_monitor(versions[-1] if versions else None),
            hint="pass mode='min' or mode='max'",
        )
        if monitor.metric is None or monitor.mode is None:
            return None
        return best_of(versions, monitor.metric, monitor.mode)

    def resolve(self, ref: int | Version | str | None) -> int:
        """The id of a version given as an id, a Version, or a reference string.

        The grammar is :mod:`ckpt.refs`'s, shared with the ``ckpt`` command:
        ``"42"``, ``"latest"``, ``"step=N"`` (the newest version at that
        step), ``"best"`` (by the monitor and mode the manager recorded),
        ``"best:METRIC"`` (the recorded mode if METRIC is the recorded
        monitor, else an error that asks for one) and ``"best:METRIC:min|max"``.

        Raises:
            VersionNotFoundError: no such version (for an id that is some
                version's step, the message suggests ``step=N``).
            BadReferenceError: a reference of none of the accepted forms.
            MetricModeError: ``best:METRIC`` for a metric whose mode is not recorded.
        """
        if isinstance(ref, Version):
            return ref.id
        parsed = refs.parse_ref(ref)
        if not self.exists:
            raise VersionNotFoundError(
                f"{self.root} has no versions: there is no store there (check the path)"
            )
        if parsed.kind == "id":
            # the common case, without a listing: is the manifest there?
            assert parsed.number is not None
            if os.path.exists(self._p("versions", manifest_name(parsed.number))):
                return parsed.number
        return refs.resolve(self.versions(), parsed, root=self.root).id

    def manifest(self, ref: int | Version | str | None = None) -> dict[str, Any]:
        """The validated manifest of a version, as a dict.

        Raises:
            VersionNotFoundError: no such version.
            FormatError: the manifest is malformed or from a newer format.
        """
        vid = self.resolve(ref) if not isinstance(ref, int) or isinstance(ref, bool) else ref
        path = self._p("versions", manifest_name(vid))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VersionNotFoundError(f"version {vid} is not in {self.root}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FormatError(f"{path} is a symlink; refusing to follow it") from None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{path} is not a regular file")
            if st.st_size > MAX_MANIFEST_BYTES:
                raise FormatError(
                    f"version {vid}: manifest of {st.st_size} bytes exceeds the limit"
                    f" ({MAX_MANIFEST_BYTES}); refusing to read it"
                )
            data = f.read(MAX_MANIFEST_BYTES + 1)
        m = parse_manifest(data, f"version {vid}")
        if m["id"] != vid:
            raise FormatError(f"version {vid}: manifest records id {m['id']}")
        return m

    # ---------------------------------------------------------------- loading
    def load(
        self,
        version: int | Version | str | None = None,
        *,
        only: str | Sequence[str] | None = None,
        into: Any = None,
        map_location: Any = None,
        as_numpy: bool = False,
        allow_pickle: bool = False,
    ) -> Any:
        """Restores a version's tree (latest by default), verifying every byte.

        Args:
            version: id, :class:`Version`, "latest", "step=N" (default latest).
            only: glob pattern(s) over leaf paths (``fnmatch``; ``*`` crosses
                ``/``). Only matching leaves are read; containers left empty
                are dropped and sequences keep their matching items in order.
            into: a tree of preallocated numpy arrays (e.g. the current
                state). A leaf at the same path with the same dtype and shape,
                C-contiguous and writable, is filled in place and returned
                instead of a new array; other leaves are allocated as usual.
                torch tensors work the same way (CUDA ones are filled by a copy).
            map_location: device for torch tensors (default: where they were saved).
            as_numpy: return torch leaves as numpy arrays (no torch needed).
            allow_pickle: load objects saved with ``allow_pickle=True``. Only
                for stores you trust: unpickling runs code.

        Raises:
            VersionNotFoundError: no such version (or an empty store).
            IntegrityError: a chunk is damaged or missing; the message names
                the version, the tensors and the chunk.
            FormatError: the manifest or a chunk header is malformed.
            UnsafeLoadError: the version holds pickled objects and
                ``allow_pickle`` is False.
            SlimmedError: retention dropped some of the wanted leaves from the
                version (``Keep(subtrees=...)``); the message names the newest
                version that still holds them and an ``only=`` for the rest.
        """
        import numpy as np

        from .adapters import numpy as npa

        vid = self.resolve(version)
        m = self.manifest(vid)
        patterns = [only] if isinstance(only, str) else list(only) if only is not None else None

        def keep(path: str) -> bool:
            return patterns is None or any(fnmatch.fnmatchcase(path, p) for p in patterns)

        nodes = [(path, n) for path, n in iter_data_nodes(m["tree"]) if keep(path)]
        pickled = [path for path, n in nodes if n["t"] == "pickle"]
        if pickled and not allow_pickle:
            raise UnsafeLoadError(
                f"version {vid} holds pickled objects ({', '.join(map(repr, pickled[:3]))});"
                " loading them runs code: pass allow_pickle=True only for a store you trust"
            )
        wanted = {n["i"] for _, n in nodes}
        gone = dropped_entries(m) & wanted if m["version"] == MANIFEST_VERSION_SLIM else set()
        if gone:
            raise self._slimmed_error(vid, m, gone)
        tensors = m["tensors"]
        self._probe(vid, m, wanted)  # before allocating or overwriting anything
        reuse: dict[str, Any] = {}
        if into is not None:
            hook = _leaf_hook(into, False, keep_objects=True)
            reuse = {
                leaf.path: leaf.extra.get("object", leaf.array) for leaf in flatten(into, hook)[1]
            }
        torch_adapter = None
        objects: dict[int, Any] = {}
        views: dict[int, np.ndarray[Any, Any]] = {}
        for i in sorted(wanted):
            t = tensors[i]
            target = reuse.get(t["path"])
            if t.get("leaf") == "torch" and not as_numpy:
                torch_adapter = torch_adapter or _torch_adapter(vid)
                try:
                    objects[i], views[i] = torch_adapter.allocate(t, target)
                except ValueError as exc:
                    raise FormatError(f"version {vid}: tensor {t['path']!r}: {exc}") from None
                continue
            try:
                dtype = npa.dtype_from_name(t["dtype"])
            except ValueError as exc:
                raise FormatError(f"version {vid}: tensor {t['path']!r}: {exc}") from None
            shape = tuple(t["shape"])
            if not (
                isinstance(target, np.ndarray)
                and target.dtype == dtype
                and target.shape == shape
                and target.flags.c_contiguous
                and target.flags.writeable
            ):
                target = np.empty(shape, dtype=dtype)
            objects[i], views[i] = target, npa.byte_view(target)
        self._read_tensors(vid, m, views)
        out: dict[int, object] = {}
        for i, obj in objects.items():
            t = tensors[i]
            if torch_adapter is not None and t.get("leaf") == "torch" and not as_numpy:
                out[i] = torch_adapter.finish(obj, t, reuse.get(t["path"]), map_location)
            else:
                a = npa.to_native(obj)
                out[i] = a[()] if t.get("scalar") else a

        def make(node: dict[str, Any], base: Any) -> object:
            if node["t"] == "pickle":
                return pickle.loads(bytes(base))  # allowed explicitly above
            if torch_adapter is not None and not isinstance(base, np.ndarray):
                return torch_adapter.make_view(node, base)
            item = base.dtype.itemsize
            return np.lib.stride_tricks.as_strided(
                base[node["offset"] :],
                shape=node["shape"],
                strides=[st * item for st in node["stride"]],
                writeable=False,
            )

        try:
            return unflatten(m["tree"], out, keep if patterns is not None else None, make)
        except ValueError as exc:
            raise FormatError(f"version {vid}: malformed tree: {exc}") from None

    def _probe(self, vid: int, m: dict[str, Any], indices: Iterable[int]) -> None:
        """Checks the chunk headers the tensors ``indices`` need (present, this
        format, the recorded raw length, the right file size) without decoding."""
        table = m["chunks"]
        used = sorted({s[0] for i in indices for s in m["tensors"][i]["spans"]})
        if not used:
            return
        try:
            _core.probe_chunks(
                self.root,
                [(table[ci][0], table[ci][1]) for ci in used],
                threads=self.threads,
                listed=listed_bases(m),
            )
        except (IntegrityError, FormatError) as exc:
            raise self._located(exc, vid, m) from None

    def _read_tensors(
        self, vid: int, m: dict[str, Any], views: dict[int, np.ndarray[Any, Any]]
    ) -> None:
        """Restores tensor ``i`` of the manifest into ``views[i]`` (flat uint8 of its size)."""
        chunk_table = m["chunks"]
        used: dict[int, int] = {}
        placements = []
        order = sorted(views)
        for target, i in enumerate(order):
            offset = 0
            for ci, coff, ln in m["tensors"][i]["spans"]:
                local = used.setdefault(ci, len(used))
                placements.append((local, coff, ln, target, offset))
                offset += ln
        chunks = [(chunk_table[ci][0], chunk_table[ci][1]) for ci in used]
        targets = [views[i] for i in order]
        try:
            _core.restore_chunks(self.root, chunks, targets, placements, threads=self.threads)
        except (IntegrityError, FormatError) as exc:
            raise self._located(exc, vid, m) from None
        except ValueError as exc:  # placements that do not fit the manifest's own tables
            raise FormatError(f"version {vid}: {exc}") from None

    def read_tensor_bytes(
        self, manifest: dict[str, Any], indices: Iterable[int]
    ) -> dict[int, np.ndarray[Any, Any]]:
        """The stored (little-endian) bytes of entries of a manifest's tensor table.

        A read-only helper for tools that stream a version entry by entry
        without rebuilding its tree (``ckpt restore``, ``export``, ``diff``).
        Every chunk is verified; chunks shared by the requested entries are
        decoded once per call.

        Args:
            manifest: a manifest returned by :meth:`manifest`.
            indices: positions in ``manifest["tensors"]``.

        Returns:
            index -> flat ``uint8`` array of the entry's ``nbytes`` bytes.

        Raises:
            IntegrityError: a chunk is damaged or missing (the message names
                the version, the tensors and the chunk).
            FormatError: a chunk header or the manifest's tables are malformed.
            SlimmedError: an entry was dropped by retention (it has no bytes).
        """
        import numpy as np

        tensors = manifest["tensors"]
        indices = list(indices)
        gone = {i for i in indices if tensors[i].get("dropped")}
        if gone:
            raise self._slimmed_error(int(manifest["id"]), manifest, gone)
        self._probe(int(manifest["id"]), manifest, indices)
        views = {i: np.empty(int(tensors[i]["nbytes"]), np.uint8) for i in indices}
        if views:
            self._read_tensors(int(manifest["id"]), manifest, views)
        return views

    def _located(
        self, exc: IntegrityError | FormatError, vid: int, m: dict[str, Any]
    ) -> IntegrityError | FormatError:
        """The same error class, naming the version and the tensors using the chunk."""
        obj = exc.object
        idx = [i for i, c in enumerate(m["chunks"]) if c[0] == obj]
        paths = tuple(t["path"] for t in m["tensors"] if any(s[0] in idx for s in t["spans"]))
        shown = ", ".join(repr(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
        message = (
            f"version {vid}: tensor {shown}: {exc.message}"
            if paths
            else f"version {vid}: {exc.message}"
        )
        if isinstance(exc, FormatError):
            return FormatError(message, obj)
        return type(exc)(message, obj, version=vid, tensors=paths)

    # ---------------------------------------------------------------- verify
    def verify(self, version: int | Version | str | None = None) -> list[VerifyResult]:
        """Re-reads and re-hashes every chunk of every version (or of one).

        Each distinct chunk is read once even when versions share it. Never raises
        for damage: it reports it.

        Returns:
            One :class:`VerifyResult` per version, ascending by id.
        """
        if version is None:
            ids = sorted(self._cache.committed_ids()) if self.exists else []
        else:
            ids = [self.resolve(version)]
        manifests: dict[int, dict[str, Any] | FormatError] = {}
        chunk_set: dict[str, int] = {}
        for vid in ids:
            try:
                m = self.manifest(vid)
            except FormatError as exc:
                manifests[vid] = exc
                continue
            except VersionNotFoundError:
                continue
            manifests[vid] = m
            for c in m["chunks"]:
                chunk_set.setdefault(c[0], c[1])
        items = sorted(chunk_set.items())
        report = _core.verify_chunks(self.root, items, threads=self.threads) if items else []
        damage = {cid: r for (cid, _), r in zip(items, report, strict=True) if r is not None}
        # the base each chunk's header names, to check every manifest lists it
        named = _core.chunk_bases(self.root, items, threads=self.threads) if items else []
        header_base = {cid: b for (cid, _), b in zip(items, named, strict=True)}
        results = []
        for vid, entry in manifests.items():
            if isinstance(entry, FormatError):
                results.append(VerifyResult(vid, (Problem("", "format", str(entry), ()),), 0, 0))
                continue
            m = entry
            problems = []
            # the bases its delta chunks name must be the ones it lists (gc
            # keeps only what manifests list); format 1 lists no deltas
            for cid, recorded in listed_bases(m):
                if cid not in damage and header_base.get(cid) != recorded:
                    problems.append(
                        Problem(
                            cid,
                            "format",
                            f"chunk {cid} is a delta on {header_base.get(cid)}, but the manifest"
                            f" records {recorded} as its base",
                            (),
                        )
                    )
            for ci, c in enumerate(m["chunks"]):
                if c[0] in damage:
                    kind, message = damage[c[0]]
                    paths = tuple(
                        t["path"] for t in m["tensors"] if any(s[0] == ci for s in t["spans"])
                    )
                    problems.append(Problem(c[0], kind, message, paths))
            results.append(
                VerifyResult(vid, tuple(problems), len(m["chunks"]), sum(c[1] for c in m["chunks"]))
            )
        return results

    # ------------------------------------------------------ deleting and pins
    def pinned(self) -> set[int]:
        """Ids of pinned versions (GC roots that delete and retention never remove)."""
        out: set[int] = set()
        if not self.exists:
            return out
        with contextlib.suppress(FileNotFoundError), os.scandir(self._p("pins")) as it:
            for entry in it:
                vid = version_id_of(entry.name)
                if vid is not None:
                    out.add(vid)
        return out

    def pin(self, version: int | Version | str) -> None:
        """Pins a version so that it is never deleted."""
        with self._writer():
            vid = self.resolve(version)
            if not os.path.lexists(self._p("pins", manifest_name(vid))):
                self._commit("pins", manifest_name(vid), b"{}\n")

    def unpin(self, version: int | Version | str) -> None:
        """Removes a pin (no-op when the version is not pinned)."""
        with self._writer():
            vid = self.resolve(version)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._p("pins", manifest_name(vid)))
                self._fsync_dir(self._p("pins"))

    def delete(self, version: int | Version | str) -> None:
        """Deletes a version's manifest; its chunks go at the next :meth:`gc`.

        Raises:
            VersionNotFoundError: no such version.
            VersionPinnedError: the version is pinned.
        """
        with self._writer():
            vid = self.resolve(version)
            if vid in self.pinned():
                raise VersionPinnedError(f"version {vid} is pinned; unpin it before deleting it")
            ids = self._cache.committed_ids()
            if vid == max(ids) and vid > self._deleted_high_water():
                # ids are never reused: remember the highest id before it disappears
                self._commit("", "last-id", f"{vid}\n".encode())
            os.unlink(self._p("versions", manifest_name(vid)))
            self._fsync_dir(self._p("versions"))
            self._cache.remember(max(ids - {vid}, default=None))
            self._chunk_maps.pop(vid, None)

    def _deleted_high_water(self) -> int:
        """The highest id ever deleted while it was the newest (``last-id``), or 0."""
        path = self._p("last-id")
        if not os.path.lexists(path):
            return 0
        data = read_regular_file(path, 64)
        text = "" if data is None else data.decode(errors="replace").strip()
        if not text.isascii() or not text.isdigit():
            raise FormatError(f"{self._p('last-id')}: expected a version id, found {text!r}")
        return int(text)

    def gc(self) -> GcResult:
        """Deletes every chunk that no committed version references.

        Runs under the writer lock, so no save is in flight. If any manifest
        cannot be read, nothing is deleted (its chunks might be referenced).

        Raises:
            FormatError: a manifest is unreadable; fix or delete it first.
        """
        with self._writer():
            return self._collect()

    def _collect(self) -> GcResult:
        """:meth:`gc`'s work (the caller holds the writer lock)."""
        referenced: set[str] = set()
        for vid in sorted(self._cache.committed_ids()):
            try:
                m = self.manifest(vid)
            except FormatError as exc:
                raise FormatError(
                    f"gc stopped before deleting anything: {exc}; a damaged manifest may"
                    " reference chunks (delete or repair that version first)"
                ) from None
            except VersionNotFoundError:
                continue  # deleted since the listing
            referenced.update(c[0] for c in m["chunks"])
        objects = _core.list_objects(self.root)
        garbage = [oid for oid, _ in objects if oid not in referenced]
        missing = tuple(sorted(referenced - {oid for oid, _ in objects}))
        freed = _core.delete_objects(self.root, garbage, durable=self.durable) if garbage else 0
        return GcResult(len(garbage), freed, len(objects) - len(garbage), missing)

    # --------------------------------------------------------------- retention
    def _stamp(self, vid: int) -> tuple[int, ...]:
        """What changes when a version's manifest is rewritten (slimmed): its
        inode (a rewrite renames a new file into place), mtime and size.

        Raises:
            VersionNotFoundError: no such version.
        """
        try:
            st = os.lstat(self._p("versions", manifest_name(vid)))
        except FileNotFoundError:
            raise VersionNotFoundError(f"version {vid} is not in {self.root}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def chunk_map(self, version: int | Version | str) -> dict[str, int]:
        """The chunks of a version: id -> stored bytes.

        Cached per Store object, checked against the manifest's inode, mtime
        and size (one ``lstat``): a manifest changes only when retention
        slims it, and then in place of the old file.
        """
        vid = version if type(version) is int else self.resolve(version)
        stamp = self._stamp(vid)
        cached = self._chunk_maps.get(vid)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        chunks = {c[0]: c[2] for c in self.manifest(vid)["chunks"]}
        self._chunk_maps[vid] = (stamp, chunks)
        return chunks

    def policy(self) -> tuple[Keep | None, str | None, str]:
        """The retention policy, monitor and mode recorded by the manager in the latest version."""
        latest = self.latest()
        manager = dict(latest.trainer.get("manager", {})) if latest else {}
        keep = manager.get("keep")
        return (
            Keep.from_dict(keep) if isinstance(keep, dict) else None,
            manager.get("monitor"),
            manager.get("mode", "min"),
        )

    def _plan(
        self, keep: Keep | None, monitor: str | None, mode: str | None, with_sizes: bool
    ) -> tuple[list[Version], Plan, dict[int, dict[str, Any]]]:
        """The plan, and with ``with_sizes`` the slimmed manifests it asks for
        (unsealed, by id: only the versions that lose leaves now) and the
        bytes deleting and slimming free together."""
        recorded_keep, recorded_monitor, recorded_mode = self.policy()
        keep = keep if keep is not None else recorded_keep
        monitor = monitor if monitor is not None else recorded_monitor
        mode = mode or recorded_mode
        versions = self.versions()
        sizes = None
        if with_sizes or (keep is not None and keep.max_bytes is not None):
            sizes = {v.id: self.chunk_map(v.id) for v in versions}
        plan = plan_retention(
            versions, keep, monitor=monitor, mode=mode, pinned=self.pinned(), chunks_of=sizes
        )
        rewrites: dict[int, dict[str, Any]] = {}
        if not with_sizes or not plan.slim or sizes is None:
            return versions, plan, rewrites
        for vid, patterns in plan.slim.items():
            stamp = self._stamp(vid)
            done = self._slim_done.get(vid)
            if done is not None and done[0] == stamp and done[1].issuperset(patterns):
                continue
            new = slim_manifest(self.manifest(vid), patterns)
            if new is None:
                self._slim_done[vid] = (stamp, frozenset(patterns))
            else:
                rewrites[vid] = new
        if rewrites:
            held: dict[str, int] = {}
            for chunks in sizes.values():
                held.update(chunks)
            remaining: set[str] = set()
            for vid, why in plan.reasons.items():
                if why:
                    remaining.update(
                        (c[0] for c in rewrites[vid]["chunks"]) if vid in rewrites else sizes[vid]
                    )
            freed = sum(n for cid, n in held.items() if cid not in remaining)
            plan = replace(plan, freed_bytes=freed)
        return versions, plan, rewrites

    def explain(
        self, keep: Keep | None = None, *, monitor: str | None = None, mode: str | None = None
    ) -> dict[int, tuple[str, ...]]:
        """For each version, the rules that keep it (empty: retention would delete it).

        A version that ``Keep(subtrees=...)`` slims has, after the rules that
        keep it, ``"PATTERN dropped: not in RULES"`` per pattern it loses
        (e.g. ``("last 5", "optimizer/** dropped: not in last 1")``), and
        ``"PATTERN dropped earlier"`` for the leaves an earlier pass dropped
        that the policy would keep now (slimming cannot be undone).

        Without arguments, uses the policy the manager recorded in the latest version.
        """
        return dict(self._plan(keep, monitor, mode, with_sizes=False)[1].reasons)

    def apply_retention(
        self,
        keep: Keep | None = None,
        *,
        monitor: str | None = None,
        mode: str | None = None,
        dry_run: bool = False,
    ) -> RetentionResult:
        """Deletes the versions no rule keeps, slims the versions ``Keep(subtrees=...)``
        slims, then deletes the chunks that no remaining version uses.

        Runs under the writer lock: manifests are deleted first (and the
        directory fsynced), then each slimmed version's manifest is rewritten
        atomically under the same id (format 3: its dropped tensor entries
        marked, its chunk table holding only what the remaining tensors and
        their delta chains need; docs/format.md, 7.7), then chunks that no
        remaining version references are deleted. The latest, the best and
        pinned versions are never deleted nor slimmed.

        The listing cache gets the slimmed version's line before its
        manifest is rewritten, so that a listing never shows a slimmed
        version as full (a crash in between lists a full version as
        slimmed until the next pass slims it: the safe side for a resume).
        A reader loading a slimmed version's dropped leaves at that moment
        fails (a missing chunk) as one loading a deleted version does.

        Raises:
            FormatError: a manifest is unreadable; nothing is deleted.
        """
        with self._writer():
            _, plan, rewrites = self._plan(keep, monitor, mode, with_sizes=True)
            slimmed = tuple(sorted(rewrites))
            if dry_run or not (plan.delete or rewrites):
                return RetentionResult(plan.delete, plan.freed_bytes, dict(plan.reasons), slimmed)
            remaining: set[str] = set()
            for vid, why in plan.reasons.items():
                if why:
                    if vid in rewrites:
                        remaining.update(c[0] for c in rewrites[vid]["chunks"])
                    else:
                        remaining.update(self.chunk_map(vid))
            garbage = {
                c for vid in (*plan.delete, *slimmed) for c in self.chunk_map(vid)
            } - remaining
            newest = self._cache.newest_id()
            if plan.delete:
                for vid in plan.delete:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._p("versions", manifest_name(vid)))
                    self._chunk_maps.pop(vid, None)
                    self._slim_done.pop(vid, None)
                self._fsync_dir(self._p("versions"))
            for vid in slimmed:
                self._rewrite_slimmed(vid, rewrites[vid], plan.slim[vid])
            if newest in plan.delete:
                self._cache.forget()
            else:
                self._cache.remember(newest)  # retention never deletes the newest version
            freed = (
                _core.delete_objects(self.root, sorted(garbage), durable=self.durable)
                if garbage
                else 0
            )
            return RetentionResult(plan.delete, freed, dict(plan.reasons), slimmed)

    def _rewrite_slimmed(self, vid: int, manifest: dict[str, Any], patterns: Sequence[str]) -> None:
        """Commits a slimmed manifest in place of version ``vid``'s (under the writer lock)."""
        data = seal_manifest(json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode())
        parse_manifest(data, f"version {vid}")  # never write what this reader would refuse
        # the cache first: its last line of an id wins, and must not say "full" for a slimmed one
        self._cache.append(Version.from_summary(manifest))
        # _commit into versions/ never replaces a manifest (and takes a new one back when
        # the directory fsync fails): write and fsync the new one in tmp/, then rename it
        # over the old one and fsync versions/. A crash leaves the old manifest or the new
        # one, both valid, and debris in tmp/ that the next writer sweeps; the caller
        # deletes chunks only after this returned.
        staged = f"{manifest_name(vid)}.slimmed"
        self._commit("tmp", staged, data)
        os.replace(self._p("tmp", staged), self._p("versions", manifest_name(vid)))
        self._fsync_dir(self._p("versions"))
        self._chunk_maps.pop(vid, None)
        self._slim_done[vid] = (self._stamp(vid), frozenset(patterns))
        if self._last_manifest is not None and self._last_manifest[0] == vid:
            self._last_manifest = None

    def _slimmed_error(self, vid: int, m: dict[str, Any], wanted: Iterable[int]) -> SlimmedError:
        """The error for a load of the dropped tensor entries ``wanted`` of version ``vid``."""
        users = leaf_users(m)
        paths = tuple(p for i in sorted(set(wanted)) for p in users.get(i, ()))
        recorded = m["slimmed"]["patterns"]
        patterns = tuple(
            p for p in recorded if any(fnmatch.fnmatchcase(path, p) for path in paths)
        ) or tuple(recorded)
        holder = None
        checked = 0
        for v in reversed(self.versions()):
            if v.id == vid or set(v.slimmed) & set(patterns):
                continue
            checked += 1
            if checked > 16:  # a listing of 10,000 versions: look at the newest few
                break
            try:
                other = self.manifest(v.id)
            except CheckpointError:
                continue
            gone = {path for i in dropped_entries(other) for path in leaf_users(other).get(i, ())}
            present = {path for path, _ in iter_data_nodes(other["tree"])} - gone
            if set(paths) <= present:
                holder = v.id
                break
        hint = only_hint(m)
        only = repr(hint[0]) if len(hint) == 1 else repr(hint)
        it = "it" if len(patterns) == 1 else "them"
        still = (
            f"version {holder} still has {it}"
            if holder is not None
            else f"no other version has {it}"
        )
        return SlimmedError(
            f"version {vid} was slimmed by retention: {', '.join(patterns)} dropped (Keep"
            f" subtrees); {still}; load only={only} for what version {vid} keeps",
            version=vid,
            patterns=patterns,
            paths=paths,
            holder=holder,
        )

    def stored_bytes(self) -> int:
        """Bytes of every chunk object in the store (what the store occupies)."""
        if not self.exists:
            return 0
        return sum(n for _, n in _core.list_objects(self.root))


def _leaf_hook(tree: object, allow_pickle: bool, keep_objects: bool = False) -> LeafHook | None:
    """The flatten hook for framework tensors (torch when it is imported) and opt-in pickle."""
    import numpy as np

    encoder: Any = None
    if "torch" in sys.modules:
        from .adapters import torch as torch_adapter

        encoder = torch_adapter.Encoder(tree)
    if encoder is None and not allow_pickle and not keep_objects:
        return None

    def hook(path: str, obj: object) -> Leaf | View | Opaque | None:
        if keep_objects:  # for into=: remember the object itself, no conversion
            return Leaf(path, np.empty(0, np.uint8), extra={"object": obj})
        if encoder is not None:
            found: Leaf | View | None = encoder(path, obj)
            if found is not None:
                return found
        if allow_pickle:
            data = pickle.dumps(obj, protocol=5)
            return Opaque(
                "pickle", Leaf(path, np.frombuffer(data, np.uint8), extra={"role": "pickle"})
            )
        return None

    return hook


def _torch_adapter(vid: int) -> Any:
    try:
        from .adapters import torch as torch_adapter
    except ImportError:
        raise FormatError(
            f"version {vid} holds torch tensors and torch is not installed;"
            " pip install 'ckpt-store[torch]', or load with as_numpy=True"
        ) from None
    return torch_adapter


def _is_blank(root: str) -> bool:
    """True for a directory that holds nothing but (parts of) an empty store
    layout: what a store creation interrupted before its marker leaves."""
    with os.scandir(root) as it:
        entries = list(it)
    for e in entries:
        if e.name == "lock" and e.is_file(follow_symlinks=False):
            continue
        if e.name not in LAYOUT or not e.is_dir(follow_symlinks=False):
            return False
        with os.scandir(e.path) as inner:
            if e.name != "tmp" and any(True for _ in inner):
                return False
    return True


def _now_text() -> str:
    return format_time(datetime.now(timezone.utc))
