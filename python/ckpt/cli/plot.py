"""``ckpt plot``: a metric over steps as a PNG, best version and early stop marked.

Needs matplotlib, an optional dependency (the ``plot`` extra:
``pip install 'ckpt-store[plot]'``); without it the command fails with one
line saying so. It draws with matplotlib's object API on an Agg canvas, so
it never touches pyplot's global state or needs a display.

What is drawn: the metric of every save the store's metric history holds
(:meth:`ckpt.Store.history`: also the versions retention deleted since, and
the steps a manager evaluated without writing a version), against its step,
as a line; a dot on each version the store still has; for a store without a
history (written before it existed) the versions alone, against their step
(against the version id when no version has a step); the best version
(``--metric``/``--mode``, else the recorded monitor) as a star with its
value; and, when the latest version's trainer state says an early stopping
fired (its ``stopped_step``), a vertical line at that step with the reason. The output
file is overwritten (a plot is cheap to redo).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from .errors import EXIT_OK, EXIT_USAGE, CliError
from .output import emit_json
from .refs import add_metric_options, best_version, monitor_of, open_store

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "plot",
        parents=[common],
        formatter_class=formatter,
        help="plot a metric over steps to a PNG (needs matplotlib)",
        description="Plot a metric over the saved versions' steps, with the best version"
        " and the early-stopping point marked, to a PNG file. Needs matplotlib"
        " (pip install 'ckpt-store[plot]').",
        epilog="examples:\n"
        "  ckpt plot runs/exp1 --out curve.png\n"
        "  ckpt plot runs/exp1 --metric acc --mode max --out acc.png",
    )
    p.add_argument("store", help="path of the store")
    add_metric_options(p, what="the plotted metric and best")
    p.add_argument("--out", "-o", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--title", help="title of the plot (default: store and metric)")
    p.set_defaults(func=cmd_plot)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError(
            "ckpt plot needs matplotlib, which is not installed:"
            " pip install 'ckpt-store[plot]' (or pip install matplotlib)"
        ) from None
    return Figure, FigureCanvasAgg


def cmd_plot(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".png"):
        raise CliError(
            f"--out {args.out!r}: ckpt plot writes PNG files (name it *.png)", EXIT_USAGE
        )
    store = open_store(args.store)
    versions = store.versions()
    latest = versions[-1] if versions else None
    monitor = monitor_of(store, args.metric, args.mode, latest)
    if monitor.metric is None:
        raise CliError("which metric? the store records no monitor; pass --metric NAME", EXIT_USAGE)
    metric = monitor.metric
    have = [v for v in versions if metric in v.metrics and math.isfinite(float(v.metrics[metric]))]
    curve: dict[int, float] = {}  # step -> value, the last recorded one for a step
    for entry in store.history():
        value = entry.metrics.get(metric)
        if entry.step is not None and value is not None and math.isfinite(float(value)):
            curve[entry.step] = float(value)
    if not have and not curve:
        raise CliError(f"no version of {store.root} has a finite value of {metric!r}")
    by_step = all(v.step is not None for v in have)

    def x_of(v: Any) -> int:
        return int(v.step) if by_step else int(v.id)

    best = best_version(versions, monitor)
    recorded = latest.trainer.get("early_stopping") if latest is not None else None
    states = recorded if isinstance(recorded, list) else [recorded]
    es = next(
        (st for st in states if isinstance(st, dict) and st.get("stopped_step") is not None), None
    )
    stopped = es.get("stopped_step") if es is not None else None
    reason = es.get("reason") if es is not None else None
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=(8, 4.5), dpi=100)
    canvas_cls(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [x_of(v) for v in have]
    ys = [float(v.metrics[metric]) for v in have]
    if curve and by_step:
        steps = sorted(curve)
        ax.plot(steps, [curve[x] for x in steps], "-", color="tab:blue", linewidth=1.2, zorder=1)
    else:
        ax.plot(xs, ys, "-", color="tab:blue", linewidth=1.2, zorder=1)
    ax.scatter(xs, ys, s=18, color="tab:blue", zorder=2, label="versions in the store")
    if best is not None and best in have:
        bx, by = x_of(best), float(best.metrics[metric])
        ax.scatter(
            [bx],
            [by],
            s=160,
            marker="*",
            color="tab:orange",
            zorder=3,
            label=f"best: v{best.id} ({by:.4g})",
        )
    if isinstance(stopped, int) and by_step:
        ax.axvline(
            stopped,
            color="tab:red",
            linestyle="--",
            linewidth=1.2,
            label=f"early stop at step {stopped}",
        )
    ax.set_xlabel("step" if by_step else "version")
    ax.set_ylabel(metric)
    ax.set_title(
        args.title or f"{os.path.basename(os.path.abspath(store.root))}: {metric} ({monitor.mode})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(args.out, format="png")
    if args.json:
        emit_json(
            {
                "out": args.out,
                "metric": metric,
                "mode": monitor.mode,
                "points": len(curve) if curve and by_step else len(have),
                "versions": len(have),
                "best": None if best is None else best.id,
                "stopped_step": stopped,
                "stop_reason": reason,
            }
        )
    else:
        extra = f", early stop at step {stopped}" if isinstance(stopped, int) else ""
        best_text = f", best v{best.id}" if best is not None else ""
        if curve and by_step:
            what = f"{len(curve)} steps ({len(have)} versions kept)"
        else:
            what = f"{len(have)} versions"
        print(f"wrote {args.out}: {metric} over {what}{best_text}{extra}")
    return EXIT_OK
