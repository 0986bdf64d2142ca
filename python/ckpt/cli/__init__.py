"""The ``ckpt`` command: inspect, restore and manage checkpoint stores from the shell.

Layout (after the huggingface_hub ``hf`` CLI): one module per command group,
each with a ``register(subparsers, common)`` that adds its sub-commands and
binds them to a function ``(args) -> exit status``:

* :mod:`.listing`: ``ls``, ``show``, ``best``, ``du``
* :mod:`.restore`: ``restore`` (.safetensors, .npz, directory of .npy)
* :mod:`.transfer`: ``export``, ``import`` (safetensors with the full tree)
* :mod:`.check`: ``verify``, ``diff``
* :mod:`.manage`: ``gc``, ``pin``, ``unpin``
* :mod:`.plot`: ``plot`` (needs matplotlib: the ``plot`` extra)

All output goes through :mod:`.output` (tables, JSON, progress); all error
reporting through :mod:`.errors` (one ``ckpt: error: ...`` line, no
traceback unless ``--debug``).

Why argparse: it is in the standard library, so the command adds no
dependency to a package whose only one is numpy; sub-parsers, parent parsers
for the shared ``--json``/``--debug`` options and epilogs with examples cover
what this command needs. ``click``/``typer`` would buy decorators and
colours at the price of a dependency in every training environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence

from .errors import EXIT_OK, describe

__all__ = ["build_parser", "main"]

_EPILOG = """\
VERSION is an id (7), latest, best (by the metric the training recorded, or
--metric), best:METRIC[:min|max], or step=N.

examples:
  ckpt ls runs/exp1                         versions, metrics, why each is kept
  ckpt show runs/exp1 best --tensors 'encoder/*'
  ckpt restore runs/exp1 best --out model.safetensors
  ckpt diff runs/exp1 3 latest
  ckpt gc runs/exp1 --keep-last 3 --keep-best 2 --dry-run
  ckpt ls runs/exp1 --json | jq '.versions[] | select(.best)'

exit status: 0 ok; 1 failure (also: damage found by verify, no version with
the metric for best, deletions not confirmed by gc); 2 usage error.
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps one-line paragraphs (descriptions); keeps multi-line ones (examples) as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, _columns()))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            if "\n" in para.strip("\n"):
                paragraphs.append("\n".join(indent + line for line in para.splitlines()))
            else:
                paragraphs.append(
                    textwrap.fill(
                        para,
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
        return "\n\n".join(paragraphs)


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ckpt`` command (all sub-commands registered)."""
    from . import check, listing, manage, plot, restore, transfer

    p = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect, restore and manage ckpt checkpoint stores.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--version", dest="print_version", action="store_true", help="print the version and exit"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="machine-readable JSON on stdout (stable keys)"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in (listing, restore, transfer, check, manage, plot):
        module.register(sub, common, _Formatter)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckpt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_version:
        from .. import __version__

        print(__version__)
        return EXIT_OK
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_OK
    try:
        status: int = args.func(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # `ckpt ls | head`: the reader left; stop quietly, like other tools.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        store = getattr(args, "store", None)
        message, status = describe(exc, store if isinstance(store, str) else None)
        one_line = " ".join(message.split())
        print(f"ckpt: error: {one_line}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
