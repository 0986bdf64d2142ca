"""Keep policies: each rule, protected versions, max_bytes with dedup, explain."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import object_files
from hypothesis import given
from hypothesis import strategies as st

import ckpt
from ckpt.index import Version
from ckpt.retention import best_of, ranked


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
