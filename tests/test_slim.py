"""Retention that slims instead of deleting: ``Keep(subtrees={"optimizer/**": Keep(last=1)})``.

Old versions keep the model and lose the optimizer state: their manifests are
rewritten (format 3) with the dropped tensors marked and the chunk table
holding only what the rest needs (delta bases included), the bytes are freed,
loads of what was dropped fail naming the version that still has it, and
every listing (cache or not, CLI included) says which versions are slimmed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference_reader as ref
from test_cli import ckpt_json, ckpt_main, ckpt_run

import ckpt
from ckpt import _core
from ckpt.index import parse_manifest, seal_manifest

SLIM = ckpt.Keep(last=4, subtrees={"optimizer/**": ckpt.Keep(last=1)})
SMALL = {"chunk_size": 64 * 1024, "small_threshold": 16 * 1024}


def train_state(i: int) -> dict[str, Any]:
    """Distinct content per version: every version's chunks are its own."""
    rng = np.random.default_rng(i)
    return {
        "model": {
            "w": rng.standard_normal(40_000).astype(np.float32),  # 3 chunks
            "b": rng.standard_normal(10).astype(np.float32),
        },
        "optimizer": {
            "m": rng.standard_normal(40_000).astype(np.float32),
            "v": rng.standard_normal(40_000).astype(np.float32),
            "step": i,
        },
    }


def six_versions(root: Path, losses: list[float] | None = None) -> ckpt.Store:
    store = ckpt.Store(root, **SMALL)
    for i in range(6):
        loss = losses[i] if losses else 1.0 / (i + 1)  # the newest is the best
        store.save(train_state(i), step=i, metrics={"loss": loss})
    return store


def manifest_file(store: ckpt.Store, vid: int) -> Path:
    return Path(store.root, "versions", f"{vid:012d}.json")


def chunks_of(store: ckpt.Store, vid: int, prefix: str) -> dict[str, int]:
    """Chunk id -> stored bytes of the tensors of version ``vid`` under ``prefix``."""
    m = store.manifest(vid)
    return {
        m["chunks"][ci][0]: m["chunks"][ci][2]
        for t in m["tensors"]
        if t["path"].startswith(prefix)
        for ci, _, _ in t["spans"]
    }


def test_slimming_end_to_end(tmp_path: Path) -> None:
    store = six_versions(tmp_path / "s")
    optimizer = {c: n for vid in (3, 4, 5) for c, n in chunks_of(store, vid, "optimizer/").items()}
    deleted = {c: n for vid in (1, 2) for c, n in store.chunk_map(vid).items()}
    before = store.stored_bytes()

    reasons = store.explain(SLIM, monitor="loss", mode="min")
    assert reasons[1] == reasons[2] == ()
    for vid in (3, 4, 5):
        assert reasons[vid] == ("last 4", "optimizer/** dropped: not in last 1")
    assert reasons[6] == ("latest", "best", "last 4")

    dry = store.apply_retention(SLIM, monitor="loss", mode="min", dry_run=True)
    assert (dry.deleted, dry.slimmed) == ((1, 2), (3, 4, 5))
    assert store.stored_bytes() == before and store.manifest(3)["version"] == 1
    result = store.apply_retention(SLIM, monitor="loss", mode="min")
    assert (result.deleted, result.slimmed) == ((1, 2), (3, 4, 5))
    freed = before - store.stored_bytes()
    assert result.freed_bytes == dry.freed_bytes == freed
    assert freed == sum(optimizer.values()) + sum(deleted.values())
    assert not set(optimizer) & {oid for oid, _ in _core.list_objects(store.root)}

    for vid in (3, 4, 5):  # the model is intact, bit-exact
        got = store.load(vid, only="model/**")
        want = train_state(vid - 1)["model"]
        assert got["model"]["w"].tobytes() == want["w"].tobytes()
        assert got["model"]["b"].tobytes() == want["b"].tobytes()
        assert store.load(vid, only="optimizer/step") == {"optimizer": {"step": vid - 1}}
    with pytest.raises(ckpt.SlimmedError) as info:
        store.load(3)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ckpt.CheckpointError)
    assert str(info.value) == (
        "version 3 was slimmed by retention: optimizer/** dropped (Keep subtrees); version 6"
        " still has it; load only=['model/**', 'optimizer/step'] for what version 3 keeps"
    )
    assert info.value.holder == 6 and info.value.paths == ("optimizer/m", "optimizer/v")
    with pytest.raises(ckpt.SlimmedError, match="version 4 was slimmed"):
        store.load(4, only="optimizer/v")
    full = store.load(6)  # the latest keeps everything
    assert full["optimizer"]["m"].tobytes() == train_state(5)["optimizer"]["m"].tobytes()

    assert all(r.ok for r in store.verify())
    assert store.gc().deleted_objects == 0  # retention left nothing behind
    on_disk = json.loads(manifest_file(store, 3).read_bytes())
    assert on_disk["version"] == 3
    assert on_disk["slimmed"] == {
        "patterns": ["optimizer/**"],
        "dropped": ["optimizer/m", "optimizer/v"],
    }
    assert [t["path"] for t in on_disk["tensors"] if t.get("dropped")] == [
        "optimizer/m",
        "optimizer/v",
    ]
    assert all(t["spans"] == [] for t in on_disk["tensors"] if t.get("dropped"))
    assert store.manifest(6)["version"] == 1

    # the independent reader agrees: the kept leaves bit-exact, the others DROPPED
    tree, _ = ref.read_version(store.root, 3)
    assert tree["optimizer"]["m"] is ref.DROPPED and tree["optimizer"]["step"] == 2
    assert tree["model"]["w"].tobytes() == train_state(2)["model"]["w"].tobytes()

    expected = [(3, ("optimizer/**",)), (4, ("optimizer/**",)), (5, ("optimizer/**",)), (6, ())]
    assert [(v.id, v.slimmed) for v in store.versions()] == expected
    assert [(v.id, v.slimmed) for v in ckpt.Store(store.root).versions()] == expected
    os.unlink(Path(store.root, "cache", "versions.jsonl"))
    assert [(v.id, v.slimmed) for v in ckpt.Store(store.root).versions()] == expected
    assert Path(store.root, "cache", "versions.jsonl").exists()  # rebuilt from the manifests
    assert [(v.id, v.slimmed) for v in ckpt.Store(store.root).versions()] == expected
    assert store.versions()[0].summary()["slimmed"] == ["optimizer/**"]

    # idempotent: nothing to do, nothing rewritten
    stamp = manifest_file(store, 3).stat().st_ino, manifest_file(store, 3).read_bytes()
    again = ckpt.Store(store.root).apply_retention(SLIM, monitor="loss", mode="min")
    assert (again.deleted, again.slimmed, again.freed_bytes) == ((), (), 0)
    assert (manifest_file(store, 3).stat().st_ino, manifest_file(store, 3).read_bytes()) == stamp
    assert store.explain(SLIM, monitor="loss", mode="min")[3] == (
        "last 4",
        "optimizer/** dropped: not in last 1",
    )


def test_the_newest_version_still_holding_the_leaves_is_named(tmp_path: Path) -> None:
    store = six_versions(tmp_path / "s")
    keep = ckpt.Keep(subtrees={"optimizer/**": ckpt.Keep(last=2)})  # keeps every version
    assert store.apply_retention(keep, monitor="loss", mode="min").slimmed == (1, 2, 3, 4)
    with pytest.raises(ckpt.SlimmedError, match="version 6 still has it") as info:
        store.load(2)
    assert info.value.holder == 6
    store.delete(6)
    store.delete(5)  # now nothing holds the optimizer of version 2
    with pytest.raises(ckpt.SlimmedError, match="no other version has it"):
        store.load(2, only="optimizer/**")


def test_pinned_and_best_versions_keep_everything(tmp_path: Path) -> None:
    store = six_versions(tmp_path / "s", losses=[0.9, 0.8, 0.1, 0.7, 0.6, 0.5])
    store.pin(4)
    result = store.apply_retention(SLIM, monitor="loss", mode="min")
    assert result.deleted == (1, 2)
    assert result.slimmed == (5,)  # 3 is the best, 4 pinned, 6 the latest
    reasons = store.explain(SLIM, monitor="loss", mode="min")
    assert reasons[3] == ("best", "last 4") and reasons[4] == ("pinned", "last 4")
    for vid in (3, 4, 6):
        assert store.load(vid)["optimizer"]["v"].tobytes() == (
            train_state(vid - 1)["optimizer"]["v"].tobytes()
        )
    assert [v.id for v in store.versions() if v.slimmed] == [5]


def test_slimming_again_extends_the_record(tmp_path: Path) -> None:
    store = six_versions(tmp_path / "s")
    first = ckpt.Keep(subtrees={"optimizer/m": ckpt.Keep(last=1)})
    assert store.apply_retention(first).slimmed == (1, 2, 3, 4, 5)
    m = store.manifest(2)
    assert m["slimmed"] == {"patterns": ["optimizer/m"], "dropped": ["optimizer/m"]}
    assert store.load(2, only="optimizer/v")["optimizer"]["v"].tobytes() == (
        train_state(1)["optimizer"]["v"].tobytes()
    )
    # a pattern that drops nothing new is no change
    assert (
        store.apply_retention(ckpt.Keep(subtrees={"optimizer/m*": ckpt.Keep(last=1)})).slimmed == ()
    )
    before = store.stored_bytes()
    v_chunks = chunks_of(store, 2, "optimizer/v")
    both = ckpt.Keep(subtrees={"optimizer/m": ckpt.Keep(last=1), "optimizer/**": ckpt.Keep(last=2)})
    result = store.apply_retention(both)
    assert result.slimmed == (1, 2, 3, 4)  # 5 keeps optimizer/v: the last 2
    assert store.manifest(2)["slimmed"] == {
        "patterns": ["optimizer/m", "optimizer/**"],
        "dropped": ["optimizer/m", "optimizer/v"],
    }
    assert store.manifest(5)["slimmed"]["patterns"] == ["optimizer/m"]
    assert before - store.stored_bytes() >= sum(v_chunks.values())
    assert [v.slimmed for v in ckpt.Store(store.root).versions()][:2] == [
        ("optimizer/m", "optimizer/**"),
        ("optimizer/m", "optimizer/**"),
    ]
    assert store.explain(first)[5] == ("no count rule", "optimizer/m dropped: not in last 1")
    # undone it cannot be: a policy that would keep them says so
    assert store.explain(ckpt.Keep(last=6))[2] == (
        "last 6",
        "optimizer/m dropped earlier",
        "optimizer/** dropped earlier",
    )
    assert all(r.ok for r in store.verify())


# ------------------------------------------------------------ delta chunks
ROWS, DIM = 16384, 16  # 1 MiB of float32: 4 chunks of 256 KiB
DELTA = {"chunk_size": 256 << 10, "small_threshold": 64 << 10}


def depth_of(store: ckpt.Store, oid: str) -> int:
    head = Path(store.root, "objects", oid[:2], oid[2:]).read_bytes()[:80]
    (version,) = struct.unpack_from("<H", head, 8)
    return int(struct.unpack_from("<I", head, 72)[0]) if version == 2 else 0


def test_a_kept_delta_whose_base_is_a_dropped_leafs_chunk(tmp_path: Path) -> None:
    """Version k holds the embedding E_k and, as "optimizer state", E_{k-1}. E_k's
    chunks are deltas on the parent's E_{k-1} chunks, which in version k are
    also the chunks of optimizer/prev (same bytes, one object, itself a delta
    on E_{k-2}). Dropping optimizer/prev must keep those chunks, now bases
    only, and their chains."""
    store = ckpt.Store(tmp_path / "s", **DELTA)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    embs = []
    for k in range(5):
        prev = emb.copy()
        rows = rng.choice(ROWS, ROWS // 100, replace=False)
        emb[rows] = rng.standard_normal((len(rows), DIM), dtype=np.float32)
        embs.append(emb.copy())
        store.save({"model": {"emb": emb}, "optimizer": {"prev": prev}}, step=k)
    m = store.manifest(4)
    (emb_entry,) = [t for t in m["tensors"] if t["path"] == "model/emb"]
    (prev_entry,) = [t for t in m["tensors"] if t["path"] == "optimizer/prev"]
    emb_rows = [m["chunks"][ci] for ci, _, _ in emb_entry["spans"]]
    assert all(len(r) == 4 for r in emb_rows)  # deltas...
    bases = {m["chunks"][r[3]][0] for r in emb_rows}
    assert bases == {m["chunks"][ci][0] for ci, _, _ in prev_entry["spans"]}  # ...on prev's
    assert max(depth_of(store, b) for b in bases) >= 1  # and those are deltas themselves

    first_prev = chunks_of(store, 1, "optimizer/")  # E_0: no version's embedding
    result = store.apply_retention(ckpt.Keep(subtrees={"optimizer/**": ckpt.Keep(last=1)}))
    assert result.slimmed == (1, 2, 3, 4)
    # every other prev chunk is an embedding's chunk or base: only E_0 goes
    assert result.freed_bytes == sum(first_prev.values()) > 0
    slim = store.manifest(4)
    assert slim["version"] == 3
    spanned = {ci for t in slim["tensors"] for ci, _, _ in t["spans"]}
    listed = {c[0] for c in slim["chunks"]}
    assert bases <= listed  # base-only entries now
    for i, c in enumerate(slim["chunks"]):
        if i not in spanned:  # base-only entries come after the span chunks
            assert i >= len(spanned)
        if len(c) == 4:  # every chain is in the table, down to a full chunk
            assert slim["chunks"][c[3]][1] == c[1]
    for vid in range(1, 5):
        got = store.load(vid, only="model/**")["model"]["emb"]
        assert got.tobytes() == embs[vid - 1].tobytes()
        tree, _ = ref.read_version(store.root, vid)
        assert tree["model"]["emb"].tobytes() == embs[vid - 1].tobytes()
    assert all(r.ok for r in store.verify())
    assert store.gc().deleted_objects == 0
    # without the older versions, the chains still hold
    for vid in (1, 2, 3):
        store.delete(vid)
    store.gc()
    assert store.load(4, only="model/**")["model"]["emb"].tobytes() == embs[3].tobytes()
    assert all(r.ok for r in store.verify())


def test_a_dropped_delta_leaves_its_kept_base(tmp_path: Path) -> None:
    """The reverse: the optimizer's chunks are deltas on the previous version's;
    dropping the optimizer of the previous version drops its chunks' spans,
    but the newest version lists them as its bases and keeps them."""
    store = ckpt.Store(tmp_path / "s", **DELTA)
    rng = np.random.default_rng(1)
    state = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    saved = []
    for k in range(3):
        state[rng.choice(ROWS, ROWS // 100, replace=False)] += 1.0
        saved.append(state.copy())
        store.save({"model": {"w": np.full(8, k, np.float32)}, "optimizer": {"m": state}})
    result = store.apply_retention(ckpt.Keep(subtrees={"optimizer/**": ckpt.Keep(last=1)}))
    assert result.slimmed == (1, 2)
    assert store.load(3)["optimizer"]["m"].tobytes() == saved[2].tobytes()
    assert all(r.ok for r in store.verify())


# ------------------------------------------------------------ crash safety
def test_a_failed_rewrite_leaves_the_full_version_and_frees_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = six_versions(tmp_path / "s")
    objects = {oid for oid, _ in _core.list_objects(store.root)}

    def fail(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error", dst)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="Input/output"):
        store.apply_retention(ckpt.Keep(subtrees={"optimizer/**": ckpt.Keep(last=1)}))
    monkeypatch.undo()
    assert {oid for oid, _ in _core.list_objects(store.root)} == objects
    assert store.manifest(1)["version"] == 1
    assert store.load(1)["optimizer"]["m"].tobytes() == train_state(0)["optimizer"]["m"].tobytes()
    # the cache line came first: the listing errs on the safe side (slimmed, not full) ...
    assert store.versions()[0].slimmed == ("optimizer/**",)
    # ... until the next pass, which does the work
    result = ckpt.Store(store.root).apply_retention(
        ckpt.Keep(subtrees={"optimizer/**": ckpt.Keep(last=1)})
    )
    assert result.slimmed == (1, 2, 3, 4, 5) and result.freed_bytes > 0
    assert all(r.ok for r in store.verify())


# ------------------------------------------------------------ the format
def reseal(path: Path, m: dict[str, Any]) -> None:
    m = {k: v for k, v in m.items() if k != "checksum"}
    path.write_bytes(seal_manifest(json.dumps(m, separators=(",", ":")).encode()))


BREAK = {
    "slimmed in format 1": lambda m: {**m, "version": 1},
    "slimmed without version 3": lambda m: {**m, "version": 2},
    "no record": lambda m: {k: v for k, v in m.items() if k != "slimmed"},
    "extra key": lambda m: {**m, "slimmed": {**m["slimmed"], "at": 1}},
    "no patterns": lambda m: {**m, "slimmed": {**m["slimmed"], "patterns": []}},
    "a pattern twice": lambda m: {
        **m,
        "slimmed": {**m["slimmed"], "patterns": ["optimizer/**", "optimizer/**"]},
    },
    "a leaf missing": lambda m: {**m, "slimmed": {**m["slimmed"], "dropped": ["optimizer/m"]}},
    "a leaf too many": lambda m: {
        **m,
        "slimmed": {**m["slimmed"], "dropped": [*m["slimmed"]["dropped"], "model/w"]},
    },
    "no pattern matches": lambda m: {**m, "slimmed": {**m["slimmed"], "patterns": ["model/*"]}},
    "dropped with spans": lambda m: {
        **m,
        "tensors": [{**t, "spans": [[0, 0, 4]]} if t.get("dropped") else t for t in m["tensors"]],
    },
    "dropped false": lambda m: {
        **m,
        "tensors": [{**t, "dropped": False} if t.get("dropped") else t for t in m["tensors"]],
    },
}


@pytest.mark.parametrize("edit", list(BREAK))
def test_malformed_slimmed_manifests_are_refused_by_both_readers(tmp_path: Path, edit: str) -> None:
    store = six_versions(tmp_path / "s")
    store.apply_retention(SLIM, monitor="loss", mode="min")
    path = manifest_file(store, 3)
    m = json.loads(path.read_bytes())
    reseal(path, BREAK[edit](m))
    with pytest.raises(ckpt.FormatError, match="version 3: malformed manifest"):
        parse_manifest(path.read_bytes(), "version 3")
    with pytest.raises(ref.ReaderError):
        ref.read_version(store.root, 3)


def test_a_dropped_entry_in_a_format_2_manifest_is_refused(tmp_path: Path) -> None:
    store = six_versions(tmp_path / "s")
    path = manifest_file(store, 1)
    m = json.loads(path.read_bytes())
    m["tensors"][0] = {**m["tensors"][0], "dropped": True, "spans": []}
    reseal(path, m)
    with pytest.raises(ckpt.FormatError, match="in manifest format 3 only"):
        store.manifest(1)
    with pytest.raises(ref.ReaderError):
        ref.read_version(store.root, 1)


def test_cache_lines_of_full_versions_keep_the_older_layout(tmp_path: Path) -> None:
    store = six_versions(tmp_path / "s")
    store.apply_retention(SLIM, monitor="loss", mode="min")
    ckpt.Store(store.root).versions()
    os.unlink(Path(store.root, "cache", "versions.jsonl"))
    ckpt.Store(store.root).versions()  # rewrites the cache
    lines = Path(store.root, "cache", "versions.jsonl").read_bytes().splitlines()
    heads = [json.loads(line.partition(b"\t")[0]) for line in lines]
    assert [len(h) for h in heads] == [12, 12, 12, 11]
    assert heads[0][10] == ["optimizer/**"] and heads[0][11] == len(lines[0].partition(b"\t")[2])


# ------------------------------------------------------------ the manager and the CLI
def test_the_manager_slims_after_every_save_and_resumes_from_a_full_version(
    tmp_path: Path,
) -> None:
    keep = ckpt.Keep(last=3, subtrees={"optimizer/**": ckpt.Keep(last=1)})
    with ckpt.CheckpointManager(str(tmp_path / "run"), keep=keep, durable=False, **SMALL) as mgr:
        for step in range(5):
            mgr.save(step, train_state(step))
        versions = mgr.store.versions()
        assert [(v.step, v.slimmed) for v in versions] == [
            (2, ("optimizer/**",)),
            (3, ("optimizer/**",)),
            (4, ()),
        ]
    with ckpt.CheckpointManager(str(tmp_path / "run"), keep=keep, durable=False) as mgr:
        state = mgr.restore_latest()
        assert mgr.next_step == 5
        assert state["optimizer"]["v"].tobytes() == train_state(4)["optimizer"]["v"].tobytes()
    # the recorded policy is read back, subtrees included
    assert ckpt.Store(tmp_path / "run").policy()[0] == keep
    assert ckpt.Store(tmp_path / "run").explain()[4] == (
        "last 3",
        "optimizer/** dropped: not in last 1",
    )


def test_ls_and_show_mark_slimmed_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = six_versions(tmp_path / "s")
    store.apply_retention(SLIM, monitor="loss", mode="min")
    data = ckpt_json(capsys, "ls", store.root)
    assert [(v["id"], v["slimmed"]) for v in data["versions"]] == [
        (3, ["optimizer/**"]),
        (4, ["optimizer/**"]),
        (5, ["optimizer/**"]),
        (6, []),
    ]
    code, out, _ = ckpt_main(capsys, "ls", store.root)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["3"].rstrip().endswith("slim") and "slim" not in rows["6"]
    shown = ckpt_json(capsys, "show", store.root, "3")
    assert shown["slimmed"] == {
        "patterns": ["optimizer/**"],
        "dropped": ["optimizer/m", "optimizer/v"],
    }
    assert [t["path"] for t in shown["tensors"] if t["dropped"]] == ["optimizer/m", "optimizer/v"]
    code, out, _ = ckpt_main(capsys, "show", store.root, "3")
    words = " ".join(out.split())  # the field may wrap
    assert "slimmed optimizer/** dropped by retention (2 leaves: optimizer/m, optimizer/v)" in words
    assert "optimizer/m (dropped)" in out
    assert ckpt_json(capsys, "show", store.root, "6")["slimmed"] is None
    code, _, err = ckpt_main(capsys, "restore", store.root, "3", "--out", str(tmp_path / "x.npz"))
    assert (
        code == 1
        and "version 3 was slimmed by retention" in err
        and "version 6 still has it" in err
    )


def test_gc_slims_with_the_slim_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = six_versions(tmp_path / "s")
    before = store.stored_bytes()
    dry = ckpt_json(
        capsys, "gc", store.root, "--keep-last", "4", "--slim", "optimizer/**=last:1", "--dry-run"
    )
    assert dry["versions"] == [1, 2] and dry["slimmed"] == [3, 4, 5] and not dry["applied"]
    assert dry["rules"]["subtrees"] == {"optimizer/**": ckpt.Keep(last=1).to_dict()}
    code, out, _ = ckpt_main(
        capsys, "gc", store.root, "--slim", "optimizer/**=last:1,seconds:1e9", "--yes"
    )
    # seconds:1e9 keeps the oldest version's optimizer (a time rule keeps the first)
    assert code == 0 and out.startswith("slimmed 4 versions (2, 3, 4, 5), freeing")
    assert [v.slimmed for v in ckpt.Store(store.root).versions()][:2] == [(), ("optimizer/**",)]
    assert store.stored_bytes() < before
    r = ckpt_run("gc", store.root, "--slim", "optimizer/**=newest:1")
    assert r.returncode == 2 and "unknown rule 'newest:1'" in r.stderr
