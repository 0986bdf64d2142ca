"""The native boundary: GIL released, buffers released, targets refused before writing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import _core


def make_root(tmp_path: Path) -> str:
    return ckpt.Store(tmp_path / "s").create().root


def save(root: str, buffers: list, groups: list[int] | None = None, **kw: object):
    opts = dict(
        chunk_size=1 << 20, small_threshold=1 << 16, level=1, min_saving=0.05, durable=False
    )
    opts.update(kw)
    return _core.save_chunks(root, buffers, groups or [1] * len(buffers), **opts)


def test_version_matches_the_package() -> None:
    from importlib.metadata import version

    assert _core.__version__ == ckpt.__version__ == version("ckpt-store")


def test_buffers_are_released_after_every_call(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    src = bytearray(b"x" * 100_000)
    chunks, spans, _ = save(root, [src])
    src.extend(b"more")  # would raise BufferError if the export were still held
    dst = bytearray(100_000)
    placements = [
        (s[0], s[1], s[2], 0, sum(x[2] for x in spans[0][:i])) for i, s in enumerate(spans[0])
    ]
    _core.restore_chunks(root, [(c[0], c[1]) for c in chunks], [dst], placements)
    dst.extend(b"x")
    assert bytes(dst[:100_000]) == b"x" * 100_000


def test_read_only_wrong_size_and_aliased_targets_are_refused_before_writing(
    tmp_path: Path,
) -> None:
    root = make_root(tmp_path)
    chunks, spans, _ = save(root, [b"abcdefgh" * 1000])
    refs = [(c[0], c[1]) for c in chunks]
    ((ci, off, ln),) = spans[0]
    with pytest.raises(ValueError, match="read-only"):
        _core.restore_chunks(root, refs, [bytes(8000)], [(ci, off, ln, 0, 0)])
    ro = np.zeros(8000, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _core.restore_chunks(root, refs, [ro], [(ci, off, ln, 0, 0)])
    small = bytearray(b"\x07" * 7999)
    with pytest.raises(ValueError, match="outside chunk|wrong size"):
        _core.restore_chunks(root, refs, [small], [(ci, off, ln, 0, 0)])
    assert small == bytearray(b"\x07" * 7999)
    big = bytearray(b"\x07" * 8001)
    with pytest.raises(ValueError, match="wrong size"):
        _core.restore_chunks(root, refs, [big], [(ci, off, ln, 0, 0)])
    assert big == bytearray(b"\x07" * 8001)
    shared = np.full(16000, 7, np.uint8)
    with pytest.raises(ValueError, match="share memory"):
        _core.restore_chunks(
            root,
            refs,
            [shared[:8000], shared[4000:12000]],
            [(ci, off, ln, 0, 0), (ci, off, ln, 1, 0)],
        )
    assert (shared == 7).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.restore_chunks(root, refs, [np.zeros(16000, np.uint8)[::2]], [(ci, off, ln, 0, 0)])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        _core.restore_chunks(
            root, [("../../etc/passwd", 8000)], [bytearray(8000)], [(0, 0, 8000, 0, 0)]
        )


def test_bad_options_raise_value_error(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    with pytest.raises(ValueError, match="threads must be between 1 and 1024"):
        save(root, [b"x"], threads=0)
    with pytest.raises(ValueError, match="chunk_size must be between"):
        save(root, [b"x"], chunk_size=10, small_threshold=1)
    with pytest.raises(ValueError, match="zstd level"):
        save(root, [b"x"], level=99)


def test_gil_is_released_during_save_and_load(tmp_path: Path) -> None:
    """Two threads' calls overlap in time (safetensors' test_threadable idea)."""
    data = np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32)  # 32 MiB
    stores = [ckpt.Store(tmp_path / f"s{i}", durable=False, threads=1) for i in range(2)]
    barrier = threading.Barrier(2)
    windows: dict[str, list[tuple[float, float]]] = {"save": [], "load": []}
    errors: list[BaseException] = []

    def work(s: ckpt.Store) -> None:
        try:
            for op in ("save", "load"):
                barrier.wait()
                t0 = time.perf_counter()
                if op == "save":
                    s.save({"w": data})
                else:
                    s.load()
                windows[op].append((t0, time.perf_counter()))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for op, ((a0, a1), (b0, b1)) in windows.items():
        overlap = min(a1, b1) - max(a0, b0)
        assert overlap > 0.5 * min(a1 - a0, b1 - b0), (op, a0, a1, b0, b1)


def test_zstd_planes_decode_with_the_zstandard_package(tmp_path: Path) -> None:
    import struct

    import zstandard

    s = ckpt.Store(tmp_path / "s")
    data = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    s.save({"w": data})
    ((cid, raw_len, _),) = s.manifest()["chunks"]
    blob = Path(s.root, "objects", cid[:2], cid[2:]).read_bytes()
    assert blob[8:10] == b"\3\0" and blob[10] == 3 and blob[11] == 4  # rotated bytegroup(4)
    pos = 24 + 16 * 4
    planes = []
    for i in range(4):
        codec, stored = blob[24 + 16 * i], struct.unpack_from("<Q", blob, 24 + 16 * i + 8)[0]
        payload = blob[pos : pos + stored]
        pos += stored
        plane = (
            zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_len // 4)
            if codec == 1
            else payload
        )
        planes.append(np.frombuffer(plane, np.uint8))
    assert any(blob[24 + 16 * i] == 1 for i in range(4))
    rotated = np.stack(planes, axis=1).reshape(-1).view(np.uint32)
    rebuilt = (rotated >> np.uint32(1)) | (rotated << np.uint32(31))  # undo the rotation
    assert rebuilt.view(np.float32).tobytes() == data.tobytes()
