"""``ckpt verify`` and ``ckpt diff``: is a store sound, and what changed between versions.

Decisions:

* ``verify`` re-reads and re-hashes every chunk (:meth:`ckpt.Store.verify`:
  a chunk shared by many versions is read once) and prints, per version,
  ``OK`` or each damaged chunk with the tensors that use it. Any damage
  exits with status 1. On a terminal an activity line shows that it runs.
* ``diff A B`` matches array leaves by path. A leaf whose dtype, shape and
  spans (chunk ids, offsets, lengths) are the same in both is unchanged
  without reading a byte (content addressing: same chunk id, same bytes).
  Others are read and compared byte for byte; for changed float leaves of
  the same shape it reports ``max_abs`` = max |B - A| over elements where
  neither is NaN, and ``rel`` = ||B - A||_2 / ||A||_2 (inf when A is all
  zero), both computed in float64 (complex128 for complex dtypes), plus
  ``n_diff``, the number of elements whose bytes differ (any dtype).
* ``shared`` is the stored size of the chunks both versions reference:
  what keeping both costs less than keeping them apart.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from .errors import EXIT_FAILURE, EXIT_OK
from .output import Column, Spinner, Table, emit_json, fmt_bytes, fmt_num
from .refs import add_metric_options, open_store, resolve

if TYPE_CHECKING:  # imported where used: building the parser (every ckpt command) stays
    # free of numpy's 50-70 ms import
    import numpy as np

    from ..interop.leaves import LeafInfo

__all__ = ["compare", "register"]


def register(sub: Any, common: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "verify",
        parents=[common],
        formatter_class=formatter,
        help="re-hash every chunk; report damaged versions, chunks and tensors",
        description="Re-read and re-hash every chunk of every version (or of one) and"
        " report, per version, OK or the damaged chunks and the tensors using them."
        " Exit status 1 when anything is damaged.",
        epilog="examples:\n  ckpt verify runs/exp1\n  ckpt verify runs/exp1 best --json",
    )
    p.add_argument("store", help="path of the store")
    p.add_argument("version", nargs="?", help="only this version (default: all)")
    add_metric_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "diff",
        parents=[common],
        formatter_class=formatter,
        help="tensors added, removed and changed between two versions",
        description="Compare two versions: tensors added, removed, changed (max-abs and"
        " relative difference for floats), unchanged, and the stored bytes they share.",
        epilog="examples:\n"
        "  ckpt diff runs/exp1 3 latest\n"
        "  ckpt diff runs/exp1 step=100 best --json",
    )
    p.add_argument("store", help="path of the store")
    p.add_argument("a", metavar="A", help="the older version")
    p.add_argument("b", metavar="B", help="the newer version")
    add_metric_options(p)
    p.set_defaults(func=cmd_diff)


# ------------------------------------------------------------------ verify
def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    target = None
    if args.version is not None:
        target = resolve(store, args.version, args.metric, args.mode).id
    with Spinner("verifying"):
        results = store.verify(target)
    damaged = [r for r in results if not r.ok]
    if args.json:
        emit_json(
            {
                "store": store.root,
                "ok": not damaged,
                "versions": [
                    {
                        "id": r.version,
                        "ok": r.ok,
                        "chunks": r.chunks,
                        "bytes": r.bytes,
                        "problems": [
                            {
                                "chunk": p.chunk,
                                "kind": p.kind,
                                "message": p.message,
                                "tensors": list(p.tensors),
                            }
                            for p in r.problems
                        ],
                    }
                    for r in results
                ],
            }
        )
        return EXIT_FAILURE if damaged else EXIT_OK
    if not results:
        print(f"{store.root}: no versions to verify")
        return EXIT_OK
    width = len(str(max(r.version for r in results)))
    for r in results:
        head = f"version {r.version:>{width}}"
        if r.ok:
            print(f"{head}  OK       {r.chunks} chunks, {fmt_bytes(r.bytes)}")
            continue
        print(f"{head}  DAMAGED  {len(r.problems)} of {r.chunks} chunks")
        for p in r.problems:
            where = f"chunk {p.chunk[:16]}" if p.chunk else "manifest"
            used = f"; tensors {', '.join(p.tensors[:5])}" if p.tensors else ""
            more = f" (+{len(p.tensors) - 5} more)" if len(p.tensors) > 5 else ""
            print(f"    {where} ({p.kind}): {p.message}{used}{more}")
    if damaged:
        print(f"{len(damaged)} of {len(results)} versions damaged")
        return EXIT_FAILURE
    print(f"all {len(results)} versions OK")
    return EXIT_OK


# -------------------------------------------------------------------- diff
def _signature(leaf: LeafInfo, m: dict[str, Any]) -> tuple[Any, ...]:
    entry = m["tensors"][leaf.index]
    chunks = m["chunks"]
    spans = tuple((chunks[ci][0], off, ln) for ci, off, ln in entry["spans"])
    return (leaf.kind, leaf.dtype, leaf.shape, leaf.view, spans)


_SLICE = 1 << 20


def compare(
    leaf: LeafInfo, a_raw: np.ndarray[Any, Any], b_raw: np.ndarray[Any, Any]
) -> dict[str, Any]:
    """Differences of two same-dtype, same-shape leaves (bytes in ``a_raw`` and ``b_raw``).

    Returns:
        ``n_diff`` (elements whose bytes differ), and for float dtypes
        ``max_abs`` and ``rel`` (None where undefined).
    """
    import numpy as np

    from ..interop.leaves import typed

    item = np.dtype(f"V{leaf.itemsize}") if leaf.itemsize else np.dtype(np.uint8)
    av, bv = a_raw.view(item), b_raw.view(item)
    n_diff = int(np.count_nonzero(av != bv))
    out: dict[str, Any] = {"n_diff": n_diff}
    if not leaf.is_float or leaf.kind == "pickle":
        return out
    try:
        a = typed(leaf, a_raw).reshape(-1)
        b = typed(leaf, b_raw).reshape(-1)
    except ValueError:  # a dtype that needs ml_dtypes, which is missing
        return out
    wide = np.complex128 if a.dtype.kind == "c" else np.float64
    max_abs = None
    sq_diff = 0.0
    sq_a = 0.0
    for start in range(0, a.size, _SLICE):
        x = a[start : start + _SLICE].astype(wide)
        y = b[start : start + _SLICE].astype(wide)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(y - x)
            ok = ~np.isnan(d)
            if ok.any():
                local = float(d[ok].max())
                max_abs = local if max_abs is None else max(max_abs, local)
            fin = ok & np.isfinite(d)
            sq_diff += float(np.sum(d[fin] ** 2))
            xa = np.abs(x)
            sq_a += float(np.sum(xa[np.isfinite(xa)] ** 2))
    out["max_abs"] = max_abs
    if sq_a > 0:
        out["rel"] = math.sqrt(sq_diff) / math.sqrt(sq_a)
    else:
        out["rel"] = math.inf if sq_diff > 0 or (max_abs or 0) > 0 else 0.0
    return out


def _leaf_json(x: LeafInfo) -> dict[str, Any]:
    return {"path": x.path, "dtype": x.dtype, "shape": list(x.shape), "nbytes": x.nbytes}


def cmd_diff(args: argparse.Namespace) -> int:
    import numpy as np

    from ..interop.leaves import list_leaves, read_leaves

    store = open_store(args.store)
    versions = store.versions()
    va = resolve(store, args.a, args.metric, args.mode, versions)
    vb = resolve(store, args.b, args.metric, args.mode, versions)
    ma, mb = store.manifest(va.id), store.manifest(vb.id)
    la = {x.path: x for x in list_leaves(ma)}
    lb = {x.path: x for x in list_leaves(mb)}
    added = [lb[p] for p in lb if p not in la]
    removed = [la[p] for p in la if p not in lb]
    common = [p for p in la if p in lb]
    same_ids = [p for p in common if _signature(la[p], ma) == _signature(lb[p], mb)]
    fast = set(same_ids)
    changed: list[dict[str, Any]] = []
    unchanged_read = 0
    to_read = []
    for p in common:
        if p in fast:
            continue
        x, y = la[p], lb[p]
        if x.dtype != y.dtype or x.shape != y.shape:
            changed.append(
                {
                    "path": p,
                    "dtype": [x.dtype, y.dtype],
                    "shape": [list(x.shape), list(y.shape)],
                    "nbytes": [x.nbytes, y.nbytes],
                }
            )
        else:
            to_read.append(p)
    pairs = zip(
        read_leaves(store, ma, [la[p] for p in to_read]),
        read_leaves(store, mb, [lb[p] for p in to_read]),
        strict=True,
    )
    for (x, a_raw), (_, b_raw) in pairs:
        if np.array_equal(a_raw, b_raw):
            unchanged_read += 1
            continue
        changed.append(
            {
                "path": x.path,
                "dtype": [x.dtype, x.dtype],
                "shape": [list(x.shape), list(x.shape)],
                "nbytes": [x.nbytes, x.nbytes],
                **compare(x, a_raw, b_raw),
            }
        )
    order = {p: i for i, p in enumerate(common)}
    changed.sort(key=lambda c: order[c["path"]])
    chunks_b = {c[0] for c in mb["chunks"]}
    shared = [c for c in ma["chunks"] if c[0] in chunks_b]
    result: dict[str, Any] = {
        "a": va.id,
        "b": vb.id,
        "added": [_leaf_json(x) for x in added],
        "removed": [_leaf_json(x) for x in removed],
        "changed": changed,
        "unchanged": len(same_ids) + unchanged_read,
        "unchanged_without_reading": len(same_ids),
        "shared_chunks": len(shared),
        "shared_stored_bytes": sum(int(c[2]) for c in shared),
    }
    if args.json:
        emit_json(result)
        return EXIT_OK

    def name(v: Any) -> str:
        return f"version {v.id}" + ("" if v.step is None else f" (step {v.step})")

    print(f"{name(va)} -> {name(vb)}")
    print(
        f"  added      {len(added)}"
        + (f", {fmt_bytes(sum(x.nbytes for x in added))}" if added else "")
    )
    print(f"  removed    {len(removed)}")
    print(f"  changed    {len(changed)}")
    print(f"  unchanged  {result['unchanged']} ({len(same_ids)} by chunk ids, without reading)")
    print(f"  shared     {fmt_bytes(result['shared_stored_bytes'])} stored in {len(shared)} chunks")
    if not (added or removed or changed):
        return EXIT_OK
    table = Table(
        [
            Column("", "<"),
            Column("path", flex=True, min_width=12, cut="middle"),
            Column("dtype", flex=True, min_width=5),
            Column("shape", flex=True, min_width=5),
            Column("max_abs", ">"),
            Column("rel", ">"),
            Column("n_diff", ">", drop=1),
        ]
    )

    def shape(s: Any) -> str:
        return "x".join(map(str, s)) if s else "()"

    for x in added:
        table.add("+", x.path or "<root>", x.dtype, shape(x.shape), "", "", "")
    for x in removed:
        table.add("-", x.path or "<root>", x.dtype, shape(x.shape), "", "", "")
    for c in changed:
        dt = c["dtype"][0] if c["dtype"][0] == c["dtype"][1] else "->".join(c["dtype"])
        sa, sb = shape(c["shape"][0]), shape(c["shape"][1])
        table.add(
            "~",
            c["path"] or "<root>",
            dt,
            sa if sa == sb else f"{sa}->{sb}",
            fmt_num(c.get("max_abs")) if "max_abs" in c else "",
            fmt_num(c.get("rel")) if "rel" in c else "",
            c.get("n_diff", ""),
        )
    print()
    table.print()
    return EXIT_OK
