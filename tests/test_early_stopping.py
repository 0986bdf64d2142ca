"""EarlyStopping: each documented rule, state round trips, validation."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckpt


def run(es: ckpt.EarlyStopping, values: list[float]) -> tuple[int | None, str | None]:
    """Feeds values at steps 0.. until a stop; returns (stop step, reason)."""
    for step, v in enumerate(values):
        d = es.update(v, step)
        if d.stop:
            return step, d.reason
    return None, None


def test_improvement_needs_more_than_min_delta_in_the_mode_direction() -> None:
    es = ckpt.EarlyStopping(monitor="loss", patience=10, min_delta=0.1)
    assert es.update(1.0, 0).improved  # the first value always improves
    assert not es.update(0.95, 1).improved  # better, but not by more than 0.1
    assert not es.update(0.9, 2).improved  # exactly min_delta is not enough
    assert es.update(0.85, 3).improved
    assert (es.best, es.best_step, es.wait) == (0.85, 3, 0)
    up = ckpt.EarlyStopping(mode="max", patience=10)
    up.update(1.0, 0)
    assert not up.update(0.5, 1).improved and up.update(1.5, 2).improved


def test_patience_counts_consecutive_evaluations_without_improvement() -> None:
    es = ckpt.EarlyStopping(monitor="loss", patience=3)
    assert run(es, [1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 0.95]) == (
        6,
        "loss did not improve by more than 0.0 in 3 evaluations (best 0.9 at step 3)",
    )
    assert run(ckpt.EarlyStopping(patience=0), [1.0, 0.5, 0.6])[0] == 2


def test_baseline_must_be_beaten_within_patience() -> None:
    es = ckpt.EarlyStopping(monitor="loss", patience=2, baseline=0.5)
    step, reason = run(es, [1.0, 0.9, 0.8, 0.7])
    assert step == 1  # improving, but never below the baseline
    assert reason is not None and "did not beat baseline 0.5 within 2 evaluations" in reason
    es = ckpt.EarlyStopping(monitor="loss", patience=2, baseline=0.5)
    assert run(es, [1.0, 0.4, 0.45, 0.3, 0.35, 0.36])[0] == 5


def test_stopping_threshold_and_divergence_threshold() -> None:
    es = ckpt.EarlyStopping(monitor="loss", patience=100, stopping_threshold=0.1)
    step, reason = run(es, [1.0, 0.5, 0.1, 0.05])
    assert step == 2 and "reached stopping_threshold 0.1" in reason
    es = ckpt.EarlyStopping(monitor="acc", mode="max", patience=100, divergence_threshold=0.2)
    step, reason = run(es, [0.5, 0.6, 0.19])
    assert step == 2 and "worse than divergence_threshold 0.2" in reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_stops_with_a_reason_that_says_so(bad: float) -> None:
    es = ckpt.EarlyStopping(monitor="loss", patience=100)
    step, reason = run(es, [1.0, bad])
    assert step == 1 and "not finite" in reason and "loss is" in reason
    relaxed = ckpt.EarlyStopping(monitor="loss", patience=100, check_finite=False)
    assert run(relaxed, [1.0, bad, 0.5]) == (None, None)
    assert relaxed.best == 0.5 and relaxed.best_step == 2


def test_start_from_warm_up_is_ignored_entirely() -> None:
    """Keras' start_from_epoch: warm-up values never stop, never become the best."""
    es = ckpt.EarlyStopping(monitor="loss", patience=1, start_from=3, stopping_threshold=0.0)
    assert run(es, [1.0, 2.0, -1.0, 3.0]) == (None, None)  # -1.0 was warm-up: no threshold stop
    assert es.best == 3.0 and es.best_step == 3 and es.evaluations == 4 and es.wait == 0
    es = ckpt.EarlyStopping(monitor="loss", patience=1, start_from=2)
    assert run(es, [1.0, math.nan, 2.0, 2.5]) == (3, es.reason)
    assert es.best == 2.0 and es.best_step == 2
    assert "did not improve" in es.reason
    # a warm-up value better than everything after it does not become the best
    es = ckpt.EarlyStopping(monitor="acc", mode="max", patience=2, start_from=1)
    assert run(es, [0.99, 0.5, 0.6, 0.7]) == (None, None)
    assert es.best == 0.7 and es.best_step == 3


def test_stop_is_sticky() -> None:
    es = ckpt.EarlyStopping(monitor="loss", patience=0)
    run(es, [1.0, 2.0])
    d = es.update(0.0, 5)
    assert d.stop and d.reason == es.reason and es.stopped_step == 1


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        ckpt.EarlyStopping(mode="lowest")
    with pytest.raises(ValueError, match="patience must be a non-negative int"):
        ckpt.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="min_delta must be a finite number >= 0"):
        ckpt.EarlyStopping(min_delta=-0.1)
    with pytest.raises(ValueError, match="baseline must be a finite number"):
        ckpt.EarlyStopping(baseline=math.nan)


values = st.lists(
    st.one_of(st.floats(-10, 10), st.sampled_from([math.nan, math.inf])), min_size=1, max_size=40
)


@given(
    values=values,
    cut=st.integers(0, 40),
    patience=st.integers(0, 5),
    min_delta=st.sampled_from([0.0, 0.5]),
    baseline=st.sampled_from([None, 0.0]),
    start_from=st.integers(0, 3),
)
def test_state_dict_round_trip_resumes_exactly(
    values: list[float],
    cut: int,
    patience: int,
    min_delta: float,
    baseline: float | None,
    start_from: int,
) -> None:
    """Stopping at any point, saving the state as JSON and resuming gives the same decisions."""

    def make() -> ckpt.EarlyStopping:
        return ckpt.EarlyStopping(
            monitor="m",
            patience=patience,
            min_delta=min_delta,
            baseline=baseline,
            start_from=start_from,
        )

    straight = make()
    expected = [straight.update(v, i) for i, v in enumerate(values)]
    first = make()
    got = [first.update(v, i) for i, v in enumerate(values[:cut])]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.update(v, i) for i, v in enumerate(values) if i >= cut]
    assert got == expected
    assert resumed.state_dict() == straight.state_dict()


def test_load_state_dict_refuses_another_mode_or_monitor() -> None:
    es = ckpt.EarlyStopping(monitor="loss")
    es.update(1.0, 0)
    with pytest.raises(ValueError, match="mode 'min'"):
        ckpt.EarlyStopping(monitor="loss", mode="max").load_state_dict(es.state_dict())
    with pytest.raises(ValueError, match="monitors 'loss'"):
        ckpt.EarlyStopping(monitor="acc").load_state_dict(es.state_dict())
    with pytest.raises(ValueError, match="malformed"):
        ckpt.EarlyStopping(monitor="loss").load_state_dict({"best": 1})
