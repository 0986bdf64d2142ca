"""A deterministic training run under a CheckpointManager, killed on purpose.

Run as ``python resume_child.py STORE RESULT.json [KILL]`` by test_resume.py.
KILL is ``PHASE:N``: SIGKILL this process at PHASE of the N-th write of this
process (1-based), where PHASE is one of

    before_chunks   before the engine writes any chunk
    after_chunks    chunks written and fsynced, no manifest yet
    before_commit   manifest written to tmp/ and fsynced, not renamed
                    (the engine's fault point manifest.after_fsync)
    after_commit    manifest renamed into versions/, directory not fsynced
                    (manifest.after_rename)
    in_retention    retention deleted manifests, chunks not yet swept

or ``step:S`` to die right after training step S (between saves). Without
KILL the run goes to the end and writes RESULT.json with what it decided.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import numpy as np

import ckpt
from ckpt import _core


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str) -> int | None:
    """Installs the kill point; returns the step to die after, if any."""
    if not kill:
        return None
    phase, n = kill.split(":")
    if phase == "step":
        return int(n)
    target = int(n)
    engine_point = {
        "before_commit": "manifest.after_fsync",
        "after_commit": "manifest.after_rename",
    }
    if phase in engine_point:
        # The engine commits manifests; its fault points count manifests only.
        os.environ["CKPT_FAULT"] = f"{engine_point[phase]}:{target}:kill"
        return None
    count = {"writes": 0}
    real_save, real_delete = _core.save_chunks, _core.delete_objects

    def save_chunks(*args: object, **kw: object) -> object:
        count["writes"] += 1
        if count["writes"] == target and phase == "before_chunks":
            die()
        out = real_save(*args, **kw)
        if count["writes"] == target and phase == "after_chunks":
            die()
        return out

    def delete_objects(*args: object, **kw: object) -> int:
        if count["writes"] >= target and phase == "in_retention":
            die()
        return real_delete(*args, **kw)  # type: ignore[arg-type]

    _core.save_chunks = save_chunks  # type: ignore[assignment]
    ckpt.store._core.save_chunks = save_chunks  # type: ignore[attr-defined]
    ckpt.store._core.delete_objects = delete_objects  # type: ignore[attr-defined]
    return None


def fresh() -> dict[str, object]:
    rng = np.random.default_rng(1234)
    return {
        "w": rng.standard_normal(60_000).astype(np.float32),
        "bias": np.zeros(8, np.float32),
        "rng": rng.bit_generator.state,
        "seen": 0,
    }


def main() -> int:
    root, result_path = sys.argv[1], sys.argv[2]
    die_after_step = arm(sys.argv[3] if len(sys.argv) > 3 else "")
    with ckpt.CheckpointManager(
        root,
        monitor="val_loss",
        mode="min",
        early_stopping=ckpt.EarlyStopping(patience=4, min_delta=0.005),
        keep=ckpt.Keep(last=2, best=2),
        save_every=3,
        save_on_improvement=True,
        chunk_size=64 * 1024,
        small_threshold=16 * 1024,
    ) as mgr:
        state = mgr.restore_latest(default=fresh())
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        for step in range(mgr.next_step, 200):
            if mgr.should_stop:
                break
            state["w"] = state["w"] * np.float32(0.99) + rng.standard_normal(60_000).astype(
                np.float32
            ) * np.float32(0.01)
            state["bias"] = state["bias"] + np.float32(0.5)
            state["seen"] = int(state["seen"]) + 1
            val_loss = max(0.25, 1.0 - 0.06 * step) + 0.03 * float(rng.standard_normal())
            state["rng"] = rng.bit_generator.state
            stop = mgr.save(step, state, metrics={"val_loss": val_loss, "seen": state["seen"]})
            if die_after_step is not None and step == die_after_step:
                die()
            if stop:
                break
        best = mgr.best_version
        latest = mgr.store.latest()
        assert best is not None and latest is not None
        final = mgr.store.load(latest)
        result = {
            "stop_step": mgr.early_stopping.stopped_step if mgr.early_stopping else None,
            "stop_reason": mgr.stop_reason,
            "best": [best.step, dict(best.metrics)],
            "kept_steps": sorted(v.step for v in mgr.store.versions()),
            "latest_step": latest.step,
            "final_w": hashlib.sha256(final["w"].tobytes()).hexdigest(),
            "final_seen": final["seen"],
            "verify_ok": all(r.ok for r in mgr.store.verify()),
        }
    with open(result_path, "w") as f:
        json.dump(result, f, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
