"""Writes the golden store of format 1: ``tests/data/golden-v1/``.

Run once by hand, from the repository root, and commit the output::

    . .venv/bin/activate && python tests/data/make_golden.py

Tests never run this script: ``tests/test_golden.py`` opens the committed
store (a copy of it) and compares its contents with :func:`golden_versions`,
which it imports from here. Regenerating the store gives new chunk files only
if the format changed (contents are deterministic; manifests differ in their
``created`` times and ``stats.seconds``), so do it only for a new format
version, into a new directory.

Contents are generated from integer arithmetic (splitmix64 over numpy
``uint64`` arrays) and exact conversions only, not from a numpy random
generator or libm, so that the expected values are the same on every
platform and numpy version.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden-v1"
CHUNK_SIZE = 64 * 1024
SMALL_THRESHOLD = 16 * 1024
PINNED = (2,)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(seed: int, n: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """``n`` pseudo-random uint64 values (splitmix64 with counter ``seed * 2**32 + i``)."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64(seed << 32) + np.uint64(1)) * _GAMMA
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def fixed16(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray[Any, Any]:
    """float32 values k / 2**16 * scale with k a random signed 16-bit integer (exact)."""
    n = int(np.prod(shape))
    k = (splitmix64(seed, n) >> np.uint64(48)).astype(np.int64) - 32768
    return (k.astype(np.float32) * np.float32(scale / 65536)).reshape(shape)


def small_ints(seed: int, shape: tuple[int, ...], bound: int, dtype: Any) -> np.ndarray[Any, Any]:
    n = int(np.prod(shape))
    return (splitmix64(seed, n) % np.uint64(bound)).astype(dtype).reshape(shape)


def golden_versions() -> list[dict[str, Any]]:
    """The three versions of the golden store: save() keyword arguments plus ``tree``."""
    embed = fixed16(1, (170, 100), 0.25)  # 68000 B of F32: 2 chunks, shared by every version

    def layers(seed: int) -> list[dict[str, Any]]:
        return [
            {"w": fixed16(seed + i, (16, 16), 0.5), "b": fixed16(seed + 10 + i, (16,), 0.01)}
            for i in range(2)
        ]

    def tree(layer_seed: int, head_seed: int, step: int) -> dict[str, Any]:
        return {
            "model": {
                "embed": embed,
                "layers": layers(layer_seed),
                "norm": fixed16(50, (64,), 2.0).astype(ml_dtypes.bfloat16),  # round to nearest even
                "head": fixed16(head_seed, (8, 16), 1.0).astype(np.float16),
            },
            "optimizer": {
                "step": np.int64(step),
                "lr": 0.001,
                "moments": (fixed16(60, (32,), 1e-3), fixed16(61, (32,), 1e-6)),
                "empty": np.zeros((0, 4), dtype=np.float32),
            },
            "rng": {0: small_ints(70, (4,), 1 << 32, np.uint32), 1: np.uint64(2**64 - 1)},
            "flags": small_ints(71, (10,), 2, np.bool_),
            "counts": small_ints(72, (3, 2), 1000, np.int64) - 500,
            "misc": {
                "name": "golden",
                "nan": float("nan"),
                "inf": float("inf"),
                "neg_zero": -0.0,
                "none": None,
                "ok": True,
                "big": -(2**70),
                "path/with~chars": np.array(1.5, dtype=np.float64),
                "z": np.complex64(1 - 2j),
            },
        }

    return [
        {
            "tree": tree(10, 20, 100),
            "step": 100,
            "epoch": 1,
            "metrics": {"loss": 1.25, "acc": 0.5},
            "meta": {"run": "golden", "config": {"lr": 0.001, "layers": 2}},
            "trainer": {},
        },
        {
            "tree": tree(30, 20, 200),  # new layers; head and everything else as in v1
            "step": 200,
            "epoch": 2,
            "metrics": {"loss": 0.75, "acc": 0.625, "grad_norm": float("inf")},
            "meta": {"run": "golden"},
            "trainer": {"best_loss": 0.75, "bad_epochs": 0},
        },
        {
            "tree": tree(30, 40, 300),  # layers as in v2, a new head
            "step": 300,
            "epoch": 3,
            "metrics": {"loss": float("nan"), "acc": 0.5},
            "meta": {"run": "golden"},
            "trainer": {"best_loss": 0.75, "bad_epochs": 1},
        },
    ]


def make(out: Path = GOLDEN) -> None:
    import ckpt

    if out.exists():
        shutil.rmtree(out)
    store = ckpt.Store(out, chunk_size=CHUNK_SIZE, small_threshold=SMALL_THRESHOLD, threads=1)
    for spec in golden_versions():
        kwargs = {k: v for k, v in spec.items() if k != "tree"}
        store.save(spec["tree"], **kwargs)
    for vid in PINNED:
        store.pin(vid)
    # Only what git can track and the format needs: no lock, tmp/ or cache/.
    for name in ("tmp", "cache"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "lock").unlink(missing_ok=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")
    assert total < 200 * 1024, total


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
