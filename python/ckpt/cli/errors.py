"""The one place where exceptions become ``ckpt: error: ...`` lines.

Commands raise library exceptions as they come (or :class:`CliError` for
problems of the command line itself); :func:`describe` turns any of them
into one line for stderr and an exit status. Nothing else in the CLI catches
exceptions to print them, so every message looks alike and a traceback is
shown only with ``--debug``.

Exit statuses: 0 success; 1 failure (an error, damage found by ``verify``,
no version with the metric for ``best``, deletions not confirmed by ``gc``);
2 usage errors (argparse's own, and :class:`CliError` with ``code=2``);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import shlex

from ..errors import (
    BadReferenceError,
    CheckpointError,
    FormatError,
    IntegrityError,
    MetricModeError,
    MissingObjectError,
    StoreLockedError,
    StoreNotFoundError,
    VersionNotFoundError,
)

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CliError", "describe"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure the command reports itself (bad option combination, refusal, ...).

    Args:
        message: the line to print after ``ckpt: error:``.
        code: the exit status (1 failure, 2 usage).
    """

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _os_message(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    if isinstance(exc, PermissionError):
        return f"permission denied: {' -> '.join(map(str, names)) or what}"
    if names:
        return f"{what}: {' -> '.join(map(str, names))}"
    return what


def describe(exc: BaseException, store: str | None = None) -> tuple[str, int]:
    """The one-line message (without the ``ckpt: error:`` prefix) and exit status for ``exc``.

    Args:
        exc: what the command raised.
        store: the STORE argument as the user typed it; hints (``ckpt verify
            runs/exp1``) name it, shell-quoted, so they can be pasted as they are.
    """
    where = "STORE" if store is None else shlex.quote(store)
    if isinstance(exc, CliError):
        return exc.message, exc.code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, (BadReferenceError, MetricModeError)):
        return str(exc), EXIT_USAGE
    if isinstance(exc, StoreNotFoundError):
        return f"{exc.strerror or exc}", EXIT_FAILURE
    if isinstance(exc, VersionNotFoundError):
        return f"{exc} (ckpt ls {where} lists the versions)", EXIT_FAILURE
    if isinstance(exc, MissingObjectError):
        return (
            f"store is damaged (a chunk is missing): {exc}; run ckpt verify {where}",
            EXIT_FAILURE,
        )
    if isinstance(exc, IntegrityError):
        return f"store is damaged: {exc}; run ckpt verify {where}", EXIT_FAILURE
    if isinstance(exc, FormatError):
        return str(exc), EXIT_FAILURE
    if isinstance(exc, StoreLockedError):
        return str(exc), EXIT_FAILURE
    if isinstance(exc, CheckpointError):
        return str(exc) or type(exc).__name__, EXIT_FAILURE
    if isinstance(exc, OSError):
        return _os_message(exc), EXIT_FAILURE
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return text or type(exc).__name__, EXIT_FAILURE
    return (
        f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
        EXIT_FAILURE,
    )
