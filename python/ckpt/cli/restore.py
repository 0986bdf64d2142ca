"""``ckpt restore``: write a version's arrays as .safetensors, .npz or .npy files.

Decisions:

* The format follows ``--out``: ``*.safetensors``, ``*.npz``, or a directory
  (a path without extension, with a trailing ``/``, or an existing
  directory). Another extension is refused rather than guessed.
* The names are the leaf paths (``encoder/layers/0/w``), or, with
  ``--state-dict [PREFIX]``, the keys of a torch / Hugging Face state dict:
  only the leaves under ``PREFIX/`` (default ``model``, where
  :func:`ckpt.torch.capture` puts ``model.state_dict()``), that prefix
  dropped, the rest of the path unescaped (``~1`` -> ``/``, ``~0`` -> ``~``)
  and joined with ``.``; so ``safetensors.torch.load_file`` gives a dict
  that ``model.load_state_dict(..., strict=True)`` accepts. A prefix that
  matches no array is refused, listing the top-level names there are; so
  are two leaves that would get one name. In a directory,
  each leaf is ``OUT/<path>.npy``, one sub-directory per path component;
  a component is percent-encoded (``urllib.parse.quote(part, safe="")``)
  and the components ``""``, ``.`` and ``..`` are written ``%``, ``%2E``
  and ``%2E%2E``, so names map back to paths and never leave ``OUT``.
* Only arrays are written; ints, strings and other non-array leaves stay in
  the store (``ckpt export`` keeps them). Pickled objects are skipped with a
  note: restoring them would need unpickling.
* The .safetensors file has no ``__metadata__`` (``ckpt export`` writes the
  tree there) and is byte-identical to ``safetensors.numpy.save_file`` on
  the restored arrays. bfloat16 and float8 keep their dtype in .safetensors;
  in .npy/.npz numpy records them as raw ``V2``/``V1`` items (view them with
  ``ml_dtypes``), as ``numpy.save`` does.
* Nothing is overwritten without ``--force``: not an existing file, nor a
  non-empty directory (with ``--force``, files of the same name in it are
  replaced, others left alone). Files are written under a temporary name
  and renamed when complete, so a failed restore leaves no partial output.
* Memory: arrays are read and written a batch (256 MiB) at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import urllib.parse
import zipfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import EXIT_OK, EXIT_USAGE, CliError
from .output import Progress, emit_json, fmt_bytes, note
from .refs import add_metric_options, open_store, resolve

if TYPE_CHECKING:  # imported where used: building the parser (every ckpt command) stays
    # free of numpy's 50-70 ms import
    import numpy as np

    from ..interop.leaves import LeafInfo

__all__ = ["leaf_file", "output_format", "register", "state_dict_names"]


def register(sub: Any, common: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "restore",
        parents=[common],
        formatter_class=formatter,
        help="write a version's tensors to .safetensors, .npz or .npy files",
        description="Write the arrays of a version to a .safetensors file, a .npz file or"
        " a directory of .npy files (chosen by the extension of --out), named by leaf path"
        " or, with --state-dict, by the keys model.load_state_dict expects.",
        epilog="examples:\n"
        "  ckpt restore runs/exp1 best --out model.safetensors\n"
        "  ckpt restore runs/exp1 latest --out state.npz --only 'model/*'\n"
        "  ckpt restore runs/exp1 step=1000 --out weights/      one .npy per tensor\n"
        "  ckpt restore runs/exp1 best --out model.safetensors --state-dict\n"
        "      then: model.load_state_dict(safetensors.torch.load_file('model.safetensors'))",
    )
    p.add_argument("store", help="path of the store")
    p.add_argument("version", help="id, latest, best, best:METRIC[:max] or step=N")
    p.add_argument(
        "--out", "-o", required=True, metavar="PATH", help="X.safetensors, X.npz or a directory"
    )
    p.add_argument(
        "--only",
        metavar="GLOB",
        action="append",
        help="only leaves whose path matches (fnmatch, * crosses /); repeatable",
    )
    p.add_argument(
        "--state-dict",
        nargs="?",
        const="model",
        metavar="PREFIX",
        help="name the tensors as a torch/HF state dict: only the leaves under PREFIX/"
        " (default: model, as ckpt.torch.capture saves it), PREFIX/ dropped, the rest"
        " joined with '.' (model/enc.0.weight -> enc.0.weight); put it after the"
        " positional arguments",
    )
    p.add_argument("--force", "-f", action="store_true", help="overwrite existing output")
    add_metric_options(p)
    p.set_defaults(func=cmd_restore)


def output_format(out: str) -> str:
    """``"safetensors"``, ``"npz"`` or ``"dir"`` for an output path.

    Raises:
        CliError: an extension that is none of these.
    """
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return "dir"
    ext = os.path.splitext(out)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext == ".npz":
        return "npz"
    if ext == "":
        return "dir"
    raise CliError(
        f"cannot tell the format of {out!r} from its extension: use .safetensors, .npz,"
        " or a directory (no extension, or a trailing /)",
        EXIT_USAGE,
    )


_SPECIAL = {"": "%", ".": "%2E", "..": "%2E%2E"}


def leaf_file(path: str) -> str:
    """The relative file name of a leaf in a directory restore (``a/b`` -> ``a/b.npy``)."""
    parts = [_SPECIAL.get(p) or urllib.parse.quote(p, safe="") for p in path.split("/")]
    return os.path.join(*parts) + ".npy"


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def state_dict_names(
    leaves: Sequence[LeafInfo], prefix: str, everything: Sequence[LeafInfo], version: int
) -> list[tuple[str, LeafInfo]]:
    """The leaves under ``prefix/``, renamed to state-dict keys (``a/b.c/d`` -> ``b.c.d``).

    Args:
        leaves: the leaves to restore (after ``--only``).
        prefix: a leaf path (``model``, ``ema/model``); ``""`` keeps every leaf.
        everything: all leaves of the version, for the names listed when none matches.
        version: the version id, for messages.

    Returns:
        ``(leaf path, leaf renamed)`` pairs, in the order of ``leaves``.

    Raises:
        CliError: no leaf is under ``prefix``, or two leaves would get one name.
    """
    prefix = prefix.strip("/")
    head = f"{prefix}/" if prefix else ""
    out: list[tuple[str, LeafInfo]] = []
    seen: dict[str, str] = {}
    for leaf in leaves:
        if not leaf.path.startswith(head) or leaf.path == prefix:
            continue
        name = ".".join(_unescape(part) for part in leaf.path[len(head) :].split("/"))
        if name in seen:
            raise CliError(
                f"--state-dict {prefix}: leaves {seen[name]!r} and {leaf.path!r} would both"
                f" be named {name!r}; restore without --state-dict"
            )
        seen[name] = leaf.path
        out.append((leaf.path, dataclasses.replace(leaf, path=name)))
    if not out:
        tops = sorted({x.path.split("/")[0] for x in everything})
        listed = ", ".join(repr(t) if t else "<root>" for t in tops) or "none"
        which = "array matching --only" if len(leaves) < len(everything) else "array"
        raise CliError(
            f"--state-dict {prefix}: no {which} of version {version} is under {prefix}/;"
            f" the top-level names are {listed} (pass --state-dict NAME)"
        )
    return out


def _check_target(out: str, fmt: str, force: bool) -> None:
    if fmt == "dir":
        if os.path.isdir(out) and os.listdir(out) and not force:
            raise CliError(f"{out} is a non-empty directory; pass --force to write into it")
        if os.path.lexists(out) and not os.path.isdir(out):
            raise CliError(f"{out} exists and is not a directory")
    elif os.path.lexists(out) and not force:
        raise CliError(f"{out} exists; pass --force to overwrite it")


def _tmp_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path.rstrip("/") or path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _write_npz(out: str, stream: Any, force: bool) -> None:
    import numpy as np

    from ..interop.leaves import typed

    tmp = _tmp_name(out)
    try:
        # As numpy.savez: stored (uncompressed) members NAME.npy, zip64 allowed.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for leaf, raw in stream:
                with zf.open(leaf.path + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(
                        f, typed(leaf, raw, numpy_only=True), allow_pickle=False
                    )
        if os.path.lexists(out) and not force:
            raise CliError(f"{out} exists; pass --force to overwrite it")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_npy(target: str, leaf: LeafInfo, raw: np.ndarray[Any, Any]) -> None:
    import numpy as np

    from ..interop.leaves import typed

    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "xb") as f:
            np.lib.format.write_array(f, typed(leaf, raw, numpy_only=True), allow_pickle=False)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_dir(out: str, stream: Any) -> None:
    out = out.rstrip("/") or out
    if os.path.isdir(out):  # --force, or empty: write into it, file by file
        for leaf, raw in stream:
            _write_npy(os.path.join(out, leaf_file(leaf.path)), leaf, raw)
        return
    tmp = _tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for leaf, raw in stream:
            _write_npy(os.path.join(tmp, leaf_file(leaf.path)), leaf, raw)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_restore(args: argparse.Namespace) -> int:
    from ..interop.leaves import list_leaves, read_leaves, select
    from ..interop.safetensors import SafetensorsWriter, TensorSpec

    fmt = output_format(args.out)
    store = open_store(args.store)
    v = resolve(store, args.version, args.metric, args.mode)
    m = store.manifest(v.id)
    everything = list_leaves(m)
    selected = select(everything, args.only)
    if args.only and all(x.kind == "pickle" for x in selected):
        raise CliError(f"no array of version {v.id} matches {' or '.join(args.only)}")
    # (leaf path in the store, the leaf as written: named by its path or state-dict key)
    items = [(x.path, x) for x in selected]
    if args.state_dict is not None:
        items = state_dict_names(selected, args.state_dict, everything, v.id)
    pickled = [path for path, x in items if x.kind == "pickle"]
    items = [(path, x) for path, x in items if x.kind != "pickle"]
    leaves = [x for _, x in items]
    _check_target(args.out, fmt, args.force)
    total = sum(x.nbytes for x in leaves)
    with Progress(total, f"version {v.id} -> {os.path.basename(args.out.rstrip('/'))}") as bar:

        def stream() -> Any:
            for leaf, raw in read_leaves(store, m, leaves):
                yield leaf, raw
                bar.advance(raw.nbytes)

        if fmt == "safetensors":
            specs = [TensorSpec(x.path, x.dtype, x.shape, x.nbytes) for x in leaves]
            with SafetensorsWriter(args.out, specs, None, overwrite=args.force) as w:
                for leaf, raw in stream():
                    w.write(leaf.path, raw)
                w.commit(durable=True)
        elif fmt == "npz":
            _write_npz(args.out, stream(), args.force)
        else:
            _write_dir(args.out, stream())
    if pickled:
        note(f"note: skipped {len(pickled)} pickled objects ({', '.join(map(repr, pickled[:3]))})")
    if args.json:
        emit_json(
            {
                "id": v.id,
                "step": v.step,
                "out": args.out,
                "format": fmt,
                "bytes": total,
                "tensors": [
                    {
                        "path": path,
                        "name": x.path,
                        "dtype": x.dtype,
                        "shape": list(x.shape),
                        "nbytes": x.nbytes,
                        **({"file": leaf_file(x.path)} if fmt == "dir" else {}),
                    }
                    for path, x in items
                ],
                "skipped_pickled": pickled,
            }
        )
    else:
        step = "" if v.step is None else f" (step {v.step})"
        what = "tensors" if args.state_dict is None else "tensors as a state dict"
        print(
            f"wrote {len(leaves)} {what}, {fmt_bytes(total)}, of version {v.id}{step} to {args.out}"
        )
    return EXIT_OK
