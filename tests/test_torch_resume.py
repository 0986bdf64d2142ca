"""A real PyTorch run killed at a random epoch, then resumed, is bit-identical to the whole run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

CHILD = Path(__file__).with_name("torch_resume_child.py")


def run(root: Path, log: Path, die_in: int | None = None) -> int:
    cmd = [sys.executable, str(CHILD), str(root), str(log)]
    if die_in is not None:
        cmd.append(str(die_in))
    return subprocess.run(cmd, timeout=300, check=False).returncode


def history(log: Path) -> tuple[dict[int, str], str | None]:
    """Loss per epoch (the last line written for it) and the final weights' hash."""
    losses: dict[int, str] = {}
    final = None
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if "final" in rec:
            final = rec["final"]
        else:
            losses[rec["epoch"]] = rec["loss"]
    return losses, final


def test_killed_at_a_random_epoch_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    assert run(tmp_path / "ref", tmp_path / "ref.jsonl") == 0
    expected = history(tmp_path / "ref.jsonl")
    assert len(expected[0]) == 8 and expected[1] is not None
    rng = random.Random(7)
    for case, die_in in enumerate([0, rng.randrange(1, 7), 7]):
        root, log = tmp_path / f"run{case}", tmp_path / f"run{case}.jsonl"
        assert run(root, log, die_in) == -signal.SIGKILL
        before, final = history(log) if log.exists() else ({}, None)
        assert final is None and len(before) == die_in  # it really died in that epoch
        assert run(root, log) == 0
        assert history(log) == expected, f"killed in epoch {die_in}"
