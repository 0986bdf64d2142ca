"""ckpt: a checkpoint store for machine-learning training.

Large tensors are cut into chunks, hashed (BLAKE3), deduplicated across
versions, compressed (zstd after byte grouping) and verified on every read by
a Rust engine; this package adds the versioned index on top.
"""

import os as _os
import sys as _sys

from . import _core
from .early_stopping import Decision, EarlyStopping
from .errors import (
    BadReferenceError,
    CheckpointError,
    ConcurrentRunError,
    FormatError,
    IntegrityError,
    MetricModeError,
    MissingMetricError,
    MissingObjectError,
    SlimmedError,
    StepExistsError,
    StepOrderError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnsafeLoadError,
    VersionNotFoundError,
)
from .history import HistoryEntry
from .index import Version
from .manager import CheckpointManager
from .retention import Keep
from .store import GcResult, Problem, RetentionResult, Store, VerifyResult, VersionPinnedError

__version__ = _core.__version__


def __getattr__(name: str) -> object:
    """``ckpt.torch`` is imported on first use (torch is an optional dependency)."""
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")


def _installed_version() -> str | None:
    """The version of the installed ``ckpt-store`` distribution (None: running from a source tree).

    What ``importlib.metadata.version("ckpt-store")`` answers, read from the
    name of the first ``ckpt_store-VERSION.dist-info`` on ``sys.path``:
    importing importlib.metadata takes 30-50 ms (it brings the email package),
    a tenth of a ``ckpt ls`` on 10,000 versions.
    """
    for entry in _sys.path:
        try:
            names = _os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                project, _, version = name[: -len(".dist-info")].partition("-")
                if project.lower().replace("-", "_").replace(".", "_") == "ckpt_store":
                    return version
    return None


_dist = _installed_version() or __version__
if _dist != __version__:  # pragma: no cover - a stale build
    raise ImportError(
        f"ckpt._core is version {__version__} but the package is {_dist}; rebuild the extension"
        " (make build)"
    )

__all__ = [
    "BadReferenceError",
    "CheckpointError",
    "ConcurrentRunError",
    "CheckpointManager",
    "Decision",
    "EarlyStopping",
    "FormatError",
    "GcResult",
    "HistoryEntry",
    "IntegrityError",
    "Keep",
    "MetricModeError",
    "MissingMetricError",
    "MissingObjectError",
    "Problem",
    "RetentionResult",
    "SlimmedError",
    "StepExistsError",
    "StepOrderError",
    "Store",
    "StoreFullError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "UnsafeLoadError",
    "VerifyResult",
    "Version",
    "VersionNotFoundError",
    "VersionPinnedError",
    "__version__",
]
