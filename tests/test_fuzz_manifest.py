"""Fuzzing the manifest and tree parser (hypothesis; the engine's chunk decoder
has its own proptest fuzzers in rust/engine/src/fuzz.rs).

Arbitrary bytes, and valid manifests with random parts replaced by random
JSON (huge, negative and non-integer numbers, strings that look like paths,
nesting), are parsed and loaded: the only outcomes allowed are a loaded tree
or one of ckpt's errors; never another exception (TypeError, KeyError,
IndexError, RecursionError, MemoryError...) and never a crash.

CKPT_FUZZ_EXAMPLES=N sets how many cases each fuzzer runs (docs/reliability.md
says how to run them for hours).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from crashcheck import record
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.index import parse_manifest, seal_manifest

EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
)

#: What a load of a hostile manifest may raise.
ALLOWED = (ckpt.FormatError, ckpt.IntegrityError, ckpt.UnsafeLoadError, ckpt.VersionNotFoundError)
#: ... and of a slimmed one (manifest format 3), whose dropped leaves are refused.
ALLOWED_SLIM = (*ALLOWED, ckpt.SlimmedError)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "a\0b", "F32", "U8", "tensor", "dict"]),
    st.sampled_from(["nan", "inf", "-inf", "0" * 64, "f" * 64, "checksum"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["t", "i", "k", "v", "shape", "stride", "offset", "x"]),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz") / "store"
    store = ckpt.Store(root, chunk_size=4096, small_threshold=1024, durable=False)
    store.save(
        {
            "w": np.arange(3000, dtype=np.float32),
            "b": np.arange(5, dtype=np.int64),
            "nested": {1: [1.5, "x", None, (True,)], "t": (np.float64(2.0),)},
        },
        step=3,
        metrics={"loss": 0.5},
    )
    m = json.loads(Path(root, "versions", "000000000001.json").read_bytes())
    del m["checksum"]
    return root, m


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every JSON path inside ``value`` (the places a mutation can hit)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths_of(v, (*prefix, i))
    return out


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    copy = list(value)
    copy[head] = replaced(copy[head], rest, new)
    return copy


@pytest.fixture(scope="module")
def slim_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A slimmed version (format 3): "opt/*" dropped, "w" and "b" kept."""
    root = tmp_path_factory.mktemp("fuzz-slim") / "store"
    store = ckpt.Store(root, chunk_size=4096, small_threshold=1024, durable=False)
    for i in range(2):
        store.save(
            {
                "w": np.arange(3000, dtype=np.float32) + i,
                "b": np.arange(5, dtype=np.int64),
                "opt": {"m": np.full(2000, i, np.float32), "n": 3},
            }
        )
    result = store.apply_retention(ckpt.Keep(subtrees={"opt/*": ckpt.Keep(last=1)}))
    assert result.slimmed == (1,)
    store.delete(2)  # the fuzzed version alone, as in the other store
    m = json.loads(Path(root, "versions", "000000000001.json").read_bytes())
    assert m["version"] == 3
    del m["checksum"]
    return root, m


def load_outcome(root: Path, data: bytes, allowed: tuple[type[Exception], ...] = ALLOWED) -> None:
    Path(root, "versions", "000000000001.json").write_bytes(data)
    store = ckpt.Store(root, durable=False)
    with contextlib.suppress(allowed):
        store.load(1)
    with contextlib.suppress(allowed):
        store.load(1, only="w")
    report = store.verify()  # never raises for damage
    assert [r.version for r in report] in ([1], [])


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_a_format_error(data: bytes) -> None:
    with contextlib.suppress(ckpt.FormatError):
        parse_manifest(data, "version 1")


@FUZZ
@given(data=st.data())
def test_mutated_manifests_parse_and_load_or_fail_cleanly(
    base: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    root, m = base
    mutated: Any = m
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths_of(mutated)))
        mutated = replaced(mutated, where, data.draw(json_values))
    body = json.dumps(mutated, separators=(",", ":")).encode()
    sealed = seal_manifest(body) if body.startswith(b"{") and body != b"{}" else body
    with contextlib.suppress(ckpt.FormatError):
        parse_manifest(sealed, "version 1")
    load_outcome(root, sealed)


@FUZZ
@given(data=st.data())
def test_mutated_slimmed_manifests_parse_and_load_or_fail_cleanly(
    slim_base: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    root, m = slim_base
    mutated: Any = m
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths_of(mutated)))
        mutated = replaced(mutated, where, data.draw(json_values))
    body = json.dumps(mutated, separators=(",", ":")).encode()
    sealed = seal_manifest(body) if body.startswith(b"{") and body != b"{}" else body
    with contextlib.suppress(ckpt.FormatError):
        parse_manifest(sealed, "version 1")
    load_outcome(root, sealed, ALLOWED_SLIM)


@FUZZ
@given(data=st.data())
def test_byte_level_mutations_of_a_sealed_manifest(
    base: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    """Random byte edits of a sealed manifest: any single edit is caught; several
    edits are caught unless all of them hit the checksum entry alone, in which
    case the manifest parses to exactly its original content."""
    _, m = base
    original = seal_manifest(json.dumps(m, separators=(",", ":")).encode())
    sealed = bytearray(original)
    edits = data.draw(st.integers(1, 4))
    for _ in range(edits):
        pos = data.draw(st.integers(0, len(sealed) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            sealed[pos] ^= data.draw(st.integers(1, 255))
        elif op == "delete":
            del sealed[pos]
        else:
            sealed.insert(pos, data.draw(st.integers(0, 255)))
    assume(bytes(sealed) != original)  # two edits may cancel out
    if edits == 1:
        with pytest.raises(ckpt.FormatError):
            parse_manifest(bytes(sealed), "version 1")
        return
    try:
        got = parse_manifest(bytes(sealed), "version 1")
    except ckpt.FormatError:
        return
    got.pop("checksum", None)
    assert {k: v for k, v in got.items() if not k.startswith("check")} == m


def test_record_the_fuzz_settings() -> None:
    record("test_fuzz_manifest", "examples per fuzzer (4 fuzzers)", EXAMPLES)
