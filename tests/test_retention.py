"""Keep policies: each rule, protected versions, max_bytes with dedup, explain."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import numpy as np
import pytest
from conftest import object_files
from hypothesis import given
from hypothesis import strategies as st

import ckpt
from ckpt.index import Version
from ckpt.retention import best_of, plan_retention, ranked


def fill(store: ckpt.Store, losses: list[float], shared: bool = False) -> None:
    rng = np.random.default_rng(0)
    common = rng.standard_normal(30_000).astype(np.float32)
    for i, loss in enumerate(losses):
        own = rng.standard_normal(30_000).astype(np.float32)
        tree = {"common": common, "own": own} if shared else {"own": own}
        store.save(tree, step=i * 10, metrics={"loss": loss})


def test_each_rule_and_the_always_kept(store: ckpt.Store) -> None:
    fill(store, [0.9, 0.3, 0.8, 0.7, 0.6, 0.5, 0.95])
    reasons = store.explain(ckpt.Keep(last=2), monitor="loss", mode="min")
    assert reasons[7] == ("latest", "last 2") and reasons[6] == ("last 2",)
    assert reasons[2] == ("best",)
    assert [vid for vid, why in reasons.items() if not why] == [1, 3, 4, 5]
    reasons = store.explain(ckpt.Keep(best=3), monitor="loss", mode="min")
    assert {vid for vid, why in reasons.items() if why} == {2, 5, 6, 7}
    assert reasons[6] == ("best 3 by loss",)
    reasons = store.explain(ckpt.Keep(every_n_steps=30), monitor="loss", mode="min")
    assert {vid for vid, why in reasons.items() if why} == {1, 2, 4, 7}
    expected = {i: ("no count rule",) for i in range(1, 7)} | {7: ("latest",)}
    assert store.explain(None) == expected  # no recorded policy: keep everything


def test_pinned_versions_are_never_deleted(store: ckpt.Store) -> None:
    fill(store, [0.5, 0.6, 0.7, 0.8])
    store.pin(2)
    result = store.apply_retention(ckpt.Keep(last=1), monitor="loss", mode="min")
    assert result.deleted == (3,)
    assert [v.id for v in store.versions()] == [1, 2, 4]
    assert store.explain(ckpt.Keep(last=1), monitor="loss", mode="min")[2] == ("pinned",)


def test_apply_retention_deletes_manifests_then_only_unshared_chunks(store: ckpt.Store) -> None:
    fill(store, [0.5, 0.6, 0.7, 0.8], shared=True)
    before = store.stored_bytes()
    dry = store.apply_retention(ckpt.Keep(last=1), monitor="loss", mode="min", dry_run=True)
    assert dry.deleted == (2, 3) and store.stored_bytes() == before
    result = store.apply_retention(ckpt.Keep(last=1), monitor="loss", mode="min")
    assert result.deleted == (2, 3)
    assert result.freed_bytes == dry.freed_bytes == before - store.stored_bytes()
    for v in store.versions():  # the shared chunk survived, everything loads
        store.load(v)
    assert all(r.ok for r in store.verify())
    assert store.gc().deleted_objects == 0  # nothing left behind


def test_max_bytes_deletes_oldest_unprotected_accounting_for_dedup(store: ckpt.Store) -> None:
    fill(store, [0.1, 0.6, 0.7, 0.8, 0.9], shared=True)
    per_version = store.chunk_map(2)
    own = max(per_version.values())  # the unshared chunk of each version
    budget = store.stored_bytes() - 2 * own  # forces exactly two deletions
    result = store.apply_retention(ckpt.Keep(last=5, max_bytes=budget), monitor="loss", mode="min")
    assert result.deleted == (2, 3)  # 1 is best and 5 is latest: protected
    assert store.stored_bytes() <= budget
    tiny = store.apply_retention(ckpt.Keep(max_bytes=1), monitor="loss", mode="min")
    assert [v.id for v in store.versions()] == [1, 5] and tiny.deleted == (4,)
    assert len(object_files(store.root)) > 0


def test_keep_validation() -> None:
    with pytest.raises(ValueError, match=r"Keep\(last=...\) must be a positive int"):
        ckpt.Keep(last=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ckpt.Keep(max_bytes=-5)


_VALUES = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.sampled_from([0.5, -0.5, 2.0, math.inf, -math.inf, math.nan]),
)


@given(st.lists(_VALUES, max_size=12), st.sampled_from(["min", "max"]), st.booleans())
def test_best_of_is_the_first_of_ranked(values: list[object], mode: str, shuffle: bool) -> None:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    versions = [
        Version(i + 1, None, None, {} if x is None else {"m": x}, {}, t, 0, 0)  # type: ignore[dict-item]
        for i, x in enumerate(values)
    ]
    if shuffle:  # ties go to the lowest id whatever the order
        versions.reverse()
    order = ranked(versions, "m", mode)
    assert best_of(versions, "m", mode) is (order[0] if order else None)
    assert best_of(versions, None, mode) is None


# ------------------------------------------------------------ time-based retention
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(vid: int, minutes: float, loss: float | None = None, step: int | None = None) -> Version:
    metrics = {} if loss is None else {"loss": loss}
    return Version(vid, step, None, metrics, {}, T0 + timedelta(minutes=minutes), 0, 0)


def test_every_seconds_keeps_one_version_per_interval_since_the_previous_kept() -> None:
    # minutes: 0, 20, 50, 61, 100, 115, 125, 190
    versions = [at(i + 1, m) for i, m in enumerate([0, 20, 50, 61, 100, 115, 125, 190])]
    plan = plan_retention(
        versions, ckpt.Keep(every_seconds=3600), monitor=None, mode="min", pinned=set()
    )
    kept = {vid for vid, why in plan.reasons.items() if "every 3600 s" in why}
    # 0 kept; 61 is the first >= 60 min after it; then 125 (>= 121); then 190 (>= 185)
    assert kept == {1, 4, 7, 8}
    assert plan.reasons[8] == ("latest", "every 3600 s") and plan.delete == (2, 3, 5, 6)
    # a timedelta is the same rule; exactly the interval counts as passed
    same = ckpt.Keep(every_seconds=timedelta(hours=1))
    assert same == ckpt.Keep(every_seconds=3600) and same.to_dict()["every_seconds"] == 3600
    exact = [at(1, 0), at(2, 60), at(3, 119.99), at(4, 120)]
    plan = plan_retention(exact, same, monitor=None, mode="min", pinned=set())
    assert plan.delete == (3,)
    # the walk is by creation time, not by id (a clock that went back: ties and order by time)
    shuffled = [at(1, 50), at(2, 0), at(3, 130), at(4, 65)]
    plan = plan_retention(shuffled, same, monitor=None, mode="min", pinned=set())
    assert {v for v, why in plan.reasons.items() if "every 3600 s" in why} == {2, 4, 3}


def test_deleting_what_every_seconds_drops_does_not_change_what_it_keeps() -> None:
    versions = [at(i + 1, 7 * i) for i in range(40)]
    keep = ckpt.Keep(every_seconds=1800, last=2)
    plan = plan_retention(versions, keep, monitor=None, mode="min", pinned=set())
    survivors = [v for v in versions if plan.reasons[v.id]]
    again = plan_retention(survivors, keep, monitor=None, mode="min", pinned=set())
    assert again.delete == () and dict(again.reasons) == {
        v.id: plan.reasons[v.id] for v in survivors
    }


class _Clock(datetime):
    """``datetime`` whose ``now()`` walks a script of times (for Store.save's created)."""

    script: ClassVar[list[datetime]] = []

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return cls.script.pop(0)


def test_every_seconds_on_a_store(store: ckpt.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt.store as store_module

    minutes = [0, 30, 59, 60, 90, 150]
    _Clock.script = [T0 + timedelta(minutes=m) for m in minutes]
    store.create()  # the marker's time is not one of the script's
    monkeypatch.setattr(store_module, "datetime", _Clock)
    for i in range(len(minutes)):
        store.save({"x": np.full(10, i)}, step=i)
    monkeypatch.undo()
    assert [v.created for v in store.versions()] == [T0 + timedelta(minutes=m) for m in minutes]
    result = store.apply_retention(ckpt.Keep(every_seconds=3600))
    assert result.deleted == (2, 3, 5)
    assert result.kept[4] == ("every 3600 s",) and result.kept[6] == ("latest", "every 3600 s")
    assert [v.id for v in store.versions()] == [1, 4, 6]


# ------------------------------------------------------------ without_metrics
def test_without_metrics_keeps_versions_lacking_the_metric_when_best_is_set() -> None:
    versions = [
        at(1, 0, 0.5),
        at(2, 1),
        at(3, 2, math.nan),
        at(4, 3, 0.4),
        at(5, 4, 0.9),
        at(6, 5),
        at(7, 6, 0.8),
    ]
    without = ckpt.Keep(best=1, without_metrics=True)
    plan = plan_retention(versions, without, monitor="loss", mode="min", pinned=set())
    assert plan.reasons[2] == plan.reasons[3] == plan.reasons[6] == ("no metric",)
    assert plan.reasons[4] == ("best", "best 1 by loss")
    assert plan.delete == (1, 5)
    default = plan_retention(versions, ckpt.Keep(best=1), monitor="loss", mode="min", pinned=set())
    assert default.delete == (1, 2, 3, 5, 6)  # ckpt's default: False
    # no monitor: best keeps nothing and neither does without_metrics
    plan = plan_retention(versions, without, monitor=None, mode="min", pinned=set())
    assert plan.delete == (1, 2, 3, 4, 5, 6)


def test_without_metrics_on_a_store(store: ckpt.Store) -> None:
    for i, loss in enumerate([0.5, None, 0.3, None, 0.7]):
        store.save({"x": np.full(10, i)}, metrics=None if loss is None else {"loss": loss})
    keep = ckpt.Keep(best=1, without_metrics=True)
    result = store.apply_retention(keep, monitor="loss", mode="min")
    assert result.deleted == (1,)
    assert result.kept[2] == result.kept[4] == ("no metric",)


# ------------------------------------------------------------ Keep as data
def test_keep_round_trips_through_its_dict() -> None:
    keep = ckpt.Keep(
        last=5,
        best=2,
        every_seconds=90.5,
        without_metrics=True,
        subtrees={
            "optimizer/**": ckpt.Keep(last=1, every_seconds=timedelta(days=1)),
            "ema/*": ckpt.Keep(best=1, without_metrics=True),
        },
    )
    d = keep.to_dict()
    assert d["subtrees"]["optimizer/**"]["every_seconds"] == 86400
    assert json.loads(json.dumps(d)) == d
    assert ckpt.Keep.from_dict(json.loads(json.dumps(d))) == keep
    assert hash(ckpt.Keep.from_dict(d)) == hash(keep)
    # a policy without the new rules is recorded as before, and old dicts parse
    old = {"last": 3, "best": None, "every_n_steps": 10, "max_bytes": None}
    assert ckpt.Keep(last=3, every_n_steps=10).to_dict() == old
    assert ckpt.Keep.from_dict(old) == ckpt.Keep(last=3, every_n_steps=10)
    assert keep.describe("loss") == "last 5 or best 2 by loss or no metric or every 90.5 s"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_seconds": 0}, "every_seconds"),
        ({"every_seconds": -1.0}, "every_seconds"),
        ({"every_seconds": math.inf}, "every_seconds"),
        ({"every_seconds": True}, "every_seconds"),
        ({"every_seconds": timedelta(0)}, "every_seconds"),
        ({"every_seconds": "3600"}, "every_seconds"),
        ({"without_metrics": True}, "only means something with best"),
        ({"best": 1, "without_metrics": 1}, "must be a bool"),
        ({"subtrees": {"a/**": {"last": 1}}}, "not a Keep"),
        ({"subtrees": {"": ckpt.Keep(last=1)}}, "is not a glob"),
        ({"subtrees": ["a/**"]}, "must map glob patterns"),
        ({"subtrees": {"a/**": ckpt.Keep(max_bytes=10)}}, "may not have subtrees or max_bytes"),
        (
            {"subtrees": {"a/**": ckpt.Keep(subtrees={"b": ckpt.Keep(last=1)})}},
            "may not have subtrees",
        ),
    ],
)
def test_keep_refuses_malformed_new_rules(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ckpt.Keep(**kwargs)


def test_a_recorded_policy_with_a_malformed_subtree_is_refused() -> None:
    with pytest.raises(ValueError, match="subtrees"):
        ckpt.Keep.from_dict({"last": 1, "subtrees": {"a/**": 3}})
    with pytest.raises(ValueError, match="subtrees"):
        ckpt.Keep.from_dict({"last": 1, "subtrees": ["a/**"]})
