"""Replays a log of powerloss_shim.c: what a power loss at any moment could leave.

The model is the strict POSIX one (what a file system may legally keep):

* a file's content survives as of its last fsync (``F`` records carry a copy
  taken at that moment); a file never fsynced comes back empty;
* a directory entry (a create, rename, unlink or mkdir) survives only once
  its directory was fsynced (``D``) afterwards; until then the directory's
  previous durable entries are what a reboot shows.

Everything under the log's root that existed before the recording counts as
durable. :meth:`Disk.states` yields, after each record that changes what is
durable (and after each writer mark), the state a power loss at that moment
leaves, materialised as a directory tree, together with how far the writer
had got (its marks).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cut", "Disk", "Unsupported", "read_log"]

Node = int | str  # a file id, or the path of a directory


class Unsupported(Exception):
    """The writer did something the model does not cover (links, sync(), renaming directories)."""


@dataclass
class Cut:
    """A moment where the power may fail."""

    index: int  # records applied
    marks: list[str] = field(default_factory=list)  # writer marks (run/name) made before it


def read_log(path: str | os.PathLike[str]) -> list[list[str]]:
    return [line.split("\t") for line in Path(path).read_text().splitlines() if line]


class Disk:
    """Volatile and durable views of the tree under ``top``."""

    def __init__(self, top: str | os.PathLike[str], marks: str | os.PathLike[str]) -> None:
        self.top = os.fspath(top)
        self.marks = os.fspath(marks)
        self.cur: dict[str, dict[str, Node]] = {}
        self.dur: dict[str, dict[str, Node]] = {}
        self.content: dict[int, bytes] = {}  # durable content of each file
        self.file_ino: dict[int, int] = {}
        self.by_ino: dict[int, int] = {}
        for dirpath, dirnames, filenames in os.walk(self.top):
            entries: dict[str, Node] = {}
            for d in dirnames:
                entries[d] = os.path.join(dirpath, d)
            for f in filenames:
                path = os.path.join(dirpath, f)
                st = os.lstat(path)
                fid = self._new_file(st.st_ino)
                with open(path, "rb") as fh:
                    self.content[fid] = fh.read()
                entries[f] = fid
            self.cur[dirpath] = entries
        self.dur = {d: dict(e) for d, e in self.cur.items()}

    def _new_file(self, ino: int) -> int:
        fid = len(self.file_ino)
        self.file_ino[fid] = ino
        self.by_ino[ino] = fid
        self.content[fid] = b""  # nothing durable until an fsync
        return fid

    def apply(self, record: list[str]) -> bool:
        """Applies one log record; returns whether the durable state changed."""
        kind, args = record[0], record[1:]
        if kind == "C":
            ino, path = int(args[0]), args[1]
            parent, name = os.path.split(path)
            node = self.cur[parent].get(name)
            if not (isinstance(node, int) and self.file_ino[node] == ino):
                self.cur[parent][name] = self._new_file(ino)
            return False
        if kind == "F":
            ino, blob = int(args[0]), args[1]
            self.content[self.by_ino[ino]] = Path(blob).read_bytes()
            return True
        if kind == "D":
            self.dur[args[0]] = dict(self.cur[args[0]])
            return True
        if kind == "R":
            (po, no), (pn, nn) = os.path.split(args[0]), os.path.split(args[1])
            node = self.cur[po].pop(no)
            if isinstance(node, str):
                raise Unsupported(f"renaming a directory: {args}")
            self.cur[pn][nn] = node
            return False
        if kind in ("U", "X"):
            parent, name = os.path.split(args[0])
            del self.cur[parent][name]
            return False
        if kind == "M":
            path = args[1]
            parent, name = os.path.split(path)
            self.cur[parent][name] = path
            self.cur[path] = {}
            self.dur.setdefault(path, {})
            return False
        raise Unsupported(f"record {record}")

    def materialize(self, dest: str | os.PathLike[str]) -> None:
        """Writes the durable state (without the marks directory) to ``dest``."""

        def build(dirpath: str, out: str) -> None:
            for name, node in self.dur.get(dirpath, {}).items():
                target = os.path.join(out, name)
                if isinstance(node, str):
                    if node == self.marks:
                        continue
                    os.mkdir(target)
                    build(node, target)
                else:
                    with open(target, "wb") as fh:
                        fh.write(self.content[node])

        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.makedirs(dest)
        build(self.top, os.fspath(dest))

    def states(self, log: list[list[str]]) -> Iterator[Cut]:
        """Replays ``log``; yields a :class:`Cut` before the first record, after each
        record that changed the durable state, after each writer mark (what must be
        durable grew) and after the last record. The model is then at that cut."""
        made: list[str] = []
        yield Cut(0, [])
        for i, record in enumerate(log, 1):
            mark = record[0] == "M" and os.path.dirname(os.path.dirname(record[2])) == self.marks
            if mark:
                made.append(os.path.relpath(record[2], self.marks))  # marks/<run>/<mark>
            if self.apply(record) or mark or i == len(log):
                yield Cut(i, list(made))
