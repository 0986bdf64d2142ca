"""``ckpt gc``, ``pin``, ``unpin``, ``verify``, ``diff`` and ``plot``."""

from __future__ import annotations

import builtins
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cli import (
    LOSSES,
    assert_one_line_error,
    ckpt_json,
    ckpt_main,
    ckpt_run,
    managed_store,
)

import ckpt
from ckpt import _core


def plain_store(root: Path, n: int = 5) -> ckpt.Store:
    """n versions without a recorded monitor; each adds a chunk of its own."""
    store = ckpt.Store(root, durable=False)
    for i in range(n):
        store.save(
            {"w": np.full(1000, i, np.float32), "fixed": np.arange(100.0)},
            step=i * 10,
            metrics={"loss": [0.9, 0.3, 0.5, 0.2, 0.8, 0.7, 0.6][i % 7]},
        )
    return store


def ids(store: ckpt.Store) -> list[int]:
    return [v.id for v in ckpt.Store(store.root).versions()]


def objects(store: ckpt.Store) -> set[str]:
    return {oid for oid, _ in _core.list_objects(store.root)}


# ---------------------------------------------------------------------- gc
def test_gc_without_yes_in_a_script_deletes_nothing(tmp_path: Path) -> None:
    store = plain_store(tmp_path / "s")
    before, objs = ids(store), objects(store)
    r = ckpt_run("gc", store.root, "--keep-last", "2")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "not deleting without confirmation", "--yes")
    assert r.stdout.startswith("would delete 3 versions (1, 2, 3)")
    assert ids(store) == before and objects(store) == objs
    r = ckpt_run("gc", store.root, "--keep-last", "2", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["applied"] is False
    assert ids(store) == before


def test_gc_dry_run_lists_what_retention_would_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = plain_store(tmp_path / "s")
    store.pin(1)
    data = ckpt_json(capsys, "gc", store.root, "--keep-last", "1", "--dry-run")
    plan = store.apply_retention(ckpt.Keep(last=1), dry_run=True)
    assert data["dry_run"] and not data["applied"]
    assert data["versions"] == list(plan.deleted) == [2, 3, 4]
    assert data["version_bytes"] == plan.freed_bytes > 0
    assert data["kept"] == {"1": ["pinned"], "5": ["latest", "last 1"]}
    assert data["rules"] == {"last": 1, "best": None, "every_n_steps": None, "max_bytes": None}
    assert ids(store) == [1, 2, 3, 4, 5]
    code, out, _ = ckpt_main(capsys, "gc", store.root, "--keep-last", "1", "-n")
    assert code == 0 and out.startswith("would delete 3 versions (2, 3, 4), freeing ")


def test_gc_yes_applies_the_rule_and_spares_latest_best_pinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = managed_store(tmp_path / "run")  # best is version 4, latest 6
    store.pin(2)
    data = ckpt_json(capsys, "gc", store.root, "--keep-last", "1", "--yes")
    assert data["applied"] and data["versions"] == [1, 3, 5]
    assert ids(store) == [2, 4, 6]
    referenced = {c for v in (2, 4, 6) for c in store.chunk_map(v)}
    assert objects(store) == referenced
    assert np.array_equal(store.load(4)["model"]["w"], ckpt.Store(store.root).load(4)["model"]["w"])


def test_gc_keep_best_uses_metric_and_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = plain_store(tmp_path / "s")  # loss 0.9 0.3 0.5 0.2 0.8
    code, _, err = ckpt_main(capsys, "gc", store.root, "--keep-best", "1", "--dry-run")
    assert code == 2
    assert_one_line_error(err, "--keep-best needs a metric")
    code, _, err = ckpt_main(capsys, "gc", store.root, "--keep-best", "1", "--metric", "loss")
    assert code == 2  # no recorded monitor: whether lower loss is better is not guessed
    assert_one_line_error(err, "'loss'", "--mode min or --mode max")
    data = ckpt_json(
        capsys, "gc", store.root, "--keep-best", "2", "--metric", "loss", "--mode", "min", "-n"
    )
    assert data["versions"] == [1, 3]  # keeps 2 and 4 (best two), 5 (latest)
    data = ckpt_json(
        capsys, "gc", store.root, "--keep-best", "1", "--metric", "loss", "--mode", "max", "-y"
    )
    assert data["versions"] == [2, 3, 4] and ids(store) == [1, 5]


def test_gc_keep_every_seconds_and_without_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = plain_store(tmp_path / "s")  # saved within a second of each other
    data = ckpt_json(capsys, "gc", store.root, "--keep-every-seconds", "3600", "-n")
    assert data["versions"] == [2, 3, 4]  # 1: the first of the hour; 5: the latest
    assert data["kept"]["1"] == ["every 3600 s"]
    assert data["rules"]["every_seconds"] == 3600
    data = ckpt_json(capsys, "gc", store.root, "--keep-every-seconds", "0.000001", "-n")
    assert data["versions"] == []  # every version is a microsecond after the previous one
    code, _, err = ckpt_main(capsys, "gc", store.root, "--keep-without-metrics", "-n")
    assert code == 2
    assert_one_line_error(err, "--keep-without-metrics needs --keep-best")
    r = ckpt_run("gc", store.root, "--keep-every-seconds", "-5")
    assert r.returncode == 2 and "positive number of seconds" in r.stderr

    mixed = ckpt.Store(tmp_path / "m", durable=False)
    for i, loss in enumerate([0.5, None, 0.2, None, 0.9]):
        mixed.save({"w": np.full(10, i)}, metrics=None if loss is None else {"loss": loss})
    args = ("gc", mixed.root, "--keep-best", "1", "--metric", "loss", "--mode", "min", "-n")
    assert ckpt_json(capsys, *args)["versions"] == [1, 2, 4]
    data = ckpt_json(capsys, *args, "--keep-without-metrics")
    assert data["versions"] == [1] and data["kept"]["2"] == data["kept"]["4"] == ["no metric"]
    assert data["rules"]["without_metrics"] is True


def test_gc_without_rules_sweeps_unreferenced_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = plain_store(tmp_path / "s")
    code, out, _ = ckpt_main(capsys, "gc", store.root)
    assert code == 0 and out.strip() == "nothing to delete"
    store.delete(2)
    store.delete(3)
    referenced = {c for v in store.versions() for c in store.chunk_map(v.id)}
    garbage = objects(store) - referenced
    sizes = dict(_core.list_objects(store.root))
    data = ckpt_json(capsys, "gc", store.root, "--dry-run")
    assert data["versions"] == [] and data["unreferenced_chunks"] == len(garbage) == 2
    assert data["unreferenced_bytes"] == sum(sizes[c] for c in garbage)
    assert objects(store) - referenced == garbage
    code, out, _ = ckpt_main(capsys, "gc", store.root, "--yes")
    assert code == 0 and out.startswith("deleted 2 unreferenced chunks")
    assert objects(store) == referenced
    assert ids(store) == [1, 4, 5]


def _run_on_a_terminal(args: list[str], answer: bytes) -> tuple[int, str, str]:
    """Runs ckpt with stdin and stderr on a pty, answering the first question."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt.cli", *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "COLUMNS": "80"},
    )
    os.close(slave)
    seen = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(master, answer)
                answered = True
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read().decode()
    return proc.wait(), out, seen.decode(errors="replace")


@pytest.mark.parametrize(("answer", "deleted"), [(b"n\n", False), (b"y\n", True)])
def test_gc_asks_on_a_terminal(tmp_path: Path, answer: bytes, deleted: bool) -> None:
    store = plain_store(tmp_path / "s")
    code, out, tty = _run_on_a_terminal(["gc", store.root, "--keep-last", "3"], answer)
    assert "delete them? [y/N]" in tty
    assert out.startswith("would delete 2 versions (1, 2)")
    if deleted:
        assert code == 0 and "deleted 2 versions (1, 2)" in out and ids(store) == [3, 4, 5]
    else:
        assert code == 1 and "nothing deleted" in out and ids(store) == [1, 2, 3, 4, 5]


# -------------------------------------------------------------------- pins
def test_pin_and_unpin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = plain_store(tmp_path / "s")
    code, out, _ = ckpt_main(capsys, "pin", store.root, "step=20")
    assert code == 0 and out.strip() == "version 3 is now pinned" and store.pinned() == {3}
    assert ckpt_json(capsys, "pin", store.root, "3") == {
        "id": 3,
        "step": 20,
        "pinned": True,
        "changed": False,
    }
    assert ckpt_json(capsys, "pin", store.root, "best:loss:min")["id"] == 4
    assert store.pinned() == {3, 4}
    code, out, _ = ckpt_main(capsys, "unpin", store.root, "3")
    assert code == 0 and "no longer pinned" in out and store.pinned() == {4}
    assert ckpt_json(capsys, "unpin", store.root, "3")["changed"] is False
    data = ckpt_json(capsys, "gc", store.root, "--keep-last", "1", "-y")
    assert 4 not in data["versions"] and ids(store) == [4, 5]
    code, _, err = ckpt_main(capsys, "pin", store.root, "1")
    assert code == 1
    assert_one_line_error(err, "version 1 is not in")


# ------------------------------------------------------------------ verify
def _damage(store: ckpt.Store, version: int) -> str:
    """Flips the last byte of the version's largest chunk; returns its id."""
    cid = max(store.manifest(version)["chunks"], key=lambda c: c[1])[0]
    path = Path(store.root, "objects", cid[:2], cid[2:])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))
    return str(cid)


def test_verify_ok_and_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = plain_store(tmp_path / "s", n=3)
    r = ckpt_run("verify", store.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "all 3 versions OK"
    assert r.stdout.count(" OK ") == 3
    cid = _damage(store, 2)
    r = ckpt_run("verify", store.root)
    assert r.returncode == 1 and r.stderr == ""
    assert "version 2  DAMAGED" in r.stdout and cid[:16] in r.stdout and "tensors w" in r.stdout
    assert "version 1  OK" in r.stdout and "1 of 3 versions damaged" in r.stdout
    r = ckpt_run("verify", store.root, "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["ok"] is False
    assert [v["ok"] for v in data["versions"]] == [True, False, True]
    (problem,) = data["versions"][1]["problems"]
    assert problem["chunk"] == cid and problem["tensors"] == ["w"] and problem["kind"]
    assert ckpt_run("verify", store.root, "1").returncode == 0
    assert ckpt_run("verify", store.root, "step=10").returncode == 1


def test_verify_missing_chunk(tmp_path: Path) -> None:
    store = plain_store(tmp_path / "s", n=2)
    cid = max(store.manifest(2)["chunks"], key=lambda c: c[1])[0]
    Path(store.root, "objects", cid[:2], cid[2:]).unlink()
    r = ckpt_run("verify", store.root, "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert [p["chunk"] for p in data["versions"][1]["problems"]] == [cid]


# -------------------------------------------------------------------- diff
def test_diff_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ckpt.Store(tmp_path / "d", chunk_size=64 * 1024, small_threshold=16 * 1024)
    rng = np.random.default_rng(0)
    big = rng.standard_normal(50_000).astype(np.float32)  # large: chunks of its own
    w = rng.standard_normal((20, 20)).astype(np.float32)
    a = {
        "big": big,
        "w": w,
        "same_small": np.arange(10, dtype=np.int32),
        "ints": np.arange(6, dtype=np.int64),
        "gone": np.ones(3),
        "reshaped": np.zeros((2, 3), np.float32),
        "zeros": np.zeros(4, np.float32),
    }
    w2 = w.copy()
    w2[3, 4] += 0.5
    w2[0, 0] -= 2.0
    ints2 = np.array([0, 1, 7, 3, 9, 5], np.int64)
    b = {
        "big": big,
        "w": w2,
        "same_small": np.arange(10, dtype=np.int32),
        "ints": ints2,
        "reshaped": np.zeros((3, 2), np.float32),
        "zeros": np.array([0, 1, 0, 0], np.float32),
        "new": np.ones((2, 2), np.float16),
    }
    store.save(a, step=1)
    store.save(b, step=2)
    data = ckpt_json(capsys, "diff", store.root, "1", "2")
    assert (data["a"], data["b"]) == (1, 2)
    assert data["added"] == [{"path": "new", "dtype": "F16", "shape": [2, 2], "nbytes": 8}]
    assert data["removed"] == [{"path": "gone", "dtype": "F64", "shape": [3], "nbytes": 24}]
    changed = {c["path"]: c for c in data["changed"]}
    assert list(changed) == ["w", "ints", "reshaped", "zeros"]
    d = np.abs(w2.astype(np.float64) - w.astype(np.float64))
    assert changed["w"]["max_abs"] == pytest.approx(d.max())
    rel = np.linalg.norm(w2.astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64))
    assert changed["w"]["rel"] == pytest.approx(rel)
    assert changed["w"]["n_diff"] == 2
    assert changed["ints"]["n_diff"] == 2 and "max_abs" not in changed["ints"]
    assert changed["reshaped"]["shape"] == [[2, 3], [3, 2]] and "n_diff" not in changed["reshaped"]
    assert changed["zeros"]["rel"] == "inf" and changed["zeros"]["max_abs"] == 1.0
    assert data["unchanged"] == 2  # big (by chunk ids) and same_small (read: packed anew)
    assert data["unchanged_without_reading"] == 1
    ma, mb = store.manifest(1), store.manifest(2)
    ids_b = {c[0] for c in mb["chunks"]}
    shared = [c for c in ma["chunks"] if c[0] in ids_b]
    assert data["shared_chunks"] == len(shared) >= 4
    assert data["shared_stored_bytes"] == sum(c[2] for c in shared)
    code, out, _ = ckpt_main(capsys, "diff", store.root, "1", "latest")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "version 1 (step 1) -> version 2 (step 2)"
    assert "unchanged  2 (1 by chunk ids, without reading)" in out
    row = next(line for line in lines if line.startswith("~  w "))
    assert "2" in row.split()[-1]
    assert any(line.startswith("+  new") for line in lines)
    assert any(line.startswith("-  gone") for line in lines)
    assert all(len(line) <= 80 for line in lines)


def test_diff_of_a_version_with_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = managed_store(tmp_path / "run")
    data = ckpt_json(capsys, "diff", store.root, "best", "best")
    assert data["changed"] == [] and data["added"] == [] and data["removed"] == []
    assert data["unchanged"] == data["unchanged_without_reading"] == 4
    data = ckpt_json(capsys, "diff", store.root, "1", "latest")
    assert [c["path"] for c in data["changed"]] == ["model/w", "opt/0/0"]


# -------------------------------------------------------------------- plot
def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    store = managed_store(tmp_path / "run")
    out = tmp_path / "curve.png"
    code, text, err = ckpt_main(capsys, "plot", store.root, "--out", out)
    assert code == 0, err
    assert text.strip() == (
        f"wrote {out}: val_loss over {len(LOSSES) - 1} steps ({len(LOSSES) - 1} versions kept),"
        " best v4, early stop at step 50"
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 450)
    info = ckpt_json(capsys, "plot", store.root, "--metric", "acc", "--mode", "max", "--out", out)
    assert info == {
        "out": str(out),
        "metric": "acc",
        "mode": "max",
        "points": 6,
        "versions": 6,
        "best": 4,
        "stopped_step": 50,
        "stop_reason": info["stop_reason"],
    }
    assert "did not improve" in info["stop_reason"]


def test_plot_without_matplotlib_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = managed_store(tmp_path / "run")
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = ckpt_main(capsys, "plot", store.root, "--out", tmp_path / "c.png")
    assert code == 1 and out == ""
    assert_one_line_error(err, "needs matplotlib", "pip install 'ckpt-store[plot]'")
    assert not (tmp_path / "c.png").exists()


def test_plot_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = plain_store(tmp_path / "s", n=2)
    code, _, err = ckpt_main(capsys, "plot", store.root, "--out", tmp_path / "c.png")
    assert code == 2
    assert_one_line_error(err, "--metric")
    code, _, err = ckpt_main(
        capsys, "plot", store.root, "--metric", "bleu", "--mode", "max", "--out", tmp_path / "c.png"
    )
    assert code == 1
    assert_one_line_error(err, "no version", "'bleu'")
    code, _, err = ckpt_main(
        capsys, "plot", store.root, "--metric", "loss", "--out", tmp_path / "c.pdf"
    )
    assert code == 2
    assert_one_line_error(err, "PNG")
