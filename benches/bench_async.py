#!/usr/bin/env python3
"""How long does a checkpoint stall the training thread? Async saves against blocking ones.

Workloads (seeded, the synthetic model of ``bench_store.py``: random normal
float32, ~200 tensors of ``--size-mib`` in all):

* ``numpy``: the model as a dict of numpy arrays;
* ``torch``: the same arrays as torch tensors (``torch.from_numpy``, a
  state dict); only when torch is importable, and not with ``--tiny`` unless
  ``--torch on``.

Part 1, the stall: the wall time of the call the training thread waits on,
one save per system and run (the order rotates), each into a fresh store or
file that is removed (and ``sync``ed) after the run, so that no save
deduplicates against an earlier one:

* ``ckpt blocking``: ``Store.save(tree)`` (durable: fsynced when it returns);
* ``ckpt async copy``: ``Store.save(tree, blocking=False)``: returns once the
  leaves are copied to host memory, into the staging buffer the store keeps
  from its previous background save (one untimed save first, then removed
  with its chunks: the steady state of a training run);
* ``ckpt async no-copy``: ``Store.save(tree, blocking=False, copy=False)``: the
  caller promises not to change the leaves until ``handle.wait()``;
* ``manager async``: ``CheckpointManager(async_save=True).save(step, tree)``;
* ``torch.save``: ``torch.save`` + fsync of the file and its directory (numpy
  trees are converted with ``torch.from_numpy`` outside the timed section);
* ``safetensors``: ``save_file`` (numpy or torch API) + fsync of file and directory;
* references, not saves: ``host copy, fresh buffers`` (``a.copy()`` of every
  leaf, what a first async save with ``copy=True`` pays) and ``host copy,
  reused buffers`` (``np.copyto`` into buffers touched before: the floor of
  such a copy; fresh memory costs page faults).

For the async ones, ``until durable`` is the time from the call until
``handle.wait()`` (``manager.wait()``) returns with the version fsynced, the
training thread doing nothing meanwhile: the save's whole cost.

Part 2, the loop: a simulated training loop on the main thread runs
``--saves`` x ``--every`` + ``--every`` steps and saves after every
``--every``-th step (the last steps let the last async save overlap work too;
the loop ends with the last save waited, so every mode has made the same
versions durable). A step is ``--matmuls`` numpy matmuls of
``--matmul-size``^2 float32 (compute, on numpy's BLAS threads), then
``--step-idle-ms`` of sleep (0 by default; e.g. 50 to model a GPU step, during
which the training thread waits without using a core), then an in-place
update of every model array (``*= 1 - 2**-20``, an optimizer-like pass over the
weights that changes every chunk, so that no save deduplicates against the
previous one). Every mode writes into a fresh store (files) per run. Reported:
the loop's time, its slowdown against the same loop without checkpoints in the
same run, and the time the save calls held the loop (for an async save this
includes waiting for the previous one when it is still running). On a 2-core
machine, a background save competes with the step for the cores. ``copy=False``
is not in the loop: the loop changes the weights right after each save, which
its contract forbids until ``handle.wait()``.

Times are medians (min-max) over ``--runs``; ratios are medians (min-max) of
per-run ratios against systems measured in the same run. The CPU time spent
outside this process during each timed step is read from ``/proc/stat``
(``other load``). Each timed step is preceded by ``sync`` and by warming
memory (see BENCHMARKING.md). No timing assertions. With ``--tiny`` every
version saved in the loop is loaded back and compared with a copy of the
model taken at its save (a check that async saves capture the right state).

Examples::

    python benches/bench_async.py --tiny --out /tmp/ba
    python benches/bench_async.py --size-mib 1024 --runs 3 --out bench-results/async

Needs numpy, safetensors and ckpt; torch optional.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_store as bs
import numpy as np
from bench_store import (
    MIB,
    Bench,
    Peer,
    SafetensorsPeer,
    Sample,
    TorchPeer,
    fmt_load,
    fmt_range,
    fmt_ratio,
    rotated,
    summary,
    timed,
    value_summary,
)

import ckpt

#: Factor of the simulated optimizer step (exact in float32; changes every normal value's bits).
DECAY = np.float32(1 - 2**-20)
STALL_SYSTEMS = (
    "ckpt blocking",
    "ckpt async copy",
    "ckpt async no-copy",
    "manager async",
    "torch.save",
    "safetensors",
    "host copy, fresh buffers",
    "host copy, reused buffers",
)
LOOP_MODES = ("no checkpoint", "ckpt blocking", "ckpt async copy", "manager async", "torch.save")
#: Stall ratios are given against these (when measured).
REFERENCES = ("ckpt blocking", "torch.save", "safetensors")


class SafetensorsTorchPeer(Peer):
    """``safetensors.torch.save_file`` of a flat state dict (+ fsync)."""

    name = "safetensors"
    ext = ".safetensors"

    def save(self, obj: Any, path: str) -> None:
        from safetensors.torch import save_file

        save_file(obj, path)
        bs.fsync_path(path)


class Workload:
    """The model (numpy arrays) and the object each system saves for it."""

    def __init__(self, name: str, arrays: dict[str, np.ndarray], torch_mod: Any) -> None:
        self.name = name
        self.arrays = arrays  # the training loop updates these in place
        self.raw_bytes = sum(int(a.nbytes) for a in arrays.values())
        self.peers: dict[str, Peer] = {}
        if name == "torch":
            self.tree: Any = {k: torch_mod.from_numpy(a) for k, a in arrays.items()}
            self.peers["torch.save"] = TorchPeer(torch_mod)
            self.peers["safetensors"] = SafetensorsTorchPeer()
            self.peer_objs = {"torch.save": self.tree, "safetensors": self.tree}
        else:
            self.tree = arrays
            st = SafetensorsPeer()
            self.peers["safetensors"] = st
            self.peer_objs = {"safetensors": st.convert(arrays)}
            if torch_mod is not None:
                tp = TorchPeer(torch_mod)
                self.peers["torch.save"] = tp
                self.peer_objs["torch.save"] = tp.convert(arrays)  # shares the arrays' memory

    def systems(self, wanted: tuple[str, ...]) -> list[str]:
        return [s for s in wanted if not s.startswith(("torch", "safetensors")) or s in self.peers]

    def staging(self) -> list[np.ndarray]:
        """Buffers like the leaves, touched once (for the reused-buffer copy)."""
        if not hasattr(self, "_staging"):
            self._staging = [np.ones_like(a) for a in self.arrays.values()]
        return self._staging


# ------------------------------------------------------------------- the stall
def stall_once(bench: Bench, w: Workload, system: str, step: int) -> tuple[Sample, float]:
    """One save by ``system``: (the training thread's stall, seconds until durable)."""
    threads = bench.args.threads
    if system.startswith("host copy"):
        dst = w.staging() if system.endswith("reused buffers") else None
        bench.prepare()
        with timed() as s:
            if dst is None:
                copies = [a.copy() for a in w.arrays.values()]
            else:
                for d, a in zip(dst, w.arrays.values(), strict=True):
                    np.copyto(d, a)
        if dst is None:
            del copies
        return s[0], float("nan")
    if system in w.peers:
        sample, path, _ = bench.peer_save(w.peers[system], w.peer_objs[system])
        bench.remove(path)
        return sample, sample.seconds
    root = bench.fresh("ckpt")
    mgr = None
    if system == "manager async":
        mgr = ckpt.CheckpointManager(root, async_save=True, threads=threads)
    store = ckpt.Store(root, threads=threads) if mgr is None else mgr.store
    if system in ("ckpt async copy", "manager async"):
        # Steady state of a training run: an earlier background save left the
        # store its staging buffer. Its version and chunks are removed, so the
        # timed save writes as much as a first one.
        store.save(w.tree, step=step + 1_000_000, blocking=False).wait()
        for v in store.versions():
            store.delete(v.id)
        store.gc()
    bench.prepare()
    if system == "ckpt blocking":
        with timed() as s:
            store.save(w.tree, step=step)
        rest = 0.0
    else:
        with timed() as s:
            if mgr is not None:
                mgr.save(step, w.tree)
            else:
                handle = store.save(
                    w.tree, step=step, blocking=False, copy=system.endswith(" copy")
                )
        t0 = time.perf_counter()
        if mgr is not None:
            mgr.wait()
        else:
            handle.wait()
        rest = time.perf_counter() - t0
    if mgr is not None:
        mgr.close()
    store.close()
    bench.remove(root)
    return s[0], s[0].seconds + rest


def run_stall(bench: Bench, w: Workload, runs: int) -> dict[str, Any]:
    systems = w.systems(STALL_SYSTEMS)
    stalls: dict[str, list[Sample]] = {k: [] for k in systems}
    durable: dict[str, list[float]] = {k: [] for k in systems}
    for r in range(runs):
        for name in rotated(systems, r):
            sample, total = stall_once(bench, w, name, r)
            stalls[name].append(sample)
            durable[name].append(total)
        print(
            f"   stall run {r + 1}: "
            + " | ".join(f"{k} {stalls[k][-1].seconds:.3f}/{durable[k][-1]:.3f}" for k in systems)
            + " (stall/durable s)",
            file=sys.stderr,
        )
    secs = {k: [x.seconds for x in v] for k, v in stalls.items()}
    return {
        "systems": {
            k: {
                "stall": summary(stalls[k]),
                "until_durable": None if k.startswith("host copy") else value_summary(durable[k]),
            }
            for k in systems
        },
        "stall_ratios": {
            k: {
                ref: value_summary([a / b for a, b in zip(secs[k], secs[ref], strict=True) if b])
                for ref in REFERENCES
                if ref in secs and ref != k
            }
            for k in systems
        },
        "_samples": stalls,
    }


# -------------------------------------------------------------------- the loop
class Trainer:
    """A simulated training step: fixed-size matmuls, then an in-place pass over the weights."""

    def __init__(self, arrays: dict[str, np.ndarray], n: int, matmuls: int, idle_ms: float) -> None:
        rng = np.random.default_rng(7)
        self.arrays = list(arrays.values())
        self.x = rng.standard_normal((n, n), dtype=np.float32)
        self.w = rng.standard_normal((n, n), dtype=np.float32) * np.float32(n**-0.5)
        self.out = np.empty((n, n), np.float32)
        self.matmuls = matmuls
        self.idle = idle_ms / 1e3

    def step(self) -> None:
        for _ in range(self.matmuls):
            np.matmul(self.x, self.w, out=self.out)
        if self.idle:
            time.sleep(self.idle)
        for a in self.arrays:
            np.multiply(a, DECAY, out=a)


class Saver:
    """The save call of one loop mode, into a fresh store or directory."""

    def __init__(self, bench: Bench, w: Workload, mode: str) -> None:
        self.mode, self.w = mode, w
        self.root = bench.fresh("loop")
        self.mgr = None
        self.store = None
        threads = bench.args.threads
        if mode == "manager async":
            self.mgr = ckpt.CheckpointManager(self.root, async_save=True, threads=threads)
        elif mode.startswith("ckpt"):
            self.store = ckpt.Store(self.root, threads=threads)
        else:
            os.makedirs(self.root)

    def save(self, step: int) -> None:
        if self.mgr is not None:
            self.mgr.save(step, self.w.tree)
        elif self.store is not None:
            self.store.save(self.w.tree, step=step, blocking=self.mode == "ckpt blocking")
        elif self.mode in self.w.peers:
            path = os.path.join(self.root, f"step{step}{self.w.peers[self.mode].ext}")
            self.w.peers[self.mode].save(self.w.peer_objs[self.mode], path)
            bs.fsync_dir(self.root)

    def finish(self) -> None:
        """Waits for the last save (durable) and releases the store."""
        if self.mgr is not None:
            self.mgr.close()
        elif self.store is not None:
            self.store.close()

    def versions(self) -> list[ckpt.Version]:
        return ckpt.Store(self.root).versions() if self.mode.startswith(("ckpt", "manager")) else []


def loop_once(
    bench: Bench, w: Workload, mode: str, trainer: Trainer, saves: int, every: int, check: bool
) -> dict[str, Any]:
    saver = Saver(bench, w, mode) if mode != "no checkpoint" else None
    expected: list[dict[str, np.ndarray]] = []
    calls: list[float] = []
    bench.prepare()
    with timed() as s:
        for i in range(1, (saves + 1) * every + 1):
            trainer.step()
            if saver is not None and i % every == 0 and i <= saves * every:
                if check:
                    expected.append({k: a.copy() for k, a in w.arrays.items()})
                t0 = time.perf_counter()
                saver.save(i)
                calls.append(time.perf_counter() - t0)
        if saver is not None:
            t0 = time.perf_counter()
            saver.finish()  # the last save is durable before the loop counts as done
            calls.append(time.perf_counter() - t0)
    if saver is not None:
        if check:
            versions = saver.versions()
            if mode != "torch.save":
                assert len(versions) == saves, (mode, versions)
                store = ckpt.Store(saver.root)
                for v, want in zip(versions, expected, strict=True):
                    got = store.load(v)
                    for k, a in want.items():
                        b = np.asarray(got[k])
                        assert np.array_equal(a, b), f"{mode}: version {v.id} leaf {k} differs"
        bench.remove(saver.root)
    return {"sample": s[0], "calls": calls}


def run_loop(bench: Bench, w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    modes = w.systems(LOOP_MODES)
    trainer = Trainer(w.arrays, args.matmul_size, args.matmuls, args.step_idle_ms)
    trainer.step()  # first-touch of the work buffers, outside the timed runs
    loops: dict[str, list[Sample]] = {k: [] for k in modes}
    calls: dict[str, list[float]] = {k: [] for k in modes}
    slowdown: dict[str, list[float]] = {k: [] for k in modes}
    for r in range(args.runs):
        order = rotated(modes, r)
        for mode in order:
            res = loop_once(bench, w, mode, trainer, args.saves, args.every, args.check)
            loops[mode].append(res["sample"])
            calls[mode] += res["calls"]
        base = loops["no checkpoint"][-1].seconds
        for mode in modes:
            slowdown[mode].append(loops[mode][-1].seconds / base - 1)
        print(
            f"   loop run {r + 1}: "
            + " | ".join(f"{k} {loops[k][-1].seconds:.3f}" for k in modes)
            + " (s)",
            file=sys.stderr,
        )
    steps = (args.saves + 1) * args.every
    return {
        "steps": steps,
        "saves": args.saves,
        "every": args.every,
        "step_idle_ms": args.step_idle_ms,
        "step_s_no_checkpoint": statistics.median(x.seconds for x in loops["no checkpoint"])
        / steps,
        "modes": {
            k: {
                "loop": summary(loops[k]),
                "slowdown": value_summary(slowdown[k]),
                "stall_per_save": value_summary(
                    [
                        (loops[k][i].seconds - loops["no checkpoint"][i].seconds) / args.saves
                        for i in range(args.runs)
                    ]
                ),
                "save_calls": value_summary(calls[k]),
            }
            for k in modes
        },
        "_samples": loops,
    }


# -------------------------------------------------------------------- markdown
def stall_markdown(results: dict[str, Any]) -> str:
    lines = [
        "| workload | system | stall s (training thread waits) | until durable s |"
        " stall / ckpt blocking | stall / torch.save | stall / safetensors | other load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        st = r["stall"]
        label = f"{name} ({r['raw_bytes'] / MIB:.0f} MiB, {r['tensors']} t)"
        for k, d in st["systems"].items():
            ratios = [
                fmt_range(st["stall_ratios"][k].get(ref), fmt_ratio) if ref != k else "1"
                for ref in REFERENCES
            ]
            lines.append(
                f"| {label} | {k} | {fmt_range(d['stall'])} | {fmt_range(d['until_durable'])} |"
                f" {' | '.join(ratios)} | {fmt_load(st['_samples'][k])} |"
            )
            label = ""
    return "\n".join(lines)


def loop_markdown(results: dict[str, Any]) -> str:
    lines = [
        "| workload | mode | loop s | slowdown vs no checkpoint | stall per save s |"
        " save calls s (median, max) | other load |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lp = r["loop"]
        label = (
            f"{name}: {lp['steps']} steps of {lp['step_s_no_checkpoint']:.3f} s,"
            f" a save every {lp['every']} ({lp['saves']} saves)"
            + (f", {lp['step_idle_ms']:g} ms idle per step" if lp["step_idle_ms"] else "")
        )
        for k, d in lp["modes"].items():
            c = d["save_calls"]
            calls = "-" if not c["runs"] else f"{c['median']:.3f}, {c['max']:.3f}"
            slow = d["slowdown"]
            spread = (
                f" ({100 * slow['min']:+.0f}% to {100 * slow['max']:+.0f}%)"
                if slow["min"] != slow["max"]
                else ""
            )
            lines.append(
                f"| {label} | {k} | {fmt_range(d['loop'])} | {100 * slow['median']:+.0f}%{spread} |"
                f" {fmt_range(d['stall_per_save'])} | {calls} |"
                f" {fmt_load(r['loop']['_samples'][k])} |"
            )
            label = ""
    return "\n".join(lines)


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=None, help="model size (1024; 8 with --tiny)")
    p.add_argument("--tensors", type=int, default=200, help="tensors in the model")
    p.add_argument("--runs", type=int, default=None, help="runs per measurement (3; 1 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="CI smoke run: 8 MiB, 1 run, no torch")
    p.add_argument("--out", metavar="DIR", help="write results.json and results.md here")
    p.add_argument("--torch", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="ckpt threads (default: all)")
    p.add_argument("--saves", type=int, default=None, help="saves per loop (3; 2 with --tiny)")
    p.add_argument("--every", type=int, default=None, help="steps between saves (4; 2 with --tiny)")
    p.add_argument("--matmul-size", type=int, default=None, help="(1024; 128 with --tiny)")
    p.add_argument("--matmuls", type=int, default=2, help="matmuls per simulated step")
    p.add_argument(
        "--step-idle-ms", type=float, default=0.0, help="sleep per step (a GPU step; default 0)"
    )
    p.add_argument("--no-loop", action="store_true", help="only the stall of single saves")
    p.add_argument("--check", action="store_true", help="verify loop versions (on with --tiny)")
    p.add_argument("--warm-mib", type=int, default=None, help="memory warmed before each step")
    p.add_argument("--workdir", default=None, help="parent of the scratch directory (/tmp)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.size_mib = args.size_mib or (8 if tiny else 1024)
    args.runs = args.runs or (1 if tiny else 3)
    args.saves = args.saves or (2 if tiny else 3)
    args.every = args.every or (2 if tiny else 4)
    args.matmul_size = args.matmul_size or (128 if tiny else 1024)
    args.warm_mib = args.warm_mib if args.warm_mib is not None else (64 if tiny else 2048)
    args.check = args.check or tiny
    args.cold = False  # for bench_store.Bench
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    parent = args.workdir or "/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ckpt-bench-async-", dir=parent)
    torch_mod, torch_why = bs.torch_or_reason(args.torch, args.tiny)
    info = bs.machine_info(workdir, torch_mod)
    results: dict[str, Any] = {}
    try:
        baseline = bs.idle_load(0.2 if args.tiny else 1.0)
        arrays = bs.synthetic(args.size_mib * MIB, args.tensors)
        workloads = [Workload("numpy", arrays, torch_mod)]
        if torch_mod is not None:
            workloads.append(Workload("torch", arrays, torch_mod))
        bench = Bench(args, workdir, [])
        bs.warm_memory(args.warm_mib * MIB)
        for w in workloads:
            print(
                f"== {w.name}: {len(arrays)} tensors, {w.raw_bytes / MIB:.1f} MiB", file=sys.stderr
            )
            bench.warm = min(args.warm_mib * MIB, max(2 * w.raw_bytes, 512 * MIB))
            r: dict[str, Any] = {"raw_bytes": w.raw_bytes, "tensors": len(arrays)}
            r["stall"] = run_stall(bench, w, args.runs)
            if not args.no_loop:
                r["loop"] = run_loop(bench, w, args)
            results[w.name] = r
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    samples: list[Sample] = []
    for r in results.values():
        for part in ("stall", "loop"):
            for v in r.get(part, {}).get("_samples", {}).values():
                samples += v
    timed_secs = sum(x.seconds for x in samples)
    during = {
        "other_load_mean": sum(x.other * x.seconds for x in samples) / timed_secs
        if timed_secs
        else 0.0,
        "other_load_max": max((x.other for x in samples), default=0.0),
        "steal_max": max((x.steal for x in samples), default=0.0),
    }
    info["loadavg_end"] = os.getloadavg()
    blas = _blas_threads()
    head = [
        "# ckpt async save: the training thread's stall",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}`",
        f"- machine: {info['cpu']}, {info['cpus']} CPUs, {info['mem_gib']} GiB, kernel"
        f" {info['kernel']}; workdir {info['workdir_fs']}",
        f"- versions: python {info['python']}, numpy {info['numpy']}, safetensors"
        f" {info['safetensors']}, torch {info['torch']}, ckpt {info['ckpt']} ({info['git']},"
        f" _core built {info['core_so_mtime']})",
        f"- model: {args.tensors} tensors, {args.size_mib} MiB float32 (seeded random normal);"
        f" {'; '.join(x for x in [torch_why] if x) or 'numpy and torch workloads'}; ckpt threads:"
        f" {args.threads or 'all'}; numpy BLAS threads: {blas}; runs: {args.runs}; warm before"
        f" each timed step: up to {args.warm_mib} MiB",
        "- every save goes to a fresh store / file, removed after its run (no dedup between"
        " saves); the loop changes every weight at every step",
        f"- other load (busy CPU outside this process, share of all CPUs): idle baseline"
        f" {100 * baseline['busy']:.1f}% (steal {100 * baseline['steal']:.1f}%); during timed"
        f" steps mean {100 * during['other_load_mean']:.1f}%, max"
        f" {100 * during['other_load_max']:.0f}%, steal max {100 * during['steal_max']:.0f}%;"
        f" loadavg {info['loadavg_start']} → {info['loadavg_end']}",
        "- times: median (min-max) over runs; ratios: median (min-max) of per-run ratios",
    ]
    body = ["## Stall of one save", "", stall_markdown(results)]
    if not args.no_loop:
        body += [
            "",
            "## A training loop that keeps working",
            "",
            "Stall per save = (loop time - loop time without checkpoints in the same run) /"
            " saves; save calls = time spent in each save call (and in the final wait).",
            "",
            loop_markdown(results),
        ]
    md = "\n".join([*head, "", *body, ""])
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        payload = {
            "args": vars(args),
            "machine": info,
            "baseline_idle": baseline,
            "during": during,
            "blas_threads": blas,
            "results": bs._strip(results),
            "wall_seconds": time.perf_counter() - started,
        }
        bs.write_results(args.out, payload, md)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _blas_threads() -> str:
    """numpy's BLAS thread count, as far as threadpoolctl or the environment tell."""
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{d['internal_api']} {d['num_threads']}" for d in threadpool_info())
    except ImportError:
        env = [
            f"{k}={os.environ[k]}"
            for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
            if k in os.environ
        ]
        return ", ".join(env) or "library default (usually all cores)"


if __name__ == "__main__":
    sys.exit(main())
