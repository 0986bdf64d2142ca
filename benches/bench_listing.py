"""How fast is the listing of a store with many versions?

Builds a store of N versions (tiny trees, durable=False: the listing is what is
measured, not the saves), then times ``store.versions()`` from a fresh Store
object: with the listing cache (the normal case), and after deleting the cache
(the rebuild from manifests). Medians of several runs; no assertions.

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
    ap.add_argument("--out", type=Path, default=None, help="directory for listing.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-listing-"))
    try:
        root = work / "store"
        build_s = build(root, args.versions)
        cached = timed(lambda: ckpt.Store(root).versions(), args.runs)
        best = timed(lambda: ckpt.Store(root).best("loss"), args.runs)
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
        print(f"| listing of {args.versions} versions | median s | min s |")
        print("|---|---|---|")
        print(f"| store.versions() (cache) | {statistics.median(cached):.4f} | {min(cached):.4f} |")
        print(f"| store.best('loss') (cache) | {statistics.median(best):.4f} | {min(best):.4f} |")
        rb = statistics.median(rebuilt)
        print(f"| versions() rebuilding the cache | {rb:.4f} | {min(rebuilt):.4f} |")
        print(f"(built in {build_s:.1f} s, {build_s / args.versions * 1e3:.2f} ms per save)")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "listing.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
