"""Large chunks are decoded from a read-only mapping of their file (chunks of
1 MiB or more); small ones and ``CKPT_NO_MMAP=1`` use ``pread``. Both paths
give the same bytes and notice the same damage, and a damaged mapped chunk is
an error, never a crash (the size is checked before the file is mapped).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ckpt

CHUNKS = {"chunk_size": 2 << 20, "small_threshold": 256 << 10}


def tree() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal(800_000).astype(np.float32),  # 3.05 MiB: chunks of 2 + 1.05 MiB
        "ids": rng.integers(0, 1 << 40, 300_000, dtype=np.int64),  # 2.3 MiB, unfiltered
        "h": rng.standard_normal(600_000).astype(np.float16),  # 1.1 MiB, 2 planes
        "b": np.arange(10, dtype=np.float32),  # packed small chunk (read, not mapped)
    }


def digest(loaded: dict[str, np.ndarray]) -> dict[str, str]:
    return {
        k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in loaded.items()
    }


def chunk_files(store: ckpt.Store, version: int, path: str) -> list[Path]:
    m = store.manifest(version)
    (tensor,) = [t for t in m["tensors"] if t["path"] == path]
    ids = [m["chunks"][span[0]][0] for span in tensor["spans"]]
    return [Path(store.root, "objects", c[:2], c[2:]) for c in ids]


LOAD = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np, ckpt
    store = ckpt.Store(sys.argv[1], create=False)
    try:
        out = store.load(int(sys.argv[2]))
        print(json.dumps({k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                          for k, v in out.items()}))
    except ckpt.CheckpointError as exc:
        print(json.dumps({"error": type(exc).__name__}))
    """
)


def load_in_child(root: str, version: int, mmap: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CKPT_NO_MMAP", None)
    if not mmap:
        env["CKPT_NO_MMAP"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", LOAD, root, str(version)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ckpt.Store, int, dict[str, np.ndarray]]:
    store = ckpt.Store(str(tmp_path / "s"), **CHUNKS)
    t = tree()
    version = store.save(t).id
    assert len(chunk_files(store, version, "w")) == 2
    return store, version, t


def test_mapped_and_read_paths_give_the_same_bytes(
    saved: tuple[ckpt.Store, int, dict[str, np.ndarray]],
) -> None:
    store, version, t = saved
    want = digest(t)
    assert digest(store.load(version)) == want
    assert load_in_child(store.root, version, mmap=True) == want
    assert load_in_child(store.root, version, mmap=False) == want
    partial = store.load(version, only=["w"])
    assert partial["w"].tobytes() == t["w"].tobytes()


@pytest.mark.parametrize(
    "damage",
    ["flip_payload", "flip_header", "truncate", "truncate_to_header", "append", "zero"],
)
@pytest.mark.parametrize("leaf", ["w", "ids", "h"])
def test_damage_in_a_mapped_chunk_is_an_error_on_both_paths(
    saved: tuple[ckpt.Store, int, dict[str, np.ndarray]], damage: str, leaf: str
) -> None:
    store, version, _ = saved
    victim = chunk_files(store, version, leaf)[0]
    data = bytearray(victim.read_bytes())
    assert len(data) >= 256 << 10  # large enough to be mapped
    if damage == "flip_payload":
        data[len(data) // 2] ^= 0x10
    elif damage == "flip_header":
        data[17] ^= 0x01  # raw length
    elif damage == "truncate":
        del data[len(data) - 1000 :]
    elif damage == "truncate_to_header":
        del data[40:]
    elif damage == "append":
        data += b"\0" * 4096
    else:
        data = bytearray(len(data))
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))

    with pytest.raises((ckpt.IntegrityError, ckpt.FormatError)) as exc:
        store.load(version)
    assert victim.parent.name + victim.name in str(exc.value)
    mapped = load_in_child(store.root, version, mmap=True)
    read = load_in_child(store.root, version, mmap=False)
    assert mapped == read == {"error": type(exc.value).__name__}
    # the other tensors still load
    others = [k for k in ("w", "ids", "h", "b") if k != leaf]
    assert set(store.load(version, only=others)) == set(others)
