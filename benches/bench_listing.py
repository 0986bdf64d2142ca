"""How fast is the listing of a store with many versions?

Builds a store of N versions (tiny trees, durable=False: the listing is what is
measured, not the saves), then times ``store.versions()`` from a fresh Store
object: with the listing cache (the normal case), and after deleting the cache
(the rebuild from manifests). Then times a tiny save into that store
(durable=False, as the build: the cost of choosing the next id and committing,
not of fsync): ``--save-runs`` saves through one Store object (a training
loop's steady state) and a few through a fresh Store object each (a new
process; its first save looks at ``versions/`` once). Medians of several runs;
no assertions.

    python benches/bench_listing.py --versions 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import ckpt


def build(root: Path, n: int) -> float:
    store = ckpt.Store(root, durable=False)
    t0 = time.perf_counter()
    w = np.zeros(16, np.float32)
    for i in range(n):
        store.save(
            {"w": w, "step": i},
            step=i,
            epoch=i // 100,
            metrics={"loss": 1.0 / (i + 1), "acc": i / n},
        )
    return time.perf_counter() - t0


def tiny_save(store: ckpt.Store, i: int) -> None:
    store.save({"w": np.zeros(16, np.float32), "step": i}, step=i, metrics={"loss": 1.0})


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--save-runs", type=int, default=20, help="tiny saves timed at --versions (0: none)"
    )
    ap.add_argument("--out", type=Path, default=None, help="directory for listing.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-listing-"))
    try:
        root = work / "store"
        build_s = build(root, args.versions)
        cached = timed(lambda: ckpt.Store(root).versions(), args.runs)
        best = timed(lambda: ckpt.Store(root).best("loss", "min"), args.runs)
        steady: list[float] = []
        fresh: list[float] = []
        if args.save_runs > 0:
            writer = ckpt.Store(root, durable=False)
            tiny_save(writer, args.versions)  # the first save of an object is timed below
            steps = iter(range(args.versions + 1, args.versions + 10 * args.save_runs + 10))
            steady = timed(lambda: tiny_save(writer, next(steps)), args.save_runs)
            writer.close()
            fresh = timed(
                lambda: tiny_save(ckpt.Store(root, durable=False), next(steps)),
                max(1, args.save_runs // 4),
            )
        cache = root / "cache" / "versions.jsonl"

        def rebuild() -> None:
            os.unlink(cache)
            ckpt.Store(root).versions()

        rebuilt = timed(rebuild, max(1, args.runs // 2))
        result = {
            "versions": args.versions,
            "build_seconds": build_s,
            "versions_cached_median_s": statistics.median(cached),
            "versions_cached_min_s": min(cached),
            "best_cached_median_s": statistics.median(best),
            "versions_rebuild_median_s": statistics.median(rebuilt),
        }
        if steady:
            result |= {
                "save_steady_median_s": statistics.median(steady),
                "save_steady_min_s": min(steady),
                "save_steady_max_s": max(steady),
                "save_fresh_store_median_s": statistics.median(fresh),
                "save_fresh_store_min_s": min(fresh),
                "save_runs": args.save_runs,
            }
        print(f"| listing of {args.versions} versions | median s | min s |")
        print("|---|---|---|")
        print(f"| store.versions() (cache) | {statistics.median(cached):.4f} | {min(cached):.4f} |")
        bm = statistics.median(best)
        print(f"| store.best('loss', 'min') (cache) | {bm:.4f} | {min(best):.4f} |")
        rb = statistics.median(rebuilt)
        print(f"| versions() rebuilding the cache | {rb:.4f} | {min(rebuilt):.4f} |")
        if steady:
            ms = [1e3 * statistics.median(steady), 1e3 * min(steady)]
            print(f"| tiny save, one Store object (ms) | {ms[0]:.3f} | {ms[1]:.3f} |")
            fm = [1e3 * statistics.median(fresh), 1e3 * min(fresh)]
            print(f"| tiny save, fresh Store object (ms) | {fm[0]:.3f} | {fm[1]:.3f} |")
        print(f"(built in {build_s:.1f} s, {build_s / args.versions * 1e3:.2f} ms per save)")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "listing.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
