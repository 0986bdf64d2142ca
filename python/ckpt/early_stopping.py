"""Early stopping: a pure decision on each new value of a monitored metric.

In the spirit of Lightning's ``EarlyStopping._evaluate_stopping_criteria``
and Keras' ``baseline``: :meth:`EarlyStopping.update` takes a value and the
step it belongs to, updates a handful of counters and returns a
:class:`Decision`. No I/O, no clock, no randomness, so a run resumed from a
checkpoint (which stores :meth:`EarlyStopping.state_dict`) decides exactly as
the uninterrupted run would have.

Semantics, for ``mode="min"`` (``"max"`` mirrors every comparison):

* **improvement**: the value is finite and it is the first one, or it is
  lower than the best so far by more than ``min_delta``
  (``value < best - min_delta``). An improvement records ``best`` and
  ``best_step``.
* **patience**: ``wait`` counts consecutive evaluations without improvement;
  training stops when ``wait`` reaches ``patience`` (``patience=0`` stops at
  the first evaluation without improvement).
* **baseline**: an improvement resets ``wait`` only if the value also beats
  ``baseline`` (``value < baseline``); so if the metric has not beaten the
  baseline within ``patience`` evaluations, training stops.
* **stopping_threshold**: stop as soon as the value reaches it (``value <=
  stopping_threshold``): good enough.
* **divergence_threshold**: stop as soon as the value is worse than it
  (``value > divergence_threshold``): the run is diverging.
* **check_finite**: stop when the value is NaN or infinite. With
  ``check_finite=False`` such a value simply is not an improvement.
* **start_from**: the first ``start_from`` evaluations are ignored entirely
  (Keras' ``start_from_epoch``): they never stop training, never become the
  best, and do not count towards ``patience`` (warm-up). They do count in
  ``evaluations``.
* The checks run in the order: warm-up, finite, stopping threshold,
  divergence threshold, patience; the first that fires gives the reason.
* Once stopped, every later update returns the same stop decision.
* **monitor and mode** default to the :class:`~ckpt.CheckpointManager`'s
  (``monitor``, ``mode``): an instance given to a manager without them
  inherits them; one that names the manager's monitor with another mode is a
  ``ValueError``. Used alone, ``mode`` defaults to ``"min"`` (Lightning's
  default). A manager also resets the instance (or loads the state the store
  recorded), so an instance that stopped once is not stopped in a new run.

Thread-safety: an instance is plain mutable state; use it from one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "EarlyStopping"]


@dataclass(frozen=True)
class Decision:
    """The outcome of one :meth:`EarlyStopping.update`.

    Attributes:
        stop: training should stop now.
        improved: the value improved on the best so far.
        reason: why training stops (None when it goes on).
    """

    stop: bool
    improved: bool
    reason: str | None = None


class EarlyStopping:
    """Stops training when a monitored metric stops improving.

    Args:
        monitor: metric name; None to take the manager's ``monitor``.
        mode: ``"min"`` (lower is better) or ``"max"``; None to take the
            manager's mode when this monitors the manager's metric (alone: ``"min"``).
        patience: evaluations without improvement before stopping (>= 0).
        min_delta: smallest change that counts as an improvement (>= 0).
        baseline: value the metric must beat for an improvement to reset patience.
        stopping_threshold: stop as soon as the metric reaches this value.
        divergence_threshold: stop as soon as the metric is worse than this.
        check_finite: stop on NaN or infinite values.
        start_from: number of warm-up evaluations that never stop training.

    Raises:
        ValueError: an unknown mode, negative patience / min_delta / start_from,
            or non-finite thresholds.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        baseline: float | None = None,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        start_from: int = 0,
    ) -> None:
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative int, got {patience!r}")
        if not isinstance(start_from, int) or start_from < 0:
            raise ValueError(f"start_from must be a non-negative int, got {start_from!r}")
        min_delta = float(min_delta)
        if not min_delta >= 0 or math.isinf(min_delta):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        for name, value in (
            ("baseline", baseline),
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
        ):
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        self.monitor = monitor
        self.mode: str = mode or "min"
        #: what the caller chose; the rest comes from the manager (see bind)
        self.given_monitor = monitor
        self.given_mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.baseline = None if baseline is None else float(baseline)
        self.stopping_threshold = None if stopping_threshold is None else float(stopping_threshold)
        self.divergence_threshold = (
            None if divergence_threshold is None else float(divergence_threshold)
        )
        self.check_finite = bool(check_finite)
        self.start_from = start_from
        self.reset()

    def bind(self, monitor: str | None, mode: str | None) -> None:
        """Takes the metric and mode of a :class:`~ckpt.CheckpointManager`.

        The monitor the caller gave wins; without one, this monitors
        ``monitor``. The mode the caller gave must agree with ``mode`` when
        both are about the same metric; without one, the manager's is taken
        for its own metric, and a metric of its own needs one.

        Raises:
            ValueError: no metric at all, a contradicting mode, or another
                metric than the manager's without a mode.
        """
        chosen = self.given_monitor if self.given_monitor is not None else monitor
        if chosen is None:
            raise ValueError("early stopping needs a metric: pass monitor=... to the manager")
        if chosen == monitor:
            if self.given_mode is not None and mode is not None and self.given_mode != mode:
                raise ValueError(
                    f"monitor {monitor!r} has mode {mode!r} in the manager but"
                    f" {self.given_mode!r} in EarlyStopping; make them agree"
                )
            resolved = self.given_mode or mode or "min"
        elif self.given_mode is None:
            raise ValueError(
                f"EarlyStopping(monitor={chosen!r}) needs mode='min' or mode='max': it is not"
                f" the manager's monitor ({monitor!r}), whose mode it would inherit"
            )
        else:
            resolved = self.given_mode
        self.monitor, self.mode = chosen, resolved

    def reset(self) -> None:
        """Forgets every evaluation (a fresh run)."""
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.stopped_step: int | None = None
        self.reason: str | None = None
        self.evaluations = 0

    @property
    def stopped(self) -> bool:
        """True once a stop decision was taken."""
        return self.stopped_step is not None

    def _better(self, value: float, reference: float, delta: float = 0.0) -> bool:
        if self.mode == "min":
            return value < reference - delta
        return value > reference + delta

    def update(self, value: float, step: int) -> Decision:
        """Records the metric's value at ``step`` and decides whether to stop.

        Args:
            value: the monitored metric (anything ``float()`` accepts).
            step: the training step (or epoch) the value belongs to.

        Returns:
            The :class:`Decision` (see the module docs for the semantics).
        """
        if self.stopped:
            return Decision(stop=True, improved=False, reason=self.reason)
        value = float(value)
        self.evaluations += 1
        if self.evaluations <= self.start_from:
            return Decision(stop=False, improved=False)  # warm-up: ignored entirely
        name = self.monitor or "the monitored metric"
        finite = math.isfinite(value)
        improved = finite and (self.best is None or self._better(value, self.best, self.min_delta))
        if improved:
            self.best, self.best_step = value, step
            if self.baseline is None or self._better(value, self.baseline):
                self.wait = 0
            else:
                self.wait += 1
        else:
            self.wait += 1

        reason: str | None = None
        if self.check_finite and not finite:
            reason = (
                f"{name} is {value} at step {step}, not finite (check_finite=True);"
                f" best was {self.best} at step {self.best_step}"
            )
        elif self.stopping_threshold is not None and (
            value == self.stopping_threshold or self._better(value, self.stopping_threshold)
        ):
            reason = (
                f"{name} = {value} at step {step} reached stopping_threshold"
                f" {self.stopping_threshold}"
            )
        elif self.divergence_threshold is not None and self._better(
            self.divergence_threshold, value
        ):
            reason = (
                f"{name} = {value} at step {step} is worse than divergence_threshold"
                f" {self.divergence_threshold}"
            )
        elif self.wait > 0 and self.wait >= self.patience:
            if self.baseline is not None and (
                self.best is None or not self._better(self.best, self.baseline)
            ):
                reason = (
                    f"{name} did not beat baseline {self.baseline} within {self.patience}"
                    f" evaluations (best {self.best} at step {self.best_step})"
                )
            else:
                reason = (
                    f"{name} did not improve by more than {self.min_delta} in {self.wait}"
                    f" evaluations (best {self.best} at step {self.best_step})"
                )
        if reason is not None:
            self.stopped_step, self.reason = step, reason
            return Decision(stop=True, improved=improved, reason=reason)
        return Decision(stop=False, improved=improved)

    def state_dict(self) -> dict[str, Any]:
        """The decision state as plain JSON data (stored in every manifest)."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped_step": self.stopped_step,
            "reason": self.reason,
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the state written by :meth:`state_dict`.

        Raises:
            ValueError: the state is malformed or was recorded for another
                monitor or mode.
        """
        try:
            if state.get("mode", self.mode) != self.mode:
                raise ValueError(
                    f"the saved state is for mode {state['mode']!r},"
                    f" this instance uses {self.mode!r}"
                )
            saved_monitor = state.get("monitor")
            if saved_monitor and self.monitor and saved_monitor != self.monitor:
                raise ValueError(
                    f"the saved state monitors {saved_monitor!r}, this instance {self.monitor!r}"
                )
            best = state["best"]
            self.best = None if best is None else float(best)
            self.best_step = None if state["best_step"] is None else int(state["best_step"])
            self.wait = int(state["wait"])
            self.stopped_step = (
                None if state["stopped_step"] is None else int(state["stopped_step"])
            )
            self.reason = state["reason"]
            self.evaluations = int(state["evaluations"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed early-stopping state: {exc!r}") from None

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, patience={self.patience},"
            f" min_delta={self.min_delta}, best={self.best}, wait={self.wait},"
            f" stopped_step={self.stopped_step})"
        )
