"""ckpt demo: train a small numpy MLP, checkpoint every epoch, restore the best.

Run with `make demo`. A 2-layer MLP learns a generated 3-class spiral data set
with momentum SGD; after every epoch the weights, the optimizer state and the
RNG state are saved to a ckpt store with the epoch's metrics. Then the demo
lists the versions, restores the best one by validation loss and shows that it
reproduces the recorded metric exactly.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import ckpt

ROOT = Path(__file__).resolve().parent.parent / "demo-runs" / "spiral-mlp"


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


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    store = ckpt.Store(ROOT)
    rng = np.random.default_rng(0)
    x, y = spirals(rng, 600)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    x_train, y_train, x_val, y_val = x[:split], y[:split], x[split:], y[split:]

    params = init(rng, x.shape[1], 256, 3)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    lr, momentum, batch = 0.1, 0.9, 64
    steps_per_epoch = -(-split // batch)
    print(f"training a {x.shape[1]}-256-3 MLP on {split} spiral points; store: {ROOT}")
    t0 = time.perf_counter()
    for epoch in range(30):
        perm = rng.permutation(split)
        for i in range(0, split, batch):
            idx = perm[i : i + batch]
            g = grads(params, x_train[idx], y_train[idx])
            for k in params:
                velocity[k] = momentum * velocity[k] - lr * g[k]
                params[k] = params[k] + velocity[k]
        train_loss, _ = loss_and_acc(params, x_train, y_train)
        val_loss, val_acc = loss_and_acc(params, x_val, y_val)
        state: dict[str, Any] = {
            "model": params,
            "optim": {"velocity": velocity, "lr": lr, "momentum": momentum},
            "rng": rng.bit_generator.state,
            "epoch": epoch,
        }
        v = store.save(
            state,
            step=(epoch + 1) * steps_per_epoch,
            epoch=epoch,
            metrics={"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc},
        )
        print(
            f"epoch {epoch:2d}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}"
            f"  val_acc {val_acc:.3f}  -> version {v.id} ({v.new_bytes / 1024:.0f} KiB new)"
        )
    print(f"trained in {time.perf_counter() - t0:.1f} s\n")

    versions = store.versions()
    print(f"{'id':>3} {'epoch':>5} {'step':>5} {'val_loss':>9} {'val_acc':>8} {'new KiB':>8}")
    for v in versions:
        print(
            f"{v.id:>3} {v.epoch:>5} {v.step:>5} {v.metrics['val_loss']:>9.4f}"
            f" {v.metrics['val_acc']:>8.3f} {v.new_bytes / 1024:>8.0f}"
        )
    raw = sum(v.raw_bytes for v in versions)
    print(
        f"\n{len(versions)} versions: {raw / 2**20:.2f} MiB of tensors saved,"
        f" {store.stored_bytes() / 2**20:.2f} MiB on disk"
    )

    best = store.best("val_loss", mode="min")
    assert best is not None
    restored = store.load(best)
    val_loss, val_acc = loss_and_acc(restored["model"], x_val, y_val)
    recorded = best.metrics["val_loss"]
    print(f"\nbest version: {best.id} (epoch {best.epoch}), recorded val_loss {recorded:.6f}")
    print(f"restored weights give   val_loss {val_loss:.6f}, val_acc {val_acc:.3f}")
    exact = val_loss == recorded and val_acc == best.metrics["val_acc"]
    print("reproduced exactly" if exact else "MISMATCH: the restored weights differ")
    damaged = [r.version for r in store.verify() if not r.ok]
    print(f"verify: {len(versions) - len(damaged)}/{len(versions)} versions OK")
    return 0 if exact and not damaged else 1


if __name__ == "__main__":
    sys.exit(main())
