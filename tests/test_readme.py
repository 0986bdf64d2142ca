"""Every code block of README.md runs as written, on an empty store and again on its result.

The ``python`` blocks run in order in one namespace (a reader goes through
them in order: ``import ckpt`` is in the first), which holds what the
README leaves to the reader (``fresh_state``, ``train_one_epoch``,
``evaluate``, ``train_and_evaluate``); the ``sh`` blocks run each line as a
real command, with the ``ckpt`` of this interpreter. The whole README runs
twice in one directory: the second time, each loop resumes from the store
the first left (two runs of one script on one store, one after the other).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```(python|sh)\n(.*?)^```$", README.read_text(), re.M | re.S)


def stubs() -> dict[str, Any]:
    """What the README's loops leave to the user: a model, training, evaluation."""

    def train_one_epoch(state: dict[str, Any]) -> dict[str, Any]:
        return {"w": state["w"] + 1, "epoch": state["epoch"] + 1}

    def evaluate(state: dict[str, Any]) -> float:
        return 1.0 / (1.0 + float(state["w"][0]))  # improves by less and less: stops early

    def train_and_evaluate(model: Any, opt: Any, sched: Any) -> float:
        import torch

        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    return {
        "fresh_state": {"w": np.zeros(16, np.float32), "epoch": 0},
        "train_one_epoch": train_one_epoch,
        "evaluate": evaluate,
        "train_and_evaluate": train_and_evaluate,
    }


def run_readme(cwd: Path) -> None:
    namespace = {"__name__": "__readme__", **stubs()}
    for kind, code in BLOCKS:
        if kind == "python":
            if "import torch" in code:
                pytest.importorskip("torch")
            exec(compile(code, f"{README}:{kind}", "exec"), namespace)
            continue
        for line in code.splitlines():
            argv = shlex.split(line, comments=True)
            if not argv or argv[0] == "make":  # make demo / make test: the set-up itself
                continue
            assert argv[0] == "ckpt", line
            r = subprocess.run(
                [sys.executable, "-m", "ckpt.cli", *argv[1:]],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "COLUMNS": "100"},
            )
            assert r.returncode == 0, f"{line}: {r.stderr}"


def test_the_readme_has_blocks() -> None:
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("python") >= 3 and "sh" in kinds


def test_every_readme_block_runs_on_an_empty_store_and_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_readme(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    import ckpt

    first = [v.id for v in ckpt.Store("runs/exp1", create=False).versions()]
    for out in ("model.safetensors", "weights.safetensors"):
        (tmp_path / out).unlink()  # ckpt restore never overwrites without --force
    run_readme(tmp_path)  # resumes: the first run had stopped early, so nothing new
    assert [v.id for v in ckpt.Store("runs/exp1", create=False).versions()] == first
