"""PyTorch helpers: capture and apply a training state without pickle.

``import ckpt.torch`` (or use ``ckpt.torch`` after ``import ckpt``) needs
torch installed (``pip install 'ckpt-store[torch]'``)::

    state = ckpt.torch.capture(model=model, optimizer=opt, scheduler=sched, epoch=epoch)
    mgr.save(epoch, state, metrics={"val_loss": vl})
    ...
    state = mgr.restore_latest(default=None)
    if state is not None:
        ckpt.torch.apply(state, model=model, optimizer=opt, scheduler=sched)

Everything is stored as tensors and JSON: model and optimizer state dicts
(int keys and tuples survive), LR scheduler and grad scaler state dicts, and
the random number generators of Python, numpy and torch (CPU and CUDA).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["apply", "capture", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, numpy's global and torch's CPU and CUDA generators."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": np.array(words, np.int64), "gauss_next": gauss},
        "numpy": {
            "kind": kind,
            "keys": np.asarray(keys),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the generators captured by :func:`rng_state`.

    CUDA generators are restored when the state has them and CUDA is available.
    """
    py = state["python"]
    words = tuple(int(x) for x in np.asarray(py["state"]).tolist())
    random.setstate((py["version"], words, py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            np.asarray(n["keys"], np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    cpu = state["torch"]
    torch.set_rng_state(cpu.cpu() if isinstance(cpu, torch.Tensor) else torch.from_numpy(cpu))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def capture(
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The state of a training loop as a tree the store saves without pickle.

    Args:
        model, optimizer, scheduler, scaler: objects with ``state_dict()``.
        rng: include :func:`rng_state`.
        **extra: more entries (epoch counters, data-loader positions, ...).

    Returns:
        ``{"model": ..., "optimizer": ..., "scheduler": ..., "scaler": ...,
        "rng": ..., **extra}`` with the entries that were given.
    """
    state: dict[str, Any] = {}
    for name, obj in (
        ("model", model),
        ("optimizer", optimizer),
        ("scheduler", scheduler),
        ("scaler", scaler),
    ):
        if obj is not None:
            state[name] = obj.state_dict()
    if rng:
        state["rng"] = rng_state()
    state.update(extra)
    return state


def apply(
    state: dict[str, Any] | None,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng: bool = True,
    strict: bool = True,
) -> None:
    """Loads a state made by :func:`capture` into the given objects.

    ``state=None`` (what ``mgr.restore_latest()`` returns on an empty store:
    a fresh run) restores nothing and leaves every object as it is, so
    ``apply(mgr.restore_latest(), model=...)`` works on the first run too.

    Raises:
        KeyError: an object was given but the state has no entry for it.
    """
    if state is None:
        return
    for name, obj in (
        ("model", model),
        ("optimizer", optimizer),
        ("scheduler", scheduler),
        ("scaler", scaler),
    ):
        if obj is not None and name not in state:
            raise KeyError(f"the state has no {name!r} entry (saved without {name}=...?)")
    if model is not None:
        model.load_state_dict(state["model"], strict=strict)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            obj.load_state_dict(state[name])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
