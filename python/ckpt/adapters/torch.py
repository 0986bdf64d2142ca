"""torch tensors as stored tensors: no pickle, no extra copy on the CPU.

Saving:
    * A CPU tensor reaches the engine as a numpy array over its own memory
      (``Tensor.numpy()``); ``bfloat16`` and float8 tensors are viewed as the
      unsigned integer of the same width and their real dtype is recorded.
      Non-contiguous tensors are made contiguous by the store (one copy).
    * A CUDA tensor is copied to pinned host memory first; its device is
      recorded and it comes back there (or to ``map_location``).
    * Tensors that share a storage (tied weights, views of one buffer) are
      stored once: the covered run of the storage becomes a hidden base
      tensor (``#storage/N``) and each tensor a strided view of it, so that
      they come back sharing memory, as with ``torch.save``. Only groups
      whose tensors have one dtype are kept shared; others are saved by value.
    * ``requires_grad`` and ``nn.Parameter`` are recorded and restored.

Loading allocates each tensor with ``torch.empty`` on the CPU and lets the
engine write into it, or fills the caller's tensor in place (``into=``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..tree import Leaf, View

__all__ = ["Encoder", "allocate", "finish", "make_view"]

_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.complex128: "C128",
}
for _attr, _name in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
):
    if hasattr(torch, _attr):
        _NAMES[getattr(torch, _attr)] = _name
_DTYPES: dict[str, torch.dtype] = {v: k for k, v in _NAMES.items()}

# dtypes numpy cannot hold: carried as the unsigned integer of the same width
_CARRIER: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_NATIVE = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}  # fmt: skip


def dtype_name(t: torch.Tensor, path: str) -> str:
    try:
        return _NAMES[t.dtype]
    except KeyError:
        raise TypeError(
            f"leaf {path!r}: torch dtype {t.dtype} cannot be stored (no format name for it);"
            " convert it (e.g. .to(torch.float32)) first"
        ) from None


def _host(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values on the CPU, detached; CUDA goes through pinned memory."""
    t = t.detach()
    if t.device.type == "cpu":
        return t
    pinned = torch.cuda.is_available() and t.device.type == "cuda"
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned)
    host.copy_(t)
    return host


def _carrier(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """A numpy array over the tensor's CPU memory with the same item width."""
    if t.dtype not in _NUMPY_NATIVE:
        width = t.element_size()
        if t.numel() == 0:
            return np.empty(tuple(t.shape), dtype=f"<i{width}")
        if t.dim() > 0 and t.stride(-1) != 1:
            # a dtype view needs unit stride in the last dim; .contiguous() may
            # keep odd strides of size-1 dims, so copy into a fresh tensor
            t = torch.empty(t.shape, dtype=t.dtype).copy_(t)
        t = t.view(_CARRIER[width])
    return t.numpy()


def _meta(t: torch.Tensor) -> dict[str, Any]:
    meta: dict[str, Any] = {"device": str(t.device)}
    if t.requires_grad:
        meta["requires_grad"] = True
    if isinstance(t, torch.nn.Parameter):
        meta["parameter"] = True
    return meta


def _tensors(obj: object, depth: int = 0) -> Iterator[torch.Tensor]:
    if depth > 64:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class Encoder:
    """The flatten hook for one save: finds shared storages first, then encodes leaves."""

    def __init__(self, tree: object) -> None:
        groups: dict[tuple[str, int], list[torch.Tensor]] = {}
        for t in _tensors(tree):
            if t.layout != torch.strided or t.is_quantized:
                continue  # refused with a clear error when the leaf is reached
            if t.numel() > 0 and t.untyped_storage().data_ptr() != 0:
                groups.setdefault(_storage_key(t), []).append(t)
        # storage -> (first element, end element) for groups of one dtype used twice or more
        self.shared: dict[tuple[str, int], tuple[int, int]] = {}
        for key, ts in groups.items():
            if len(ts) < 2 or len({t.dtype for t in ts}) != 1:
                continue
            starts = [int(t.storage_offset()) for t in ts]
            ends = [
                int(t.storage_offset())
                + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
                + 1
                for t in ts
            ]
            self.shared[key] = (min(starts), max(ends))
        self.bases: dict[tuple[str, int], Leaf] = {}

    def __call__(self, path: str, obj: object) -> Leaf | View | None:
        if not isinstance(obj, torch.Tensor):
            return None
        if obj.is_sparse or obj.is_quantized or obj.layout != torch.strided:
            raise TypeError(
                f"leaf {path!r}: {obj.layout} / quantized tensors cannot be stored;"
                " convert with .to_dense() or .dequantize() first"
            )
        name = dtype_name(obj, path)
        key = _storage_key(obj) if obj.numel() > 0 else None
        if key is not None and key in self.shared:
            start, end = self.shared[key]
            if key not in self.bases:
                base = torch.as_strided(obj.detach(), (end - start,), (1,), start)
                self.bases[key] = Leaf(
                    "",
                    _carrier(_host(base)),
                    dtype_name=name,
                    extra={"leaf": "torch", "torch": _meta(obj.detach()), "role": "storage"},
                )
            return View(
                key, self.bases[key], int(obj.storage_offset()) - start,
                [int(n) for n in obj.shape], [int(s) for s in obj.stride()],
            )  # fmt: skip
        host = _host(obj)
        return Leaf(
            "", _carrier(host), dtype_name=name, extra={"leaf": "torch", "torch": _meta(obj)}
        )


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name} has no torch equivalent in this torch version") from None


def allocate(entry: dict[str, Any], into: object) -> tuple[torch.Tensor, np.ndarray[Any, Any]]:
    """A CPU tensor to restore into (the caller's, when it fits) and its byte view."""
    dtype = torch_dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    if (
        isinstance(into, torch.Tensor)
        and into.device.type == "cpu"
        and into.dtype == dtype
        and tuple(into.shape) == shape
        and into.is_contiguous()
        and not into.requires_grad
    ):
        target = into
    else:
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            target = torch.empty(shape, dtype=dtype)
            return target, np.empty(0, np.uint8)
        # numpy's allocator backs large arrays with huge pages, which fault in
        # several times faster than torch.empty's 4 KiB pages
        carrier = np.empty(numel * torch.empty((), dtype=dtype).element_size(), np.uint8)
        target = torch.from_numpy(carrier).view(dtype).reshape(shape)
        return target, carrier
    return target, target.reshape(-1).view(torch.uint8).numpy()


def finish(t: torch.Tensor, entry: dict[str, Any], into: object, map_location: Any) -> torch.Tensor:
    """Moves a restored tensor to its device (or into the caller's tensor) and marks grads."""
    meta = entry.get("torch", {})
    if (
        isinstance(into, torch.Tensor)
        and into is not t
        and into.shape == t.shape
        and into.dtype == t.dtype
        and into.device.type != "cpu"
    ):
        with torch.no_grad():
            into.copy_(t)  # a CUDA destination filled in place
        return into
    device = map_location if map_location is not None else meta.get("device", "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"tensor {entry['path']!r} was saved on {meta.get('device')} but CUDA is not"
            " available here; pass map_location='cpu'"
        )
    if device.type != "cpu":
        t = t.to(device)
    if meta.get("parameter"):
        return torch.nn.Parameter(t, requires_grad=bool(meta.get("requires_grad")))
    if meta.get("requires_grad"):
        t.requires_grad_(True)
    return t


def make_view(node: dict[str, Any], base: torch.Tensor) -> torch.Tensor:
    """A tensor sharing the base's memory, as it shared its storage when saved."""
    return torch.as_strided(base.detach(), node["shape"], node["stride"], node["offset"])
