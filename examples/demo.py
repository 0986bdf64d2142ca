"""ckpt demo: train a small numpy MLP under a CheckpointManager, kill it, resume it.

Run with `make demo`. A 2-layer MLP learns a generated 3-class spiral data set
with momentum SGD. Every epoch the weights, the optimizer state and the RNG
state are handed to a CheckpointManager with the epoch's metrics; early
stopping watches the validation loss and retention keeps the last 3 and the
best 2 versions. The demo kills the training process on purpose (SIGKILL in
the middle of an epoch), resumes it from the store, and shows that the
resumed run ends exactly like a run that was never interrupted. Then it lists
what was kept and why, and restores the best model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import ckpt

ROOT = Path(__file__).resolve().parent.parent / "demo-runs" / "interrupted"


def spirals(rng: np.random.Generator, n: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points per class on noisy interleaved spirals, lifted to 32 features."""
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n) + rng.normal(0, 0.25, n)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n, c))
    x = np.concatenate(xs)
    lift = rng.normal(0, 1, (2, 30))
    x = np.concatenate([x, np.tanh(x @ lift)], axis=1).astype(np.float32)
    return x, np.concatenate(ys)


def init(rng: np.random.Generator, d_in: int, hidden: int, d_out: int) -> dict[str, np.ndarray]:
    return {
        "w1": (rng.standard_normal((d_in, hidden)) * np.sqrt(2 / d_in)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.standard_normal((hidden, d_out)) * np.sqrt(1 / hidden)).astype(np.float32),
        "b2": np.zeros(d_out, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(x @ p["w1"] + p["b1"], 0)
    return h, h @ p["w2"] + p["b2"]


def loss_and_acc(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    _, logits = forward(p, x)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(1) == y).mean())


def grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    h, logits = forward(p, x)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1
    d_logits = probs / len(y)
    d_h = (d_logits @ p["w2"].T) * (h > 0)
    return {"w1": x.T @ d_h, "b1": d_h.sum(0), "w2": h.T @ d_logits, "b2": d_logits.sum(0)}


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = spirals(rng, 600)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:]


def manager(root: Path) -> ckpt.CheckpointManager:
    return ckpt.CheckpointManager(
        str(root),
        monitor="val_loss",
        mode="min",
        early_stopping=ckpt.EarlyStopping(patience=5, min_delta=1e-3),
        keep=ckpt.Keep(last=3, best=2),
    )


def train(root: Path, die_in_epoch: int | None) -> None:
    """The training process: resumes from the store if there is anything in it."""
    x_train, y_train, x_val, y_val = data()
    rng = np.random.default_rng(1)
    params = init(rng, x_train.shape[1], 256, 3)
    fresh = {
        "model": params,
        "optim": {"velocity": {k: np.zeros_like(v) for k, v in params.items()}},
        "rng": rng.bit_generator.state,
    }
    lr, momentum, batch = 0.1, 0.9, 64
    with manager(root) as mgr:
        state = mgr.restore_latest(default=fresh)
        if mgr.next_step:
            print(f"  resumed from the store at epoch {mgr.next_step}", flush=True)
        params, velocity = state["model"], state["optim"]["velocity"]
        rng.bit_generator.state = state["rng"]
        for epoch in range(mgr.next_step, 200):
            if mgr.should_stop:
                break
            perm = rng.permutation(len(y_train))
            for i in range(0, len(y_train), batch):
                if die_in_epoch == epoch and i >= len(y_train) // 2:
                    print(
                        f"  (killing the training process in the middle of epoch {epoch})",
                        flush=True,
                    )
                    os.kill(os.getpid(), signal.SIGKILL)
                idx = perm[i : i + batch]
                g = grads(params, x_train[idx], y_train[idx])
                for k in params:
                    velocity[k] = momentum * velocity[k] - lr * g[k]
                    params[k] = params[k] + velocity[k]
            val_loss, val_acc = loss_and_acc(params, x_val, y_val)
            state = {
                "model": params,
                "optim": {"velocity": velocity},
                "rng": rng.bit_generator.state,
            }
            stop = mgr.save(epoch, state, metrics={"val_loss": val_loss, "val_acc": val_acc})
            print(f"  epoch {epoch:2d}  val_loss {val_loss:.4f}  val_acc {val_acc:.3f}", flush=True)
            if stop:
                print(f"  early stopping: {mgr.stop_reason}", flush=True)
                break


def outcome(root: Path) -> dict[str, object]:
    store = ckpt.Store(root)
    best = store.best("val_loss")
    assert best is not None
    return {
        "stopped": store.latest().step,  # type: ignore[union-attr]
        "best": [best.step, best.metrics["val_loss"]],
        "kept": [v.step for v in store.versions()],
    }


def run_worker(root: Path, die_in_epoch: int | None = None) -> int:
    cmd = [sys.executable, __file__, "--worker", str(root)]
    if die_in_epoch is not None:
        cmd += ["--die-in-epoch", str(die_in_epoch)]
    return subprocess.run(cmd, check=False).returncode


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        die = int(sys.argv[4]) if len(sys.argv) > 4 else None
        train(Path(sys.argv[2]), die)
        return 0
    shutil.rmtree(ROOT.parent, ignore_errors=True)
    run, reference = ROOT, ROOT.parent / "uninterrupted"
    t0 = time.perf_counter()
    print(f"1. training a 32-256-3 MLP on spirals; checkpoints in {run}")
    code = run_worker(run, die_in_epoch=8)
    print(
        f"   the process died with signal {-code}; the store has"
        f" {len(ckpt.Store(run).versions())} versions\n"
    )
    print("2. the same command again resumes where the store left off")
    assert run_worker(run) == 0
    print("\n3. a run that is never interrupted, for comparison (quietly)")
    subprocess.run(
        [sys.executable, __file__, "--worker", str(reference)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    a, b = outcome(run), outcome(reference)
    print(f"   interrupted+resumed: {json.dumps(a)}")
    print(f"   uninterrupted:       {json.dumps(b)}")
    print("   identical" if a == b else "   DIFFERENT: resume is not exact")
    print(f"   ({time.perf_counter() - t0:.1f} s for the three runs)\n")

    store = ckpt.Store(run)
    why = store.explain()
    print("4. what the store kept, and why (ckpt ls)")
    print(f"   {'id':>3} {'epoch':>5} {'val_loss':>9} {'val_acc':>8} {'new KiB':>8}  kept because")
    for v in store.versions():
        print(
            f"   {v.id:>3} {v.step:>5} {v.metrics['val_loss']:>9.4f}"
            f" {v.metrics['val_acc']:>8.3f} {v.new_bytes / 1024:>8.0f}  {', '.join(why[v.id])}"
        )
    print(f"   stored: {store.stored_bytes() / 1024:.0f} KiB\n")

    mgr = manager(run)
    best_version = mgr.best_version
    assert best_version is not None
    restored = mgr.restore_best()
    _, _, x_val, y_val = data()
    val_loss, val_acc = loss_and_acc(restored["model"], x_val, y_val)
    recorded = best_version.metrics["val_loss"]
    print(
        f"5. best version {best_version.id} (epoch {best_version.step}):"
        f" recorded val_loss {recorded:.6f}"
    )
    print(f"   restored model gives      val_loss {val_loss:.6f}, val_acc {val_acc:.3f}")
    exact = val_loss == recorded
    print("   reproduced exactly" if exact else "   MISMATCH")
    damaged = [r.version for r in store.verify() if not r.ok]
    print(f"   verify: {'all versions OK' if not damaged else f'damaged: {damaged}'}")
    return 0 if exact and a == b and not damaged else 1


if __name__ == "__main__":
    sys.exit(main())
