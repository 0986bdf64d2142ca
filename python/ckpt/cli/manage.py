"""``ckpt gc``, ``ckpt pin``, ``ckpt unpin``: deleting what is not needed, protecting what is.

``gc`` decisions:

* With a rule (``--keep-last N``, ``--keep-best K``, ``--keep-every N``,
  ``--keep-every-seconds S``) it applies that retention policy now
  (:meth:`ckpt.Store.apply_retention`): versions no rule keeps are deleted,
  then the chunks only they used. The latest version, the best one (by
  ``--metric``/``--mode``, else the recorded monitor) and pinned versions are
  never deleted. ``--keep-without-metrics`` (with ``--keep-best``) also keeps
  versions without the metric. ``--slim 'GLOB=RULE[,RULE]'`` (repeatable;
  RULE is ``last:N``, ``best:K``, ``every:N`` or ``seconds:S``) slims the
  kept versions that RULE does not keep: the leaves matching GLOB are
  dropped (``Keep(subtrees=...)``), never from the latest, the best or a
  pinned version. It then sweeps chunks that no version references (debris
  of interrupted saves). Without a rule it only sweeps (:meth:`ckpt.Store.gc`).
  ``--slim`` alone keeps every version and only slims.
* ``--dry-run`` lists what would go and changes nothing (exit 0).
* Otherwise it lists what would go and asks for confirmation when stdin
  and stderr are a terminal; ``--yes`` skips the question. A run that is
  not interactive and has no ``--yes`` deletes nothing: it lists what
  would go, prints ``ckpt: error: ... pass --yes`` and exits with status 1,
  so that a script that forgot ``--yes`` fails loudly instead of passing.
* Nothing to delete is not an error (exit 0, no question asked).
* After the confirmation the plan is computed again under the store's
  writer lock; if it changed in between (a save, another gc), nothing is
  deleted and the command fails, asking to run it again.

``pin``/``unpin``: a pinned version is never deleted by ``gc``, retention or
``Store.delete``. Unpinning a version that is not pinned is a no-op.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from .. import _core
from ..retention import Keep
from ..store import Store
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError
from .output import confirm, emit_json, fmt_bytes, interactive
from .refs import add_metric_options, monitor_of, open_store, resolve

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "gc",
        parents=[common],
        formatter_class=formatter,
        help="delete versions a retention rule does not keep, and unreferenced chunks",
        description="Apply a retention rule now (keep the last N, the best K, every N"
        " steps, every S seconds; slim old versions with --slim) and delete unreferenced"
        " chunks; without a rule only the chunks. The latest, the best and pinned versions are"
        " never deleted nor slimmed. Asks before deleting unless --yes; a non-interactive run"
        " without --yes deletes nothing and exits with status 1.",
        epilog="examples:\n"
        "  ckpt gc runs/exp1 --dry-run                      unreferenced chunks only\n"
        "  ckpt gc runs/exp1 --keep-last 3 --keep-best 2 --dry-run\n"
        "  ckpt gc runs/exp1 --keep-last 3 --yes\n"
        "  ckpt gc runs/exp1 --keep-every-seconds 3600 --keep-last 5 --yes\n"
        "  ckpt gc runs/exp1 --keep-last 5 --slim 'optimizer/**=last:1' --yes",
    )
    p.add_argument("store", help="path of the store")
    p.add_argument("--keep-last", type=_positive, metavar="N", help="keep the N newest versions")
    p.add_argument(
        "--keep-best", type=_positive, metavar="K", help="keep the K best versions by --metric"
    )
    p.add_argument(
        "--keep-every", type=_positive, metavar="N", help="keep versions whose step is a multiple"
    )
    p.add_argument(
        "--keep-every-seconds",
        type=_seconds,
        metavar="S",
        help="keep a version when S seconds passed since the previous one this rule kept",
    )
    p.add_argument(
        "--keep-without-metrics",
        action="store_true",
        help="with --keep-best: also keep versions that lack the metric (or have NaN)",
    )
    p.add_argument(
        "--slim",
        type=_slim_rule,
        action="append",
        metavar="GLOB=RULES",
        help="drop the leaves matching GLOB from kept versions that RULES (last:N, best:K,"
        " every:N, seconds:S; comma-separated) do not keep; repeatable",
    )
    add_metric_options(p)
    p.add_argument("--dry-run", "-n", action="store_true", help="only list what would be deleted")
    p.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    p.set_defaults(func=cmd_gc)

    for name, verb in (("pin", "pin"), ("unpin", "unpin")):
        p = sub.add_parser(
            name,
            parents=[common],
            formatter_class=formatter,
            help=f"{verb} a version" + (" (never deleted while pinned)" if verb == "pin" else ""),
            description=(
                "Pin a version: gc, retention and delete never remove it."
                if verb == "pin"
                else "Remove a version's pin (no-op when it is not pinned)."
            ),
            epilog=f"examples:\n  ckpt {name} runs/exp1 best\n  ckpt {name} runs/exp1 12",
        )
        p.add_argument("store", help="path of the store")
        p.add_argument("version", help="id, latest, best, best:METRIC[:max] or step=N")
        add_metric_options(p)
        p.set_defaults(func=cmd_pin if verb == "pin" else cmd_unpin)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return x


_SLIM_RULES = {"last": "last", "best": "best", "every": "every_n_steps", "seconds": "every_seconds"}


def _slim_rule(text: str) -> tuple[str, Keep]:
    """``GLOB=RULE[,RULE...]`` -> (GLOB, the inner Keep)."""
    pattern, eq, rules = text.rpartition("=")
    if not eq or not pattern or not rules:
        raise argparse.ArgumentTypeError(
            f"expected GLOB=RULES (e.g. 'optimizer/**=last:1'), got {text!r}"
        )
    fields: dict[str, Any] = {}
    for rule in rules.split(","):
        name, colon, value = rule.strip().partition(":")
        if name not in _SLIM_RULES or not colon:
            raise argparse.ArgumentTypeError(
                f"unknown rule {rule!r} in {text!r}; use last:N, best:K, every:N or seconds:S"
            )
        fields[_SLIM_RULES[name]] = _seconds(value) if name == "seconds" else _positive(value)
    try:
        return pattern, Keep(**fields)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------- gc
@dataclass(frozen=True)
class _Plan:
    """Versions (and the bytes only they use), then unreferenced chunks."""

    versions: tuple[int, ...]
    version_bytes: int
    chunks: int
    chunk_bytes: int
    kept: dict[int, tuple[str, ...]]
    slimmed: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.versions and not self.chunks and not self.slimmed


def _plan(store: Store, keep: Keep | None, metric: str | None, mode: str) -> _Plan:
    """What gc would delete: versions (and their chunks), then unreferenced chunks."""
    deleted: tuple[int, ...] = ()
    slimmed: tuple[int, ...] = ()
    freed = 0
    kept: dict[int, tuple[str, ...]] = {}
    if keep is not None:
        result = store.apply_retention(keep, monitor=metric, mode=mode, dry_run=True)
        deleted, freed, kept = result.deleted, result.freed_bytes, dict(result.kept)
        slimmed = result.slimmed
    referenced: set[str] = set()
    for v in store.versions():
        referenced.update(store.chunk_map(v.id))
    garbage = [n for oid, n in _core.list_objects(store.root) if oid not in referenced]
    return _Plan(deleted, freed, len(garbage), sum(garbage), kept, slimmed)


def _plan_json(plan: _Plan) -> dict[str, Any]:
    return {
        "versions": list(plan.versions),
        "slimmed": list(plan.slimmed),
        "version_bytes": plan.version_bytes,
        "unreferenced_chunks": plan.chunks,
        "unreferenced_bytes": plan.chunk_bytes,
        "kept": {str(k): list(v) for k, v in sorted(plan.kept.items()) if v},
    }


def _describe(plan: _Plan, verb: str) -> list[str]:
    lines = []

    def ids_of(ids: tuple[int, ...]) -> str:
        return ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")

    if plan.versions or plan.slimmed:
        parts = []
        if plan.versions:
            parts.append(f"{verb} {len(plan.versions)} versions ({ids_of(plan.versions)})")
        if plan.slimmed:
            slim = "would slim" if verb.startswith("would") else "slimmed"
            parts.append(f"{slim} {len(plan.slimmed)} versions ({ids_of(plan.slimmed)})")
        lines.append(f"{', '.join(parts)}, freeing {fmt_bytes(plan.version_bytes)}")
    if plan.chunks:
        lines.append(
            f"{verb} {plan.chunks} unreferenced chunks, freeing {fmt_bytes(plan.chunk_bytes)}"
        )
    return lines


def cmd_gc(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    rules = (args.keep_last, args.keep_best, args.keep_every, args.keep_every_seconds)
    keep = None
    if args.keep_without_metrics and args.keep_best is None:
        raise CliError("--keep-without-metrics needs --keep-best", EXIT_USAGE)
    if any(r is not None for r in rules) or args.slim:
        keep = Keep(
            last=args.keep_last,
            best=args.keep_best,
            every_n_steps=args.keep_every,
            every_seconds=args.keep_every_seconds,
            without_metrics=args.keep_without_metrics,
            subtrees=dict(args.slim) if args.slim else None,
        )
    monitor = monitor_of(store, args.metric, args.mode)
    needs_metric = args.keep_best is not None or any(
        inner.best is not None for _, inner in args.slim or ()
    )
    if needs_metric and monitor.metric is None:
        raise CliError(
            "--keep-best needs a metric (so does a best: rule of --slim): the store records no"
            " monitor; pass --metric NAME",
            EXIT_USAGE,
        )
    plan = _plan(store, keep, monitor.metric, monitor.mode or "min")
    base = {"store": store.root, "dry_run": args.dry_run, "rules": keep.to_dict() if keep else None}
    if plan.empty:
        if args.json:
            emit_json({**base, "applied": False, **_plan_json(plan)})
        else:
            print("nothing to delete")
        return EXIT_OK
    if args.dry_run or not args.yes:
        if args.json:
            emit_json({**base, "applied": False, **_plan_json(plan)})
        else:
            for line in _describe(plan, "would delete"):
                print(line)
        if args.dry_run:
            return EXIT_OK
        if not interactive():
            raise CliError("not deleting without confirmation: pass --yes (or --dry-run to list)")
        if not confirm("delete them?"):
            print("nothing deleted")
            return EXIT_FAILURE
    applied = _apply(store, plan, keep, monitor.metric, monitor.mode or "min", checked=not args.yes)
    if args.json:
        emit_json({**base, "applied": True, **_plan_json(applied)})
    else:
        for line in _describe(applied, "deleted"):
            print(line)
    return EXIT_OK


def _apply(
    store: Store, plan: _Plan, keep: Keep | None, metric: str | None, mode: str, checked: bool
) -> _Plan:
    """Deletes what ``plan`` lists.

    Holds the store's writer lock (re-entrant for this Store object) across
    the re-check and the deletions, so that no save or other gc slips in
    between what was confirmed and what is deleted.
    """
    with store._writer():
        if checked:
            again = _plan(store, keep, metric, mode)
            if (again.versions, again.slimmed) != (plan.versions, plan.slimmed):
                raise CliError("the store changed since the listing; nothing deleted, run gc again")
        deleted: tuple[int, ...] = ()
        slimmed: tuple[int, ...] = ()
        freed = 0
        kept: dict[int, tuple[str, ...]] = {}
        if keep is not None:
            result = store.apply_retention(keep, monitor=metric, mode=mode)
            deleted, freed, kept = result.deleted, result.freed_bytes, dict(result.kept)
            slimmed = result.slimmed
        swept = store.gc()
    return _Plan(deleted, freed, swept.deleted_objects, swept.freed_bytes, kept, slimmed)


# -------------------------------------------------------------------- pins
def cmd_pin(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    v = resolve(store, args.version, args.metric, args.mode)
    was = v.id in store.pinned()
    store.pin(v.id)
    if args.json:
        emit_json({"id": v.id, "step": v.step, "pinned": True, "changed": not was})
    else:
        print(f"version {v.id} {'was already' if was else 'is now'} pinned")
    return EXIT_OK


def cmd_unpin(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    v = resolve(store, args.version, args.metric, args.mode)
    was = v.id in store.pinned()
    store.unpin(v.id)
    if args.json:
        emit_json({"id": v.id, "step": v.step, "pinned": False, "changed": was})
    else:
        print(f"version {v.id} {'is no longer' if was else 'was not'} pinned")
    return EXIT_OK
