"""The training-loop layer's regressions (issue 15): one source of truth for the
monitored metric and its mode, the steps stored and the early-stopping state."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden-manager-v1"


def state(i: int) -> dict[str, Any]:
    return {"w": np.full(1000, i, np.float32), "i": i}


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def acc_store(root: Path) -> ckpt.Store:
    """A store whose manager recorded monitor acc, mode max; acc 0.5 0.9 0.7."""
    with ckpt.CheckpointManager(str(root), monitor="acc", mode="max") as mgr:
        for step, acc in enumerate([0.5, 0.9, 0.7]):
            mgr.save(step, state(step), metrics={"acc": acc, "loss": 1 - acc})
    return ckpt.Store(root, create=False)


# ------------------------------------------------------- 1. one grammar of refs
def test_best_follows_the_recorded_mode_everywhere(tmp_path: Path) -> None:
    store = acc_store(tmp_path / "s")
    assert store.resolve("best:acc") == store.resolve("best") == 2  # the highest acc
    assert store.best("acc").id == 2 and store.best().id == 2
    assert store.resolve("best:acc:min") == 1
    for args in (["show", store.root, "best:acc"], ["best", store.root, "--metric", "acc"]):
        r = cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == 2
    # another metric has no known mode: refused, with what to write
    with pytest.raises(ckpt.MetricModeError, match=r"write best:loss:min or best:loss:max"):
        store.resolve("best:loss")
    with pytest.raises(ckpt.MetricModeError, match="pass mode='min' or mode='max'"):
        store.best("loss")
    r = cli("best", store.root, "--metric", "loss")
    assert r.returncode == 2 and "--mode min or --mode max" in r.stderr
    assert r.stderr.count("\n") == 1
    assert store.best("loss", "min").id == 2


def test_the_golden_manager_store_resolves_best_by_its_recorded_max(tmp_path: Path) -> None:
    root = tmp_path / "g"
    shutil.copytree(GOLDEN, root)
    store = ckpt.Store(root, create=False)
    assert store.resolve("best:acc") == 3  # acc 0.75: was the lowest (4) before the fix
    r = cli("show", root, "best:acc", "--json")
    assert json.loads(r.stdout)["id"] == 3


def test_a_missing_id_suggests_the_step_form(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s")
    for step in (10, 11):
        store.save(state(step), step=step)
    with pytest.raises(ckpt.VersionNotFoundError, match=r"did you mean step=11 \(version 2\)\?"):
        store.load(11)
    r = cli("show", store.root, "11")
    assert r.returncode == 1 and "did you mean step=11 (version 2)?" in r.stderr


# ----------------------------------------- 2. early stopping inherits the mode
def test_early_stopping_inherits_the_managers_mode(tmp_path: Path) -> None:
    es = ckpt.EarlyStopping(patience=2)
    mgr = ckpt.CheckpointManager(str(tmp_path / "s"), monitor="acc", mode="max", early_stopping=es)
    assert (es.monitor, es.mode) == ("acc", "max")
    for step, acc in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):  # rising: never stops
        assert not mgr.save(step, state(step), metrics={"acc": acc})
    assert es.best == 0.5
    r = cli("show", mgr.store.root, "latest")
    assert "early stopping (acc, max)" in r.stdout
    # and the manager takes the mode of an early stopping of its metric
    mgr2 = ckpt.CheckpointManager(
        str(tmp_path / "t"), monitor="acc", early_stopping=ckpt.EarlyStopping(mode="max")
    )
    assert mgr2.mode == "max"


def test_a_contradicting_or_missing_mode_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode 'max' in the manager but 'min' in EarlyStopping"):
        ckpt.CheckpointManager(
            str(tmp_path / "s"),
            monitor="acc",
            mode="max",
            early_stopping=ckpt.EarlyStopping(mode="min"),
        )
    with pytest.raises(ValueError, match="needs mode='min' or mode='max'"):
        ckpt.CheckpointManager(
            str(tmp_path / "s"),
            monitor="acc",
            mode="max",
            early_stopping=ckpt.EarlyStopping(monitor="grad_norm"),
        )
    assert not (tmp_path / "s").exists()


def test_several_stopping_criteria(tmp_path: Path) -> None:
    def manager() -> ckpt.CheckpointManager:
        return ckpt.CheckpointManager(
            str(tmp_path / "s"),
            monitor="acc",
            mode="max",
            early_stopping=[
                ckpt.EarlyStopping(patience=10),
                ckpt.EarlyStopping(monitor="grad_norm", mode="min", divergence_threshold=100.0),
            ],
        )

    mgr = manager()
    grads = [1.0, 2.0, 500.0]
    stops = [
        mgr.save(i, state(i), metrics={"acc": 0.1 * i, "grad_norm": g}) for i, g in enumerate(grads)
    ]
    assert stops == [False, False, True]
    assert mgr.stop_reason is not None and "grad_norm = 500.0" in mgr.stop_reason
    trainer = dict(mgr.store.latest().trainer)
    assert [e["monitor"] for e in trainer["early_stopping"]] == ["acc", "grad_norm"]
    # a resumed manager adopts both states: it has stopped
    again = manager()
    again.restore_latest()
    assert again.should_stop and again.early_stoppings[0].best == pytest.approx(0.2)
    r = cli("show", again.store.root, "latest")
    assert "early stopping (acc, max)" in r.stdout and "early stopping (grad_norm, min)" in r.stdout


# ------------------------------------------------ 3. two writers on one store
def test_a_stale_manager_does_not_write_a_step_again(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    a = ckpt.CheckpointManager(root, monitor="loss")
    b = ckpt.CheckpointManager(root, monitor="loss")  # made before a wrote anything
    for step in range(3):
        a.save(step, state(step), metrics={"loss": 1.0 / (step + 1)})
    with pytest.raises(ckpt.ConcurrentRunError, match=r"another writer saved version 3 \(step 2"):
        b.save(2, state(2), metrics={"loss": 0.1})
    with pytest.raises(ckpt.ConcurrentRunError, match="call restore_latest"):
        b.save(3, state(3), metrics={"loss": 0.1})
    assert [v.step for v in a.store.versions()] == [0, 1, 2]
    assert b.early_stopping is None and b.next_step == 0  # the refused saves changed nothing
    b.restore_latest()  # takes over explicitly
    assert b.next_step == 3
    b.save(3, state(3), metrics={"loss": 0.1})
    with pytest.raises(ckpt.ConcurrentRunError):
        a.save(3, state(3), metrics={"loss": 0.1})  # now a is the stale one
    assert [v.step for v in a.store.versions()] == [0, 1, 2, 3]


def test_an_older_step_than_the_latest_is_refused(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    with ckpt.CheckpointManager(root, monitor="loss") as first:
        for step in range(11):
            first.save(step, state(step), metrics={"loss": 1.0})
    mgr = ckpt.CheckpointManager(root, monitor="loss")
    assert mgr.next_step == 11  # adopted from the store, not from nothing
    with pytest.raises(ckpt.StepOrderError, match="step 5 is older than step 10"):
        mgr.save(5, state(5), metrics={"loss": 1.0})
    assert mgr.store.latest().step == 10
    # restoring an older version first moves the manager back
    mgr.restore("step=5")
    with pytest.raises(ckpt.StepExistsError, match="already has a version for step 6"):
        mgr.save(6, state(6), metrics={"loss": 0.5})
    over = ckpt.CheckpointManager(root, monitor="loss", overwrite=True)
    over.save(5, state(50), metrics={"loss": 0.2})  # overwrite=True: an older step is allowed
    assert over.restore_latest()["i"] == 50
    assert [v.step for v in over.store.versions()].count(5) == 1  # the old step 5 replaced


RUN = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import ckpt
    root, name = sys.argv[1], sys.argv[2]
    try:
        with ckpt.CheckpointManager(root, monitor="loss", keep=ckpt.Keep(last=2)) as mgr:
            mgr.restore_latest()
            for step in range(mgr.next_step, mgr.next_step + 30):
                mgr.save(step, {"w": np.full(1000, step, np.float32), "run": name},
                         metrics={"loss": 1.0})
                time.sleep(0.02)
    except ckpt.ConcurrentRunError as exc:
        print("REFUSED", exc)
        sys.exit(3)
    """
)


def test_a_second_concurrent_run_is_refused_not_interleaved(tmp_path: Path) -> None:
    root = tmp_path / "s"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, str(root), name], stdout=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=120)[0] for p in runs]
    codes = sorted(p.returncode for p in runs)
    assert codes == [0, 3], outs  # one run finished, the other was refused
    refused = outs[[p.returncode for p in runs].index(3)]
    assert "REFUSED not saving: another writer saved version" in refused
    store = ckpt.Store(root, create=False)
    versions = store.versions()
    steps = [v.step for v in versions]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    winner = store.load(versions[-1])["run"]
    assert all(store.load(v)["run"] == winner for v in versions)  # one run's versions only


# --------------------------------------------- 4. an EarlyStopping reused
def test_a_reused_early_stopping_starts_afresh_in_a_new_manager(tmp_path: Path) -> None:
    es = ckpt.EarlyStopping(patience=0)
    with ckpt.CheckpointManager(str(tmp_path / "a"), monitor="loss", early_stopping=es) as mgr:
        mgr.save(0, state(0), metrics={"loss": 1.0})
        assert mgr.save(1, state(1), metrics={"loss": 2.0})
    assert es.stopped
    mgr = ckpt.CheckpointManager(str(tmp_path / "b"), monitor="loss", early_stopping=es)
    assert not es.stopped and not mgr.should_stop
    assert not mgr.save(0, state(0), metrics={"loss": 5.0})  # Keras' reuse case: no stop
    # on the old store, a new manager adopts its stopped state instead
    again = ckpt.CheckpointManager(str(tmp_path / "a"), monitor="loss", early_stopping=es)
    assert again.should_stop and es.stopped


# --------------------------------------------- 5. torch.apply on a fresh run
def test_apply_of_a_fresh_runs_none_restores_nothing(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import ckpt.torch

    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ckpt.CheckpointManager(str(tmp_path / "s"), monitor="val_loss") as mgr:
        ckpt.torch.apply(mgr.restore_latest(), model=model)  # an empty store: None
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
        mgr.save(0, ckpt.torch.capture(model=model), metrics={"val_loss": 1.0})
        ckpt.torch.apply(mgr.restore_latest(), model=model)


# ------------------------------------------ 6. an interrupted save's chunks
def test_the_next_writer_sweeps_the_chunks_of_a_killed_save(tmp_path: Path) -> None:
    from crashcheck import CHUNKS, Children, referenced_objects, tree_for

    root = tmp_path / "s"
    ckpt.Store(root, **CHUNKS).save(tree_for(1), step=1)
    children = Children()
    try:
        result = children.run(root, ["save:2"], fault="objects.before_dir_fsync:1:kill")
    finally:
        children.close()
    assert result.returncode < 0  # killed after renaming its chunks, before the commit

    def objects() -> set[str]:
        return {p.parent.name + p.name for p in (root / "objects").glob("??/*")}

    store = ckpt.Store(root, **CHUNKS)
    assert objects() - referenced_objects(store)  # debris before the next writer
    store.save(tree_for(3), step=3)
    assert objects() == referenced_objects(store)
    assert all(r.ok for r in store.verify())


CTRL_C = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ckpt
    store = ckpt.Store(sys.argv[1])
    rng = np.random.default_rng(0)
    tree = {f"w{i}": rng.standard_normal(1 << 20).astype(np.float32) for i in range(48)}
    print("saving", flush=True)
    try:
        while True:
            for a in tree.values():
                a += 1
            store.save(tree)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    """
)


def test_ctrl_c_mid_save_leaves_no_chunks_after_the_next_writer(tmp_path: Path) -> None:
    import signal
    import time

    root = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "saving\n"
    time.sleep(1.5)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=60)
    assert "interrupted" in out
    store = ckpt.Store(root)
    store.save({"x": np.zeros(4, np.float32)})
    on_disk = {p.parent.name + p.name for p in (root / "objects").glob("??/*")}
    referenced = {c[0] for v in store.versions() for c in store.manifest(v.id)["chunks"]}
    assert on_disk == referenced
    assert all(r.ok for r in store.verify())


# --------------------------------------------------- 7. the metric history
def test_the_history_keeps_every_save_that_retention_deleted(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with ckpt.CheckpointManager(
        str(root), monitor="loss", keep=ckpt.Keep(last=2), save_every=2
    ) as mgr:
        for epoch in range(16):
            mgr.save(epoch, state(epoch), metrics={"loss": 1.0 / (epoch + 1)}, epoch=epoch)
    store = ckpt.Store(root, create=False)
    assert len(store.versions()) == 2
    history = store.history()
    assert sorted(e.step for e in history) == list(range(16))
    written = {e.step: e.version for e in history if e.version is not None}
    assert sorted(written) == list(range(0, 16, 2))  # the schedule wrote every second step
    assert all(h.metrics["loss"] == 1.0 / (h.step + 1) for h in history if h.step is not None)
    pytest.importorskip("matplotlib")
    r = cli("plot", root, "--out", tmp_path / "c.png", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["points"] == 16 and data["versions"] == 2


def test_a_torn_history_line_is_skipped_and_the_next_append_starts_anew(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s")
    store.save(state(0), step=0, metrics={"loss": 1.0})
    with open(Path(store.root, "history.jsonl"), "ab") as f:
        f.write(b'{"step": 1, "metr')  # a crash mid-append
    store.save(state(2), step=2, metrics={"loss": 0.5})
    assert [e.step for e in store.history()] == [0, 2]


# ---------------------------------------- 8. typo paths and read-only stores
def test_opening_a_typo_path_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "runs" / "exp1-typo"
    store = ckpt.Store(typo)
    assert store.versions() == [] and store.history() == [] and store.latest() is None
    with pytest.raises(ckpt.VersionNotFoundError, match="there is no store there"):
        store.load()
    assert not typo.exists() and not typo.parent.exists()
    with pytest.raises(ckpt.StoreNotFoundError, match="is not a ckpt store"):
        ckpt.Store(typo, create=False)
    mgr = ckpt.CheckpointManager(str(typo), monitor="loss")
    assert mgr.restore_latest(default="fresh") == "fresh"
    mgr.close()
    assert not typo.exists()


READ_ONLY = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ckpt
    store = ckpt.Store(sys.argv[1])
    print(len(store.versions()), float(store.load()["w"][0]))
    try:
        store.save({"w": np.zeros(3)})
    except ckpt.StoreReadOnlyError as exc:
        print("REFUSED", exc)
    """
)


def test_a_read_only_store_loads_and_refuses_saves_clearly(tmp_path: Path) -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    src, ro = tmp_path / "src", tmp_path / "ro"
    store = ckpt.Store(src)
    store.save({"w": np.full(3, 7.0)})
    shutil.rmtree(src / "cache")  # a read then would want to rebuild the cache
    (src / "lock").unlink()
    ro.mkdir()
    script = tmp_path / "ro.py"
    script.write_text(READ_ONLY)
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare -rm is not allowed here: {probe.stderr.strip()}")
    r = subprocess.run(
        [
            "unshare", "-rm", "sh", "-c",
            f"mount --bind {src} {ro} && mount -o remount,ro,bind {ro}"
            f" && exec {sys.executable} {script} {ro}",
        ],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1 7.0"
    assert lines[1].startswith(f"REFUSED store {ro} is read-only (Read-only file system")
    assert "it can be listed, loaded and verified, not written" in lines[1]
    layout = ["ckpt-store.json", "history.jsonl", "objects", "pins", "tmp", "versions"]
    assert sorted(p.name for p in src.iterdir()) == layout  # nothing written: no lock, no cache


# -------------------------------------------------------- logging decisions
def test_each_decision_is_logged_at_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckpt")
    mgr = ckpt.CheckpointManager(
        str(tmp_path / "s"),
        monitor="loss",
        save_every=2,
        early_stopping=ckpt.EarlyStopping(patience=1),
    )
    for step, loss in enumerate([1.0, 0.5, 0.7]):
        mgr.save(step, state(step), metrics={"loss": loss})
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "ckpt.manager")
    assert "step 0: saved version 1 (loss=1.0)" in text
    assert "step 1: loss improved to 0.5" in text
    assert "step 1: skipped by the schedule (last version at step 0)" in text
    assert "step 2: stopping: loss did not improve" in text
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "ckpt.manager")


# ------------------------------------------------- retention that slims
def test_resume_never_lands_on_a_slimmed_version_when_a_full_one_exists(tmp_path: Path) -> None:
    keep = ckpt.Keep(last=3, subtrees={"optimizer/**": ckpt.Keep(last=1)})
    with ckpt.CheckpointManager(str(tmp_path / "s"), monitor="loss", keep=keep) as mgr:
        for step in range(5):  # loss rises: the best is step 0, kept whole
            tree = {"model": state(step), "optimizer": {"m": np.full(4000, step, np.float32)}}
            mgr.save(step, tree, metrics={"loss": float(step)})
    store = ckpt.Store(tmp_path / "s", create=False)
    assert [(v.step, bool(v.slimmed)) for v in store.versions()] == [
        (0, False), (2, True), (3, True), (4, False),
    ]  # fmt: skip
    latest = store.manifest("latest")
    own = {c[0] for c in latest["chunks"]} - {
        c[0] for v in store.versions()[:-1] for c in store.manifest(v.id)["chunks"]
    }
    for cid in own:  # damage what only the newest version holds
        path = tmp_path / "s" / "objects" / cid[:2] / cid[2:]
        path.write_bytes(b"x" + path.read_bytes()[1:])
    mgr = ckpt.CheckpointManager(str(tmp_path / "s"), monitor="loss", keep=keep)
    with pytest.warns(RuntimeWarning, match="resuming from version 1 \\(step 0\\)"):
        tree = mgr.restore_latest(fallback=True)
    assert tree["model"]["i"] == 0 and tree["optimizer"]["m"][0] == 0  # whole, not slimmed
    assert mgr.next_step == 1


def test_the_golden_manager_store_loads_bit_exact_and_resumes(tmp_path: Path) -> None:
    """A store written by the code before this rework (tests/data/make_golden_manager.py)."""
    sys.path.insert(0, str(HERE / "data"))
    import make_golden_manager as made
    from treecmp import assert_same

    root = tmp_path / "g"
    shutil.copytree(GOLDEN, root)
    store = ckpt.Store(root, create=False)
    trees = made.run_trees()
    assert [v.step for v in store.versions()] == [2, 3, 4]
    for v in store.versions():
        assert v.step is not None
        assert_same(store.load(v), trees[v.step])
    assert all(r.ok for r in store.verify())
    mgr = ckpt.CheckpointManager(
        str(root),
        monitor="acc",
        mode="max",
        early_stopping=ckpt.EarlyStopping(patience=made.PATIENCE),
        keep=ckpt.Keep(last=2, best=1),
    )
    assert_same(mgr.restore_latest(), trees[4])
    assert mgr.should_stop and mgr.next_step == 5  # it had stopped at step 4
    assert mgr.early_stopping is not None and mgr.early_stopping.best == 0.75
    assert mgr.save(5, trees[4], metrics={"acc": 0.9})  # stopped: nothing more is written
    assert [v.id for v in store.versions()] == [3, 4, 5]
