"""Retention: which versions to keep, and why.

A :class:`Keep` policy composes rules in the manner of Orbax's ``LatestN`` /
``BestN`` / ``EveryNSteps``. A version is kept if any rule keeps it. Whatever
the rules say, three kinds of version are protected and never deleted:

* ``latest``: the newest version, the resume target;
* ``best``: the best version by the monitored metric (when there is one);
* ``pinned``: versions pinned with :meth:`ckpt.Store.pin`.

``max_bytes`` applies after the other rules: while the store's stored bytes
exceed it, the oldest unprotected version still kept is deleted too (even if
a rule such as ``last`` keeps it). Deleting a version frees only the chunks
that no remaining version uses (deduplication is accounted for).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .index import Version

__all__ = ["Keep", "Plan", "plan_retention"]


@dataclass(frozen=True)
class Keep:
    """A retention policy.

    Args:
        last: keep the ``last`` newest versions.
        best: keep the ``best`` best versions by the monitored metric.
        every_n_steps: keep versions whose step is a multiple of this.
        max_bytes: keep the store's stored bytes under this budget.

    Raises:
        ValueError: a rule is not a positive int (or None).
    """

    last: int | None = None
    best: int | None = None
    every_n_steps: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("last", "best", "every_n_steps", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"Keep({name}=...) must be a positive int or None, got {value!r}")

    def to_dict(self) -> dict[str, int | None]:
        return {
            "last": self.last,
            "best": self.best,
            "every_n_steps": self.every_n_steps,
            "max_bytes": self.max_bytes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Keep:
        return cls(**{k: d.get(k) for k in ("last", "best", "every_n_steps", "max_bytes")})

    @property
    def keeps_everything(self) -> bool:
        return self.last is None and self.best is None and self.every_n_steps is None


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
    """What retention keeps and deletes."""

    reasons: Mapping[int, tuple[str, ...]]
    delete: tuple[int, ...]
    freed_bytes: int


def plan_retention(
    versions: Sequence[Version],
    keep: Keep | None,
    *,
    monitor: str | None,
    mode: str,
    pinned: set[int],
    chunks_of: Mapping[int, Mapping[str, int]] | None = None,
) -> Plan:
    """Decides, for each version, the rules that keep it.

    Args:
        versions: every committed version, ascending id.
        keep: the policy; None keeps everything.
        monitor, mode: what "best" means (None: no best).
        pinned: ids of pinned versions.
        chunks_of: per version, its chunks (id -> stored bytes); needed only
            for ``max_bytes``.

    Returns:
        A :class:`Plan`: reasons per version (empty tuple = deleted) and the
        ids to delete, oldest first.
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
        if keep.every_n_steps is not None:
            for v in versions:
                if v.step is not None and v.step % keep.every_n_steps == 0:
                    reasons[v.id].append(f"every {keep.every_n_steps} steps")
    freed = 0
    if keep is not None and keep.max_bytes is not None and chunks_of is not None:
        protected = {"latest", "best", "pinned"}
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
            if protected & set(reasons[vid]):
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
    return Plan({k: tuple(v) for k, v in reasons.items()}, delete, freed)
