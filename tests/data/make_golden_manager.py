"""Writes the golden store of a CheckpointManager run: ``tests/data/golden-manager-v1/``.

Made once, by the code of main as of 2026-12-07 (28e470f), before the
training-loop layer was reworked (issue 15), and committed; never regenerate
it: ``tests/test_golden_manager.py`` checks that a store written by that code
keeps loading bit-exact, and that the reworked manager resumes from it (its
trainer state records one early stopping as a dict, monitor ``acc`` in mode
``max``, and a ``Keep(last=2, best=1)`` policy).

Run by hand, from the repository root::

    . .venv/bin/activate && python tests/data/make_golden_manager.py

The values come from ``make_golden``'s integer generators, so the expected
trees are recomputed exactly by :func:`run_trees`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_golden import fixed16, small_ints  # noqa: E402

GOLDEN = HERE / "golden-manager-v1"
#: the accuracy of each epoch: rises to epoch 2, then two epochs without improvement
ACC = (0.5, 0.625, 0.75, 0.6875, 0.71875)
PATIENCE = 2


def run_trees() -> list[dict[str, Any]]:
    """The state saved at each epoch (epoch i is ``run_trees()[i]``)."""
    embed = fixed16(1, (40, 16), 0.25)  # unchanged: shared by every version
    return [
        {
            "model": {"embed": embed, "w": fixed16(100 + i, (16, 16), 0.5)},
            "optimizer": {"m": fixed16(200 + i, (16, 16), 1e-3), "step": np.int64(i)},
            "rng": small_ints(300 + i, (4,), 1 << 32, np.uint32),
            "epoch": i,
        }
        for i in range(len(ACC))
    ]


def make(out: Path = GOLDEN) -> None:
    import ckpt

    if out.exists():
        shutil.rmtree(out)
    with ckpt.CheckpointManager(
        str(out),
        monitor="acc",
        mode="max",
        early_stopping=ckpt.EarlyStopping(monitor="acc", mode="max", patience=PATIENCE),
        keep=ckpt.Keep(last=2, best=1),
        chunk_size=64 * 1024,
        small_threshold=16 * 1024,
        threads=1,
    ) as mgr:
        for epoch, (tree, acc) in enumerate(zip(run_trees(), ACC, strict=True)):
            if mgr.save(epoch, tree, metrics={"acc": acc, "loss": 1 - acc}, epoch=epoch):
                break
    for name in ("tmp", "cache"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "lock").unlink(missing_ok=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")
    assert total < 100 * 1024, total


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
