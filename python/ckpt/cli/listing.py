"""``ckpt ls``, ``ckpt show``, ``ckpt best``, ``ckpt du``: looking at a store.

Decisions:

* ``ls`` shows, per version: id, step, epoch (when any version has one),
  creation time (local, and how long ago), metrics, raw size, the bytes it
  added to the store, markers ``L`` latest / ``B`` best / ``P`` pinned, and
  the retention rules that keep it (``Store.explain()``, with the policy the
  manager recorded; ``-`` means no rule keeps it: the next retention pass
  deletes it), ``slim`` for a version that retention slimmed (or will slim:
  ``Keep(subtrees=...)`` drops some of its leaves; ``--json`` lists the
  patterns under ``slimmed``). By default only the monitored metric is shown
  (``--metric``, else the recorded monitor), or every metric when there is
  none or with ``--all-metrics``; more than two metrics share one column.
* ``--sort metric`` lists the best first; ``--limit N`` then keeps the N
  best. For the other orders (ascending), ``--limit N`` keeps the N last
  rows: the newest versions.
* ``--json`` always carries every metric; ``created`` is ISO 8601 UTC.
* ``show`` lists the tensor table as stored (with ``#storage/N`` entries
  for memory shared by views); a tensor's stored bytes are its share of
  its chunks: the sum over its spans of span_len / chunk_raw_len *
  chunk_stored_len, rounded.
* ``du`` sums raw bytes over versions (what saving each version fully would
  cost), the raw bytes of the distinct chunks they reference (after
  deduplication), the stored bytes of those chunks (after compression) and
  the bytes of every object file (the difference is what ``ckpt gc`` frees).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..index import Version, encode_metrics, format_time
from ..retention import Keep, plan_retention, ranked
from ..store import Store
from .errors import EXIT_OK, EXIT_USAGE, CliError
from .output import (
    Column,
    Table,
    emit_json,
    fmt_ago,
    fmt_bytes,
    fmt_num,
    fmt_when,
    print_fields,
)
from .refs import Monitor, add_metric_options, best_version, monitor_of, open_store, resolve

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "ls",
        parents=[common],
        formatter_class=formatter,
        help="list the versions of a store",
        description="List the versions of a store: step, time, metrics, sizes, markers"
        " (L latest, B best, P pinned) and the retention rules that keep each one.",
        epilog="examples:\n"
        "  ckpt ls runs/exp1\n"
        "  ckpt ls runs/exp1 --sort metric --limit 5       the five best\n"
        "  ckpt ls runs/exp1 --metric acc --mode max --all-metrics\n"
        "  ckpt ls runs/exp1 --json",
    )
    p.add_argument("store", help="path of the store")
    add_metric_options(p)
    p.add_argument(
        "--sort",
        choices=("id", "step", "metric", "created"),
        default="id",
        help="row order (default id; metric: best first)",
    )
    p.add_argument(
        "--limit", type=_positive, metavar="N", help="show N rows: the newest, or the best"
    )
    p.add_argument(
        "--all-metrics", action="store_true", help="show every metric, not just the monitored one"
    )
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "show",
        parents=[common],
        formatter_class=formatter,
        help="show one version: metadata, trainer state, tensors",
        description="Show a version's metadata, its early-stopping state and its tensors"
        " (dtype, shape, bytes, stored bytes, chunks).",
        epilog="examples:\n"
        "  ckpt show runs/exp1 latest\n"
        "  ckpt show runs/exp1 best --tensors 'decoder/*'\n"
        "  ckpt show runs/exp1 step=1000 --json",
    )
    p.add_argument("store", help="path of the store")
    p.add_argument("version", help="id, latest, best, best:METRIC[:max] or step=N")
    p.add_argument(
        "--tensors",
        metavar="GLOB",
        action="append",
        help="only tensors whose path matches (fnmatch, * crosses /); repeatable",
    )
    add_metric_options(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "best",
        parents=[common],
        formatter_class=formatter,
        help="print the best version by a metric",
        description="Print the best version (id, step, metric). Exit status 1 when no"
        " version has the metric.",
        epilog="examples:\n"
        "  ckpt best runs/exp1\n"
        "  ckpt best runs/exp1 --metric acc --mode max\n"
        "  id=$(ckpt best runs/exp1 --json | jq .id)",
    )
    p.add_argument("store", help="path of the store")
    add_metric_options(p)
    p.set_defaults(func=cmd_best)

    p = sub.add_parser(
        "du",
        parents=[common],
        formatter_class=formatter,
        help="disk usage: raw vs stored bytes, dedup and compression savings",
        description="Disk usage: raw size and new bytes per version, and the savings of"
        " deduplication and compression over the whole store.",
        epilog="examples:\n  ckpt du runs/exp1\n  ckpt du runs/exp1 --json",
    )
    p.add_argument("store", help="path of the store")
    p.set_defaults(func=cmd_du)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


# ---------------------------------------------------------------------- ls
def _kept_text(reasons: tuple[str, ...], slimmed: bool = False) -> str:
    """Store.explain()'s reasons, shortened: ``best 2 by loss`` -> ``best 2``; ``-``: none.

    The reasons of slimming (``optimizer/** dropped: ...``) become one ``slim``
    flag, as does a version that ``slimmed`` says retention slimmed already.
    """
    out = []
    for r in reasons:
        if " dropped: " in r or r.endswith(" dropped earlier"):
            slimmed = True
        elif r == "no count rule":
            out.append("keep all")
        elif r.startswith("best ") and " by " in r:
            out.append(r.split(" by ")[0])
        elif r.startswith("every ") and r.endswith(" steps"):
            out.append(r[: -len(" steps")])
        else:
            out.append(r)
    if slimmed and reasons:
        out.append("slim")
    return ", ".join(out) if out else "-"


def _metric_names(versions: list[Version]) -> list[str]:
    seen: dict[str, None] = {}
    for v in versions:
        for k in v.metrics:
            seen.setdefault(k, None)
    return list(seen)


def _sorted(versions: list[Version], key: str, monitor: Monitor) -> list[Version]:
    if key == "metric":
        if monitor.metric is None:
            raise CliError(
                "--sort metric needs a metric: the store records no monitor; pass --metric NAME",
                EXIT_USAGE,
            )
        good = ranked(versions, monitor.metric, monitor.mode or "min")
        ids = {v.id for v in good}
        return good + [v for v in versions if v.id not in ids]
    if key == "step":
        return sorted(versions, key=lambda v: (v.step is None, v.step or 0, v.id))
    if key == "created":
        return sorted(versions, key=lambda v: (v.created, v.id))
    return list(versions)


def _version_json(
    v: Version, now: datetime, why: Mapping[int, tuple[str, ...]], flags: tuple[bool, bool, bool]
) -> dict[str, Any]:
    return {
        "id": v.id,
        "step": v.step,
        "epoch": v.epoch,
        "created": format_time(v.created),
        "age_seconds": round((now - v.created).total_seconds(), 3),
        "metrics": encode_metrics(v.metrics),
        "raw_bytes": v.raw_bytes,
        "new_bytes": v.new_bytes,
        "n_tensors": v.n_tensors,
        "parent": v.parent,
        "latest": flags[0],
        "best": flags[1],
        "pinned": flags[2],
        "kept_because": list(why.get(v.id, ())),
        "slimmed": list(v.slimmed),
    }


def explain(store: Store, versions: list[Version], pinned: set[int]) -> dict[int, tuple[str, ...]]:
    """What :meth:`Store.explain` returns, for the listing already in hand.

    ``Store.explain()`` lists the store twice more (for the recorded policy
    and for the plan); on 10,000 versions that triples the time of ``ckpt
    ls``. Same policy (the manager's, recorded in the latest version), same
    planner; tests check that both agree.
    """
    if not versions:
        return {}
    manager = versions[-1].trainer.get("manager", {})
    manager = manager if isinstance(manager, dict) else {}
    keep = Keep.from_dict(manager["keep"]) if isinstance(manager.get("keep"), dict) else None
    if keep is not None and keep.max_bytes is not None:
        return store.explain()  # needs every version's chunks: let the store do it
    plan = plan_retention(
        versions,
        keep,
        monitor=manager.get("monitor"),
        mode=manager.get("mode", "min"),
        pinned=pinned,
    )
    return dict(plan.reasons)


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    versions = store.versions()
    latest = versions[-1] if versions else None
    shown = monitor_of(store, args.metric, args.mode, latest)
    recorded = monitor_of(store, None, None, latest)
    marker = recorded if recorded.metric is not None else shown
    best = best_version(versions, marker)
    pinned = store.pinned()
    why = explain(store, versions, pinned)
    if best is not None and "best" not in why.get(best.id, ()):
        # no recorded monitor: mark the best by --metric like the store marks its own
        reasons = list(why.get(best.id, ()))
        reasons.insert(1 if reasons[:1] == ["latest"] else 0, "best")
        why[best.id] = tuple(r for r in reasons if r != "no count rule") or ("best",)
    rows = _sorted(versions, args.sort, shown)
    if args.limit is not None:
        rows = rows[: args.limit] if args.sort == "metric" else rows[-args.limit :]
    now = datetime.now(timezone.utc)

    def flags(v: Version) -> tuple[bool, bool, bool]:
        return (
            latest is not None and v.id == latest.id,
            best is not None and v.id == best.id,
            v.id in pinned,
        )

    if args.json:
        emit_json(
            {
                "store": store.root,
                "metric": shown.metric,
                "mode": shown.mode,
                "best_metric": marker.metric,
                "best_mode": marker.mode,
                "count": len(versions),
                "versions": [_version_json(v, now, why, flags(v)) for v in rows],
            }
        )
        return EXIT_OK
    if not versions:
        print(f"{store.root}: no versions yet")
        return EXIT_OK
    names = _metric_names(versions) if args.all_metrics or shown.metric is None else [shown.metric]
    with_epoch = any(v.epoch is not None for v in versions)
    columns = [Column("id", ">"), Column("step", ">")]
    if with_epoch:
        columns.append(Column("epoch", ">", drop=4))
    columns += [
        Column("created", drop=3),
        Column("age", drop=2),
        # one metric: a column of its own; several share one flexible column
        Column(names[0], ">") if len(names) == 1 else Column("metrics", flex=True, min_width=10),
        Column("size", ">"),
        Column("new", ">", drop=1),
        Column("kept because", flex=True, min_width=12),
    ]
    table = Table(columns)
    for v in rows:
        cells: list[object] = [v.id, "-" if v.step is None else v.step]
        if with_epoch:
            cells.append("-" if v.epoch is None else v.epoch)
        cells += [
            fmt_when(v.created, now),
            fmt_ago(v.created, now),
            fmt_num(v.metrics.get(names[0]))
            if len(names) == 1
            else " ".join(f"{k}={fmt_num(v.metrics[k])}" for k in names if k in v.metrics) or "-",
            fmt_bytes(v.raw_bytes),
            fmt_bytes(v.new_bytes),
            _kept_text(why.get(v.id, ()), bool(v.slimmed)),
        ]
        table.add(*cells)
    table.print()
    if len(rows) < len(versions):
        print(f"({len(rows)} of {len(versions)} versions; --limit)")
    return EXIT_OK


# -------------------------------------------------------------------- show
def _shape_text(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else "()"


def _scalar_leaves(node: Any) -> int:
    if not isinstance(node, dict):
        return 0
    t = node.get("t")
    if t == "dict" or t in ("list", "tuple"):
        return sum(_scalar_leaves(v) for v in node.get("v", ()))
    return 1 if t in ("int", "float", "str", "bool", "none") else 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..interop.leaves import list_leaves, select, stored_share

    store = open_store(args.store)
    versions = store.versions()
    v = resolve(store, args.version, args.metric, args.mode, versions)
    m = store.manifest(v.id)
    monitor = monitor_of(store, args.metric, args.mode, versions[-1])
    best = best_version(versions, monitor)
    pinned = v.id in store.pinned()
    why = store.explain().get(v.id, ())
    chunks = m["chunks"]
    leaves = list_leaves(m)
    views = [x for x in leaves if x.kind == "view"]
    bases = {x.index for x in views}
    patterns = args.tensors
    import fnmatch

    tensors = []
    for i, t in enumerate(m["tensors"]):
        if patterns and not any(fnmatch.fnmatchcase(t["path"], p) for p in patterns):
            continue
        kind = "pickle" if t.get("role") == "pickle" else "storage" if i in bases else "tensor"
        tensors.append(
            {
                "path": t["path"],
                "kind": kind,
                "dtype": t["dtype"],
                "shape": list(t["shape"]),
                "nbytes": int(t["nbytes"]),
                "stored_bytes": stored_share(t, chunks),
                "chunks": len({s[0] for s in t["spans"]}),
                "dropped": bool(t.get("dropped")),
            }
        )
    view_rows = [
        {
            "path": x.path,
            "base": m["tensors"][x.index]["path"],
            "dtype": x.dtype,
            "shape": list(x.shape),
            "nbytes": x.nbytes,
            "offset": x.view[0] if x.view else 0,
            "stride": list(x.view[1]) if x.view else [],
        }
        for x in select(views, patterns)
    ]
    trainer = dict(m.get("trainer", {}))
    raw_es = trainer.get("early_stopping")
    # one early stopping is an object (as older releases wrote it), several a list
    stoppers = [
        e for e in (raw_es if isinstance(raw_es, list) else [raw_es]) if isinstance(e, dict)
    ]
    es = raw_es if stoppers else None
    flags = {
        "latest": v.id == versions[-1].id,
        "best": best is not None and best.id == v.id,
        "pinned": pinned,
    }
    if args.json:
        emit_json(
            {
                "id": v.id,
                "parent": v.parent,
                "step": v.step,
                "epoch": v.epoch,
                "created": format_time(v.created),
                "metrics": encode_metrics(v.metrics),
                "meta": m.get("meta", {}),
                "raw_bytes": v.raw_bytes,
                "new_bytes": v.new_bytes,
                "stored_bytes": sum(int(c[2]) for c in chunks),
                "n_tensors": len(m["tensors"]),
                "n_chunks": len(chunks),
                **flags,
                "kept_because": list(why),
                "slimmed": m.get("slimmed"),
                "early_stopping": es,
                "trainer": trainer,
                "tensors": tensors,
                "views": view_rows,
            }
        )
        return EXIT_OK
    marks = [k for k, on in flags.items() if on]
    if flags["best"]:
        marks[marks.index("best")] = f"best by {monitor.describe()}"
    print(f"version {v.id}" + (f" ({', '.join(marks)})" if marks else ""))
    now = datetime.now(timezone.utc)
    fields: list[tuple[str, object]] = [
        ("parent", "-" if v.parent is None else v.parent),
        ("step", "-" if v.step is None else v.step),
        ("epoch", "-" if v.epoch is None else v.epoch),
        ("created", f"{fmt_when(v.created, full=True)} ({fmt_ago(v.created, now)})"),
        ("metrics", "  ".join(f"{k}={_full(x)}" for k, x in v.metrics.items()) or "-"),
        ("size", f"{fmt_bytes(v.raw_bytes)} raw, {fmt_bytes(v.new_bytes)} new in this version"),
        ("stored", f"{fmt_bytes(sum(int(c[2]) for c in chunks))} in {len(chunks)} chunks"),
        ("kept because", ", ".join(why) or "no rule (retention would delete it)"),
    ]
    slimmed = m.get("slimmed")
    if slimmed:
        gone = slimmed["dropped"]
        fields.append(
            (
                "slimmed",
                f"{', '.join(slimmed['patterns'])} dropped by retention ({len(gone)} leaves: "
                + ", ".join(gone[:5])
                + (" ..." if len(gone) > 5 else "")
                + ")",
            )
        )
    meta = m.get("meta", {})
    if meta:
        fields.append(("meta", json.dumps(meta, separators=(", ", ": "))))
    n_scalars = _scalar_leaves(m["tree"])
    if n_scalars:
        fields.append(("other leaves", f"{n_scalars} (ints, floats, strings, None)"))
    if trainer.get("saved_because"):
        fields.append(("saved because", trainer["saved_because"]))
    print_fields(fields)
    raw_configs = trainer.get("manager", {}).get("early_stopping") or {}
    configs = raw_configs if isinstance(raw_configs, list) else [raw_configs]
    for i, es in enumerate(stoppers):
        config = configs[i] if i < len(configs) and isinstance(configs[i], dict) else {}
        print(f"early stopping ({es.get('monitor')}, {es.get('mode')})")
        patience = config.get("patience")
        stopped = es.get("stopped_step")
        print_fields(
            [
                ("best", f"{_full(es.get('best'))} at step {es.get('best_step')}"),
                ("wait", f"{es.get('wait')}" + (f" of patience {patience}" if patience else "")),
                ("evaluations", es.get("evaluations")),
                (
                    "stopped",
                    "no" if stopped is None else f"at step {stopped}: {es.get('reason')}",
                ),
            ]
        )
    shown = f"{len(tensors)} of {len(m['tensors'])}" if patterns else f"{len(tensors)}"
    print(f"tensors ({shown})")
    table = Table(
        [
            Column("path", flex=True, min_width=16, cut="middle"),
            Column("dtype"),
            Column("shape", flex=True, min_width=8),
            Column("bytes", ">"),
            Column("stored", ">"),
            Column("chunks", ">"),
        ]
    )
    for t in tensors:
        path = t["path"] + (" (pickle)" if t["kind"] == "pickle" else "")
        path += " (dropped)" if t["dropped"] else ""
        table.add(
            path or "<root>",
            t["dtype"],
            _shape_text(t["shape"]),
            fmt_bytes(t["nbytes"]),
            "-" if t["dropped"] else fmt_bytes(t["stored_bytes"]),
            t["chunks"],
        )
    for x in view_rows:
        table.add(
            f"{x['path']} (view of {x['base']})",
            x["dtype"],
            _shape_text(x["shape"]),
            fmt_bytes(x["nbytes"]),
            "-",
            "-",
        )
    if tensors or view_rows:
        table.print()
    return EXIT_OK


def _full(x: object) -> str:
    if isinstance(x, float) and math.isfinite(x):
        return repr(x)
    return str(x)


# -------------------------------------------------------------------- best
def cmd_best(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    versions = store.versions()
    monitor = monitor_of(store, args.metric, args.mode, versions[-1] if versions else None)
    if monitor.metric is None:
        raise CliError("no metric: the store records no monitor; pass --metric NAME", EXIT_USAGE)
    best = best_version(versions, monitor)
    if best is None:
        if args.json:
            emit_json({"id": None, "metric": monitor.metric, "mode": monitor.mode})
        raise CliError(f"no version of {store.root} has the metric {monitor.metric!r}")
    value = best.metrics[monitor.metric]
    if args.json:
        emit_json(
            {
                "id": best.id,
                "step": best.step,
                "epoch": best.epoch,
                "created": format_time(best.created),
                "metric": monitor.metric,
                "mode": monitor.mode,
                "value": value,
            }
        )
        return EXIT_OK
    step = "-" if best.step is None else best.step
    print(f"version {best.id}  step {step}  {monitor.metric}={_full(value)} ({monitor.mode})")
    return EXIT_OK


# ---------------------------------------------------------------------- du
def cmd_du(args: argparse.Namespace) -> int:
    from .. import _core

    store = open_store(args.store)
    versions = store.versions()
    unique: dict[str, tuple[int, int]] = {}
    for v in versions:
        for cid, raw_len, stored_len, *_ in store.manifest(v.id)["chunks"]:
            unique[cid] = (int(raw_len), int(stored_len))
    total_raw = sum(v.raw_bytes for v in versions)
    unique_raw = sum(r for r, _ in unique.values())
    stored = sum(s for _, s in unique.values())
    objects = _core.list_objects(store.root)
    on_disk = sum(n for _, n in objects)
    unreferenced = [(oid, n) for oid, n in objects if oid not in unique]

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    result = {
        "store": store.root,
        "versions": [
            {"id": v.id, "step": v.step, "raw_bytes": v.raw_bytes, "new_bytes": v.new_bytes}
            for v in versions
        ],
        "total_raw_bytes": total_raw,
        "unique_raw_bytes": unique_raw,
        "stored_bytes": stored,
        "on_disk_bytes": on_disk,
        "chunks": len(unique),
        "unreferenced_chunks": len(unreferenced),
        "unreferenced_bytes": sum(n for _, n in unreferenced),
        "dedup_ratio": ratio(total_raw, unique_raw),
        "compression_ratio": ratio(unique_raw, stored),
        "total_ratio": ratio(total_raw, stored),
    }
    if args.json:
        emit_json(result)
        return EXIT_OK
    table = Table([Column("id", ">"), Column("step", ">"), Column("raw", ">"), Column("new", ">")])
    for v in versions:
        table.add(
            v.id, "-" if v.step is None else v.step, fmt_bytes(v.raw_bytes), fmt_bytes(v.new_bytes)
        )
    if versions:
        table.print()
        print()

    def saving(a: int, b: int) -> str:
        return f"saves {1 - b / a:.0%} ({a / b:.2f}x)" if a and b else ""

    rows = Table([Column("", "<"), Column("", ">"), Column("")])
    rows.add("raw, all versions", fmt_bytes(total_raw), f"{len(versions)} versions")
    rows.add(
        "raw, distinct chunks", fmt_bytes(unique_raw), f"dedup {saving(total_raw, unique_raw)}"
    )
    rows.add("stored", fmt_bytes(stored), f"compression {saving(unique_raw, stored)}")
    garbage = sum(n for _, n in unreferenced)
    rows.add(
        "on disk (objects)",
        fmt_bytes(on_disk),
        f"{fmt_bytes(garbage)} unreferenced: ckpt gc {shlex.quote(args.store)} frees it"
        if unreferenced
        else "",
    )
    print("\n".join(rows.render().splitlines()[1:]))
    if stored:
        print(
            f"total: {fmt_bytes(total_raw)} raw in {fmt_bytes(stored)} stored,"
            f" {saving(total_raw, stored)}"
        )
    return EXIT_OK
