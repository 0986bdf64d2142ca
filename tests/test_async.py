"""Background saves: copy-then-return, errors surface, failures never commit."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import store as store_module


def test_async_save_copies_the_leaves_and_commits_in_the_background(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s")
    w = np.arange(1_000_000, dtype=np.float32)
    handle = s.save({"w": w}, step=1, blocking=False)
    w[:] = -1  # training goes on and changes the weights right away
    v = handle.wait()
    assert handle.done() and v.id == 1 and v.step == 1
    assert s.load(v)["w"].tolist()[:3] == [0.0, 1.0, 2.0]
    assert s.load(v)["w"][-1] == 999_999
    s.close()


def test_back_to_back_async_saves_reuse_the_staging_buffer_safely(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s")
    rng = np.random.default_rng(0)
    model = {"a": rng.standard_normal(300_000).astype(np.float32), "b": np.arange(7)}
    expected = []
    handles = []
    for k in range(4):
        # the next save starts while the previous one may still run; it waits
        # for it before its copy overwrites the staging buffer
        handles.append(s.save(model, step=k, blocking=False))
        expected.append({name: a.copy() for name, a in model.items()})
        model["a"] += 1.0  # training changes the weights right after the call
        model["b"] = np.arange(7 + k)  # a leaf that changes size
        if k == 2:
            model["c"] = rng.standard_normal(500_000)  # a bigger state: a bigger buffer
    for h, want in zip(handles, expected, strict=True):
        v = h.wait()
        got = s.load(v)
        assert set(got) == set(want)
        for name, a in want.items():
            assert got[name].tobytes() == a.tobytes()
    assert s._staging is not None
    s.close()
    assert s._staging is None


def test_copy_false_shares_the_callers_memory_until_wait(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s")
    w = np.ones(10, np.float32)
    v = s.save({"w": w}, blocking=False, copy=False).wait()
    assert s.load(v)["w"].tolist() == [1.0] * 10


def test_a_failed_async_save_never_commits_and_surfaces_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = ckpt.Store(tmp_path / "s")
    s.save({"w": np.zeros(3)})
    gate = threading.Event()

    def failing(*args: object, **kw: object) -> None:
        gate.wait(5)
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(store_module._core, "save_chunks", failing)
    handle = s.save({"w": np.ones(3)}, blocking=False)
    assert not handle.done()
    gate.set()
    with pytest.raises(OSError, match="injected"):
        handle.wait()
    with pytest.raises(OSError, match="injected"):  # and on the next save, which does not save
        s.save({"w": np.full(3, 2.0)})
    monkeypatch.undo()
    assert [v.id for v in s.versions()] == [1]
    assert s.save({"w": np.full(3, 2.0)}).id == 2  # the store goes on
    assert not list(Path(s.root, "tmp").iterdir())


def test_saves_run_in_call_order_and_readers_do_not_block(tmp_path: Path) -> None:
    s = ckpt.Store(tmp_path / "s")
    handles = [s.save({"i": np.full(100_000, i)}, step=i, blocking=False) for i in range(5)]
    steps = [v.step for v in s.versions()]  # while saves are in flight
    assert steps == list(range(len(steps)))  # whole versions only, in call order
    versions = [h.wait() for h in handles[-1:]]
    s.wait()
    assert [v.step for v in s.versions()] == [0, 1, 2, 3, 4]
    assert versions[0].step == 4
    s.close()


def test_manager_async_save_with_retention_and_resume(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(
        str(tmp_path / "run"),
        monitor="loss",
        keep=ckpt.Keep(last=2),
        async_save=True,
        early_stopping=ckpt.EarlyStopping(patience=2),
    ) as mgr:
        for step, loss in enumerate([1.0, 0.5, 0.6, 0.7, 0.8]):
            if mgr.save(step, {"w": np.full(1000, step, np.float32)}, metrics={"loss": loss}):
                break
    assert step == 3
    store = ckpt.Store(tmp_path / "run")
    assert [v.step for v in store.versions()] == [1, 2, 3]  # last 2 + best
    again = ckpt.CheckpointManager(str(tmp_path / "run"), monitor="loss", async_save=True)
    assert again.restore_latest()["w"][0] == 3.0 and again.next_step == 4
    again.close()
