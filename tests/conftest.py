from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import ckpt


@pytest.fixture
def store(tmp_path: Path) -> ckpt.Store:
    """A small-chunked store so that tests exercise multi-chunk tensors cheaply."""
    return ckpt.Store(tmp_path / "store", chunk_size=64 * 1024, small_threshold=16 * 1024)


def set_packing(root: str | os.PathLike[str], rule: str | None) -> None:
    """Makes a store's marker name packing rule ``rule`` (None: no key, like the
    stores made before the key existed); reopen the store to follow it."""
    marker = Path(root, "ckpt-store.json")
    info = json.loads(marker.read_text())
    info.pop("packing", None)
    if rule is not None:
        info["packing"] = rule
    marker.write_text(json.dumps(info, indent=1) + "\n")


def object_files(root: str | os.PathLike[str]) -> list[Path]:
    return sorted(p for p in Path(root, "objects").rglob("*") if p.is_file())
