"""Retention: which versions to keep, which to slim, and why.

A :class:`Keep` policy composes rules in the manner of Orbax's ``LatestN`` /
``BestN`` / ``EveryNSteps`` / ``keep_time_interval``. A version is kept if any
rule keeps it. Whatever the rules say, three kinds of version are protected
and never deleted:

* ``latest``: the newest version, the resume target;
* ``best``: the best version by the monitored metric (when there is one);
* ``pinned``: versions pinned with :meth:`ckpt.Store.pin`.

``max_bytes`` applies after the other rules: while the store's stored bytes
exceed it, the oldest unprotected version still kept is deleted too (even if
a rule such as ``last`` keeps it). Deleting a version frees only the chunks
that no remaining version uses (deduplication is accounted for).

``subtrees`` slims instead of deleting: ``Keep(last=5, subtrees={"optimizer/**":
Keep(last=1)})`` keeps five versions, and only the newest of them keeps the
leaves under ``optimizer/``; the four others keep the model and lose the
optimizer state (often 2-6x the weights). See :class:`Keep` and
:meth:`ckpt.Store.apply_retention`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .index import Version

__all__ = ["Keep", "Plan", "plan_retention"]

#: The rules of a policy, in the order of ``to_dict`` and of the reasons.
_COUNT_RULES = ("last", "best", "every_n_steps")
_INT_RULES = ("last", "best", "every_n_steps", "max_bytes")
#: Keys of ``to_dict`` that older releases wrote (always present, even when None).
_BASE_KEYS = ("last", "best", "every_n_steps", "max_bytes")
#: The protected reasons: never deleted, never slimmed.
PROTECTED = frozenset({"latest", "best", "pinned"})


@dataclass(frozen=True)
class Keep:
    """A retention policy.

    Thread-safe and process-safe: an immutable value.

    Args:
        last: keep the ``last`` newest versions.
        best: keep the ``best`` best versions by the monitored metric.
        every_n_steps: keep versions whose step is a multiple of this.
        max_bytes: keep the store's stored bytes under this budget. It counts
            the chunks versions hold now: the slimming that the same pass
            does (``subtrees``) is not counted, so a pass may delete a
            version that its slimming would have made fit (the next pass
            counts the slimmed versions at their new size).
        every_seconds: time-based retention (Orbax's ``keep_time_interval``):
            walking the versions oldest to newest by their ``created`` time
            (ties by id), keep a version when at least this long (seconds, or
            a :class:`datetime.timedelta`) has passed since the previous
            version this rule kept; the oldest version is kept. The rule's
            anchors are versions it keeps, so deleting the versions between
            them does not change which versions it keeps later. Reason:
            ``"every 3600 s"``.
        without_metrics: with ``best``, also keep every version that lacks
            the monitored metric or has NaN for it (reason ``"no metric"``;
            Orbax's ``keep_checkpoints_without_metrics``). Only meaningful
            with ``best`` and a monitor (ValueError without ``best``).
            Orbax defaults to True; ckpt defaults to False, for two
            reasons: every manifest records the manager's policy and
            ``Store.policy()``, ``ckpt ls`` and ``ckpt gc`` read it back, so a
            True default would silently change what existing stores keep
            after an upgrade; and ckpt's manager saves between evaluations
            (every N steps or seconds, on preemption) without metrics, so a
            True default would keep every such save forever and defeat
            ``last``.
        subtrees: slimming: glob pattern over leaf paths (the matching of
            ``Store.load(only=...)``: :func:`fnmatch.fnmatchcase`, ``*``
            crosses ``/``) -> an inner policy. Among the versions the outer
            rules keep, the inner policy, evaluated over those same versions
            with the same protections (the latest, the best and pinned
            versions keep everything), decides which keep the leaves that
            match the pattern; the others are *slimmed*: those leaves'
            bytes are dropped and their chunks freed (see
            :meth:`ckpt.Store.apply_retention`). The best version is
            protected too because ``restore_best`` loads it whole. An inner
            policy may not have ``subtrees`` or ``max_bytes``. Slimming
            cannot be undone: a version slimmed once stays slimmed even if
            a later policy would keep its leaves.

    Raises:
        ValueError: a rule is not a positive int (or None), ``every_seconds``
            is not a positive finite number, ``without_metrics`` is not a
            bool or is set without ``best``, or ``subtrees`` is malformed.
    """

    last: int | None = None
    best: int | None = None
    every_n_steps: int | None = None
    max_bytes: int | None = None
    every_seconds: float | timedelta | None = None
    without_metrics: bool = False
    subtrees: Mapping[str, Keep] | None = None

    def __post_init__(self) -> None:
        for name in _INT_RULES:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"Keep({name}=...) must be a positive int or None, got {value!r}")
        seconds = self.every_seconds
        if seconds is not None:
            if isinstance(seconds, timedelta):
                seconds = seconds.total_seconds()
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, (int, float))
                or not math.isfinite(seconds)
                or seconds <= 0
            ):
                raise ValueError(
                    "Keep(every_seconds=...) must be a positive number of seconds, a timedelta"
                    f" or None, got {self.every_seconds!r}"
                )
            # an int stays an int (3600, not 3600.0, in to_dict and the reasons)
            seconds = int(seconds) if float(seconds).is_integer() else float(seconds)
            object.__setattr__(self, "every_seconds", seconds)
        if not isinstance(self.without_metrics, bool):
            raise ValueError(
                f"Keep(without_metrics=...) must be a bool, got {self.without_metrics!r}"
            )
        if self.without_metrics and self.best is None:
            raise ValueError("Keep(without_metrics=True) only means something with best=K")
        if self.subtrees is not None:
            if not isinstance(self.subtrees, Mapping):
                raise ValueError(
                    f"Keep(subtrees=...) must map glob patterns to Keep, got {self.subtrees!r}"
                )
            subtrees: dict[str, Keep] = {}
            for pattern, inner in self.subtrees.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"Keep(subtrees=...): pattern {pattern!r} is not a glob")
                if not isinstance(inner, Keep):
                    raise ValueError(
                        f"Keep(subtrees=...): {pattern!r} maps to {inner!r}, not a Keep"
                    )
                if inner.subtrees or inner.max_bytes is not None:
                    raise ValueError(
                        f"Keep(subtrees=...): the policy of {pattern!r} may not have subtrees"
                        " or max_bytes (it decides which kept versions hold those leaves)"
                    )
                subtrees[pattern] = inner
            object.__setattr__(self, "subtrees", subtrees or None)

    def __hash__(self) -> int:
        items = tuple(self.subtrees.items()) if self.subtrees else ()
        return hash((self.last, self.best, self.every_n_steps, self.max_bytes,
                     self.every_seconds, self.without_metrics, items))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The policy as JSON (recorded in every manifest by the manager).

        The four keys of older releases are always present; ``every_seconds``,
        ``without_metrics`` and ``subtrees`` only when set, so that a policy
        that does not use them is recorded exactly as before.
        """
        out: dict[str, Any] = {k: getattr(self, k) for k in _BASE_KEYS}
        if self.every_seconds is not None:
            out["every_seconds"] = self.every_seconds
        if self.without_metrics:
            out["without_metrics"] = True
        if self.subtrees:
            out["subtrees"] = {p: inner.to_dict() for p, inner in self.subtrees.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Keep:
        """The inverse of :meth:`to_dict`; a dict of an older release (without
        the newer keys) parses too.

        Raises:
            ValueError: a value is malformed.
        """
        subtrees = d.get("subtrees")
        if subtrees is not None:
            if not isinstance(subtrees, Mapping):
                raise ValueError(f"Keep subtrees must be an object, got {subtrees!r}")
            inner: dict[str, Keep] = {}
            for pattern, policy in subtrees.items():
                if not isinstance(policy, Mapping):
                    raise ValueError(f"Keep subtrees[{pattern!r}] must be an object")
                inner[pattern] = cls.from_dict(policy)
            subtrees = inner
        return cls(
            **{k: d.get(k) for k in _BASE_KEYS},
            every_seconds=d.get("every_seconds"),
            without_metrics=d.get("without_metrics", False),
            subtrees=subtrees,
        )

    @property
    def keeps_everything(self) -> bool:
        return (
            self.last is None
            and self.best is None
            and self.every_n_steps is None
            and self.every_seconds is None
        )

    @property
    def interval_seconds(self) -> float | None:
        """``every_seconds`` as a number of seconds (None: no time rule)."""
        seconds = self.every_seconds
        if isinstance(seconds, timedelta):  # normalised in __post_init__; for the type checker
            return seconds.total_seconds()
        return None if seconds is None else float(seconds)

    def describe(self, monitor: str | None = None) -> str:
        """The rules as the reasons name them, e.g. ``last 1 or every 3600 s``."""
        parts = []
        if self.last is not None:
            parts.append(f"last {self.last}")
        if self.best is not None:
            parts.append(f"best {self.best} by {monitor}")
            if self.without_metrics:
                parts.append("no metric")
        if self.every_n_steps is not None:
            parts.append(f"every {self.every_n_steps} steps")
        if self.every_seconds is not None:
            parts.append(f"every {self.every_seconds} s")
        return " or ".join(parts) if parts else "keep all"


def ranked(versions: Sequence[Version], metric: str | None, mode: str) -> list[Version]:
    """Versions that have a finite-or-inf (not NaN) ``metric``, best first, ties by id."""
    if metric is None:
        return []
    have = [v for v in versions if metric in v.metrics and v.metrics[metric] == v.metrics[metric]]
    sign = 1 if mode == "min" else -1
    return sorted(have, key=lambda v: (sign * v.metrics[metric], v.id))


def best_of(versions: Iterable[Version], metric: str | None, mode: str) -> Version | None:
    """``ranked(versions, metric, mode)[0]`` (or None) in one pass, without sorting."""
    if metric is None:
        return None
    lower = mode == "min"
    best: Version | None = None
    best_value: float = 0.0
    for v in versions:
        x = v.metrics.get(metric)
        if x is None or x != x:
            continue
        if (
            best is None
            or (x < best_value if lower else x > best_value)
            or (x == best_value and v.id < best.id)
        ):
            best, best_value = v, x
    return best


@dataclass(frozen=True)
class Plan:
    """What retention keeps, slims and deletes.

    Attributes:
        reasons: per version, the rules that keep it (empty: deleted), then
            for a slimmed one ``"PATTERN dropped: not in RULES"`` per pattern.
        delete: the ids to delete, oldest first.
        freed_bytes: stored bytes the deletions free (the store adds what
            slimming frees).
        slim: per kept version that the policy slims, the ``subtrees``
            patterns whose leaves it must not hold (whether or not it was
            slimmed by them already).
    """

    reasons: Mapping[int, tuple[str, ...]]
    delete: tuple[int, ...]
    freed_bytes: int
    slim: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


def _kept_by_interval(versions: Sequence[Version], seconds: float) -> list[Version]:
    """The versions ``every_seconds`` keeps: the oldest, then each one at least
    ``seconds`` after the previous one kept (by ``created``, ties by id)."""
    out: list[Version] = []
    for v in sorted(versions, key=lambda v: (v.created, v.id)):
        if not out or (v.created - out[-1].created).total_seconds() >= seconds:
            out.append(v)
    return out


def plan_retention(
    versions: Sequence[Version],
    keep: Keep | None,
    *,
    monitor: str | None,
    mode: str,
    pinned: set[int],
    chunks_of: Mapping[int, Mapping[str, int]] | None = None,
) -> Plan:
    """Decides, for each version, the rules that keep it, and what to slim.

    Args:
        versions: every committed version, ascending id.
        keep: the policy; None keeps everything.
        monitor, mode: what "best" means (None: no best).
        pinned: ids of pinned versions.
        chunks_of: per version, its chunks (id -> stored bytes); needed only
            for ``max_bytes``.

    Returns:
        A :class:`Plan`: reasons per version (empty tuple = deleted), the
        ids to delete, oldest first, and the versions to slim.
    """
    reasons: dict[int, list[str]] = {v.id: [] for v in versions}
    if not versions:
        return Plan({}, (), 0)
    reasons[versions[-1].id].append("latest")
    best = best_of(versions, monitor, mode)  # sorts (10,000 versions) only for keep.best
    if best is not None:
        reasons[best.id].append("best")
    for vid in sorted(pinned):
        if vid in reasons:
            reasons[vid].append("pinned")
    if keep is None or keep.keeps_everything:
        for v in versions:
            if not reasons[v.id]:
                reasons[v.id].append("no count rule")
    else:
        if keep.last is not None:
            for v in versions[-keep.last :]:
                reasons[v.id].append(f"last {keep.last}")
        if keep.best is not None:
            for v in ranked(versions, monitor, mode)[: keep.best]:
                reasons[v.id].append(f"best {keep.best} by {monitor}")
            if keep.without_metrics and monitor is not None:
                for v in versions:
                    x = v.metrics.get(monitor)
                    if x is None or x != x:
                        reasons[v.id].append("no metric")
        if keep.every_n_steps is not None:
            for v in versions:
                if v.step is not None and v.step % keep.every_n_steps == 0:
                    reasons[v.id].append(f"every {keep.every_n_steps} steps")
        seconds = keep.interval_seconds
        if seconds is not None:
            for v in _kept_by_interval(versions, seconds):
                reasons[v.id].append(f"every {keep.every_seconds} s")
    freed = 0
    if keep is not None and keep.max_bytes is not None and chunks_of is not None:
        kept = [v.id for v in versions if reasons[v.id]]
        usage: dict[str, int] = {}
        size: dict[str, int] = {}
        for vid in kept:
            for cid, stored in chunks_of[vid].items():
                usage[cid] = usage.get(cid, 0) + 1
                size[cid] = stored
        total = sum(size.values())
        for vid in kept:  # oldest first
            if total <= keep.max_bytes:
                break
            if PROTECTED.intersection(reasons[vid]):
                continue
            for cid in chunks_of[vid]:
                usage[cid] -= 1
                if usage[cid] == 0:
                    total -= size[cid]
            reasons[vid] = []
    delete = tuple(v.id for v in versions if not reasons[v.id])
    if chunks_of is not None and delete:
        remaining: set[str] = set()
        for v in versions:
            if reasons[v.id]:
                remaining.update(chunks_of[v.id])
        gone: dict[str, int] = {}
        for vid in delete:
            for cid, stored in chunks_of[vid].items():
                if cid not in remaining:
                    gone[cid] = stored
        freed = sum(gone.values())
    slim: dict[int, tuple[str, ...]] = {}
    if keep is not None and keep.subtrees:
        # the inner policies see the versions the outer one keeps, with the same
        # protections (latest, best and pinned are among them and keep everything)
        survivors = [v for v in versions if reasons[v.id]]
        drops: dict[int, list[str]] = {v.id: [] for v in survivors}
        for pattern, inner in keep.subtrees.items():
            inner_plan = plan_retention(survivors, inner, monitor=monitor, mode=mode, pinned=pinned)
            rules = inner.describe(monitor)
            for v in survivors:
                if not inner_plan.reasons[v.id]:
                    drops[v.id].append(pattern)
                    reasons[v.id].append(f"{pattern} dropped: not in {rules}")
        slim = {vid: tuple(p) for vid, p in drops.items() if p}
    for v in versions:  # slimmed before, whatever the policy says now: it cannot be undone
        if reasons[v.id]:
            for pattern in v.slimmed:
                if pattern not in slim.get(v.id, ()):
                    reasons[v.id].append(f"{pattern} dropped earlier")
    return Plan({k: tuple(v) for k, v in reasons.items()}, delete, freed, slim)
