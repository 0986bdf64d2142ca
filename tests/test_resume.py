"""Exact resume: a run SIGKILLed anywhere, then resumed, ends as the uninterrupted run.

Each case runs tests/resume_child.py in a real subprocess, kills it at a kill
point (inside a save: before/after the chunk writes, before/after the manifest
commit, inside retention; or between saves; or at a random moment), then
resumes it until it finishes, and compares what it decided with the run that
was never interrupted.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crashcheck import TOP_LEVEL

import ckpt

CHILD = Path(__file__).with_name("resume_child.py")


def run_child(root: Path, out: Path, kill: str = "", timeout: float = 120) -> int:
    return subprocess.run(
        [sys.executable, str(CHILD), str(root), str(out), kill], timeout=timeout, check=False
    ).returncode


def finish(root: Path, out: Path) -> dict[str, object]:
    """Resumes until the run completes; returns its result."""
    for _ in range(5):
        if run_child(root, out) == 0:
            return json.loads(out.read_text())
    raise AssertionError("the resumed run did not finish")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("reference")
    assert run_child(d / "store", d / "out.json") == 0
    result = json.loads((d / "out.json").read_text())
    assert result["stop_step"] is not None and result["verify_ok"]
    return result


def check_invariants(root: Path) -> None:
    """After any kill: latest loads bit-exact and verifies; debris only in tmp/."""
    store = ckpt.Store(root)
    if not root.exists():  # killed before its first save: a store is made by its first write
        assert store.versions() == [] and not store.exists
        return
    latest = store.latest()
    if latest is not None:
        store.load(latest)
        assert store.verify(latest)[0].ok
    for entry in Path(root).iterdir():
        assert entry.name in TOP_LEVEL


PHASES = ["before_chunks", "after_chunks", "before_commit", "after_commit", "in_retention"]


@pytest.mark.parametrize("write", [1, 2, 5])
@pytest.mark.parametrize("phase", PHASES)
def test_killed_inside_a_save_resumes_exactly(
    tmp_path: Path, reference: dict[str, object], phase: str, write: int
) -> None:
    root, out = tmp_path / "store", tmp_path / "out.json"
    code = run_child(root, out, f"{phase}:{write}")
    if phase == "in_retention" and code == 0:
        pytest.skip("no retention deletion happened at this write")  # not every save deletes
    assert code == -signal.SIGKILL
    check_invariants(root)
    assert finish(root, out) == reference


@pytest.mark.parametrize("step", [0, 4, 12, 16, 17])
def test_killed_between_saves_resumes_exactly(
    tmp_path: Path, reference: dict[str, object], step: int
) -> None:
    root, out = tmp_path / "store", tmp_path / "out.json"
    assert run_child(root, out, f"step:{step}") == -signal.SIGKILL
    check_invariants(root)
    assert finish(root, out) == reference


def test_killed_at_random_moments_resumes_exactly(
    tmp_path: Path, reference: dict[str, object]
) -> None:
    rng = random.Random(20261127)
    interrupted = 0
    for case in range(8):
        root, out = tmp_path / f"store{case}", tmp_path / f"out{case}.json"
        child = subprocess.Popen([sys.executable, str(CHILD), str(root), str(out)])
        time.sleep(rng.uniform(0.15, 0.6))  # the whole run takes about half a second
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        interrupted += not out.exists()
        check_invariants(root)
        assert finish(root, out) == reference
    assert interrupted >= 3, "the random kills should land mid-run; retune the delays"
