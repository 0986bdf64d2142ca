from __future__ import annotations

import os
from pathlib import Path

import pytest

import ckpt


@pytest.fixture
def store(tmp_path: Path) -> ckpt.Store:
    """A small-chunked store so that tests exercise multi-chunk tensors cheaply."""
    return ckpt.Store(tmp_path / "store", chunk_size=64 * 1024, small_threshold=16 * 1024)


def object_files(root: str | os.PathLike[str]) -> list[Path]:
    return sorted(p for p in Path(root, "objects").rglob("*") if p.is_file())
