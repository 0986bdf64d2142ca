"""CheckpointManager: the part a training loop talks to.

It combines a :class:`~ckpt.Store` with a save schedule, early stopping,
retention and preemption handling, and makes resuming exact: every version
records the early-stopping state and the manager's configuration, so a run
killed at any moment and resumed with :meth:`CheckpointManager.restore_latest`
takes the same decisions as the run that was never interrupted.

Typical loop::

    with ckpt.CheckpointManager("runs/exp1", monitor="val_loss", mode="min",
            early_stopping=ckpt.EarlyStopping(patience=5, min_delta=1e-3),
            keep=ckpt.Keep(last=3, best=2)) as mgr:
        state = mgr.restore_latest(default=fresh_state)
        for epoch in range(mgr.next_step, 100):
            if mgr.should_stop:          # a resumed run that had already stopped
                break
            ...
            if mgr.save(epoch, state, metrics={"val_loss": vl}):
                break
        best = mgr.restore_best()

Decisions where the design leaves room:

* Early stopping sees the monitored metric on every ``save`` call, also when
  the schedule skips writing; a stop decision always writes a version (the
  final state), as does a preemption.
* Once stopped, ``save`` returns True again without writing anything.
* Several stopping criteria (``early_stopping=[...]``, as Lightning allows
  several EarlyStopping callbacks): training stops when any of them says so;
  the first one's improvements drive ``save_on_improvement``. Each inherits
  the manager's ``monitor`` and ``mode`` unless it names its own (a
  contradiction is a ``ValueError``).
* The manager's state (next step, schedule, early stopping) is the store's:
  a new manager adopts the newest version's (an EarlyStopping object that
  stopped in an earlier run is reset first, so reusing one is safe), and
  restoring any version (latest, best, or a given one) adopts that
  version's. A version written because of preemption does not count as
  stopped: resuming from it goes on training.
* Every write is checked under the store's writer lock against what the
  store holds then: a step older than the one the manager's state is at is
  refused (:class:`~ckpt.errors.StepOrderError`) unless ``overwrite=True``;
  restoring an older version first moves that point back. A step that has a
  version is refused (:class:`~ckpt.errors.StepExistsError`) unless
  ``overwrite=True``, which replaces it. If another writer committed a
  version since this manager last looked (a second training run on the same
  store, or a stale manager), the save is refused with
  :class:`~ckpt.errors.ConcurrentRunError` instead of interleaving two runs
  whose retention would delete each other's versions; ``restore_latest()``
  takes the store's newest state over explicitly.
* Every ``save`` call's metrics go to the store's metric history
  (:meth:`ckpt.Store.history`), also for steps the schedule did not write and
  for versions retention deletes later; ``ckpt plot`` draws it. Entries of
  unwritten steps are appended with the next version (and at ``close``).
* Each decision (saved, skipped, improved, stopping because ...) is logged at
  INFO on the ``ckpt.manager`` logger, which shows nothing unless the
  application configures logging.
* ``save_every_seconds`` depends on the clock, so it is the one schedule that
  a resumed run cannot replay exactly; steps and improvements can.

Thread-safety: one manager per training process, used from one thread; the
signal handler only sets a flag. Process-safety: the store's writer lock,
and the checks above, which refuse a second run rather than interleave it.
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from .early_stopping import Decision, EarlyStopping
from .errors import (
    CheckpointError,
    ConcurrentRunError,
    FormatError,
    IntegrityError,
    MissingMetricError,
    StepExistsError,
    StepOrderError,
    VersionNotFoundError,
)
from .index import Version, encode_metrics, format_time
from .retention import Keep
from .store import Store

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CheckpointManager:
    """Saves, stops early, keeps what matters and resumes exactly.

    Args:
        root: the store directory (created by the first save if missing).
        monitor: the metric that defines "best" (for retention, ``restore_best``,
            ``ckpt best``) and, by default, for early stopping.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
            None: the mode of an early stopping that monitors the same metric,
            else ``"min"``.
        early_stopping: an :class:`EarlyStopping`, or several (training stops
            when any says so); each inherits ``monitor`` and ``mode`` unless
            it names its own.
        keep: a retention :class:`Keep` policy applied after every save (None: keep all).
        save_every: write a version when at least this many steps passed since
            the last one (None: no step schedule).
        save_every_seconds: write a version when this much time passed since the last one.
        save_on_improvement: write a version whenever the monitored metric improves.
        handle_signals: install a SIGTERM/SIGUSR1 handler that only sets a flag;
            the next ``save`` then writes a version and returns True.
        overwrite: allow saving a step that already has a version (the old one
            is deleted after the new one is committed), or a step older than
            the one the manager's state is at.
        strict: a monitored metric missing from ``metrics`` is an error (else a warning).
        async_save: write versions in the background: ``save`` returns once the
            state is copied to host memory; the previous save's error is
            raised by the next ``save``, ``wait`` or ``close``.
        **store_options: passed to :class:`Store` (``durable``, ``threads``, ...).

    Raises:
        ValueError: inconsistent options (unknown mode, a monitor/mode that
            contradicts an early stopping's, a non-positive schedule), or an
            early-stopping state in the store recorded for another mode.
    """

    def __init__(
        self,
        root: str,
        *,
        monitor: str | None = None,
        mode: str | None = None,
        early_stopping: EarlyStopping | Sequence[EarlyStopping] | None = None,
        keep: Keep | None = None,
        save_every: int | None = 1,
        save_every_seconds: float | None = None,
        save_on_improvement: bool = False,
        handle_signals: bool = False,
        overwrite: bool = False,
        strict: bool = True,
        async_save: bool = False,
        **store_options: Any,
    ) -> None:
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
        if save_every_seconds is not None and not save_every_seconds > 0:
            raise ValueError(f"save_every_seconds must be > 0 or None, got {save_every_seconds!r}")
        if early_stopping is None:
            stoppers: tuple[EarlyStopping, ...] = ()
        elif isinstance(early_stopping, EarlyStopping):
            stoppers = (early_stopping,)
        else:
            stoppers = tuple(early_stopping)
            if not all(isinstance(es, EarlyStopping) for es in stoppers):
                raise TypeError("early_stopping must be an EarlyStopping or a sequence of them")
        if mode is None:  # the mode an early stopping of the same metric names, else min
            mode = next(
                (
                    es.given_mode
                    for es in stoppers
                    if es.given_mode is not None and es.given_monitor in (None, monitor)
                ),
                "min",
            )
        for es in stoppers:
            es.bind(monitor, mode)
            es.reset()  # an instance that stopped in an earlier run starts afresh
        if keep is not None and keep.best is not None and monitor is None:
            raise ValueError("Keep(best=...) needs monitor=... to know what best means")
        self.store = Store(root, **store_options)
        self.monitor = monitor
        self.mode: str = mode
        self.early_stoppings = stoppers
        #: the first early stopping (None without one); see ``early_stoppings``
        self.early_stopping = stoppers[0] if stoppers else None
        self.keep = keep
        self.save_every = save_every
        self.save_every_seconds = save_every_seconds
        self.save_on_improvement = save_on_improvement
        self.overwrite = overwrite
        self.strict = strict
        self.async_save = async_save
        self.next_step = 0
        self.should_stop = False
        self.stop_reason: str | None = None
        self._last_save_step: int | None = None
        self._last_save_time = time.monotonic()
        #: the newest version id this manager knows the store has (None: empty)
        self._seen: int | None = None
        #: the step the manager's state is at: older steps are refused
        self._floor: int | None = None
        #: ids of versions restore_latest(fallback=True) skipped as damaged
        self._damaged: set[int] = set()
        #: history entries of steps evaluated but not written yet
        self._unwritten: list[dict[str, Any]] = []
        self._preempted = False
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}
        versions = self.store.versions()
        self._steps: set[int] = {v.step for v in versions if v.step is not None}
        if versions:
            self._adopt(versions[-1], versions[-1].id)
        if handle_signals:
            self._install_signals()

    # ----------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        """The manager's configuration, recorded in every manifest.

        ``early_stopping`` is one object for one early stopping (as older
        releases wrote it) and a list for several.
        """
        configs = [
            {
                "monitor": es.monitor,
                "mode": es.mode,
                "patience": es.patience,
                "min_delta": es.min_delta,
                "baseline": es.baseline,
                "stopping_threshold": es.stopping_threshold,
                "divergence_threshold": es.divergence_threshold,
                "check_finite": es.check_finite,
                "start_from": es.start_from,
            }
            for es in self.early_stoppings
        ]
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "keep": self.keep.to_dict() if self.keep else None,
            "save_every": self.save_every,
            "save_every_seconds": self.save_every_seconds,
            "save_on_improvement": self.save_on_improvement,
            "early_stopping": _one_or_list(configs),
        }

    # ---------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        for sig in _SIGNALS:
            try:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError as exc:  # not the main thread
                self._restore_signals()
                raise ValueError(
                    f"handle_signals=True needs the main thread ({exc}); create the manager there"
                ) from None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: no I/O, no locks, nothing that could deadlock or tear a save.
        self._preempted = True

    def _restore_signals(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    @property
    def preempted(self) -> bool:
        """True once SIGTERM/SIGUSR1 arrived (with ``handle_signals=True``)."""
        return self._preempted

    # ----------------------------------------------------------------- saving
    def _monitored(self, name: str | None, metrics: Mapping[str, Any], step: int) -> Any:
        if name is None:
            return None
        if name in metrics:
            return metrics[name]
        message = (
            f"monitored metric {name!r} is not among the metrics of step {step}"
            f" ({', '.join(sorted(metrics)) or 'none given'}); pass it to save(metrics=...)"
        )
        if self.strict:
            raise MissingMetricError(message + ", or create the manager with strict=False")
        warnings.warn(message + "; early stopping skips this step", RuntimeWarning, stacklevel=3)
        return None

    def _check_order(self, step: int) -> None:
        """Refuses a step older than the one the manager's state is at (unless overwrite)."""
        if self._floor is not None and step < self._floor and not self.overwrite:
            raise StepOrderError(
                f"step {step} is older than step {self._floor}, where {self.store.root} is;"
                " saving it would make an older state the resume target. Pass overwrite=True"
                " to save it anyway, or restore an older version first (mgr.restore(...))"
                " to go back to it"
            )

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
        force: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> bool:
        """Records a step: updates early stopping, writes a version when due.

        Args:
            step: the training step or epoch (non-negative int, increasing).
            state: the state tree to save.
            metrics: metric name -> number for this step.
            epoch: optional epoch number, for listing.
            force: write a version whatever the schedule says.
            meta: user metadata stored with the version.

        Returns:
            True when training should stop (early stopping or preemption).

        Raises:
            StepExistsError: a version for ``step`` exists (and ``overwrite=False``).
            StepOrderError: ``step`` is older than the manager's state (and
                ``overwrite=False``).
            ConcurrentRunError: another writer saved to the store since this
                manager last looked at it.
            MissingMetricError: the monitored metric is missing (``strict=True``).
        """
        if self._closed:
            raise CheckpointError("the CheckpointManager is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"step must be a non-negative int, got {step!r}")
        if self.should_stop and not self._preempted:
            log.info("step %d: not saved: training stopped already (%s)", step, self.stop_reason)
            return True  # stopped earlier (maybe before a resume): nothing more to write
        self._check_order(step)
        metrics = dict(metrics or {})
        encoded = encode_metrics(metrics)  # a bad metric is refused before any state changes
        values = [(es, self._monitored(es.monitor, metrics, step)) for es in self.early_stoppings]
        if self.monitor is not None and all(
            es.monitor != self.monitor for es in self.early_stoppings
        ):
            self._monitored(self.monitor, metrics, step)
        before = [es.state_dict() for es in self.early_stoppings]
        decisions: list[Decision | None] = [
            None if value is None else es.update(value, step) for es, value in values
        ]
        for (es, value), d in zip(values, decisions, strict=True):
            if d is not None and d.improved:
                log.info("step %d: %s improved to %s", step, es.monitor, value)
        first = decisions[0] if decisions else None
        stopping = next((d for d in decisions if d is not None and d.stop), None)
        preempted = self._preempted
        stop = preempted or stopping is not None
        due = (
            force
            or stop
            or self._last_save_step is None
            or step < self._last_save_step  # overwrite=True: going back is a new start
            or (self.save_every is not None and step - self._last_save_step >= self.save_every)
            or (
                self.save_every_seconds is not None
                and time.monotonic() - self._last_save_time >= self.save_every_seconds
            )
            or (self.save_on_improvement and first is not None and first.improved)
        )
        entry = {"step": step, "epoch": epoch, "metrics": encoded, "time": _now()}
        if due:
            try:
                self._write(step, state, metrics, epoch, meta, "preempted" if preempted else None)
            except BaseException:
                for es, saved in zip(self.early_stoppings, before, strict=True):
                    es.load_state_dict(saved)  # the step did not happen
                raise
        else:
            self._unwritten.append(entry)
            log.info(
                "step %d: skipped by the schedule (last version at step %s)",
                step,
                self._last_save_step,
            )
        self.next_step = step + 1
        self._floor = step
        if stop:
            self.should_stop = True
            self.stop_reason = (
                "preempted" if preempted else stopping.reason if stopping is not None else None
            )
            log.info("step %d: stopping: %s", step, self.stop_reason)
        return stop

    def _write(
        self,
        step: int,
        state: Any,
        metrics: dict[str, Any],
        epoch: int | None,
        meta: dict[str, Any] | None,
        why: str | None,
    ) -> None:
        if self.async_save:
            self.wait()  # one save in flight at a time; its error surfaces here
        if step in self._steps and not self.overwrite:
            raise StepExistsError(
                f"{self.store.root} already has a version for step {step};"
                " pass overwrite=True to replace it"
            )
        seen, replaced = self._seen, []
        trainer = {
            "manager": self.config(),
            "early_stopping": _one_or_list([es.state_dict() for es in self.early_stoppings]),
            "saved_because": why,
        }

        def check(newest: int | None, listing: Callable[[], list[Version]]) -> None:
            # Under the writer lock, before anything is written: is the store
            # still where this manager's state says it is?
            if newest != seen:
                raise self._concurrent(seen, newest, listing())
            if step in self._steps:
                same = [v.id for v in listing() if v.step == step and v.id not in self._damaged]
                if same and not self.overwrite:
                    raise StepExistsError(
                        f"{self.store.root} already has a version for step {step};"
                        " pass overwrite=True to replace it"
                    )
                replaced.extend(same)

        def after_commit(version: Version) -> None:
            self._seen = version.id
            log.info(
                "step %d: saved version %d (%s)", step, version.id,
                ", ".join(f"{k}={v}" for k, v in metrics.items()) or "no metrics",
            )  # fmt: skip
            for vid in replaced:
                self.store.delete(vid)
            if self.keep is not None:
                result = self.store.apply_retention(self.keep, monitor=self.monitor, mode=self.mode)
                if result.deleted:
                    log.info("retention deleted versions %s", list(result.deleted))

        history, self._unwritten = self._unwritten, []
        common: dict[str, Any] = {
            "step": step, "epoch": epoch, "metrics": metrics, "meta": meta, "trainer": trainer,
            "then": after_commit, "check": check, "history": history,
        }  # fmt: skip
        try:
            if self.async_save:
                self.store.save(state, blocking=False, **common)
            else:
                self.store.save(state, **common)
        except BaseException:
            self._unwritten = history + self._unwritten
            raise
        self._steps.add(step)
        self._last_save_step = step
        self._last_save_time = time.monotonic()
        if self.keep is not None and not self.async_save:
            self._refresh_steps()

    def _concurrent(
        self, seen: int | None, newest: int | None, versions: list[Version]
    ) -> ConcurrentRunError:
        root = self.store.root
        newer = [v for v in versions if seen is None or v.id > seen]
        if newer:
            v = newer[-1]
            what = (
                f"another writer saved version {v.id} (step {v.step}, {format_time(v.created)})"
                f" since this manager last looked at {root}"
                + (f" (at version {seen})" if seen is not None else " (empty then)")
            )
        else:
            what = f"version {seen} of {root}, the newest this manager knew, was deleted since"
        return ConcurrentRunError(
            f"not saving: {what}. Two training runs on one store would resume from each"
            " other's states and delete each other's versions; give each run its own store,"
            " or call restore_latest() to continue from the store's newest version"
            + (f" ({newest})" if newest is not None else "")
        )

    def _refresh_steps(self) -> None:
        self._steps = {v.step for v in self.store.versions() if v.step is not None}

    def wait(self) -> None:
        """Waits for a background save (``async_save=True``) and raises its error."""
        self.store.wait()
        if self.keep is not None:
            self._refresh_steps()  # retention ran in the background

    # -------------------------------------------------------------- restoring
    def _adopt(self, version: Version, newest: int | None) -> None:
        """Takes the early-stopping state and counters as of ``version``;
        ``newest`` is the store's newest version id now."""
        recorded = dict(version.trainer).get("early_stopping")
        states = recorded if isinstance(recorded, list) else [recorded]
        unused = [st for st in states if isinstance(st, dict)]
        for es in self.early_stoppings:
            match = next((st for st in unused if st.get("monitor") in (None, es.monitor)), None)
            if match is None:
                es.reset()
                continue
            unused.remove(match)
            try:
                es.load_state_dict(match)
            except ValueError as exc:
                raise ValueError(
                    f"{self.store.root}: version {version.id} recorded an early stopping that"
                    f" this manager's does not match: {exc}; use the same monitor and mode, or"
                    " a new store"
                ) from None
        self.next_step = 0 if version.step is None else version.step + 1
        self._last_save_step = version.step
        self._last_save_time = time.monotonic()
        self._floor = version.step
        self._seen = newest
        stopped = [es for es in self.early_stoppings if es.stopped]
        self.should_stop = bool(stopped)
        self.stop_reason = stopped[0].reason if stopped else None

    def _fresh(self) -> None:
        for es in self.early_stoppings:
            es.reset()
        self.next_step, self.should_stop, self.stop_reason = 0, False, None
        self._last_save_step = self._floor = self._seen = None

    def restore_latest(self, default: Any = None, into: Any = None, fallback: bool = False) -> Any:
        """Resumes: loads the newest version and the decision state as of it.

        Args:
            default: returned when the store is empty (a fresh run).
            into: a tree of preallocated arrays to restore into where shapes
                and dtypes match (avoids a second full-size allocation). A
                load that fails may have filled some of them already.
            fallback: when the newest version is damaged (a chunk or its
                manifest fails verification), warn and resume from the newest
                version that loads and verifies instead. The damaged versions
                stay in the store (evidence for ``ckpt verify``); their steps
                may be saved again, and retention waits for the next save.

        Raises:
            IntegrityError, FormatError: the newest version is damaged (and
                ``fallback`` is False), or every version is (with ``fallback``:
                the newest one's error).
        """
        self.wait()
        versions = self.store.versions()
        if not versions:
            self._fresh()
            return default
        damaged: list[tuple[Version, CheckpointError]] = []
        candidates = list(reversed(versions if fallback else versions[-1:]))
        # resume never lands on a version retention slimmed when a full one exists
        full = [v for v in candidates if not v.slimmed]
        for candidate in full or candidates:
            try:
                tree = self.store.load(candidate, into=into)
            except (IntegrityError, FormatError) as exc:
                if not fallback:
                    raise
                damaged.append((candidate, exc))
                continue
            break
        else:
            raise damaged[0][1]
        if damaged:
            warnings.warn(
                f"{self.store.root}: resuming from version {candidate.id} (step {candidate.step})"
                " because newer versions are damaged: "
                + "; ".join(f"version {v.id}: {exc}" for v, exc in damaged),
                RuntimeWarning,
                stacklevel=2,
            )
            self._steps -= {v.step for v, _ in damaged}
            self._damaged |= {v.id for v, _ in damaged}
        self._adopt(candidate, versions[-1].id)
        if self.keep is not None and not damaged:
            # A run killed between a commit and its retention catches up here.
            self.store.apply_retention(self.keep, monitor=self.monitor, mode=self.mode)
            self._refresh_steps()
        return tree

    def restore_best(self, into: Any = None) -> Any:
        """Loads the best version by ``monitor`` (and the decision state as of it).

        Raises:
            VersionNotFoundError: no version has the monitored metric.
        """
        self.wait()
        best = self.best_version
        if best is None:
            raise VersionNotFoundError(
                f"no version in {self.store.root} has the metric {self.monitor!r}"
            )
        tree = self.store.load(best, into=into)
        self._adopt(best, self._newest())
        return tree

    def restore(self, version: int | Version | str, into: Any = None) -> Any:
        """Loads a given version (any reference of :mod:`ckpt.refs`: id, Version,
        "latest", "best", "step=N", ...) and the decision state as of it.

        Restoring an older version moves the manager back to it: the next
        save may then be of a step older than the store's newest (a version
        that already exists at that step is still only replaced with
        ``overwrite=True``)."""
        self.wait()
        vid = self.store.resolve(version)
        tree = self.store.load(vid, into=into)
        versions = self.store.versions()
        self._adopt(next(v for v in versions if v.id == vid), versions[-1].id)
        return tree

    def _newest(self) -> int | None:
        latest = self.store.latest()
        return None if latest is None else latest.id

    @property
    def best_version(self) -> Version | None:
        """The best saved version by ``monitor`` and ``mode`` (None without a monitor)."""
        if self.monitor is None:
            return None
        return self.store.best(self.monitor, self.mode)

    @property
    def latest_version(self) -> Version | None:
        return self.store.latest()

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Waits for a background save, records the metric history of steps not
        written, restores the previous signal handlers; the manager cannot
        save afterwards."""
        if not self._closed:
            self._closed = True
            try:
                self.store.close()  # waits for a background save; raises its error
                if self._unwritten and self.store.exists:
                    try:
                        self.store.append_history(self._unwritten)
                    except (OSError, CheckpointError) as exc:
                        log.warning("%s: metric history not written: %s", self.store.root, exc)
                    self._unwritten = []
            finally:
                self._restore_signals()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({self.store.root!r}, monitor={self.monitor!r}, mode={self.mode!r},"
            f" next_step={self.next_step}, should_stop={self.should_stop})"
        )


def _one_or_list(items: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]] | None:
    """None, the one item (the form of older releases) or the list."""
    if not items:
        return None
    return items[0] if len(items) == 1 else items


def _now() -> str:
    return format_time(datetime.now(timezone.utc))
