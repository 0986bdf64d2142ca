"""Everything the ``ckpt`` command prints: tables, JSON, numbers, progress.

The one place that decides how output looks, so that every command renders
alike (the huggingface_hub ``hf`` CLI keeps the same split):

* :func:`emit_json`: machine-readable output on stdout, one line when piped
  (indented on a terminal). Keys are stable and documented per command;
  non-finite floats are written as the strings ``"nan"``, ``"inf"``,
  ``"-inf"`` (as in manifests), so the output is strict JSON that ``jq``
  and ``json.loads`` accept.
* :class:`Table`: a plain-text table that fits the width of
  :func:`output_width`: ``$COLUMNS`` when set, else the terminal's when
  stdout is one (flexible columns are truncated with an ellipsis, optional
  ones dropped, before anything wraps). Piped or redirected output has no
  width limit: every value is written in full, one row per line, so that
  ``grep``, ``awk`` and files see what the store holds.
* :func:`fmt_bytes`, :func:`fmt_ago`, :func:`fmt_when`, :func:`fmt_num`: the
  number formats of tables (binary units, "3m ago", local time, 4 digits).
* :class:`Progress` and :class:`Spinner`: drawn on stderr only when stderr is
  a terminal, so that pipes and logs stay clean; stdout is never touched.
* :func:`confirm`: the yes/no question of destructive commands; a run whose
  stdin is not a terminal is never asked (and never says yes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = [
    "Column",
    "Progress",
    "Spinner",
    "Table",
    "confirm",
    "emit_json",
    "fmt_ago",
    "fmt_bytes",
    "fmt_num",
    "fmt_when",
    "jsonable",
    "note",
    "output_width",
    "print_fields",
    "terminal_width",
]


# ------------------------------------------------------------------- JSON
def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``"nan"``/``"inf"``/``"-inf"``."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def emit_json(obj: Any, stream: TextIO | None = None) -> None:
    """Writes ``obj`` as strict JSON and a newline to stdout.

    Indented when the stream is a terminal (someone reads it), one line
    otherwise (a pipe: smaller, and serialised by the C encoder, several
    times faster on a 10,000-version listing).
    """
    out = stream or sys.stdout
    indent = 2 if getattr(out, "isatty", lambda: False)() else None
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:  # a non-finite float somewhere: spell it as manifests do
        text = json.dumps(jsonable(obj), indent=indent, allow_nan=False)
    out.write(text + "\n")


def note(message: str) -> None:
    """A line for people on stderr (hints, warnings); never part of the output proper."""
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- numbers
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_bytes(n: int | float) -> str:
    """``512 B``, ``12.3 KiB``, ``118 MiB``, ``1.21 GiB``: at most 8 characters."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            if abs(value) >= 100:
                return f"{value:.0f} {unit}"
            if abs(value) >= 10:
                return f"{value:.1f} {unit}"
            return f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_num(x: float | int | None) -> str:
    """A metric for a table: ints as they are, floats with 4 significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def fmt_ago(t: datetime, now: datetime | None = None) -> str:
    """``12s ago``, ``3m ago``, ``5h ago``, ``4d ago``, ``2y ago`` (``in 3m`` for the future)."""
    now = now or datetime.now(timezone.utc)
    seconds = (now - t).total_seconds()
    future = seconds < -1
    s = abs(seconds)
    if s < 60:
        text = f"{int(s)}s"
    elif s < 3600:
        text = f"{int(s // 60)}m"
    elif s < 48 * 3600:
        text = f"{int(s // 3600)}h"
    elif s < 730 * 86400:
        text = f"{int(s // 86400)}d"
    else:
        text = f"{int(s // (365 * 86400))}y"
    return f"in {text}" if future else f"{text} ago"


def fmt_when(t: datetime, now: datetime | None = None, *, full: bool = False) -> str:
    """Local time: ``06-01 14:03`` this year, ``2024-06-01`` before; ``full``: to the second."""
    local = t.astimezone()
    if full:
        return local.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    now = (now or datetime.now(timezone.utc)).astimezone()
    return local.strftime("%m-%d %H:%M" if local.year == now.year else "%Y-%m-%d")


# ------------------------------------------------------------------ tables
def terminal_width(default: int = 80) -> int:
    """Columns of the terminal on stdout, ``$COLUMNS`` if set, else ``default``."""
    return max(40, shutil.get_terminal_size((default, 24)).columns)


def output_width(stream: TextIO | None = None) -> int | None:
    """The width tables and ``key  value`` blocks are fitted to, or None for no limit.

    ``$COLUMNS`` when it is set to a positive integer (an explicit request,
    honoured even in a pipe); else the terminal's width when ``stream``
    (stdout) is a terminal; else None: a pipe or a file gets every value in
    full, never cut to 80 or any other number of columns.
    """
    env = os.environ.get("COLUMNS", "")
    if env.isascii() and env.isdigit() and int(env) > 0:
        return max(40, int(env))
    out = stream or sys.stdout
    try:
        if out.isatty():
            return max(40, os.get_terminal_size(out.fileno()).columns)
    except (AttributeError, ValueError, OSError):
        pass
    return None


def _ellipsis() -> str:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return "\u2026" if encoding in ("utf8", "utf16", "utf32") else "~"


def _cut(text: str, width: int, how: str) -> str:
    if len(text) <= width:
        return text
    if width <= 0:
        return ""
    dots = _ellipsis()
    if width <= len(dots):
        return text[:width]
    keep = width - len(dots)
    if how == "middle":
        head = (keep + 1) // 2
        return text[:head] + dots + text[len(text) - (keep - head) :]
    if how == "left":
        return dots + text[len(text) - keep :]
    return text[:keep] + dots


@dataclass
class Column:
    """A table column.

    Attributes:
        header: column title (lower case, as in every ckpt table).
        align: ``"<"`` (text) or ``">"`` (numbers).
        flex: may be narrowed down to ``min_width``, cells truncated with an ellipsis.
        min_width: narrowest a flex column gets.
        cut: where a truncated cell loses text: ``"right"``, ``"middle"`` (paths), ``"left"``.
        drop: columns with a higher value are dropped first when flex columns
            cannot make the table fit (0: never dropped).
    """

    header: str
    align: str = "<"
    flex: bool = False
    min_width: int = 6
    cut: str = "right"
    drop: int = 0


class Table:
    """Rows of text cells rendered in aligned columns that fit a width.

    Columns are separated by two spaces. When the natural width exceeds the
    limit (``width``, else :func:`output_width`; None: no limit), flex columns
    are narrowed (cells truncated with an ellipsis), then droppable columns
    are removed, highest ``drop`` first.
    """

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(["" if c is None else str(c) for c in cells])

    def render(self, width: int | None = None) -> str:
        limit = output_width() if width is None else width
        visible = list(range(len(self.columns)))
        while True:
            widths = {
                i: max([len(self.columns[i].header)] + [len(r[i]) for r in self.rows])
                for i in visible
            }
            if limit is None:  # not a terminal: every cell in full
                break
            total = sum(widths.values()) + 2 * (len(visible) - 1)
            for i in sorted(visible, key=lambda i: -i):  # narrow the rightmost flex first
                if total <= limit:
                    break
                col = self.columns[i]
                if col.flex and widths[i] > col.min_width:
                    cut = min(widths[i] - col.min_width, total - limit)
                    widths[i] -= cut
                    total -= cut
            droppable = [i for i in visible if self.columns[i].drop]
            if total <= limit or not droppable:
                break
            visible.remove(max(droppable, key=lambda i: (self.columns[i].drop, i)))
        lines = []
        for cells in [[c.header for c in self.columns], *self.rows]:
            parts = []
            for i in visible:
                col = self.columns[i]
                text = _cut(cells[i], widths[i], col.cut)
                parts.append(text.rjust(widths[i]) if col.align == ">" else text.ljust(widths[i]))
            lines.append("  ".join(parts).rstrip())
        return "\n".join(lines)

    def print(self, width: int | None = None) -> None:
        print(self.render(width))


def print_fields(
    fields: Iterable[tuple[str, object]], indent: str = "  ", width: int | None = None
) -> None:
    """``key   value`` lines, values aligned (``ckpt show`` blocks).

    Values are wrapped to ``width``, else to :func:`output_width`; with no
    limit (a pipe) each value stays whole on its key's line.
    """
    pairs = [(k, "" if v is None else str(v)) for k, v in fields]
    if not pairs:
        return
    w = max(len(k) for k, _ in pairs)
    limit = output_width() if width is None else width
    hang = " " * (len(indent) + w + 2)
    for k, v in pairs:
        first = f"{indent}{k.ljust(w)}  "
        if limit is None:
            print(f"{first}{v}".rstrip())
            continue
        lines = textwrap.wrap(
            v,
            width=max(limit, len(first) + 20),
            initial_indent=first,
            subsequent_indent=hang,
            break_on_hyphens=False,
        )
        print("\n".join(lines) if lines else first.rstrip())


# ---------------------------------------------------------------- progress
class Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal.

    Args:
        total: the amount of work (bytes, items, ...); 0 draws a counter only.
        label: what is being done.
        unit: ``"bytes"`` shows sizes, anything else plain counts.
        stream: where to draw (default stderr); nothing is drawn unless it is a TTY.
    """

    def __init__(
        self, total: int, label: str, *, unit: str = "bytes", stream: TextIO | None = None
    ) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._drawn = False

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(ok=exc[0] is None)

    def _amount(self, n: int) -> str:
        return fmt_bytes(n) if self.unit == "bytes" else str(n)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        width = min(terminal_width(), 100)
        if self.total:
            frac = min(1.0, self.done / self.total)
            right = f" {frac * 100:3.0f}% {self._amount(self.done)}/{self._amount(self.total)}"
            bar_w = max(10, width - len(self.label) - len(right) - 4)
            filled = int(frac * bar_w)
            line = f"{self.label} [{'#' * filled}{'.' * (bar_w - filled)}]{right}"
        else:
            line = f"{self.label} {self._amount(self.done)}"
        self.stream.write("\r" + line[: width - 1])
        self.stream.flush()
        self._drawn = True

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._draw(force=self.done >= self.total > 0)

    def close(self, ok: bool = True) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K" if not ok else "\n")
            self.stream.flush()
            self._drawn = False


class Spinner:
    """An activity line on stderr (a TTY only) while one long call runs.

    For operations that report no progress of their own (``Store.verify``
    runs in one native call that releases the GIL, so a thread can redraw).
    """

    _FRAMES = "|/-\\"

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        start = time.monotonic()
        i = 0
        while not self._stop.wait(0.1):
            elapsed = time.monotonic() - start
            self.stream.write(f"\r{self.label} {self._FRAMES[i % 4]} {elapsed:.0f}s")
            self.stream.flush()
            i += 1

    def __enter__(self) -> Spinner:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# ----------------------------------------------------------------- prompts
def interactive() -> bool:
    """True when a person can answer a question (stdin and stderr are terminals)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def confirm(question: str, ask: Callable[[str], str] = input) -> bool:
    """Asks ``question [y/N]`` on a terminal; False when not interactive or not "y"/"yes"."""
    if not interactive():
        return False
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    try:
        answer = ask("")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
