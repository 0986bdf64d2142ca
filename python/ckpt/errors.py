"""The exception hierarchy of ckpt.

Every exception derives from :class:`CheckpointError` and, where it fits, from
a builtin, so ``except KeyError`` or ``except ValueError`` still work. The
native engine raises these same classes (``IntegrityError``, ``FormatError``,
``MissingObjectError``, ``StoreFullError``); other operating-system failures
arrive as the builtin ``OSError`` subclasses (``FileNotFoundError``,
``PermissionError``, ...).
"""

from __future__ import annotations

__all__ = [
    "BadReferenceError",
    "CheckpointError",
    "ConcurrentRunError",
    "MetricModeError",
    "FormatError",
    "IntegrityError",
    "MissingMetricError",
    "MissingObjectError",
    "SlimmedError",
    "StepExistsError",
    "StepOrderError",
    "StoreFullError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "UnsafeLoadError",
    "VersionNotFoundError",
]


class CheckpointError(Exception):
    """Base class of every error raised by ckpt."""


class IntegrityError(CheckpointError):
    """Stored bytes do not match their recorded hash or length.

    Attributes:
        object: hex id of the damaged chunk, when one is known.
        version: id of the version being read, when known.
        tensors: leaf paths of the tensors that use the damaged chunk.
    """

    def __init__(
        self,
        message: str,
        object: str | None = None,
        *,
        version: int | None = None,
        tensors: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.object = object
        self.version = version
        self.tensors = tensors

    def __str__(self) -> str:
        return self.message


class MissingObjectError(IntegrityError):
    """A chunk that a version references is not in the store."""


class FormatError(CheckpointError, ValueError):
    """A file of the store is not in a form this version of ckpt understands."""

    def __init__(self, message: str, object: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.object = object

    def __str__(self) -> str:
        return self.message


class VersionNotFoundError(CheckpointError, KeyError):
    """The requested version is not in the store."""

    def __str__(self) -> str:
        # KeyError quotes its argument; show the message as written.
        return str(self.args[0]) if self.args else ""


class BadReferenceError(VersionNotFoundError, ValueError):
    """A version reference is none of the accepted forms (see :mod:`ckpt.refs`)."""


class MetricModeError(CheckpointError, ValueError):
    """ "Best" by a metric whose direction is not known: say ``min`` or ``max``.

    A metric's mode is known only for the monitor the manager recorded; for
    any other metric ckpt does not guess whether lower or higher is better.
    """


class StoreNotFoundError(CheckpointError, FileNotFoundError):
    """The path is not a ckpt store (and ``create=False`` was given)."""


class StoreLockedError(CheckpointError):
    """Another writer holds the store's lock."""


class ConcurrentRunError(StoreLockedError):
    """Another training run saved to this store since this manager last looked.

    Two runs interleaving versions in one store would delete each other's
    versions through retention and resume from each other's states; the
    manager refuses to save instead (see :class:`ckpt.CheckpointManager`).
    """


class StoreReadOnlyError(CheckpointError, PermissionError):
    """The store cannot be written here (a read-only mount, or no write permission).

    Reading works: listing, loading and verifying take no lock.
    """

    def __str__(self) -> str:
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


class StoreFullError(CheckpointError, OSError):
    """The store's file system is full (``ENOSPC``, ``EDQUOT`` or ``EFBIG``).

    Raised by a save that ran out of space while writing, or that was refused
    before writing anything because its new chunks could not fit. The version
    was not committed, its temporary files are removed, and every earlier
    version is intact. ``errno`` holds the operating-system error number.
    """

    def __str__(self) -> str:
        # The message names the store and the file: no "[Errno N]" prefix.
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


class StepExistsError(CheckpointError, ValueError):
    """A version for this step exists already (pass ``overwrite=True`` to replace it)."""


class StepOrderError(CheckpointError, ValueError):
    """A step older than the one the manager's state is at (pass ``overwrite=True``,
    or restore an older version first)."""


class MissingMetricError(CheckpointError, KeyError):
    """The monitored metric is not among the metrics given to a save."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsafeLoadError(CheckpointError):
    """Loading would unpickle objects (run code) and ``allow_pickle`` was not given."""


class SlimmedError(CheckpointError, KeyError):
    """The leaves asked for were dropped from the version by retention (``Keep(subtrees=...)``).

    A ``KeyError``, like a missing version: the leaves are not there to be
    read. The message names the version, the dropped patterns, the newest
    version that still holds those leaves (if any) and an ``only=`` that
    loads what the version keeps.

    Attributes:
        version: id of the slimmed version.
        patterns: the retention patterns that dropped the wanted leaves.
        paths: the wanted leaf paths that were dropped.
        holder: id of the newest version that still holds them, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        version: int,
        patterns: tuple[str, ...] = (),
        paths: tuple[str, ...] = (),
        holder: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.version = version
        self.patterns = patterns
        self.paths = paths
        self.holder = holder

    def __str__(self) -> str:
        # KeyError quotes its argument; show the message as written.
        return self.message
