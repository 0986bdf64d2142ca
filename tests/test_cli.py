"""The ``ckpt`` command: help, ls, show, best, du, VERSION forms and error reporting.

Helpers shared by the other ``test_cli_*`` modules live here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt
import ckpt.cli.listing
from ckpt.cli import main
from ckpt.cli.errors import describe
from ckpt.cli.output import fmt_bytes

COMMANDS = (
    "ls",
    "show",
    "restore",
    "best",
    "verify",
    "diff",
    "du",
    "gc",
    "pin",
    "unpin",
    "export",
    "import",
    "plot",
)


# ------------------------------------------------------------------ helpers
def ckpt_run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ckpt.cli ARGS`` in a real subprocess (stdin closed, 80 columns)."""
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", "ckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def ckpt_main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``main(ARGS)`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def ckpt_json(capsys: pytest.CaptureFixture[str], *args: object) -> Any:
    code, out, err = ckpt_main(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("ckpt: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err


def state(step: int, n: int = 64) -> dict[str, Any]:
    """A small training state: a changing matrix, a frozen embedding, optimizer scalars."""
    rng = np.random.default_rng(step)
    return {
        "model": {
            "w": rng.standard_normal((n, n)).astype(np.float32),
            "b": np.zeros(n, np.float32),
            "emb": np.arange(32 * 1024, dtype=np.float32),  # 128 KiB: chunks of its own
        },
        "opt": {"lr": 0.1, "count": step, 0: (np.int64(step), "adam")},
    }


LOSSES = [1.0, 0.5, 0.7, 0.4, 0.6, 0.65, 0.66]


def managed_store(root: Path, keep: ckpt.Keep | None = None) -> ckpt.Store:
    """A CheckpointManager run with early stopping (patience 2): it stops at step 50.

    Losses 1.0, 0.5, 0.7, 0.4, 0.6, 0.65 at steps 0..50: the best is step 30
    (version 4); early stopping fires at step 50 (version 6).
    """
    with ckpt.CheckpointManager(
        str(root),
        monitor="val_loss",
        mode="min",
        early_stopping=ckpt.EarlyStopping(patience=2),
        keep=keep,
        chunk_size=64 * 1024,
        small_threshold=16 * 1024,
        durable=False,
    ) as mgr:
        for i, loss in enumerate(LOSSES):
            if mgr.save(i * 10, state(i), metrics={"val_loss": loss, "acc": 1 - loss}, epoch=i):
                break
        return mgr.store


@pytest.fixture
def run_store(tmp_path: Path) -> ckpt.Store:
    return managed_store(tmp_path / "run")


@pytest.fixture
def kept_store(tmp_path: Path) -> ckpt.Store:
    """The same run with retention Keep(last=2, best=1): versions 4, 5, 6 remain."""
    return managed_store(tmp_path / "kept", ckpt.Keep(last=2, best=1))


# --------------------------------------------------------------------- help
def test_help_lists_every_command_with_examples() -> None:
    r = ckpt_run("--help")
    assert r.returncode == 0, r.stderr
    assert "examples:" in r.stdout and "exit status" in r.stdout
    for cmd in COMMANDS:
        assert cmd in r.stdout


def test_listing_commands_never_import_numpy(run_store: ckpt.Store) -> None:
    """`import ckpt`, the parser and ls/best/du stay free of numpy's 50-70 ms import.

    `ckpt ls` on 10,000 versions must answer within 0.3 s as a command
    (benches/bench_cli_ls.py); numpy was a fifth of that.
    """
    code = f"""
import contextlib, io, sys
import ckpt
assert "numpy" not in sys.modules, "import ckpt"
from ckpt.cli import main
for argv in (["ls"], ["ls", "--json"], ["best"], ["du"], ["ls", "--sort", "metric"]):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([argv[0], {run_store.root!r}, *argv[1:]]) == 0, argv
    assert "numpy" not in sys.modules, argv
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_examples(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"ckpt {cmd}" in out and "--json" in out


def test_version_and_python_dash_m_entry_points() -> None:
    r = ckpt_run("--version")
    assert r.returncode == 0 and r.stdout.strip() == ckpt.__version__
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == ckpt.__version__


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ckpt_main(capsys)
    assert code == 0 and "commands:" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ls"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["ls", "x", "--limit", "0"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------- ls
def test_ls_human_table(kept_store: ckpt.Store) -> None:
    r = ckpt_run("ls", kept_store.root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    header, rows = lines[0], lines[1:]
    for col in ("id", "step", "created", "age", "val_loss", "size", "new", "kept because"):
        assert col in header  # the one monitored metric has a column of its own
    by_id = {int(line.split()[0]): line for line in rows}
    assert sorted(by_id) == [v.id for v in kept_store.versions()] == [4, 5, 6]
    assert " 0.4 " in by_id[4] and "best" in by_id[4]
    assert "latest" in by_id[6] and " 0.65 " in by_id[6]
    assert "acc=" not in r.stdout  # only the monitored metric by default
    assert " ago" in by_id[5]
    v5 = kept_store.versions()[1]
    assert fmt_bytes(v5.raw_bytes) in by_id[5]
    assert fmt_bytes(v5.new_bytes) in by_id[5]


def test_ls_all_metrics_and_sort_and_limit(
    run_store: ckpt.Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = ckpt_main(capsys, "ls", run_store.root, "--all-metrics")
    assert code == 0 and "acc=0.6" in out and "val_loss=0.4" in out
    data = ckpt_json(capsys, "ls", run_store.root, "--sort", "metric", "--limit", "2")
    assert [v["id"] for v in data["versions"]] == [4, 2]  # val_loss 0.4, 0.5
    data = ckpt_json(capsys, "ls", run_store.root, "--limit", "2")
    assert [v["id"] for v in data["versions"]] == [5, 6]  # the newest two
    code, _, err = ckpt_main(capsys, "ls", run_store.root, "--sort", "metric", "--metric", "acc")
    assert code == 2  # acc is not the recorded monitor: its mode is not guessed
    assert_one_line_error(err, "'acc'", "--mode min or --mode max")
    data = ckpt_json(
        capsys, "ls", run_store.root, "--sort", "metric", "--metric", "acc", "--mode", "min"
    )
    assert data["metric"] == "acc" and data["mode"] == "min"
    assert [v["id"] for v in data["versions"]][:2] == [1, 3]
    data = ckpt_json(
        capsys, "ls", run_store.root, "--sort", "metric", "--metric", "acc", "--mode", "max"
    )
    assert [v["id"] for v in data["versions"]][:1] == [4]
    # the best marker stays the recorded monitor's (what the store protects)
    assert [v["id"] for v in data["versions"] if v["best"]] == [4]
    assert data["best_metric"] == "val_loss"


def test_ls_json_matches_the_store(
    kept_store: ckpt.Store, capsys: pytest.CaptureFixture[str]
) -> None:
    kept_store.pin(5)
    data = ckpt_json(capsys, "ls", kept_store.root)
    versions = kept_store.versions()
    why = kept_store.explain()
    best = kept_store.best("val_loss", "min")
    assert data["count"] == len(versions) and data["metric"] == "val_loss"
    assert [v["id"] for v in data["versions"]] == [v.id for v in versions]
    for got, v in zip(data["versions"], versions, strict=True):
        assert got["step"] == v.step and got["epoch"] == v.epoch
        assert got["metrics"] == dict(v.metrics)
        assert got["raw_bytes"] == v.raw_bytes and got["new_bytes"] == v.new_bytes
        assert got["kept_because"] == list(why[v.id])
        assert got["latest"] == (v.id == versions[-1].id)
        assert got["best"] == (best is not None and v.id == best.id)
        assert got["pinned"] == (v.id == 5)
        assert got["created"].endswith("Z") and got["age_seconds"] >= 0
    assert "pinned" in data["versions"][1]["kept_because"]


@pytest.mark.parametrize(
    "keep",
    [
        None,
        ckpt.Keep(last=2),
        ckpt.Keep(best=2, every_n_steps=20),
        ckpt.Keep(last=1, max_bytes=1),
    ],
)
def test_ls_kept_because_is_store_explain(
    tmp_path: Path, keep: ckpt.Keep | None, capsys: pytest.CaptureFixture[str]
) -> None:
    store = managed_store(tmp_path / "s")
    # record another policy in a new latest version, as a manager configured so would
    latest = store.latest()
    assert latest is not None
    trainer = dict(latest.trainer)
    trainer["manager"] = {**trainer["manager"], "keep": keep.to_dict() if keep else None}
    store.save(state(9), step=90, metrics={"val_loss": 0.3}, trainer=trainer)
    store.pin(2)
    data = ckpt_json(capsys, "ls", store.root)
    assert {v["id"]: tuple(v["kept_because"]) for v in data["versions"]} == store.explain()


def test_ls_without_recorded_monitor_marks_best_by_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ckpt.Store(tmp_path / "plain", durable=False)
    for i, acc in enumerate([0.2, 0.9, 0.5]):
        store.save({"w": np.full(4, i, np.float32)}, step=i, metrics={"acc": acc, "loss": 1 - acc})
    data = ckpt_json(capsys, "ls", store.root)
    assert data["metric"] is None and not any(v["best"] for v in data["versions"])
    assert [v["kept_because"] for v in data["versions"]] == [
        ["no count rule"],
        ["no count rule"],
        ["latest"],
    ]
    data = ckpt_json(capsys, "ls", store.root, "--metric", "acc", "--mode", "max")
    assert [v["id"] for v in data["versions"] if v["best"]] == [2]
    code, out, _ = ckpt_main(capsys, "ls", store.root, "--metric", "acc", "--mode", "max")
    assert code == 0
    row = next(line for line in out.splitlines() if line.split()[0] == "2")
    assert "best" in row and " 0.9 " in row and "acc" in out.splitlines()[0].split()


def test_ls_fits_80_columns_with_long_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    store = ckpt.Store(tmp_path / "wide", durable=False)
    metrics = {f"validation/very_long_metric_name_{i}": i / 7 for i in range(6)}
    for i in range(3):
        store.save(
            {"w": np.ones(10**5, np.float64) * i}, step=10**9 + i, epoch=10**6, metrics=metrics
        )
    long_metric = ["--metric", "validation/very_long_metric_name_3", "--mode", "max"]
    for extra in ([], ["--all-metrics"], long_metric):
        code, out, _ = ckpt_main(capsys, "ls", store.root, *extra)
        assert code == 0
        assert all(len(line) <= 80 for line in out.splitlines()), out
        assert len(out.splitlines()) == 4


LONG_METRIC = "validation/" + "very_long_metric_name_" * 5 + "loss"
LONG_LEAF = "block_with_a_long_name_" * 5 + "weight"
LONG_TENSOR = f"encoder/{LONG_LEAF}"
LONG_NOTE = "a note of many words " * 12 + "END"


def _wide_store(root: Path) -> ckpt.Store:
    store = ckpt.Store(root, durable=False)
    for i in range(2):
        store.save(
            {"encoder": {LONG_LEAF: np.ones(16, np.float32) * i}},
            step=10**9 + i,
            metrics={LONG_METRIC: 0.125 + i, "acc": 0.5},
            meta={"note": LONG_NOTE},
        )
    return store


def _piped(*args: object, columns: str | None = None) -> subprocess.CompletedProcess[str]:
    """ckpt with stdout a pipe and ``COLUMNS`` unset (or set to ``columns``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-m", "ckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_piped_output_is_never_cut(tmp_path: Path) -> None:
    store = _wide_store(tmp_path / "wide")
    r = _piped("ls", store.root)  # no monitor: every metric, in one flexible column
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert len(rows) == 2 and "metrics" in header.split()
    assert f"{LONG_METRIC}=1.125 acc=0.5" in rows[1]
    assert rows[1].endswith("latest") and len(rows[1]) > 150
    r = _piped("show", store.root, "latest")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split() == ["metrics", f"{LONG_METRIC}=1.125", "acc=0.5"] for line in lines)
    note = next(line for line in lines if line.lstrip().startswith("meta "))
    assert note.endswith(f'"note": "{LONG_NOTE}"}}'), note  # the whole value, on one line
    row = next(line for line in lines if line.startswith("encoder/"))
    assert row.split()[:3] == [LONG_TENSOR, "F32", "16"]
    # an explicit COLUMNS is still honoured in a pipe
    r = _piped("ls", store.root, columns="80")
    assert r.returncode == 0 and LONG_METRIC not in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())


def test_a_terminal_gets_tables_that_fit_it(tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    store = _wide_store(tmp_path / "wide")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 70, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt.cli", "ls", store.root],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None and proc.stderr.read() == b""
    proc.stderr.close()
    lines = seen.decode().replace("\r\n", "\n").splitlines()
    assert len(lines) == 3 and LONG_METRIC not in seen.decode()
    assert all(len(line) <= 70 for line in lines), lines
    assert max(len(line) for line in lines) > 40  # fitted to 70, not to a fallback of 40


def test_ls_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ckpt.Store(tmp_path / "empty").create()
    code, out, _ = ckpt_main(capsys, "ls", store.root)
    assert code == 0 and "no versions" in out
    assert ckpt_json(capsys, "ls", store.root)["versions"] == []


# --------------------------------------------------------------------- show
def test_show_json_tensors_and_trainer_state(
    run_store: ckpt.Store, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ckpt_json(capsys, "show", run_store.root, "latest")
    m = run_store.manifest(6)
    assert data["id"] == 6 and data["step"] == 50 and data["latest"] and not data["best"]
    assert data["metrics"] == {"val_loss": 0.65, "acc": 1 - 0.65}
    es = data["early_stopping"]
    assert es == m["trainer"]["early_stopping"]
    assert es["stopped_step"] == 50 and es["best_step"] == 30 and es["best"] == 0.4
    chunks = m["chunks"]
    assert [t["path"] for t in data["tensors"]] == [t["path"] for t in m["tensors"]]
    for got, t in zip(data["tensors"], m["tensors"], strict=True):
        share = sum(ln / chunks[ci][1] * chunks[ci][2] for ci, _, ln in t["spans"])
        assert got["stored_bytes"] == round(share)
        assert got["chunks"] == len({ci for ci, _, _ in t["spans"]})
        assert (got["dtype"], got["shape"], got["nbytes"]) == (t["dtype"], t["shape"], t["nbytes"])
    assert data["n_chunks"] == len(chunks)
    assert data["stored_bytes"] == sum(c[2] for c in chunks)
    emb = next(t for t in data["tensors"] if t["path"] == "model/emb")
    assert emb["chunks"] == 2  # 128 KiB in chunks of 64 KiB


def test_show_human_and_tensor_glob(
    run_store: ckpt.Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # fitted like a terminal of 80 columns
    code, out, _ = ckpt_main(capsys, "show", run_store.root, "best", "--tensors", "model/*")
    assert code == 0
    assert out.startswith("version 4 (best by val_loss (min))")
    assert "early stopping (val_loss, min)" in out and "stopped      no" in out
    assert "tensors (3 of 4)" in out
    assert "model/w" in out and "model/emb" in out and "F32" in out and "64x64" in out
    assert "opt/0/0" not in out
    code, out, _ = ckpt_main(capsys, "show", run_store.root, "latest")
    assert "at step 50: val_loss did not improve" in out
    assert "opt/0/0" in out and "I64" in out and "()" in out
    assert all(len(line) <= 80 for line in out.splitlines())


# --------------------------------------------------------------------- best
def test_best(run_store: ckpt.Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ckpt_main(capsys, "best", run_store.root)
    assert code == 0 and out.strip() == "version 4  step 30  val_loss=0.4 (min)"
    data = ckpt_json(capsys, "best", run_store.root)
    assert data == {
        "id": 4,
        "step": 30,
        "epoch": 3,
        "created": data["created"],
        "metric": "val_loss",
        "mode": "min",
        "value": 0.4,
    }
    best_acc = run_store.best("acc", "max")
    assert best_acc is not None
    data = ckpt_json(capsys, "best", run_store.root, "--metric", "acc", "--mode", "max")
    assert data["id"] == best_acc.id == 4
    assert ckpt_json(capsys, "best", run_store.root, "--metric", "acc", "--mode", "min")["id"] == 1
    code, out, err = ckpt_main(capsys, "best", run_store.root, "--metric", "acc")
    assert code == 2 and out == ""
    assert_one_line_error(err, "'acc'", "recorded monitor is val_loss (min)", "--mode min")


def test_best_exits_1_without_the_metric(run_store: ckpt.Store) -> None:
    r = ckpt_run("best", run_store.root, "--metric", "bleu", "--mode", "max")
    assert r.returncode == 1 and r.stdout == ""
    assert_one_line_error(r.stderr, "no version", "'bleu'")


def test_best_without_any_monitor_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ckpt.Store(tmp_path / "p")
    store.save({"w": np.ones(2)}, metrics={"loss": 1.0})
    code, _, err = ckpt_main(capsys, "best", store.root)
    assert code == 2
    assert_one_line_error(err, "--metric")


# ------------------------------------------------------------------ VERSION
@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("3", 3),
        ("latest", 6),
        ("best", 4),
        ("step=20", 3),
        ("best:val_loss", 4),
        ("best:acc:min", 1),
        ("best:acc:max", 4),
    ],
)
def test_version_forms(
    run_store: ckpt.Store, ref: str, want: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ckpt_json(capsys, "show", run_store.root, ref)["id"] == want


def test_best_version_follows_metric_option(
    run_store: ckpt.Store, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ckpt_json(capsys, "show", run_store.root, "best", "--metric", "acc", "--mode", "max")
    assert data["id"] == 4
    data = ckpt_json(capsys, "show", run_store.root, "best", "--metric", "acc", "--mode", "min")
    assert data["id"] == 1
    code, _, err = ckpt_main(capsys, "show", run_store.root, "best", "--metric", "acc")
    assert code == 2 and "--mode min or --mode max" in err


@pytest.mark.parametrize(
    ("ref", "code", "fragment"),
    [
        ("99", 1, "version 99 is not in"),
        ("step=999", 1, "no version at step 999"),
        ("step=x", 2, "the step must be a non-negative integer"),
        ("first", 2, "unknown version reference 'first'"),
        ("-1", 2, "unknown version"),
        ("best:loss:up", 2, "best:METRIC:min|max"),
        ("best:bleu", 2, "write best:bleu:min|max"),
        ("best:bleu:max", 1, "no version of"),
    ],
)
def test_bad_versions_are_one_line_errors(
    run_store: ckpt.Store, ref: str, code: int, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got, out, err = ckpt_main(capsys, "show", run_store.root, ref)
    assert got == code and out == ""
    assert_one_line_error(err, fragment)


# ----------------------------------------------------------------------- du
def test_du_numbers(kept_store: ckpt.Store, capsys: pytest.CaptureFixture[str]) -> None:
    kept_store.delete(5)  # leaves chunks only version 5 used: unreferenced until gc
    data = ckpt_json(capsys, "du", kept_store.root)
    versions = kept_store.versions()
    unique: dict[str, tuple[int, int]] = {}
    for v in versions:
        for cid, raw, stored in kept_store.manifest(v.id)["chunks"]:
            unique[cid] = (raw, stored)
    files = {
        p.parent.name + p.name: p.stat().st_size
        for p in Path(kept_store.root, "objects").rglob("*")
        if p.is_file()
    }
    assert [v["id"] for v in data["versions"]] == [v.id for v in versions]
    assert [v["raw_bytes"] for v in data["versions"]] == [v.raw_bytes for v in versions]
    assert [v["new_bytes"] for v in data["versions"]] == [v.new_bytes for v in versions]
    assert data["total_raw_bytes"] == sum(v.raw_bytes for v in versions)
    assert data["unique_raw_bytes"] == sum(r for r, _ in unique.values())
    assert data["stored_bytes"] == sum(s for _, s in unique.values())
    assert data["on_disk_bytes"] == sum(files.values())
    garbage = {k: n for k, n in files.items() if k not in unique}
    assert data["unreferenced_chunks"] == len(garbage) > 0
    assert data["unreferenced_bytes"] == sum(garbage.values())
    assert data["dedup_ratio"] > 1  # the frozen embedding is stored once
    assert data["compression_ratio"] > 1  # arange compresses
    code, out, _ = ckpt_main(capsys, "du", kept_store.root)
    assert code == 0 and "dedup saves" in out and "compression saves" in out
    assert f"unreferenced: ckpt gc {kept_store.root} frees it" in out


# ------------------------------------------------------------------- errors
#: Every command that opens an existing store (all but import), with its other arguments.
STORE_COMMANDS = (
    ("ls",),
    ("show", "latest"),
    ("best", "--metric", "val_loss"),
    ("du",),
    ("restore", "latest", "--out", "out.npz"),
    ("restore", "latest", "--out", "out.safetensors", "--state-dict"),
    ("export", "latest", "out.safetensors"),
    ("verify",),
    ("diff", "1", "2"),
    ("plot", "--metric", "val_loss", "--out", "out.png"),
    ("gc", "--dry-run"),
    ("gc", "--keep-last", "1", "--yes"),
    ("pin", "1"),
    ("unpin", "1"),
)


def test_store_commands_cover_every_command_but_import() -> None:
    assert {c[0] for c in STORE_COMMANDS} == set(COMMANDS) - {"import"}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a directory."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("cmd", STORE_COMMANDS, ids=" ".join)
def test_a_typo_path_is_refused_and_nothing_is_created(
    tmp_path: Path, cmd: tuple[str, ...]
) -> None:
    r = ckpt_run(cmd[0], "runs/exp9", *cmd[1:], cwd=tmp_path)
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert_one_line_error(
        r.stderr, "ckpt: error: runs/exp9 is not a ckpt store (no such directory); check the path"
    )
    assert list(tmp_path.iterdir()) == []  # no store, no runs/, no output file


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("empty", "an empty directory"),
        ("file", "a file, not a directory"),
        ("other files", "no ckpt-store.json in it"),
    ],
)
@pytest.mark.parametrize("cmd", STORE_COMMANDS, ids=" ".join)
def test_a_path_that_is_not_a_store_is_refused_and_left_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cmd: tuple[str, ...],
    kind: str,
    what: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "runs" / "exp9"
    if kind == "file":
        path.parent.mkdir()
        path.write_text("not a store\n")
    else:
        path.mkdir(parents=True)
        if kind == "other files":
            (path / "notes.txt").write_text("hello\n")
    before = _snapshot(tmp_path)
    code, out, err = ckpt_main(capsys, cmd[0], "runs/exp9", *cmd[1:])
    assert code == 1 and out == ""
    assert_one_line_error(
        err, f"ckpt: error: runs/exp9 is not a ckpt store ({what}); check the path"
    )
    assert _snapshot(tmp_path) == before


def test_import_says_it_created_the_store(tmp_path: Path) -> None:
    st_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "in.safetensors"
    st_numpy.save_file({"w": np.arange(4, dtype=np.float32)}, str(src))
    r = ckpt_run("import", "runs/new", src, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "created store runs/new\n"
    assert (tmp_path / "runs" / "new" / "ckpt-store.json").is_file()
    r = ckpt_run("import", "runs/new", src, cwd=tmp_path)  # now it exists: nothing to say
    assert r.returncode == 0 and r.stderr == ""


def test_import_refuses_a_plain_file_as_the_store(tmp_path: Path) -> None:
    st_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "in.safetensors"
    st_numpy.save_file({"w": np.arange(4, dtype=np.float32)}, str(src))
    (tmp_path / "notes").write_text("hello\n")
    before = _snapshot(tmp_path)
    r = ckpt_run("import", "notes", src, cwd=tmp_path)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "notes is a file, not a store")
    assert _snapshot(tmp_path) == before


def test_newer_store_format(run_store: ckpt.Store) -> None:
    marker = Path(run_store.root, "ckpt-store.json")
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "version": 7}))
    r = ckpt_run("ls", run_store.root)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "newer", "upgrade ckpt-store")


def test_newer_manifest_format(run_store: ckpt.Store) -> None:
    path = Path(run_store.root, "versions", "000000000003.json")
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "version": ckpt.index.MANIFEST_VERSION + 1}))
    r = ckpt_run("show", run_store.root, "3")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "version 3", "newer", "upgrade ckpt-store")


def test_damaged_manifest(run_store: ckpt.Store) -> None:
    Path(run_store.root, "versions", "000000000002.json").write_text("{not json")
    r = ckpt_run("show", run_store.root, "2")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "version 2", "not a JSON manifest")


def test_damaged_chunk(run_store: ckpt.Store, tmp_path: Path) -> None:
    m = run_store.manifest(6)
    cid = next(c[0] for c in m["chunks"] if c[1] > 1024)
    obj = Path(run_store.root, "objects", cid[:2], cid[2:])
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    r = ckpt_run("restore", run_store.root, "6", "--out", tmp_path / "x.npz")
    assert r.returncode == 1
    assert_one_line_error(
        r.stderr, "store is damaged", "version 6", cid[:16], f"; run ckpt verify {run_store.root}"
    )
    assert not (tmp_path / "x.npz").exists()
    assert not list(tmp_path.glob(".x.npz*"))


def test_hints_name_the_store_as_typed_and_shell_quoted(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "my runs" / "exp1", durable=False)
    store.save({"w": np.arange(64 * 1024, dtype=np.float32)}, step=1)
    typed = "my runs/exp1"
    r = ckpt_run("show", typed, "9", cwd=tmp_path)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "version 9", "(ckpt ls 'my runs/exp1' lists the versions)")
    cid = store.manifest(1)["chunks"][0][0]
    obj = Path(store.root, "objects", cid[:2], cid[2:])
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    r = ckpt_run("restore", typed, "latest", "--out", "x.npz", cwd=tmp_path)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "store is damaged", "; run ckpt verify 'my runs/exp1'")
    obj.unlink()
    r = ckpt_run("restore", typed, "latest", "--out", "x.npz", cwd=tmp_path)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "a chunk is missing", "; run ckpt verify 'my runs/exp1'")
    Path(store.root, "objects", "ab", "c" * 62).parent.mkdir(exist_ok=True)
    Path(store.root, "objects", "ab", "c" * 62).write_bytes(b"debris")
    r = ckpt_run("du", typed, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "unreferenced: ckpt gc 'my runs/exp1' frees it" in r.stdout
    assert "STORE" not in r.stdout


def test_permission_denied_real(run_store: ckpt.Store) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads anything")
    versions = Path(run_store.root, "versions")
    versions.chmod(0)
    try:
        r = ckpt_run("ls", run_store.root)
    finally:
        versions.chmod(0o755)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "permission denied", "versions")


def test_permission_denied_simulated(
    run_store: ckpt.Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str) -> ckpt.Store:
        raise PermissionError(13, "Permission denied", os.path.join(path, "versions"))

    monkeypatch.setattr(ckpt.cli.listing, "open_store", refuse)
    code, out, err = ckpt_main(capsys, "ls", run_store.root)
    assert code == 1 and out == ""
    assert_one_line_error(err, "permission denied", os.path.join(run_store.root, "versions"))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = ckpt_run("ls", tmp_path / "nope", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("ckpt: error: ")
    r = ckpt_run("--debug", "ls", tmp_path / "nope")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_unexpected_errors_are_one_line(
    run_store: ckpt.Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(path: str) -> ckpt.Store:
        raise RuntimeError("something odd\nover two lines")

    monkeypatch.setattr(ckpt.cli.listing, "open_store", boom)
    code, _, err = ckpt_main(capsys, "ls", run_store.root)
    assert code == 1
    assert_one_line_error(err, "unexpected RuntimeError: something odd over two lines", "--debug")


def test_describe_maps_library_exceptions() -> None:
    assert describe(KeyboardInterrupt()) == ("interrupted", 130)
    assert describe(ckpt.StoreLockedError("locked by pid 3"))[0] == "locked by pid 3"
    assert describe(ckpt.VersionNotFoundError("version 3 is not in s"))[0].startswith(
        "version 3 is not in s"
    )
    msg, code = describe(ckpt.MissingObjectError("chunk ab missing", "ab"))
    assert code == 1 and "a chunk is missing" in msg
    assert describe(FileNotFoundError(2, "No such file or directory", "x.st")) == (
        "No such file or directory: x.st",
        1,
    )
    assert describe(PermissionError(13, "Permission denied", "/s"))[0] == "permission denied: /s"
    assert describe(ValueError("bad"))[0] == "bad"


def test_broken_pipe_is_quiet(kept_store: ckpt.Store) -> None:
    code = (
        f"import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'ckpt.cli', 'ls', {kept_store.root!r},"
        f" '--json'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        f"p.stdout.close()\n"
        f"err = p.stderr.read()\n"
        f"sys.exit(p.wait() if err == b'' else 99)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r


# ------------------------------------------------------------------- output
def test_table_fits_by_truncating_flex_columns_then_dropping() -> None:
    from ckpt.cli.output import Column, Table

    t = Table(
        [
            Column("id", ">"),
            Column("path", flex=True, min_width=10, cut="middle"),
            Column("note", flex=True, min_width=6),
            Column("extra", drop=1),
        ]
    )
    t.add(1, "encoder/layers/10/attention/q_proj/weight", "a long free-text note here", "x" * 10)
    wide = t.render(200).splitlines()
    assert wide[1].split() == [
        "1",
        "encoder/layers/10/attention/q_proj/weight",
        "a",
        "long",
        "free-text",
        "note",
        "here",
        "x" * 10,
    ]
    for width in (60, 40, 30):
        lines = t.render(width).splitlines()
        assert all(len(line) <= width for line in lines), (width, lines)
    assert "extra" in t.render(40).splitlines()[0]
    narrow = t.render(30).splitlines()
    assert "extra" not in narrow[0]  # dropped once flex columns were at their minimum
    assert narrow[1].split()[1].startswith("encod") and narrow[1].split()[1].endswith("ight")


def test_number_and_time_formats() -> None:
    from datetime import datetime, timedelta, timezone

    from ckpt.cli.output import fmt_ago, fmt_bytes, fmt_num

    assert [fmt_bytes(n) for n in (0, 512, 1536, 10 * 1024**2 + 1, 300 * 1024**3)] == [
        "0 B",
        "512 B",
        "1.50 KiB",
        "10.0 MiB",
        "300 GiB",
    ]
    assert all(len(fmt_bytes(n)) <= 8 for n in range(0, 2**50, 2**50 // 997))
    assert (fmt_num(None), fmt_num(3), fmt_num(0.123456), fmt_num(float("nan"))) == (
        "-",
        "3",
        "0.1235",
        "nan",
    )
    now = datetime(2025, 1, 10, tzinfo=timezone.utc)
    ago = [fmt_ago(now - timedelta(seconds=s), now) for s in (5, 180, 7200, 5 * 86400, 800 * 86400)]
    assert ago == ["5s ago", "3m ago", "2h ago", "5d ago", "2y ago"]
    assert fmt_ago(now + timedelta(minutes=3), now) == "in 3m"


class _FakeTTY:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_and_spinner_draw_only_on_a_terminal() -> None:
    import io
    import time

    from ckpt.cli.output import Progress, Spinner

    tty = _FakeTTY()
    with Progress(4096, "restoring", stream=tty) as bar:  # type: ignore[arg-type]
        bar.advance(1024)
        bar.advance(3072)
    assert "restoring [" in tty.text and "100% 4.00 KiB/4.00 KiB" in tty.text
    assert tty.text.endswith("\n")
    pipe = io.StringIO()
    with Progress(10, "x", stream=pipe) as bar:
        bar.advance(10)
    assert pipe.getvalue() == ""
    tty = _FakeTTY()
    with Spinner("verifying", stream=tty):  # type: ignore[arg-type]
        time.sleep(0.35)
    assert "verifying |" in tty.text and tty.text.endswith("\r\x1b[K")
