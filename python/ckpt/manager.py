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
* Restoring any version (latest, best, or a given one) restores the early
  stopping state and counters as of that version. A version written because
  of preemption does not count as stopped: resuming from it goes on training.
* ``save_every_seconds`` depends on the clock, so it is the one schedule that
  a resumed run cannot replay exactly; steps and improvements can.

Thread-safety: one manager per training process, used from one thread; the
signal handler only sets a flag. Process-safety is the store's (writers lock).
"""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Mapping
from types import FrameType
from typing import Any

from .early_stopping import Decision, EarlyStopping
from .errors import (
    CheckpointError,
    FormatError,
    IntegrityError,
    MissingMetricError,
    StepExistsError,
    VersionNotFoundError,
)
from .index import Version
from .retention import Keep
from .store import Store

__all__ = ["CheckpointManager"]

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CheckpointManager:
    """Saves, stops early, keeps what matters and resumes exactly.

    Args:
        root: the store directory (created if missing).
        monitor: the metric that defines "best" (for retention, ``restore_best``,
            ``ckpt best``) and, by default, for early stopping.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        early_stopping: an :class:`EarlyStopping`; its ``monitor`` defaults to ``monitor``.
        keep: a retention :class:`Keep` policy applied after every save (None: keep all).
        save_every: write a version when at least this many steps passed since
            the last one (None: no step schedule).
        save_every_seconds: write a version when this much time passed since the last one.
        save_on_improvement: write a version whenever the monitored metric improves.
        handle_signals: install a SIGTERM/SIGUSR1 handler that only sets a flag;
            the next ``save`` then writes a version and returns True.
        overwrite: allow saving a step that already has a version (the old one is deleted).
        strict: a monitored metric missing from ``metrics`` is an error (else a warning).
        async_save: write versions in the background: ``save`` returns once the
            state is copied to host memory; the previous save's error is
            raised by the next ``save``, ``wait`` or ``close``.
        **store_options: passed to :class:`Store` (``durable``, ``threads``, ...).

    Raises:
        ValueError: inconsistent options (unknown mode, a monitor/mode that
            contradicts the early stopping's, a non-positive schedule).
    """

    def __init__(
        self,
        root: str,
        *,
        monitor: str | None = None,
        mode: str = "min",
        early_stopping: EarlyStopping | None = None,
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
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
        if save_every_seconds is not None and not save_every_seconds > 0:
            raise ValueError(f"save_every_seconds must be > 0 or None, got {save_every_seconds!r}")
        if early_stopping is not None:
            if early_stopping.monitor is None:
                if monitor is None:
                    raise ValueError("early stopping needs a metric: pass monitor=...")
                early_stopping.monitor = monitor
            elif early_stopping.monitor == monitor and early_stopping.mode != mode:
                raise ValueError(
                    f"monitor {monitor!r} has mode {mode!r} here but {early_stopping.mode!r}"
                    " in EarlyStopping; make them agree"
                )
        if keep is not None and keep.best is not None and monitor is None:
            raise ValueError("Keep(best=...) needs monitor=... to know what best means")
        self.store = Store(root, **store_options)
        self.monitor = monitor
        self.mode = mode
        self.early_stopping = early_stopping
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
        self._steps: set[int] = {v.step for v in self.store.versions() if v.step is not None}
        self._preempted = False
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}
        if handle_signals:
            self._install_signals()

    # ----------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        """The manager's configuration, recorded in every manifest."""
        es = self.early_stopping
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "keep": self.keep.to_dict() if self.keep else None,
            "save_every": self.save_every,
            "save_every_seconds": self.save_every_seconds,
            "save_on_improvement": self.save_on_improvement,
            "early_stopping": None
            if es is None
            else {
                "monitor": es.monitor,
                "mode": es.mode,
                "patience": es.patience,
                "min_delta": es.min_delta,
                "baseline": es.baseline,
                "stopping_threshold": es.stopping_threshold,
                "divergence_threshold": es.divergence_threshold,
                "check_finite": es.check_finite,
                "start_from": es.start_from,
            },
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
            MissingMetricError: the monitored metric is missing (``strict=True``).
        """
        if self._closed:
            raise CheckpointError("the CheckpointManager is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"step must be a non-negative int, got {step!r}")
        if self.should_stop and not self._preempted:
            return True  # stopped earlier (maybe before a resume): nothing more to write
        metrics = dict(metrics or {})
        es = self.early_stopping
        decision: Decision | None = None
        if es is not None:
            value = self._monitored(es.monitor, metrics, step)
            if value is not None:
                decision = es.update(value, step)
        if self.monitor is not None and (es is None or es.monitor != self.monitor):
            self._monitored(self.monitor, metrics, step)
        preempted = self._preempted
        stop = preempted or (decision is not None and decision.stop)
        due = (
            force
            or stop
            or self._last_save_step is None
            or (self.save_every is not None and step - self._last_save_step >= self.save_every)
            or (
                self.save_every_seconds is not None
                and time.monotonic() - self._last_save_time >= self.save_every_seconds
            )
            or (self.save_on_improvement and decision is not None and decision.improved)
        )
        if due:
            self._write(step, state, metrics, epoch, meta, "preempted" if preempted else None)
        self.next_step = step + 1
        if stop:
            self.should_stop = True
            self.stop_reason = "preempted" if preempted else decision.reason if decision else None
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
        replaced: list[int] = []
        if step in self._steps:
            if not self.overwrite:
                raise StepExistsError(
                    f"{self.store.root} already has a version for step {step};"
                    " pass overwrite=True to replace it"
                )
            replaced = [v.id for v in self.store.versions() if v.step == step]
        trainer = {
            "manager": self.config(),
            "early_stopping": None
            if self.early_stopping is None
            else self.early_stopping.state_dict(),
            "saved_because": why,
        }

        def after_commit(version: Version) -> None:
            for vid in replaced:
                self.store.delete(vid)
            if self.keep is not None:
                self.store.apply_retention(self.keep, monitor=self.monitor, mode=self.mode)

        if self.async_save:
            self.store.save(
                state, step=step, epoch=epoch, metrics=metrics, meta=meta, trainer=trainer,
                blocking=False, then=after_commit,
            )  # fmt: skip
        else:
            self.store.save(
                state, step=step, epoch=epoch, metrics=metrics, meta=meta, trainer=trainer,
                then=after_commit,
            )  # fmt: skip
        self._steps.add(step)
        self._last_save_step = step
        self._last_save_time = time.monotonic()
        if self.keep is not None and not self.async_save:
            self._refresh_steps()

    def _refresh_steps(self) -> None:
        self._steps = {v.step for v in self.store.versions() if v.step is not None}

    def wait(self) -> None:
        """Waits for a background save (``async_save=True``) and raises its error."""
        self.store.wait()
        if self.keep is not None:
            self._refresh_steps()  # retention ran in the background

    # -------------------------------------------------------------- restoring
    def _adopt(self, version: Version) -> None:
        """Takes the early-stopping state and counters as of ``version``."""
        trainer = dict(version.trainer)
        es_state = trainer.get("early_stopping")
        if self.early_stopping is not None:
            if isinstance(es_state, dict):
                self.early_stopping.load_state_dict(es_state)
            else:
                self.early_stopping.reset()
        self.next_step = 0 if version.step is None else version.step + 1
        self._last_save_step = version.step
        self._last_save_time = time.monotonic()
        self.should_stop = self.early_stopping is not None and self.early_stopping.stopped
        self.stop_reason = (
            self.early_stopping.reason if self.should_stop and self.early_stopping else None
        )

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
            if self.early_stopping is not None:
                self.early_stopping.reset()
            self.next_step, self.should_stop, self.stop_reason = 0, False, None
            self._last_save_step = None
            return default
        damaged: list[tuple[Version, CheckpointError]] = []
        for candidate in reversed(versions if fallback else versions[-1:]):
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
        self._adopt(candidate)
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
        self._adopt(best)
        return tree

    def restore(self, version: int | Version | str, into: Any = None) -> Any:
        """Loads a given version (id, Version, "latest", "step=N")."""
        self.wait()
        vid = self.store.resolve(version)
        tree = self.store.load(vid, into=into)
        self._adopt(next(v for v in self.store.versions() if v.id == vid))
        return tree

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
        """Waits for a background save, restores the previous signal handlers; the
        manager cannot save afterwards."""
        if not self._closed:
            self._closed = True
            try:
                self.store.close()  # waits for a background save; raises its error
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
