"""A store from someone else: malicious manifests, chunk bombs, planted symlinks.

Each hostile store is opened, listed, loaded, verified and collected in a
child process whose address space is capped (RLIMIT_AS = 1 GiB, about twice
what the child needs): a load that tried a large allocation would die with
MemoryError there. Every case must give its documented error (mostly
FormatError), and nothing outside the stores may change (sentinel files).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from crashcheck import record

import ckpt
from ckpt.index import seal_manifest

HERE = Path(__file__).parent
zstandard = pytest.importorskip("zstandard")
blake3 = pytest.importorskip("blake3")

Manifest = dict[str, Any]


def base_tree() -> dict[str, object]:
    return {
        "w": np.arange(20_000, dtype=np.float32),
        "b": np.arange(10, dtype=np.int64),
        "x": 1.5,
        "name": "s",
    }


def write_manifest(root: Path, m: Manifest | bytes, vid: int = 1) -> None:
    """Writes a manifest as an attacker would: validly sealed (the checksum is public)."""
    body = m if isinstance(m, bytes) else json.dumps(m, separators=(",", ":")).encode()
    if not isinstance(m, bytes):
        body = seal_manifest(body)
    Path(root, "versions", f"{vid:012d}.json").write_bytes(body)


def chunk_file(frame: bytes, raw_len: int) -> bytes:
    """A chunk file (format 1) of one zstd plane holding ``frame``."""
    header = b"CKPTCHNK" + struct.pack("<HBB4xQ", 1, 0, 1, raw_len)
    return header + struct.pack("<B7xQ", 1, len(frame)) + frame


def fcs_patched(frame: bytes, value: int) -> bytes:
    """The frame with its Frame_Content_Size field set to ``value`` (field size kept)."""
    fhd = frame[4]
    size = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    start = 5 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 3]
    value -= 256 if size == 2 else 0
    value = min(value, (1 << (8 * size)) - 1)
    return frame[:start] + value.to_bytes(size, "little") + frame[start + size :]


def add_bomb(root: Path, m: Manifest, content: bytes, frame: bytes, raw_len: int = 4096) -> None:
    """Adds tensor "bomb" (U8[raw_len]) stored in one chunk holding ``frame``."""
    cid = blake3.blake3(content).hexdigest()
    (root / "objects" / cid[:2]).mkdir(exist_ok=True)
    (root / "objects" / cid[:2] / cid[2:]).write_bytes(chunk_file(frame, raw_len))
    m["chunks"].append([cid, raw_len, len(frame) + 40])
    m["tensors"].append(
        {
            "path": "bomb",
            "dtype": "U8",
            "shape": [raw_len],
            "nbytes": raw_len,
            "spans": [[len(m["chunks"]) - 1, 0, raw_len]],
        }
    )
    m["tree"]["k"].append("bomb")
    m["tree"]["v"].append({"t": "tensor", "i": len(m["tensors"]) - 1})


class Sneaky:
    """Unpickling it makes a directory: the sentinel that must never appear."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.mkdir, (self.target,))


def tensor(m: Manifest, path: str) -> dict[str, Any]:
    return next(t for t in m["tensors"] if t["path"] == path)


def deep_tree(m: Manifest) -> None:
    node: dict[str, Any] = {"t": "none"}
    for _ in range(70):
        node = {"t": "list", "v": [node]}
    m["tree"]["k"].append("deep")
    m["tree"]["v"].append(node)


Case = Callable[[Path, Manifest], object]

#: case -> (what it does to the store, the error a load must raise)
CASES: dict[str, tuple[Case, str]] = {
    "shape-product-overflows-64-bits": (
        lambda r, m: tensor(m, "w").update(shape=[2**32, 2**32, 2**32], nbytes=2**98),
        "FormatError",
    ),
    "dim-of-2**63": (
        lambda r, m: tensor(m, "w").update(shape=[2**63], nbytes=2**65),
        "FormatError",
    ),
    "negative-dim": (lambda r, m: tensor(m, "w").update(shape=[-1, -20_000]), "FormatError"),
    "huge-dims-and-a-huge-chunk": (
        lambda r, m: (
            tensor(m, "w").update(shape=[2**40], nbytes=2**42, spans=[[0, 0, 2**42]]),
            m["chunks"][0].__setitem__(1, 2**42),
        ),
        "FormatError",
    ),
    "huge-dims-spread-over-1-GiB-spans": (
        lambda r, m: (
            tensor(m, "w").update(shape=[2**33], nbytes=2**35, spans=[[0, 0, 2**30]] * 32),
            m["chunks"][0].__setitem__(1, 2**30),
        ),
        "FormatError",  # the chunk's header says otherwise: refused before allocating 32 GiB
    ),
    "dtype-disagrees-with-nbytes": (lambda r, m: tensor(m, "w").update(dtype="F64"), "FormatError"),
    "unknown-dtype": (lambda r, m: tensor(m, "w").update(dtype="F128"), "FormatError"),
    "span-past-its-chunk": (
        lambda r, m: tensor(m, "b").update(spans=[[1, 10**9, 80]]),
        "FormatError",
    ),
    "span-of-a-missing-chunk-index": (
        lambda r, m: tensor(m, "b").update(spans=[[99, 0, 80]]),
        "FormatError",
    ),
    "negative-span-offset": (
        lambda r, m: tensor(m, "b").update(spans=[[1, -8, 80]]),
        "FormatError",
    ),
    "spans-hold-more-than-the-tensor": (
        lambda r, m: tensor(m, "b")["spans"].append([1, 0, 8]),
        "FormatError",
    ),
    "duplicate-tensor-paths": (
        lambda r, m: tensor(m, "b").update(path="w"),
        "FormatError",
    ),
    "duplicate-dict-keys": (lambda r, m: m["tree"]["k"].__setitem__(1, "w"), "FormatError"),
    "two-leaves-share-a-tensor": (
        lambda r, m: m["tree"]["v"].__setitem__(1, dict(m["tree"]["v"][0])),
        "FormatError",
    ),
    "tree-70-levels-deep": (lambda r, m: deep_tree(m), "FormatError"),
    "view-reaching-past-its-base": (
        lambda r, m: (
            m["tree"]["v"].append(
                {"t": "view", "i": 0, "offset": 0, "shape": [10**6], "stride": [1]}
            )
            or m["tree"]["k"].append("v")
        ),
        "FormatError",
    ),
    "non-hex-object-name": (lambda r, m: m["chunks"][0].__setitem__(0, "zz" * 32), "FormatError"),
    "short-object-name": (
        lambda r, m: m["chunks"][0].__setitem__(0, m["chunks"][0][0][:62]),
        "FormatError",
    ),
    "uppercase-object-name": (
        lambda r, m: m["chunks"][0].__setitem__(0, m["chunks"][0][0].upper()),
        "FormatError",
    ),
    "object-name-with-dotdot": (
        lambda r, m: m["chunks"][0].__setitem__(0, "../../../outside/secret"),
        "FormatError",
    ),
    "absolute-object-name": (
        lambda r, m: m["chunks"][0].__setitem__(0, str(r.parent / "outside" / "secret")),
        "FormatError",
    ),
    "object-name-with-nul": (
        lambda r, m: m["chunks"][0].__setitem__(0, "0" * 63 + "\0"),
        "FormatError",
    ),
    "chunk-of-a-newer-format": (
        lambda r, m: (
            p := r / "objects" / m["chunks"][0][0][:2] / m["chunks"][0][0][2:]
        ).write_bytes(p.read_bytes()[:8] + b"\4\0" + p.read_bytes()[10:]),
        "FormatError",
    ),
    "manifest-id-disagrees": (lambda r, m: m.update(id=7), "FormatError"),
    "names-that-look-like-paths": (  # leaf names are data, never paths: loads fine
        lambda r, m: (
            tensor(m, "w").update(path="../../../outside/w"),
            m["tree"]["k"].__setitem__(0, "/etc/../../outside\0w"),
        ),
        "ok",
    ),
    "zstd-bomb": (  # 64 MiB of zeros in a 4 KiB chunk
        lambda r, m: add_bomb(
            r, m, bytes(4096), zstandard.ZstdCompressor().compress(bytes(1 << 26))
        ),
        "IntegrityError",
    ),
    "frame-header-claims-4-GiB": (
        lambda r, m: add_bomb(
            r,
            m,
            bytes(4096),
            fcs_patched(zstandard.ZstdCompressor().compress(bytes(1 << 20)), 1 << 32),
        ),
        "IntegrityError",
    ),
    "frame-header-understates-its-content": (
        lambda r, m: add_bomb(
            r,
            m,
            bytes(4096),
            fcs_patched(zstandard.ZstdCompressor().compress(bytes(1 << 20)), 4096),
        ),
        "IntegrityError",
    ),
    "frame-with-a-2-GiB-window": (  # a valid frame: decodes into the 4 KiB target, no window
        lambda r, m: add_bomb(
            r,
            m,
            bytes(range(256)) * 16,
            zstandard.ZstdCompressor(
                compression_params=zstandard.ZstdCompressionParameters(
                    window_log=31, write_content_size=False
                ),
            ).compress(bytes(range(256)) * 16),
        ),
        "ok",
    ),
}

#: cases that replace the manifest's bytes instead of editing its fields
RAW_CASES: dict[str, tuple[Callable[[Path], bytes | None], str]] = {
    "json-nested-100000-deep": (
        lambda r: (
            b'{"format":"ckpt-manifest","version":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        ),
        "FormatError",
    ),
    "a-1-GiB-string": (lambda r: None, "FormatError"),  # written as a sparse file below
    "an-int-of-100000-digits": (
        lambda r: b'{"format":"ckpt-manifest","version":1,"step":' + b"7" * 100_000 + b"}",
        "FormatError",
    ),
    "a-pickle-instead-of-json": (
        lambda r: pickle.dumps(Sneaky(str(r.parent / "outside" / "pwned-manifest"))),
        "FormatError",
    ),
    # format 3 is a slimmed version (docs/format.md 7.7): 4 is the first this ckpt does not read
    "manifest-of-a-newer-format": (
        lambda r: seal_manifest(b'{"format":"ckpt-manifest","version":4,"id":1}'),
        "FormatError",
    ),
}


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    import ckpt

    def attempt(fn):
        try:
            said = fn()
            return said if isinstance(said, str) else "ok"
        except MemoryError:
            return "MemoryError"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    out = {}
    for root in sys.argv[1:]:
        r = {}
        try:
            store = ckpt.Store(root, create=False)
        except Exception as exc:
            out[root] = {"open": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        r["versions"] = attempt(store.versions)
        r["load"] = attempt(lambda: store.load(1))
        r["load_part"] = attempt(lambda: store.load(1, only="b"))
        found = lambda: "damage found" if not all(v.ok for v in store.verify()) else 0  # noqa: E731
        r["verify"] = attempt(found)
        r["gc"] = attempt(store.gc)
        out[root] = r
    print(json.dumps(out))
    """
)


def snapshot(path: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, str]]]:
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not touch")
    (outside / ("ab" * 31)).write_bytes(b"looks like an object")
    template = base / "template"
    ckpt.Store(template, chunk_size=64 * 1024, small_threshold=16 * 1024).save(base_tree())
    m0 = json.loads(Path(template, "versions", "000000000001.json").read_bytes())
    del m0["checksum"]
    roots = []
    import shutil

    for name, (damage, _) in CASES.items():
        root = base / name
        shutil.copytree(template, root)
        m = json.loads(json.dumps(m0))
        damage(root, m)
        write_manifest(root, m)
        roots.append(root)
    for name, (make, _) in RAW_CASES.items():
        root = base / name
        shutil.copytree(template, root)
        data = make(root)
        if data is None:
            with open(root / "versions" / "000000000001.json", "wb") as f:
                f.write(b'{"format":"ckpt-manifest","version":1,"meta":{"s":"')
                f.truncate((1 << 30) + 100)  # sparse: nothing is really written
        else:
            write_manifest(root, data)
        roots.append(root)
    root = base / "pickled-leaf"  # a real pickle node, saved with the opt-in
    store = ckpt.Store(root)
    store.save({"w": np.ones(3), "obj": Sneaky(str(outside / "pwned"))}, allow_pickle=True)
    roots.append(root)
    root = base / "store-of-a-newer-format"
    shutil.copytree(template, root)
    marker = json.loads((root / "ckpt-store.json").read_text())
    (root / "ckpt-store.json").write_text(json.dumps({**marker, "version": 2}))
    roots.append(root)

    before = snapshot(outside)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, roots)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(outside) == before, "something outside the stores changed"
    outcomes = {Path(k).name: v for k, v in json.loads(result.stdout).items()}
    record("test_hostile", "hostile stores", len(outcomes))
    return base, outcomes


@pytest.mark.parametrize("case", [*CASES, *RAW_CASES])
def test_hostile_manifests_and_chunks_are_refused_with_bounded_memory(
    case: str, hostile: tuple[Path, dict[str, dict[str, str]]]
) -> None:
    _, outcomes = hostile
    expected = {**CASES, **RAW_CASES}[case][1]
    got = outcomes[case]
    assert "MemoryError" not in json.dumps(got), got
    assert got["load"].split(":")[0] == expected, got
    if expected != "ok":
        assert "version 1" in got["load"], got  # the error names the version
        assert got["verify"] == "damage found", got  # verify reports it, never raises
        if "object " not in got["load"]:  # a malformed manifest, not a chunk: gc stops
            assert got["gc"].startswith("FormatError: gc stopped before deleting"), got
    if "newer-format" in case:
        assert "upgrade ckpt" in got["load"], got


def test_a_pickled_leaf_is_never_unpickled_without_the_opt_in(
    hostile: tuple[Path, dict[str, dict[str, str]]],
) -> None:
    base, outcomes = hostile
    got = outcomes["pickled-leaf"]
    assert got["load"].startswith("UnsafeLoadError: version 1 holds pickled objects"), got
    assert got["load_part"] == "ok"  # the other leaves load without it
    assert not (base / "outside" / "pwned").exists()


def test_a_store_of_a_newer_format_is_refused_at_open(
    hostile: tuple[Path, dict[str, dict[str, str]]],
) -> None:
    _, outcomes = hostile
    got = outcomes["store-of-a-newer-format"]
    assert got["open"].startswith("FormatError") and "upgrade ckpt-store" in got["open"], got


# ------------------------------------------------------------------ symlinks
@pytest.fixture
def planted(tmp_path: Path) -> tuple[ckpt.Store, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not touch")
    store = ckpt.Store(tmp_path / "store", chunk_size=64 * 1024, small_threshold=16 * 1024)
    store.save(base_tree())
    store.save({"other": np.zeros(30_000, np.float32)})
    return store, outside


def test_a_symlinked_object_directory_is_never_followed(
    planted: tuple[ckpt.Store, Path],
) -> None:
    store, outside = planted
    cid = store.manifest(2)["chunks"][0][0]
    prefix = Path(store.root, "objects", cid[:2])
    moved = outside / "moved"
    prefix.rename(moved)  # the real directory goes outside, a symlink takes its place
    prefix.symlink_to(moved)
    before = snapshot(outside)
    with pytest.raises(ckpt.FormatError, match="version 2: tensor 'other'.*not a directory"):
        store.load(2)  # not read through the link
    store.delete(2)
    store.gc()  # its chunk is garbage now: but never deleted through the link
    with pytest.raises(ckpt.FormatError, match="not a directory"):
        store.save({"other": np.zeros(30_000, np.float32)})  # nor written through it
    assert snapshot(outside) == before
    assert prefix.is_symlink()


def test_symlinks_planted_in_versions_and_tmp_are_never_followed(
    planted: tuple[ckpt.Store, Path],
) -> None:
    store, outside = planted
    copy = outside / "manifest.json"
    copy.write_bytes(Path(store.root, "versions", "000000000001.json").read_bytes())
    link = Path(store.root, "versions", "000000000009.json")
    link.symlink_to(copy)
    (Path(store.root, "tmp") / "debris").symlink_to(outside / "secret")
    before = snapshot(outside)
    with pytest.raises(ckpt.FormatError, match="symlink"):
        store.load(9)
    assert [v.id for v in store.versions()] == [1, 2]  # not listed
    store.save({"w": np.ones(4)})  # the writer sweeps tmp/: the link goes, the target stays
    assert not (Path(store.root, "tmp") / "debris").exists()
    store.delete(9)  # removes the link itself
    assert not link.exists() and not link.is_symlink()
    assert snapshot(outside) == before


@pytest.mark.parametrize("directory", ["tmp", "objects", "versions", "pins", "cache"])
def test_a_symlinked_store_directory_is_refused(
    planted: tuple[ckpt.Store, Path], directory: str
) -> None:
    store, outside = planted
    path = Path(store.root, directory)
    target = outside / directory
    path.rename(target)
    path.symlink_to(target)
    (target / "bait").write_bytes(b"a tmp sweep would delete me")
    before = snapshot(outside)
    with pytest.raises(ckpt.FormatError, match="not a directory"):
        ckpt.Store(store.root).save({"w": np.ones(4)})
    assert snapshot(outside) == before


def test_an_object_that_is_a_symlink_is_refused_and_replaced_by_the_next_save(
    planted: tuple[ckpt.Store, Path],
) -> None:
    store, outside = planted
    cid = store.manifest(2)["chunks"][0][0]
    obj = Path(store.root, "objects", cid[:2], cid[2:])
    obj.rename(outside / "real")
    obj.symlink_to(outside / "real")
    before = snapshot(outside)
    with pytest.raises(ckpt.FormatError, match="symlink"):
        store.load(2)
    store.save({"other": np.zeros(30_000, np.float32)})  # writes a real object over the link
    assert obj.is_file() and not obj.is_symlink()
    assert store.load(2)["other"].tolist()[:3] == [0.0, 0.0, 0.0]
    assert snapshot(outside) == before


def test_a_chunk_of_a_newer_format_fails_before_any_byte_is_read(tmp_path: Path) -> None:
    """The headers are checked before anything is allocated or overwritten: arrays
    passed with into= keep their contents."""
    store = ckpt.Store(tmp_path / "s", chunk_size=64 * 1024, small_threshold=16 * 1024)
    store.save({"a": np.arange(40_000, dtype=np.float32), "b": np.ones(40_000, np.float32)})
    m = store.manifest(1)
    cid = m["chunks"][-1][0]  # a chunk of "b"
    path = Path(store.root, "objects", cid[:2], cid[2:])
    blob = path.read_bytes()
    path.write_bytes(blob[:8] + b"\x04\x00" + blob[10:])
    into = {"a": np.full(40_000, -7, np.float32), "b": np.full(40_000, -7, np.float32)}
    with pytest.raises(ckpt.FormatError, match="version 1: tensor 'b'.*upgrade ckpt"):
        store.load(1, into=into)
    assert (into["a"] == -7).all() and (into["b"] == -7).all()  # no partial read
    assert store.load(1, only="a")["a"][-1] == 39_999  # what does not need it still loads


def test_fifos_and_giant_numbers_never_hang_or_crash_a_reader(tmp_path: Path) -> None:
    store = ckpt.Store(tmp_path / "s")
    store.save({"a": np.ones(3)})
    os.mkfifo(Path(store.root, "versions", "000000000009.json"))  # open() would block forever
    cache = Path(store.root, "cache", "versions.jsonl")
    cache.write_bytes(cache.read_bytes() + b'{"id":' + b"9" * 5000 + b"}\n")  # past int()'s limit
    assert [v.id for v in store.versions()] == [1]
    with pytest.raises(ckpt.FormatError, match="not a regular file"):
        store.load(9)
    assert store.verify(9)[0].problems[0].kind == "format"
    cache.unlink()
    os.mkfifo(cache)
    assert [v.id for v in ckpt.Store(store.root).versions()] == [1]
