"""CheckpointManager: schedule, early stopping, retention, errors, preemption, resume state."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

import ckpt


def state(i: int) -> dict[str, object]:
    return {"w": np.full(1000, i, np.float32), "i": i}


def manager(tmp_path: Path, **kw: object) -> ckpt.CheckpointManager:
    opts: dict[str, object] = {"monitor": "loss", "mode": "min"}
    opts.update(kw)
    return ckpt.CheckpointManager(str(tmp_path / "run"), **opts)  # type: ignore[arg-type]


def test_the_documented_loop(tmp_path: Path) -> None:
    losses = [1.0, 0.8, 0.6, 0.61, 0.62, 0.63, 0.64, 0.65, 0.5]
    with manager(
        tmp_path, early_stopping=ckpt.EarlyStopping(patience=3), keep=ckpt.Keep(last=2, best=1)
    ) as mgr:
        fresh = state(-1)
        assert mgr.restore_latest(default=fresh) is fresh and mgr.next_step == 0
        stopped_at = None
        for epoch in range(mgr.next_step, 100):
            if mgr.save(epoch, state(epoch), metrics={"loss": losses[epoch]}):
                stopped_at = epoch
                break
        assert stopped_at == 5 and mgr.should_stop
        assert mgr.stop_reason is not None and "did not improve" in mgr.stop_reason
        assert [v.step for v in mgr.store.versions()] == [2, 4, 5]
        best = mgr.restore_best()
        assert best["i"] == 2 and mgr.best_version is not None and mgr.best_version.step == 2


def test_schedule_every_n_and_on_improvement(tmp_path: Path) -> None:
    mgr = manager(
        tmp_path,
        early_stopping=ckpt.EarlyStopping(patience=100),
        save_every=4,
        save_on_improvement=True,
    )
    losses = [5, 4, 6, 6, 6, 6, 3, 6, 6, 6]
    for step, loss in enumerate(losses):
        mgr.save(step, state(step), metrics={"loss": loss})
    # first save, improvements at 1 and 6, and every 4 steps since the last write
    assert [v.step for v in mgr.store.versions()] == [0, 1, 5, 6]
    assert mgr.early_stopping is not None and mgr.early_stopping.evaluations == 10
    mgr.save(10, state(10), metrics={"loss": 7}, force=True)
    assert mgr.store.latest().step == 10


def test_same_step_twice_raises_unless_overwrite(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    mgr.save(3, state(3), metrics={"loss": 1.0})
    with pytest.raises(ckpt.StepExistsError, match="already has a version for step 3"):
        mgr.save(3, state(4), metrics={"loss": 1.0}, force=True)
    mgr.close()
    mgr = manager(tmp_path, overwrite=True)
    mgr.save(3, state(4), metrics={"loss": 1.0}, force=True)
    (v,) = mgr.store.versions()
    assert v.step == 3 and mgr.store.load(v)["i"] == 4


def test_missing_monitor_is_an_error_or_a_warning(tmp_path: Path) -> None:
    mgr = manager(tmp_path, early_stopping=ckpt.EarlyStopping())
    with pytest.raises(ckpt.MissingMetricError, match="'loss' is not among the metrics of step 0"):
        mgr.save(0, state(0), metrics={"acc": 1.0})
    assert mgr.store.versions() == []
    relaxed = manager(tmp_path / "b", early_stopping=ckpt.EarlyStopping(), strict=False)
    with pytest.warns(RuntimeWarning, match="early stopping skips this step"):
        relaxed.save(0, state(0), metrics={})
    assert len(relaxed.store.versions()) == 1


def test_inconsistent_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="early stopping needs a metric"):
        ckpt.CheckpointManager(str(tmp_path / "a"), early_stopping=ckpt.EarlyStopping())
    with pytest.raises(ValueError, match="make them agree"):
        manager(tmp_path, early_stopping=ckpt.EarlyStopping(monitor="loss", mode="max"))
    with pytest.raises(ValueError, match=r"Keep\(best=...\) needs monitor"):
        ckpt.CheckpointManager(str(tmp_path / "c"), keep=ckpt.Keep(best=1))
    with pytest.raises(ValueError, match="save_every must be a positive int"):
        manager(tmp_path, save_every=0)


def test_resume_restores_counters_and_early_stopping_state(tmp_path: Path) -> None:
    es = ckpt.EarlyStopping(patience=2)
    mgr = manager(tmp_path, early_stopping=es)
    for step, loss in enumerate([1.0, 0.5, 0.7]):
        mgr.save(step, state(step), metrics={"loss": loss})
    mgr.close()
    again = manager(tmp_path, early_stopping=ckpt.EarlyStopping(patience=2))
    restored = again.restore_latest(default=None)
    assert restored["i"] == 2 and again.next_step == 3
    assert again.early_stopping is not None
    assert again.early_stopping.state_dict() == es.state_dict()
    assert again.save(3, state(3), metrics={"loss": 0.9})  # second miss in a row: stop
    assert again.should_stop and again.stop_reason is not None
    # a resumed run that had already stopped stays stopped and writes nothing more
    third = manager(tmp_path, early_stopping=ckpt.EarlyStopping(patience=2))
    third.restore_latest()
    assert third.should_stop and third.stop_reason == again.stop_reason
    n = len(third.store.versions())
    assert third.save(4, state(4), metrics={"loss": 0.1})
    assert len(third.store.versions()) == n


def test_preemption_signal_sets_a_flag_and_the_next_save_checkpoints(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with manager(tmp_path, save_every=100, handle_signals=True) as mgr:
        assert not mgr.save(0, state(0), metrics={"loss": 1.0})
        assert not mgr.save(1, state(1), metrics={"loss": 1.0})  # not due: nothing written
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.preempted and len(mgr.store.versions()) == 1  # the handler wrote nothing
        assert mgr.save(2, state(2), metrics={"loss": 1.0})
        assert mgr.stop_reason == "preempted"
        latest = mgr.store.latest()
        assert latest is not None and latest.step == 2
        assert latest.trainer["saved_because"] == "preempted"
    assert signal.getsignal(signal.SIGTERM) == previous
    resumed = manager(tmp_path, save_every=100)
    resumed.restore_latest()
    assert resumed.next_step == 3 and not resumed.should_stop  # preemption is resumed, not stopped


def test_configuration_is_recorded_for_the_cli(tmp_path: Path) -> None:
    mgr = manager(tmp_path, mode="min", keep=ckpt.Keep(last=3, best=1))
    mgr.save(0, state(0), metrics={"loss": 1.0})
    keep, monitor, mode = mgr.store.policy()
    assert (keep, monitor, mode) == (ckpt.Keep(last=3, best=1), "loss", "min")
    assert ckpt.Store(mgr.store.root).explain()[1] == ("latest", "best", "last 3", "best 1 by loss")


def test_restore_into_preallocated_arrays_fills_them_in_place(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    mgr.save(0, {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3)}, metrics={"loss": 1.0})
    target = {"w": np.zeros(1000, np.float32), "b": np.zeros(2)}  # b: wrong shape
    out = mgr.restore_latest(into=target)
    assert out["w"] is target["w"] and target["w"][999] == 999
    assert out["b"] is not target["b"] and out["b"].tolist() == [1.0, 1.0, 1.0]


def test_closed_manager_refuses_to_save(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    mgr.close()
    with pytest.raises(ckpt.CheckpointError, match="closed"):
        mgr.save(0, state(0), metrics={"loss": 1.0})


def test_ckpt_ls_shows_versions_and_why_they_are_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    mgr = manager(tmp_path, keep=ckpt.Keep(last=1))
    for step, loss in enumerate([0.5, 0.2, 0.9]):
        mgr.save(step, state(step), metrics={"loss": loss})
    out = subprocess.run(
        [sys.executable, "-m", "ckpt.cli", "ls", mgr.store.root],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "kept because" in out[0] and "loss" in out[0].split()
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {"2", "3"}
    assert "best" in rows["2"] and " 0.2 " in rows["2"]  # the loss column
    assert "latest, last 1" in rows["3"]
    missing = subprocess.run(
        [sys.executable, "-m", "ckpt.cli", "ls", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "is not a ckpt store" in missing.stderr
    assert "Traceback" not in missing.stderr
