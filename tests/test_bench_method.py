"""The benchmark's memory method (benches/bench_store.py ``--memory``).

With ``fresh`` (the default) every large allocation of a timed step is new
pages, as in a restarted process; with ``reuse`` glibc hands a step the pages
an earlier step freed. Each case runs in its own interpreter: ``mallopt``
changes the allocator for the rest of a process.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"

CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import bench_store as bs
import numpy as np
fresh = bs.fresh_memory() if sys.argv[2] == "fresh" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(1 << 20, np.uint8)  # 256 pages, under numpy's huge-page size
    a.fill(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del a
print(json.dumps({"fresh": fresh, "faults": faults}))
"""


def faults_per_allocation(mode: str) -> tuple[object, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(BENCHES), mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["fresh"], data["faults"]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator",
)
def test_fresh_memory_gives_every_step_new_pages_and_reuse_does_not() -> None:
    fresh, faults = faults_per_allocation("fresh")
    assert fresh is True, "mallopt refused the thresholds"
    # Every 1 MiB array is mapped anew and touched page by page.
    assert all(f >= 200 for f in faults), faults
    _, reused = faults_per_allocation("reuse")
    # glibc raised its mmap threshold when the first array was freed: from
    # the third on, they come from heap pages that are already resident.
    assert reused[0] >= 200, reused
    assert all(f < 50 for f in reused[2:]), reused
