"""The ``ckpt`` command (the full command set is tracked in its own issue)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect and manage ckpt checkpoint stores.",
        epilog="example: ckpt ls runs/exp1",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    ls = sub.add_parser("ls", help="list the versions of a store")
    ls.add_argument("store", help="path of the store")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ckpt`` console script."""
    args = _parser().parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if args.command == "ls":
        from ..errors import CheckpointError
        from ..store import Store

        try:
            store = Store(args.store, create=False)
            versions = store.versions()
        except (CheckpointError, OSError) as exc:
            print(f"ckpt: error: {exc}", file=sys.stderr)
            return 1
        why = store.explain()
        print(f"{'id':>6} {'step':>8} {'created':<20} {'kept because':<24} metrics")
        for v in versions:
            metrics = " ".join(f"{k}={val:.6g}" for k, val in sorted(v.metrics.items()))
            step = "-" if v.step is None else str(v.step)
            created = v.created.strftime("%Y-%m-%d %H:%M:%S")
            kept = ", ".join(why.get(v.id, ()))
            print(f"{v.id:>6} {step:>8} {created:<20} {kept:<24} {metrics}")
        return 0
    _parser().print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
