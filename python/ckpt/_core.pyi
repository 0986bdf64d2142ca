# Hand-written stub of the native module (checked by mypy.stubtest in make lint).
from collections.abc import Sequence
from os import PathLike
from typing import Any

__all__ = [
    "chunk_bases",
    "FAULT_POINTS",
    "__version__",
    "commit_file",
    "delete_objects",
    "list_objects",
    "probe_chunks",
    "restore_chunks",
    "save_chunks",
    "verify_chunks",
]
__version__: str
FAULT_POINTS: tuple[str, ...]

def save_chunks(
    root: str | PathLike[str],
    buffers: Sequence[Any],
    groups: Sequence[int],
    *,
    chunk_size: int,
    small_threshold: int,
    level: int,
    min_saving: float,
    durable: bool,
    threads: int | None = None,
    bases: Sequence[Sequence[tuple[int, int, str, int | None]]] | None = None,
    delta_depth: int = 0,
    size_classes: bool = True,
) -> tuple[
    list[tuple[str, int, int, bool, str | None, int | None]],
    list[list[tuple[int, int, int]]],
    list[tuple[str, int, int, str | None]],
]: ...
def restore_chunks(
    root: str | PathLike[str],
    chunks: Sequence[tuple[str, int]],
    targets: Sequence[Any],
    placements: Sequence[tuple[int, int, int, int, int]],
    *,
    threads: int | None = None,
) -> None: ...
def verify_chunks(
    root: str | PathLike[str],
    chunks: Sequence[tuple[str, int]],
    *,
    threads: int | None = None,
) -> list[tuple[str, str] | None]: ...
def chunk_bases(
    root: str | PathLike[str],
    chunks: Sequence[tuple[str, int]],
    *,
    threads: int | None = None,
) -> list[str | None]: ...
def probe_chunks(
    root: str | PathLike[str],
    chunks: Sequence[tuple[str, int]],
    *,
    threads: int | None = None,
    listed: Sequence[tuple[str, str | None]] | None = None,
) -> None: ...
def list_objects(root: str | PathLike[str]) -> list[tuple[str, int]]: ...
def delete_objects(
    root: str | PathLike[str], ids: Sequence[str], *, durable: bool = True
) -> int: ...
def commit_file(
    root: str | PathLike[str],
    directory: str,
    name: str,
    data: bytes,
    *,
    durable: bool = True,
) -> None: ...
