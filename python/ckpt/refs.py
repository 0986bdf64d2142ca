"""Version references and what "best" means: one grammar for the library and the CLI.

:meth:`ckpt.Store.resolve`, :meth:`ckpt.Store.best`, the
:class:`~ckpt.CheckpointManager` and every ``ckpt`` command that takes a
VERSION parse and resolve it here, so a reference names the same version
wherever it is written. A reference is one of:

* an id: ``7`` or ``"7"``;
* ``"latest"`` (or None): the newest version;
* ``"step=N"``: the newest version saved at step N;
* ``"best"``: the best version by the metric and mode that the
  :class:`~ckpt.CheckpointManager` recorded (its ``monitor`` and ``mode``);
* ``"best:METRIC"``: the best by METRIC. Its mode is the recorded one when
  METRIC is the recorded monitor; for any other metric the mode is not
  guessed: :class:`~ckpt.errors.MetricModeError` asks for
  ``best:METRIC:min`` or ``best:METRIC:max``;
* ``"best:METRIC:min"`` / ``"best:METRIC:max"``.

"Best" ignores versions without the metric or with a NaN value; ties go to
the earliest version. The recorded monitor is the one in the newest
version's trainer state, as for :meth:`ckpt.Store.policy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadReferenceError, MetricModeError, VersionNotFoundError
from .index import Version
from .retention import best_of

__all__ = ["FORMS", "Monitor", "Ref", "choose_monitor", "parse_ref", "recorded_monitor", "resolve"]

#: The accepted forms, for messages.
FORMS = "an id, latest, best, best:METRIC, best:METRIC:min|max or step=N"
MODES = ("min", "max")


@dataclass(frozen=True)
class Ref:
    """A parsed version reference.

    Attributes:
        kind: ``"id"``, ``"latest"``, ``"step"`` or ``"best"``.
        number: the id (``kind="id"``) or the step (``kind="step"``).
        metric, mode: what ``best`` names inline (None: not given).
    """

    kind: str
    number: int | None = None
    metric: str | None = None
    mode: str | None = None


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_ref(ref: int | str | None) -> Ref:
    """Parses a reference (see the module docs).

    Raises:
        BadReferenceError: ``ref`` is none of the accepted forms.
        TypeError: ``ref`` is neither an int, a str nor None.
    """
    if ref is None:
        return Ref("latest")
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        raise TypeError(f"a version is an int id, a Version or a str, not {type(ref).__name__}")
    if isinstance(ref, int):
        if ref < 0:
            raise BadReferenceError(f"version ids are non-negative, got {ref}")
        return Ref("id", ref)
    text = ref.strip()
    if _digits(text):
        return Ref("id", int(text))
    if text == "latest":
        return Ref("latest")
    if text.startswith("step="):
        if not _digits(text[5:]):
            raise BadReferenceError(f"{ref!r}: the step must be a non-negative integer (step=N)")
        return Ref("step", int(text[5:]))
    if text == "best":
        return Ref("best")
    if text.startswith("best:"):
        parts = text.split(":")
        if len(parts) > 3 or not parts[1] or (len(parts) == 3 and parts[2] not in MODES):
            raise BadReferenceError(f"bad version {ref!r}: use best:METRIC or best:METRIC:min|max")
        return Ref("best", metric=parts[1], mode=parts[2] if len(parts) == 3 else None)
    raise BadReferenceError(f"unknown version reference {ref!r}; use {FORMS}")


@dataclass(frozen=True)
class Monitor:
    """The metric that defines "best", and whether lower (``min``) or higher is better."""

    metric: str | None
    mode: str | None

    def describe(self) -> str:
        return f"{self.metric} ({self.mode})" if self.metric else "no metric"


def recorded_monitor(latest: Version | None) -> Monitor:
    """The monitor and mode the manager recorded in ``latest`` (Monitor(None, None) if none)."""
    manager: Any = latest.trainer.get("manager") if latest is not None else None
    if not isinstance(manager, dict):
        return Monitor(None, None)
    metric = manager.get("monitor") if isinstance(manager.get("monitor"), str) else None
    mode = manager.get("mode") if manager.get("mode") in MODES else None
    return Monitor(metric, mode if metric is not None else None)


def choose_monitor(
    metric: str | None,
    mode: str | None,
    recorded: Monitor,
    *,
    hint: str = "write best:{metric}:min or best:{metric}:max",
) -> Monitor:
    """The metric and mode of "best": what is given, else what the manager recorded.

    A metric without a mode takes the recorded mode when it is the recorded
    monitor; for any other metric the mode is refused rather than guessed.
    A result without a metric (nothing given, nothing recorded) is for the
    caller to refuse or to treat as "no best".

    Args:
        metric, mode: given explicitly (None: not given).
        recorded: what the store records (:func:`recorded_monitor`).
        hint: how the caller names a mode, with ``{metric}`` for the metric.

    Raises:
        ValueError: ``mode`` is not "min" or "max".
        MetricModeError: a metric that is not the recorded monitor, without a mode.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    chosen = metric if metric is not None else recorded.metric
    if chosen is None or mode is not None:
        return Monitor(chosen, mode)
    if chosen == recorded.metric and recorded.mode is not None:
        return Monitor(chosen, recorded.mode)
    known = (
        f"the store's recorded monitor is {recorded.describe()}"
        if recorded.metric
        else "the store records no monitor"
    )
    raise MetricModeError(
        f"is a lower or a higher {chosen!r} better? {known}, so ckpt does not know"
        f" (and does not guess); {hint.format(metric=chosen)}"
    )


def resolve(
    versions: Sequence[Version],
    ref: int | str | Ref | None,
    *,
    root: str,
    metric: str | None = None,
    mode: str | None = None,
    hint: str = "write best:{metric}:min or best:{metric}:max",
) -> Version:
    """The version that ``ref`` names among ``versions`` (ascending by id).

    Args:
        versions: every committed version, ascending by id.
        ref: a reference (see the module docs), parsed or not.
        root: the store, for messages.
        metric, mode: what ``best`` means when the reference does not say
            (the CLI's ``--metric``/``--mode``); inline ones win.
        hint: how the caller names a mode (see :func:`choose_monitor`).

    Raises:
        BadReferenceError: a malformed reference, or ``best`` with no metric.
        MetricModeError: ``best`` by a metric whose mode is not known.
        VersionNotFoundError: no such version; for a missing id that is
            some version's step, the message suggests ``step=N``.
    """
    r = ref if isinstance(ref, Ref) else parse_ref(ref)
    if r.kind == "latest":
        if not versions:
            raise VersionNotFoundError(f"{root} has no versions yet")
        return versions[-1]
    if r.kind == "step":
        for v in reversed(versions):
            if v.step == r.number:
                return v
        raise VersionNotFoundError(f"{root} has no version at step {r.number}")
    if r.kind == "id":
        for v in versions:
            if v.id == r.number:
                return v
        raise VersionNotFoundError(missing_id_message(versions, r.number or 0, root))
    monitor = choose_monitor(
        r.metric if r.metric is not None else metric,
        r.mode if r.mode is not None else mode,
        recorded_monitor(versions[-1] if versions else None),
        hint=hint,
    )
    if monitor.metric is None or monitor.mode is None:
        raise BadReferenceError(
            f"'best' needs a metric: {root} records no monitor; write best:METRIC:min or"
            " best:METRIC:max"
        )
    found = best_of(versions, monitor.metric, monitor.mode)
    if found is None:
        raise VersionNotFoundError(f"no version of {root} has the metric {monitor.metric!r}")
    return found


def missing_id_message(versions: Sequence[Version], vid: int, root: str) -> str:
    """ "version N is not in ROOT", with ``did you mean step=N`` when a version has that step."""
    at_step = [v for v in versions if v.step == vid]
    if at_step:
        return (
            f"version {vid} is not in {root}; did you mean step={vid} (version {at_step[-1].id})?"
        )
    return f"version {vid} is not in {root}"
