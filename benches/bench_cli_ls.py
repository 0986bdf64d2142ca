"""How fast is ``ckpt ls`` on a store with many versions?

Builds a store of N versions (tiny trees, durable=False: the listing is what
is measured, not the saves), with the manager's configuration recorded in
each version (monitor, retention policy, early stopping) as a
CheckpointManager would, then times:

* in-process (``ckpt.cli.main``, output discarded): ``ckpt ls --limit 20``
  and the full ``ckpt ls --json``;
* as a subprocess (``python -m ckpt.cli``, interpreter start-up and imports
  included): the same two commands.

Medians and minimums of several runs; no assertions.

The package's bytecode is compiled first (``compileall``), as ``pip install``
does: run from a source tree with ``PYTHONDONTWRITEBYTECODE`` set, every
subprocess would otherwise compile ckpt's modules again (~30-40 ms), which no
installed ckpt pays.

    python benches/bench_cli_ls.py --versions 10000
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import ckpt
from ckpt.cli import main as cli_main


def build(root: Path, n: int) -> float:
    """N versions of a tiny tree with the trainer state a manager records."""
    store = ckpt.Store(root, durable=False)
    es = ckpt.EarlyStopping(monitor="loss", patience=10**9)
    manager = {
        "monitor": "loss",
        "mode": "min",
        "keep": None,
        "save_every": 1,
        "save_every_seconds": None,
        "save_on_improvement": False,
        "early_stopping": {"monitor": "loss", "mode": "min", "patience": 10**9},
    }
    w = np.zeros(16, np.float32)
    t0 = time.perf_counter()
    for i in range(n):
        loss = 1.0 / (i + 1) + 0.01 * ((i * 7919) % 13)
        es.update(loss, i)
        store.save(
            {"w": w, "step": i},
            step=i,
            epoch=i // 100,
            metrics={"loss": loss, "acc": i / n},
            trainer={"manager": manager, "early_stopping": es.state_dict()},
        )
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def in_process(argv: list[str]) -> Callable[[], object]:
    def run() -> None:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            status = cli_main(argv)
        if status != 0:
            raise RuntimeError(f"ckpt {' '.join(argv)} exited with {status}")

    return run


def as_subprocess(argv: list[str]) -> Callable[[], object]:
    env = {**os.environ, "COLUMNS": "80"}

    def run() -> None:
        subprocess.run(
            [sys.executable, "-m", "ckpt.cli", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--store", type=Path, default=None, help="reuse (or build) this store")
    ap.add_argument("--out", type=Path, default=None, help="directory for cli_ls.json")
    args = ap.parse_args()
    compileall.compile_dir(os.path.dirname(ckpt.__file__), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="ckpt-cli-ls-"))
    try:
        root = args.store or work / "store"
        build_s = 0.0
        if not (root / "ckpt-store.json").exists():
            build_s = build(root, args.versions)
        n = len(ckpt.Store(root).versions())
        root_s = str(root)
        cases = {
            "ls --limit 20": [root_s, "--limit", "20"],
            "ls --json": [root_s, "--json"],
        }
        os.environ.setdefault("COLUMNS", "80")
        rows = []
        result: dict[str, object] = {"versions": n, "build_seconds": build_s}
        for name, rest in cases.items():
            argv = ["ls", *rest]
            for how, make in (("in-process", in_process), ("subprocess", as_subprocess)):
                times = timed(make(argv), args.runs)
                rows.append((f"ckpt {name} ({how})", statistics.median(times), min(times)))
                result[f"{name} {how} median_s"] = statistics.median(times)
        probe = io.StringIO()
        with contextlib.redirect_stdout(probe):
            cli_main(["ls", root_s, "--json"])
        result["json_bytes"] = len(probe.getvalue())
        print(f"| ckpt ls on {n} versions | median s | min s |")
        print("|---|---|---|")
        for label, med, best in rows:
            print(f"| {label} | {med:.3f} | {best:.3f} |")
        if build_s:
            print(f"(built in {build_s:.1f} s; full --json output {result['json_bytes']} bytes)")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "cli_ls.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
