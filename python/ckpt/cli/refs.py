"""What STORE and VERSION arguments mean, and which metric "best" uses.

VERSION, everywhere a command takes one, is a reference of :mod:`ckpt.refs`
(the grammar the library uses too): an id (``7``), ``latest``, ``step=N``
(the newest version saved at step N), ``best`` (by the metric and mode the
:class:`~ckpt.CheckpointManager` recorded, or ``--metric``/``--mode``),
``best:METRIC`` and ``best:METRIC:min|max``.

The metric of ``best`` (and of ``ls``, ``best``, ``gc``, ``plot``): the one
inline in the reference, else ``--metric``, else the recorded monitor. The
mode: inline, else ``--mode``, else the recorded mode if the metric is the
recorded monitor; for any other metric the command refuses to guess and asks
for ``--mode min|max`` (exit status 2).
"""

from __future__ import annotations

import argparse
import errno
import os

from ..errors import StoreNotFoundError
from ..index import Version
from ..refs import Monitor, choose_monitor, recorded_monitor
from ..refs import resolve as resolve_ref
from ..retention import best_of
from ..store import Store

__all__ = [
    "Monitor",
    "add_metric_options",
    "best_version",
    "monitor_of",
    "not_a_store",
    "open_store",
    "resolve",
]

#: How a command names a mode, in MetricModeError messages.
MODE_HINT = "pass --mode min or --mode max (or write best:{metric}:min|max)"


def open_store(path: str) -> Store:
    """Opens an existing store (never creates one, nor anything else at ``path``).

    Every command but ``import`` opens its STORE through here, so that a
    mistyped path is refused, naming the path and what is there instead.

    Raises:
        StoreNotFoundError: ``path`` is not a store.
        FormatError: a store of a newer or unknown format.
    """
    try:
        return Store(path, create=False)
    except StoreNotFoundError as exc:
        raise StoreNotFoundError(errno.ENOENT, not_a_store(path), path) from exc


def not_a_store(path: str) -> str:
    """Why ``path`` is not a store, and what to do: one line for ``ckpt: error:``."""
    if not os.path.lexists(path):
        what = "no such directory"
    elif not os.path.isdir(path):
        what = "a file, not a directory"
    else:
        try:
            empty = not os.listdir(path)
        except OSError:
            empty = False
        what = "an empty directory" if empty else "no ckpt-store.json in it"
    return f"{path} is not a ckpt store ({what}); check the path"


def add_metric_options(p: argparse.ArgumentParser, what: str = "best") -> None:
    """``--metric`` and ``--mode``, which define what "best" means."""
    p.add_argument(
        "--metric",
        metavar="NAME",
        help=f"metric that defines {what} (default: the monitor the manager recorded)",
    )
    p.add_argument(
        "--mode",
        choices=("min", "max"),
        help="whether lower or higher is better (default: the recorded mode, for the"
        " recorded monitor; required for any other metric)",
    )


def monitor_of(
    store: Store, metric: str | None, mode: str | None, latest: Version | None = None
) -> Monitor:
    """The metric and mode of "best": explicit options first, then what the manager recorded.

    Raises:
        MetricModeError: ``metric`` is not the recorded monitor and ``mode`` is None.
    """
    latest = latest if latest is not None else store.latest()
    return choose_monitor(metric, mode, recorded_monitor(latest), hint=MODE_HINT)


def best_version(versions: list[Version], monitor: Monitor) -> Version | None:
    """The best version (NaN ignored, ties to the earliest), as :meth:`Store.best` decides."""
    if monitor.metric is None or monitor.mode is None:
        return None
    return best_of(versions, monitor.metric, monitor.mode)


def resolve(
    store: Store,
    ref: str,
    metric: str | None = None,
    mode: str | None = None,
    versions: list[Version] | None = None,
) -> Version:
    """The version a VERSION argument names (:func:`ckpt.refs.resolve`).

    Raises:
        VersionNotFoundError: no such version (or no version has the metric).
        BadReferenceError: ``ref`` is not one of the accepted forms, or
            ``best`` has no metric (exit status 2).
        MetricModeError: ``best`` by a metric whose mode is not known (exit status 2).
    """
    versions = versions if versions is not None else store.versions()
    return resolve_ref(versions, ref, root=store.root, metric=metric, mode=mode, hint=MODE_HINT)
