"""``ckpt export`` and ``ckpt import``: a version as one self-describing safetensors file.

The file format and its guarantees are in :mod:`ckpt.interop.safetensors`:
tensors named by leaf path, the rest of the version (tree, step, epoch,
metrics, meta, trainer state) as JSON under ``__metadata__["ckpt"]``;
import rebuilds the exact tree; export -> import -> export is byte-identical.

Decisions: ``import`` creates the store when it does not exist (like
``git clone`` into a new directory) and says so; ``--step`` overrides the
exported step; ``--flat`` ignores ckpt's metadata. ``export`` refuses to
overwrite without ``--force`` and refuses versions holding pickled objects.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..store import Store
from .errors import EXIT_OK, CliError
from .output import Progress, emit_json, fmt_bytes, note
from .refs import add_metric_options, open_store, resolve

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        formatter_class=formatter,
        help="write a version (tensors, tree, metrics, trainer state) to one .safetensors",
        description="Write a whole version to a safetensors file: tensors named by leaf path,"
        " everything else as JSON in its metadata, so that ckpt import restores it exactly."
        " Any safetensors reader can load the tensors.",
        epilog="examples:\n"
        "  ckpt export runs/exp1 best best.safetensors\n"
        "  ckpt export runs/exp1 step=1000 s1000.safetensors --force",
    )
    p.add_argument("store", help="path of the store")
    p.add_argument("version", help="id, latest, best, best:METRIC[:max] or step=N")
    p.add_argument("out", metavar="OUT.safetensors", help="the file to write")
    p.add_argument("--force", "-f", action="store_true", help="overwrite an existing file")
    add_metric_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        parents=[common],
        formatter_class=formatter,
        help="save a .safetensors file as a new version",
        description="Save a safetensors file as a new version of a store (created if"
        " missing). A file written by ckpt export comes back as the exact tree with its"
        " step, metrics and trainer state; any other file as a flat {name: array} dict.",
        epilog="examples:\n"
        "  ckpt import runs/exp2 best.safetensors\n"
        "  ckpt import runs/hf model.safetensors --step 0",
    )
    p.add_argument("store", help="path of the store (created if missing)")
    p.add_argument("file", metavar="IN.safetensors", help="the file to read")
    p.add_argument("--step", type=int, metavar="N", help="step of the new version")
    p.add_argument(
        "--flat", action="store_true", help="ignore ckpt metadata: import a flat dict of tensors"
    )
    p.set_defaults(func=cmd_import)


def cmd_export(args: argparse.Namespace) -> int:
    from ..interop.leaves import list_leaves
    from ..interop.safetensors import export_version

    store = open_store(args.store)
    v = resolve(store, args.version, args.metric, args.mode)
    if os.path.lexists(args.out) and not args.force:
        raise CliError(f"{args.out} exists; pass --force to overwrite it")
    m = store.manifest(v.id)
    total = sum(x.nbytes for x in list_leaves(m))
    with Progress(total, f"version {v.id} -> {os.path.basename(args.out)}") as bar:
        result = export_version(store, v.id, args.out, overwrite=args.force, progress=bar.advance)
    if args.json:
        emit_json(
            {
                "id": result.version,
                "step": v.step,
                "out": result.path,
                "tensors": result.tensors,
                "bytes": result.bytes,
                "file_bytes": os.path.getsize(result.path),
            }
        )
    else:
        print(
            f"exported version {v.id} ({result.tensors} tensors, {fmt_bytes(result.bytes)})"
            f" to {result.path}"
        )
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from ..interop.safetensors import read_import

    if args.step is not None and args.step < 0:
        raise CliError("--step must be a non-negative integer", 2)
    created = not os.path.exists(os.path.join(args.store, "ckpt-store.json"))
    if created and os.path.lexists(args.store) and not os.path.isdir(args.store):
        raise CliError(f"{args.store} is a file, not a store: name a new or empty directory")
    if not created:
        store = open_store(args.store)  # a store we cannot write to fails before reading
    data = read_import(args.file, flat=args.flat)  # checked before a store is created
    if created:
        store = Store(args.store)
        note(f"created store {args.store}")
    v = data.save(store, args.step)
    if args.json:
        emit_json(
            {
                "id": v.id,
                "step": v.step,
                "store": store.root,
                "created_store": created,
                "tensors": v.n_tensors,
                "raw_bytes": v.raw_bytes,
                "new_bytes": v.new_bytes,
            }
        )
    else:
        step = "" if v.step is None else f", step {v.step}"
        print(
            f"imported {args.file} as version {v.id}{step} ({v.n_tensors} tensors,"
            f" {fmt_bytes(v.raw_bytes)}, {fmt_bytes(v.new_bytes)} new)"
        )
    return EXIT_OK
