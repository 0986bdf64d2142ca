"""Model-based testing: random sequences of store operations against a plain dict.

Rules: save, load, delete, pin, unpin, gc, apply retention, "crash and
reopen" (the states a killed writer leaves: orphan chunks, temp files of
chunks and manifests, the dead writer's holder line in the lock file, then a
fresh Store object), corrupt a chunk and repair it. After every step the
store must agree with the model: the same versions, pins and latest; every
intact version loads bit-exact; exactly the versions using a damaged chunk
fail to load and are the ones verify reports.

CKPT_LONG_TESTS=1 runs many more and longer sequences.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from crashcheck import record
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from treecmp import assert_same

import ckpt
from ckpt import _core

LONG = os.environ.get("CKPT_LONG_TESTS") == "1"


def make_tree(seeds: list[int], sizes: list[int], step: int) -> dict[str, object]:
    """A tree whose tensors come from a few seeds, so that saves share chunks."""
    tree: dict[str, object] = {"step": step}
    for i, (seed, size) in enumerate(zip(seeds, sizes, strict=False)):
        rng = np.random.default_rng(seed)
        dtype = (np.float32, np.int64, np.uint8)[seed % 3]
        tree[f"t{i}"] = (rng.standard_normal(size) * 100).astype(dtype)
    return tree


trees = st.builds(
    make_tree,
    st.lists(st.integers(0, 5), min_size=1, max_size=3),
    st.lists(st.sampled_from([0, 7, 300, 3000, 9000]), min_size=1, max_size=3),
    st.integers(0, 10**6),
)


class StoreMachine(RuleBasedStateMachine):
    versions = Bundle("versions")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ckpt-model-")
        self.root = os.path.join(self.dir, "store")
        self.store = self.open()
        self.model: dict[int, dict[str, object]] = {}
        self.pins: set[int] = set()
        self.highest = 0
        self.damaged: dict[str, bytes] = {}  # chunk id -> its original bytes

    def open(self) -> ckpt.Store:
        return ckpt.Store(self.root, chunk_size=4096, small_threshold=1024, durable=False)

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def chunks_of(self, vid: int) -> set[str]:
        return {c[0] for c in self.store.manifest(vid)["chunks"]}

    def broken(self) -> set[int]:
        return {vid for vid in self.model if self.chunks_of(vid) & set(self.damaged)}

    # ------------------------------------------------------------------ rules
    @rule(target=versions, tree=trees)
    def save(self, tree: dict[str, object]) -> int:
        v = self.store.save(tree, step=int(tree["step"]))  # type: ignore[call-overload]
        assert v.id > self.highest  # ids only grow, never reused
        self.highest = v.id
        self.model[v.id] = tree
        return v.id

    @rule(vid=versions)
    def load(self, vid: int) -> None:
        if vid not in self.model:
            try:
                self.store.load(vid)
            except ckpt.VersionNotFoundError:
                return
            raise AssertionError(f"deleted version {vid} still loads")
        if vid in self.broken():
            try:
                self.store.load(vid)
            except (ckpt.IntegrityError, ckpt.FormatError) as exc:
                assert f"version {vid}" in str(exc)
                return
            raise AssertionError(f"damaged version {vid} loaded")
        assert_same(self.store.load(vid), self.model[vid])

    @rule(vid=consumes(versions))
    def delete(self, vid: int) -> None:
        if vid not in self.model:
            return
        if vid in self.pins:
            try:
                self.store.delete(vid)
            except ckpt.VersionPinnedError:
                return
            raise AssertionError("a pinned version was deleted")
        self.store.delete(vid)
        del self.model[vid]

    @rule(vid=versions)
    def pin(self, vid: int) -> None:
        if vid in self.model:
            self.store.pin(vid)
            self.pins.add(vid)

    @rule(vid=versions)
    def unpin(self, vid: int) -> None:
        if vid in self.model:
            self.store.unpin(vid)
            self.pins.discard(vid)

    @rule()
    def gc(self) -> None:
        result = self.store.gc()
        assert not result.missing
        self.forget_collected_damage()

    def forget_collected_damage(self) -> None:
        for cid in list(self.damaged):  # collected: no longer damage anyone
            if not Path(self.root, "objects", cid[:2], cid[2:]).exists():
                del self.damaged[cid]

    @rule(last=st.integers(1, 4))
    def retain(self, last: int) -> None:
        result = self.store.apply_retention(ckpt.Keep(last=last))
        for vid in result.deleted:
            assert vid not in self.pins and vid != max(self.model)
            del self.model[vid]
        kept = sorted(self.model)
        assert set(kept[-last:]) | (self.pins & set(kept)) <= set(kept)
        self.forget_collected_damage()  # retention deletes unreferenced chunks too

    @rule(
        orphans=st.booleans(),
        debris=st.booleans(),
        manifest=st.booleans(),
        holder=st.booleans(),
    )
    def crash_and_reopen(self, orphans: bool, debris: bool, manifest: bool, holder: bool) -> None:
        """What a writer killed at some moment leaves behind, then a new process."""
        if orphans:  # chunks written, no manifest
            _core.save_chunks(
                self.root,
                [np.random.default_rng(len(self.model)).bytes(5000)],
                [1],
                chunk_size=4096,
                small_threshold=1024,
                level=1,
                min_saving=0.05,
                durable=False,
            )
        if debris:  # a half-written chunk in tmp/
            Path(self.root, "tmp", "ab" * 32 + ".999.0.chunk").write_bytes(b"CKPTCHNK half")
        if manifest:  # a manifest written to tmp/ but never renamed
            Path(self.root, "tmp", f"{self.highest + 1:012d}.json.999.1.tmp").write_bytes(b"{")
        if holder:  # the dead writer's line in the lock file
            Path(self.root, "lock").write_text("pid 999999 on elsewhere\n")
        self.store = self.open()

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), how=st.sampled_from(["flip", "truncate", "zero"]))
    def corrupt(self, data: st.DataObject, how: str) -> None:
        vid = data.draw(st.sampled_from(sorted(self.model)))
        chunks = sorted(self.chunks_of(vid) - set(self.damaged))
        if not chunks:
            return
        cid = data.draw(st.sampled_from(chunks))
        path = Path(self.root, "objects", cid[:2], cid[2:])
        original = path.read_bytes()
        if how == "flip":
            pos = data.draw(st.integers(0, len(original) - 1))
            damaged = original[:pos] + bytes([original[pos] ^ 0x10]) + original[pos + 1 :]
        elif how == "truncate":
            damaged = original[: len(original) // 2]
        else:
            damaged = bytes(len(original))
        path.write_bytes(damaged)
        self.damaged[cid] = original

    @precondition(lambda self: bool(self.damaged))
    @rule()
    def repair(self) -> None:
        for cid, original in self.damaged.items():
            Path(self.root, "objects", cid[:2], cid[2:]).write_bytes(original)
        self.damaged.clear()

    # ------------------------------------------------------------- invariants
    @invariant()
    def agrees_with_the_model(self) -> None:
        listed = [v.id for v in self.store.versions()]
        assert listed == sorted(self.model)
        latest = self.store.latest()
        assert (latest.id if latest else None) == (max(self.model) if self.model else None)
        assert self.store.pinned() & set(self.model) == self.pins & set(self.model)

    @invariant()
    def verify_reports_exactly_the_damage(self) -> None:
        bad = {r.version for r in self.store.verify() if not r.ok}
        assert bad == self.broken()

    @invariant()
    def a_new_writer_sweeps_tmp(self) -> None:
        if self.store._lock_fd is None:
            with self.store._writer():
                pass
            assert not list(Path(self.root, "tmp").iterdir())


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=400 if LONG else 25,
    stateful_step_count=40 if LONG else 15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_record_the_model_based_settings() -> None:
    s = TestStoreMachine.settings
    record("test_model_based", "sequences x steps", s.max_examples * s.stateful_step_count)
