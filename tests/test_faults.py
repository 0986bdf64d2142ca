"""Crashes and I/O errors at the engine's named fault points (CKPT_FAULT).

A child process (crash_child.py) saves, deletes, collects or pins while the
engine's fault points kill it (SIGKILL) or fail a step with EIO or ENOSPC.
After each interruption crashcheck.check_store reopens the store: every
version there is one that was saved and loads bit-exact, verify is clean,
committed versions are all there, and the next writer sweeps the debris.

CKPT_LONG_TESTS=1 kills at every fault-point hit and at many more random moments.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from crashcheck import CHUNKS, Children, check_store, committed_after, record, tree_for

import ckpt
from ckpt import _core

HERE = Path(__file__).parent
CHILD = HERE / "crash_child.py"
LONG = os.environ.get("CKPT_LONG_TESTS") == "1"

#: scenario -> (versions saved beforehand, child ops, id -> tree k, ids that must survive)
SCENARIOS: dict[str, tuple[list[int], list[str], dict[int, int], set[int]]] = {
    "save": ([1, 2], ["save:3"], {1: 1, 2: 2, 3: 3}, {1, 2}),
    "save-dedup": ([1, 2], ["save:2"], {1: 1, 2: 2, 3: 2}, {1, 2}),
    "create": ([], ["save:1"], {1: 1}, set()),
    "delete-gc": ([1, 2, 3], ["delete:2", "gc"], {1: 1, 2: 2, 3: 3}, {1, 3}),
    "delete-latest": ([1, 2], ["delete:2", "save:5"], {1: 1, 2: 2, 3: 5}, {1}),
    "retain": ([1, 2, 3], ["retain:1"], {1: 1, 2: 2, 3: 3}, {3}),
    "pin": ([1, 2], ["pin:1"], {1: 1, 2: 2}, {1, 2}),
}

#: Points after which nothing can fail any more: they kill, they never inject errors.
KILL_ONLY = {"objects.after_dir_fsync", "manifest.after_dir_fsync"}


@pytest.fixture(scope="module")
def children() -> Iterator[Children]:
    server = Children()
    yield server
    server.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One pristine store per scenario, copied for every run."""
    base = tmp_path_factory.mktemp("prepared")
    out = {}
    for name, (before, _, _, _) in SCENARIOS.items():
        root = base / name
        if before:
            store = ckpt.Store(root, **CHUNKS)
            for k in before:
                store.save(tree_for(k), step=k)
        out[name] = root
    return out


def fresh(prepared: dict[str, Path], scenario: str, dest: Path) -> Path:
    if prepared[scenario].exists():
        shutil.copytree(prepared[scenario], dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def traces(
    prepared: dict[str, Path], children: Children, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[str]]:
    """The fault points each scenario passes, in order (CKPT_FAULT_LOG)."""
    base = tmp_path_factory.mktemp("traces")
    out = {}
    for name, (_, ops, _, _) in SCENARIOS.items():
        log = base / f"{name}.log"
        result = children.run(fresh(prepared, name, base / name), ops, log=log)
        assert result.returncode == 0, result.stderr
        out[name] = log.read_text().split()
    return out


def test_every_fault_point_is_on_some_path(traces: dict[str, list[str]]) -> None:
    reached = {p for trace in traces.values() for p in trace}
    assert reached == set(_core.FAULT_POINTS)
    save = traces["save"]
    # the order a durable save goes through
    steps = ("chunk.tmp_written", "chunk.before_fsync", "chunk.after_fsync", "chunk.after_rename")
    first = [save.index(p) for p in steps]
    assert first == sorted(first)
    assert save.index("objects.after_dir_fsync") < save.index("manifest.tmp_written")
    assert save[-1] == "manifest.after_dir_fsync"
    # "w" (2 chunks) and the packed small tensors are new; "frozen" deduplicates
    assert Counter(save)["chunk.tmp_written"] == 3
    assert "chunk.tmp_written" not in traces["save-dedup"]


def kill_points(trace: list[str]) -> list[str]:
    """Fault specs that kill the child: each point it passes, by name, at its first
    hit; then every hit in turn (``*:k``: the k-th point reached, whichever it is)."""
    return [f"{p}:1:kill" for p in dict.fromkeys(trace)] + [
        f"*:{k}:kill" for k in range(1, len(trace) + 1)
    ]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_at_each_fault_point(
    scenario: str,
    prepared: dict[str, Path],
    traces: dict[str, list[str]],
    children: Children,
    tmp_path: Path,
) -> None:
    """SIGKILL at each fault point by name, then at every hit in turn."""
    _, ops, saved, must_have = SCENARIOS[scenario]
    outcomes: Counter[tuple[int, ...]] = Counter()
    specs = kill_points(traces[scenario])
    record("test_killed_at_each_fault_point", f"kills ({scenario})", len(specs))
    for i, spec in enumerate(specs):
        root = fresh(prepared, scenario, tmp_path / f"run{i}")
        result = children.run(root, ops, fault=spec)
        assert result.returncode == -signal.SIGKILL, (spec, result.returncode, result.stderr)
        ids = check_store(root, saved, must_have)
        outcomes[tuple(ids)] += 1
        shutil.rmtree(root)
    if scenario in ("save", "create"):
        # some kills land before the commit point, some after
        assert len(outcomes) == 2, outcomes


def test_killed_at_random_moments(
    prepared: dict[str, Path], children: Children, tmp_path: Path
) -> None:
    """A longer child run (saves, a delete, gc, retention), killed at a random moment
    of its ops. The child's marks say which ops had returned: their versions must be
    there, whatever the op in flight did.

    Each run picks an op and a moment within it, as long as that op took in a timing
    run; the kill is timed from the mark of the op before (not from the start), so
    that a slow first save on a loaded machine cannot pull every kill into op 0."""
    ops = ["save:3", "save:4", "delete:1", "gc", "save:5", "retain:3", "save:6"]
    saved = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}
    marks = tmp_path / "timing-marks"
    marks.mkdir()
    timing = children.run(fresh(prepared, "save", tmp_path / "timing"), ops, marks=marks)
    assert timing.returncode == 0, timing.stderr
    ends = sorted(p.stat().st_mtime for p in marks.iterdir())
    assert len(ends) == len(ops)
    lengths = [max(b - a, 0.001) for a, b in zip([timing.ready_at, *ends[:-1]], ends, strict=True)]
    rng = random.Random(20261127)
    runs = 300 if LONG else 15
    progress: Counter[int] = Counter()
    for i in range(runs):
        root, marks = fresh(prepared, "save", tmp_path / f"run{i}"), tmp_path / f"marks{i}"
        marks.mkdir()
        op = i % len(ops) if i < len(ops) else rng.randrange(len(ops))
        moment = rng.uniform(0, lengths[op])
        result = children.run(root, ops, marks=marks, kill_after=moment, kill_after_marks=op)
        done = len(list(marks.iterdir()))
        assert result.returncode == -signal.SIGKILL or done == len(ops), result
        assert done >= op, (op, done)
        progress[done] += 1
        now, then = committed_after(ops[:done], [1, 2]), committed_after(ops[: done + 1], [1, 2])
        check_store(root, {v: saved[v] for v in now | then}, now & then)
        shutil.rmtree(root)
    assert len(progress) >= 3, f"the kills should land at different ops; retune: {progress}"
    record("test_killed_at_random_moments", "random kills", runs)


def errno_points(trace: list[str]) -> list[str]:
    return [p for p in dict.fromkeys(trace) if p not in KILL_ONLY]


@pytest.mark.parametrize("action", ["eio", "enospc"])
@pytest.mark.parametrize("scenario", ["save", "create", "delete-gc", "pin"])
def test_an_io_error_at_any_point_aborts_cleanly(
    scenario: str,
    action: str,
    prepared: dict[str, Path],
    traces: dict[str, list[str]],
    children: Children,
    tmp_path: Path,
) -> None:
    """EIO or ENOSPC at a step: the op fails, nothing is committed, tmp/ is clean,
    every earlier version loads, and the next writer succeeds."""
    _, ops, saved, _ = SCENARIOS[scenario]
    before = set(SCENARIOS[scenario][0])
    points = errno_points(traces[scenario])
    record("test_an_io_error_at_any_point_aborts_cleanly", f"{action} ({scenario})", len(points))
    for i, point in enumerate(points):
        root = fresh(prepared, scenario, tmp_path / f"run{i}")
        result = children.run(root, ops, fault=f"{point}:1:{action}")
        if scenario == "create" and point.startswith("file."):
            # writing the store marker failed, in the first save (which creates the
            # store): that save fails with the errno, and no version exists
            assert result.returncode == 3 and "Error" in result.stderr, result.stderr
            assert not list(Path(root, "versions").glob("*.json"))
            shutil.rmtree(root)
            continue
        assert result.returncode == 3, (point, result.returncode, result.stderr)
        if action == "eio":
            assert f"errno={errno.EIO}" in result.stderr, result.stderr
        else:
            assert result.stderr.startswith("StoreFullError: errno=28"), result.stderr
            if ops[0].startswith("save"):
                assert "is full" in result.stderr, result.stderr
                assert "every earlier version is intact" in result.stderr
        assert not list(Path(root, "tmp").iterdir()), (point, "temp files left behind")
        if ops[0].startswith("save"):
            must_have = before  # the failed save committed nothing
            ids = check_store(root, saved, must_have)
            assert set(ids) == before, (point, ids)
        else:
            check_store(root, saved, before - {2})
        shutil.rmtree(root)


@pytest.mark.parametrize("fsize", [256, 4096, 40_000, 1 << 20])
def test_a_real_file_size_limit_is_a_store_full_error(
    fsize: int, prepared: dict[str, Path], children: Children, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE makes real writes fail with EFBIG at increasing sizes."""
    root = fresh(prepared, "save", tmp_path / "store")
    result = children.run(root, ["save:3"], fsize=fsize)
    if fsize >= 1 << 20:
        assert result.returncode == 0, result.stderr  # everything fits
        check_store(root, SCENARIOS["save"][2], {1, 2, 3})
        return
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"StoreFullError: errno={errno.EFBIG}"), result.stderr
    assert "The version was not saved" in result.stderr
    assert not list(Path(root, "tmp").iterdir())
    assert check_store(root, SCENARIOS["save"][2], {1, 2}) == [1, 2]


def test_free_space_is_checked_before_a_save_that_cannot_fit(
    prepared: dict[str, Path], tmp_path: Path
) -> None:
    root = fresh(prepared, "save", tmp_path / "store")
    objects = sorted(p.name for p in Path(root, "objects").rglob("*"))
    env = {**os.environ, "CKPT_FAULT": "free_space=50000"}  # the file system "has" 50 kB free
    code = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(HERE)!r})
        import ckpt
        from crashcheck import CHUNKS, tree_for
        s = ckpt.Store({str(root)!r}, **CHUNKS)
        print(s.save(tree_for(2)).new_bytes)  # all chunks exist: fits
        try:
            s.save(tree_for(3))  # 3 new chunks of up to 80 kB: refused before writing
        except ckpt.StoreFullError as exc:
            print(exc.errno, exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    first, second = result.stdout.splitlines()
    assert int(first) == 0
    assert second.startswith(f"{errno.ENOSPC} store {root} is full")
    assert "need up to" in second and "nothing was written" in second
    assert sorted(p.name for p in Path(root, "objects").rglob("*")) == objects
    assert not list(Path(root, "tmp").iterdir())
    check_store(root, {1: 1, 2: 2, 3: 2}, {1, 2, 3})


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


ENOSPC_CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    import ckpt
    from crashcheck import CHUNKS, tree_for
    from treecmp import assert_same

    mnt = sys.argv[1]
    store = ckpt.Store(os.path.join(mnt, "store"), **CHUNKS)
    saved = {store.save(tree_for(1)).id: 1}
    outcomes = []

    def free() -> int:
        st = os.statvfs(mnt)
        return st.f_bavail * st.f_frsize

    for k, leave in enumerate([1 << 20, 300_000, 150_000, 80_000, 40_000, 12_000, 4096, 0], 2):
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb") as f:  # leave about `leave` bytes free
            f.write(b"x" * max(free() - leave, 0))
        try:
            v = store.save(tree_for(k))
            saved[v.id] = k
            outcome = "ok"
        except ckpt.StoreFullError as exc:
            assert exc.errno == 28 and "is full" in str(exc), exc
            outcome = "full: " + str(exc).split(": ", 1)[1][:60]
        outcomes.append([leave, outcome])
        assert not os.listdir(os.path.join(mnt, "store", "tmp")), "temp files left"
        for vid, want in saved.items():  # every earlier version stays loadable
            assert_same(store.load(vid), tree_for(want))
        assert all(r.ok for r in store.verify())
        os.unlink(filler)
    store.gc()
    print(json.dumps(outcomes))
    """
)


@pytest.mark.skipif(not unshare_works(), reason="needs unshare -Urm and tmpfs mounts")
def test_a_real_full_file_system_at_increasing_fill_levels(tmp_path: Path) -> None:
    """A 1 MiB tmpfs filled to leave less and less room: each save commits or is a
    StoreFullError; every earlier version keeps loading; no temp files stay."""
    script = tmp_path / "enospc_child.py"
    script.write_text(ENOSPC_CHILD)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    shell = f'mount -t tmpfs -o size=2m tmpfs "$1" && exec "{sys.executable}" "$2" "$1" "$3"'
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", shell, "sh", str(mnt), str(script), str(HERE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    kinds = [o.split(":")[0] for _, o in outcomes]
    assert kinds[0] == "ok" and kinds[-1] == "full", outcomes
    assert "full" in kinds[:-1], outcomes  # more than the empty disk fails
    early = [o for _, o in outcomes if "nothing was written" in o or "need up to" in o]
    assert early, f"no save was refused by the free-space check: {outcomes}"


SIGTERM_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ckpt
    state = {"w": np.random.default_rng(0).standard_normal(12_000_000).astype(np.float32)}
    with ckpt.CheckpointManager(sys.argv[1], handle_signals=True) as mgr:
        for step in range(100):
            state["w"][step] = step
            print("start", step, flush=True)
            stop = mgr.save(step, state)
            print("end", step, flush=True)
            if stop:
                break
        print(json.dumps({"stopped_at": step, "reason": mgr.stop_reason}), flush=True)
    """
)


def test_sigterm_during_a_large_save_commits_or_aborts_cleanly(tmp_path: Path) -> None:
    """SIGTERM lands inside a 48 MB save: that save completes (the handler only
    sets a flag), the next save writes a final version and says stop."""
    rng = random.Random(5)
    for run in range(2):
        root = tmp_path / f"store{run}"
        child = subprocess.Popen(
            [sys.executable, "-c", SIGTERM_CHILD, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        lines = []
        started = None
        for line in child.stdout:
            lines.append(line.strip())
            if line.startswith("end 1"):
                t_save = time.monotonic() - started if started else 0.2
            if line.startswith("start 1"):
                started = time.monotonic()
            if line.startswith("start 2"):
                time.sleep(rng.uniform(0.1, 0.9) * t_save)
                child.send_signal(signal.SIGTERM)
                break
        rest, _ = child.communicate(timeout=120)
        lines += rest.split("\n")
        assert child.returncode == 0, lines
        summary = json.loads(next(x for x in lines if x.startswith("{")))
        assert summary["reason"] == "preempted"
        store = ckpt.Store(root)
        versions = store.versions()
        assert [v.step for v in versions] == list(range(summary["stopped_at"] + 1))
        assert versions[-1].trainer["saved_because"] == "preempted"
        assert all(r.ok for r in store.verify())
        assert store.load()["w"][summary["stopped_at"]] == summary["stopped_at"]
        assert not list(Path(root, "tmp").iterdir())


def test_the_signal_handler_only_sets_a_flag(tmp_path: Path) -> None:
    mgr = ckpt.CheckpointManager(str(tmp_path / "s"))
    # no call, no I/O, no lock: the handler's code touches one attribute
    assert mgr._on_signal.__code__.co_names == ("_preempted",)
    mgr.close()
