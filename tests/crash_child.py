"""A store writer for the crash, fault and power-loss tests, run as a child process.

Usage: ``python crash_child.py STORE OP [OP ...]`` with OP one of

    save:K      save tree_for(K) (step K)
    delete:V    delete version V
    gc          collect unreferenced chunks
    retain:N    apply retention Keep(last=N)
    pin:V       pin version V
    unpin:V

The parent arms the engine's fault points with ``CKPT_FAULT`` (the child
dies or fails where it says). With ``CKPT_MARKS=DIR`` the child makes the
directory ``DIR/<i>-<op>[-id<V>]`` after the i-th op returns, which the
power-loss shim records: the model then knows what had been committed at
each moment. Exit status: 0, or 3 with the error on stderr when an op
raised (a test that injects EIO or ENOSPC expects that).

``python crash_child.py --serve`` is a fork server for the same runs (see
:func:`serve`): the tests use it so that each of hundreds of runs does not
pay for importing numpy and ckpt again.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable

from crashcheck import CHUNKS, tree_for

import ckpt


def break_commits(how: str) -> None:
    """Test-only sabotage (``CKPT_TEST_BROKEN``): atomic commits that skip the
    directory fsync (``no-dir-fsync``) or the file fsync (``no-file-fsync``),
    so that test_powerloss.py can show that it catches either."""

    def commit(self: ckpt.Store, directory: str, name: str, data: bytes) -> None:
        folder = os.path.join(self.root, directory)
        tmp = os.path.join(self.root, "tmp", f"{name}.broken.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if how != "no-file-fsync":
                os.fsync(f.fileno())
        os.rename(tmp, os.path.join(folder, name))
        if how != "no-dir-fsync":
            fd = os.open(folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    ckpt.Store._commit = commit  # type: ignore[method-assign]


def run(root: str, ops: list[str], ready: Callable[[], None] | None = None) -> int:
    if os.environ.get("CKPT_TEST_BROKEN"):
        break_commits(os.environ["CKPT_TEST_BROKEN"])
    marks = os.environ.get("CKPT_MARKS")
    store = ckpt.Store(root, **CHUNKS)
    if ready is not None:
        ready()  # imports done: the ops start now
    for i, op in enumerate(ops):
        name, _, arg = op.partition(":")
        suffix = ""
        try:
            if name == "save":
                v = store.save(tree_for(int(arg)), step=int(arg))
                suffix = f"-id{v.id}"
            elif name == "delete":
                store.delete(int(arg))
            elif name == "gc":
                store.gc()
            elif name == "retain":
                store.apply_retention(ckpt.Keep(last=int(arg)))
            elif name == "pin":
                store.pin(int(arg))
            elif name == "unpin":
                store.unpin(int(arg))
            else:
                raise SystemExit(f"unknown op {op!r}")
        except (OSError, ckpt.CheckpointError) as exc:
            kind = type(exc).__name__
            print(f"{kind}: errno={getattr(exc, 'errno', None)}: {exc}", file=sys.stderr)
            return 3
        if marks:
            os.mkdir(os.path.join(marks, f"{i}-{name}{suffix}"))
    return 0


def wait_for_marks(pid: int, env: dict[str, str], count: int) -> int | None:
    """Poll until the child has made ``count`` marks; its wait status if it
    exited first (reaped here), else None."""
    while count and len(os.listdir(env["CKPT_MARKS"])) < count:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.0005)
    return None


def serve() -> None:
    """Fork server: one JSON request per stdin line, ``{"root", "ops", "env",
    "fsize", "kill_after", "kill_after_marks"}``; answers ``{"returncode", "stderr", "ready_at"}``
    with the returncode as subprocess reports it (negative: killed by that signal).

    Each request runs in a process forked from this one, which has imported
    ckpt but never reached a fault point, so each child reads CKPT_FAULT
    afresh, as a new process would, without paying for the imports again.
    With ``kill_after`` the server SIGKILLs the child that many seconds after
    it opened the store (the child's ops are running then); with
    ``kill_after_marks`` K as well, that many seconds after the child's K-th
    op returned (its mark appeared in ``CKPT_MARKS``), so that a kill lands in
    the op the test chose however fast this machine runs today.
    """
    for line in sys.stdin:
        req = json.loads(line)
        err_r, err_w = os.pipe()  # pipes: RLIMIT_FSIZE does not apply to them
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(err_r)
                os.close(ready_r)
                os.dup2(err_w, 2)
                os.environ.update(req["env"])
                if req.get("fsize"):
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead
                    resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
                code = run(req["root"], req["ops"], functools.partial(os.close, ready_w))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(err_w)
        os.close(ready_w)
        os.read(ready_r, 1)  # returns when the child closed its end (ready or dead)
        os.close(ready_r)
        ready_at = time.time()
        status = None
        if req.get("kill_after") is not None:
            status = wait_for_marks(pid, req["env"], req.get("kill_after_marks") or 0)
            if status is None:
                time.sleep(req["kill_after"])
                os.kill(pid, signal.SIGKILL)
        with os.fdopen(err_r, "rb") as err:
            stderr = err.read().decode(errors="replace")
        if status is None:
            _, status = os.waitpid(pid, 0)
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        answer = {"returncode": returncode, "stderr": stderr, "ready_at": ready_at}
        print(json.dumps(answer), flush=True)


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return 0
    return run(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
