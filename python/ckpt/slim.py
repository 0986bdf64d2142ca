"""Slimming a version: dropping the leaves that retention's ``Keep(subtrees=...)`` lets go.

A slimmed version keeps its id, its tree and the entries of its tensor table;
the dropped entries are marked ``"dropped": true`` with no spans, and the
chunk table is rebuilt to hold only the chunks the remaining tensors use and
the bases their delta chunks need (docs/format.md, 7.3 and 7.7). Because a
version's objects are exactly its chunk table, ``gc``, ``verify`` and the
retention sweep then treat the dropped chunks as any unreferenced chunk.

Decisions:

* A tensor entry is dropped when every leaf of the tree that uses it matches
  a pattern: a plain tensor or pickle leaf by its own path, a storage entry
  (``#storage/N``, the memory that views share) when all the views on it
  match. A view that matches while a view on the same storage does not is
  kept, with its storage: a part of a storage cannot be dropped.
* Scalar leaves (ints, floats, strings, None) live in the skeleton, cost no
  chunk, and are never dropped.
* Slimming again with more patterns extends the record; slimming with
  patterns that drop nothing new changes nothing (idempotent), and a
  pattern that dropped nothing is not recorded.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

from .index import MANIFEST_VERSION_SLIM
from .tree import escape_key, iter_data_nodes

__all__ = ["dropped_entries", "leaf_users", "only_hint", "slim_manifest"]


def leaf_users(m: dict[str, Any]) -> dict[int, list[str]]:
    """Tensor-table index -> the leaf paths of the tree that use that entry."""
    users: dict[int, list[str]] = {}
    for path, node in iter_data_nodes(m["tree"]):
        users.setdefault(node["i"], []).append(path)
    return users


def dropped_entries(m: dict[str, Any]) -> set[int]:
    """Indices of the tensor entries that retention dropped (empty for a full version)."""
    return {i for i, t in enumerate(m["tensors"]) if t.get("dropped")}


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def slim_manifest(m: dict[str, Any], patterns: Sequence[str]) -> dict[str, Any] | None:
    """The manifest ``m`` with the leaves matching ``patterns`` dropped, or None
    when that drops nothing that is not dropped already.

    ``m`` (a validated manifest) is not modified. The result has no
    ``checksum`` (the caller seals it), manifest format 3 and a ``slimmed``
    record of every pattern that dropped something, old and new.
    """
    record = m.get("slimmed") or {"patterns": [], "dropped": []}
    users = leaf_users(m)
    tensors = m["tensors"]
    already = dropped_entries(m)
    new_patterns = [p for p in patterns if p not in record["patterns"]]
    every = [*record["patterns"], *new_patterns]
    drop = set(already) | {
        i for i, paths in users.items() if all(_matches(p, every) for p in paths)
    }
    newly = [p for i in sorted(drop - already) for p in users[i]]
    # a pattern is recorded when it dropped a leaf (the others changed nothing)
    useful = [p for p in new_patterns if any(fnmatch.fnmatchcase(path, p) for path in newly)]
    if drop == already:
        return None
    old = m["chunks"]
    kept_spans = [ci for i, t in enumerate(tensors) if i not in drop for ci, _, _ in t["spans"]]
    order: dict[int, int] = {}  # old index -> new index
    for ci in sorted(set(kept_spans)):  # span chunks keep their relative order
        order[ci] = len(order)
    for ci in sorted(set(kept_spans)):  # then the bases of delta chunks, each chain down
        base = old[ci][3] if len(old[ci]) == 4 else None
        while base is not None and base not in order:
            order[base] = len(order)
            base = old[base][3] if len(old[base]) == 4 else None
    table: list[list[Any]] = [[]] * len(order)
    for ci, ni in order.items():
        row = list(old[ci][:3])
        if len(old[ci]) == 4:
            row.append(order[old[ci][3]])
        table[ni] = row
    out = {k: copy.deepcopy(v) for k, v in m.items() if k not in ("checksum", "slimmed")}
    out["version"] = MANIFEST_VERSION_SLIM
    new_tensors = []
    for i, t in enumerate(tensors):
        t = dict(t)
        if i in drop:
            t["dropped"] = True
            t["spans"] = []
        else:
            t["spans"] = [[order[ci], off, ln] for ci, off, ln in t["spans"]]
        new_tensors.append(t)
    out["tensors"] = new_tensors
    out["chunks"] = table
    out["slimmed"] = {
        "patterns": [*record["patterns"], *useful],
        "dropped": [path for path, node in iter_data_nodes(m["tree"]) if node["i"] in drop],
    }
    return out


def _leaf_paths(node: Any, path: str = "") -> Iterator[str]:
    """Every leaf path of a validated skeleton, scalars included."""
    t = node["t"]
    if t == "dict":
        for key, value in zip(node["k"], node["v"], strict=True):
            yield from _leaf_paths(value, _join(path, key))
    elif t in ("list", "tuple"):
        for i, value in enumerate(node["v"]):
            yield from _leaf_paths(value, _join(path, i))
    else:
        yield path


def _join(prefix: str, key: str | int) -> str:
    text = escape_key(key)
    return f"{prefix}/{text}" if prefix else text


def only_hint(m: dict[str, Any], limit: int = 4) -> list[str]:
    """``only=`` patterns that load what a slimmed version keeps: ``top/**`` for
    a top-level key all of whose leaves are kept, the kept leaves themselves
    for a key that lost some (at most ``limit`` patterns, then ``...``)."""
    dropped = set(m.get("slimmed", {}).get("dropped", ()))
    groups: dict[str, list[tuple[str, bool]]] = {}
    for path in _leaf_paths(m["tree"]):
        groups.setdefault(path.split("/", 1)[0], []).append((path, path in dropped))
    out: list[str] = []
    for top, leaves in groups.items():
        if not any(gone for _, gone in leaves):
            out.append(top if [p for p, _ in leaves] == [top] else f"{top}/**")
        else:
            out += [p for p, gone in leaves if not gone]
    return out[:limit] + (["..."] if len(out) > limit else [])
