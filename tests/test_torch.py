"""PyTorch adapter: bit-exact round trips of every dtype and layout, sharing, state dicts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import ckpt  # noqa: E402
import ckpt.torch  # noqa: E402

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32,
    torch.float64, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store never calls torch.load (or pickle) on its own."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def raw(t: Any) -> bytes:
    t = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> Any:
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if dtype == torch.bool:
        data &= 1  # other bytes are not valid bools (torch copies normalise them)
    return torch.from_numpy(data).view(dtype).reshape(shape)  # every bit pattern


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert raw(a) == raw(b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    else:
        assert a == b or (a != a and b != b)


def store(tmp_path: Path) -> ckpt.Store:
    return ckpt.Store(tmp_path / "s", chunk_size=16 * 1024, small_threshold=2048)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    s = store(tmp_path)
    tree = {
        "big": random_tensor(dtype, (70, 130), 0),
        "scalar": random_tensor(dtype, (), 1),
        "empty": random_tensor(dtype, (0, 4), 2),
    }
    s.save(tree)
    same(s.load(), tree)
    manifest_dtypes = {t["dtype"] for t in s.manifest()["tensors"]}
    assert len(manifest_dtypes) == 1 and all(t["leaf"] == "torch" for t in s.manifest()["tensors"])


layouts = st.sampled_from(["contiguous", "transposed", "strided", "narrow", "expanded"])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(DTYPES),
    layout=layouts,
    rows=st.integers(0, 40),
    cols=st.integers(1, 40),
)
def test_property_layouts_round_trip(
    tmp_path: Path, dtype: torch.dtype, layout: str, rows: int, cols: int
) -> None:
    base = random_tensor(dtype, (rows, cols), rows * 100 + cols)
    make = {
        "contiguous": lambda: base,
        "transposed": lambda: base.t(),
        "strided": lambda: base[::2, ::3],
        "narrow": lambda: base[:, cols // 2 :],
        "expanded": lambda: base[:1].expand(3, cols) if rows else base,
    }
    t = make[layout]()
    s = ckpt.Store(tmp_path / f"s{rows}-{cols}-{layout}-{str(dtype)[6:]}", durable=False)
    s.save({"t": t})
    out = s.load()["t"]
    assert out.dtype == t.dtype and out.shape == t.shape and raw(out) == raw(t)


def test_tied_weights_and_views_come_back_sharing_memory(tmp_path: Path) -> None:
    s = store(tmp_path)
    emb = torch.randn(300, 64)
    buf = torch.randn(1000)
    tree = {
        "embed": {"weight": emb},
        "lm_head": {"weight": emb},  # tied
        "a": buf[100:400].view(10, 30),
        "b": buf[250:900:5],
        "alone": buf[:10],  # shares with a and b too
    }
    v = s.save(tree)
    covered = emb.numel() * 4 + 896 * 4  # buf[0:896] is the run the three views cover
    assert v.raw_bytes == covered  # each storage stored once
    out = s.load()
    same(out["embed"]["weight"], emb)
    assert out["embed"]["weight"].data_ptr() == out["lm_head"]["weight"].data_ptr()
    for k in ("a", "b", "alone"):
        assert raw(out[k]) == raw(tree[k])
        assert out[k].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()
    out["a"][0, 15] = 42.0  # buf[115]: writes through to the others, as after torch.load
    assert out["alone"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()
    out["b"][0] = 7.0  # buf[250] is a[5, 0]
    assert out["a"][5, 0].item() == 7.0
    bases = [t for t in s.manifest()["tensors"] if t.get("role") == "storage"]
    assert len(bases) == 2
    assert sum(t["nbytes"] for t in bases) == covered
    assert {t["path"] for t in s.manifest()["tensors"]} >= {"#storage/0", "#storage/1"}
    only = s.load(only="lm_head/*")
    same(only["lm_head"]["weight"], emb)


def test_model_optimizer_scheduler_scaler_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        sched.step()
    s = store(tmp_path)
    state = ckpt.torch.capture(model=model, optimizer=opt, scheduler=sched, scaler=scaler, epoch=3)
    s.save(state)
    expected_next = torch.rand(3)
    loaded = s.load()
    assert isinstance(next(iter(loaded["optimizer"]["state"])), int)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.95))
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    ckpt.torch.apply(loaded, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler)
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where it was
    same(model2.state_dict(), model.state_dict())
    same(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    with pytest.raises(KeyError, match="no 'scaler' entry"):
        ckpt.torch.apply({"model": model.state_dict()}, model=model2, scaler=scaler)


def test_restore_into_existing_tensors_in_place(tmp_path: Path) -> None:
    s = store(tmp_path)
    model = torch.nn.Linear(100, 50)
    s.save({"model": model.state_dict()})
    other = torch.nn.Linear(100, 50)
    target = other.state_dict()
    out = s.load(into={"model": target})
    assert out["model"]["weight"].data_ptr() == other.weight.data_ptr()
    assert torch.equal(other.weight, model.weight)


def test_parameters_and_requires_grad_are_restored(tmp_path: Path) -> None:
    s = store(tmp_path)
    p = torch.nn.Parameter(torch.randn(5))
    s.save({"p": p, "g": torch.randn(2).requires_grad_()})
    out = s.load()
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert out["g"].requires_grad and not isinstance(out["g"], torch.nn.Parameter)


def test_map_location_and_devices(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save({"w": torch.ones(3)})
    assert s.load(map_location="cpu")["w"].device.type == "cpu"
    entry = s.manifest()["tensors"][0]
    assert entry["torch"]["device"] == "cpu"
    # a tensor recorded on CUDA cannot come back on a machine without CUDA, unless mapped
    p = next(Path(s.root, "versions").glob("*.json"))
    m = json.loads(p.read_text())
    m["tensors"][0]["torch"]["device"] = "cuda:0"
    p.write_text(json.dumps(m))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="map_location='cpu'"):
            s.load()
    assert s.load(map_location="cpu")["w"].device.type == "cpu"


def test_as_numpy_loads_torch_leaves_without_torch_types(tmp_path: Path) -> None:
    import ml_dtypes

    s = store(tmp_path)
    s.save({"w": torch.arange(6, dtype=torch.float32).to(torch.bfloat16)})
    w = s.load(as_numpy=True)["w"]
    assert isinstance(w, np.ndarray) and w.dtype == np.dtype(ml_dtypes.bfloat16)
    assert w.astype(np.float32).tolist() == [0, 1, 2, 3, 4, 5]


def test_unstorable_objects_name_the_path_and_pickle_is_opt_in(tmp_path: Path) -> None:
    s = store(tmp_path)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda e: 0.9**e)
    state = {"scheduler": sched.state_dict(), "fn": lambda: 1}
    with pytest.raises(TypeError, match=r"leaf 'fn' is a function.*without pickle"):
        s.save(state)
    with pytest.raises(TypeError, match="cannot be stored"):
        s.save({"sparse": torch.eye(3).to_sparse()})
    s.save({"fn": len, "w": torch.ones(1)}, allow_pickle=True)
    with pytest.raises(ckpt.UnsafeLoadError, match=r"pickled objects \('fn'\).*allow_pickle=True"):
        s.load()
    assert s.load(only="w")["w"].tolist() == [1.0]  # the rest loads without unpickling
    assert s.load(allow_pickle=True)["fn"] is len


class Boom:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, ("touch PWNED",))


def test_a_pickle_where_a_manifest_should_be_never_executes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = store(tmp_path)
    s.save({"w": torch.ones(1)})
    Path(s.root, "versions", "000000000001.json").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ckpt.FormatError, match="not a JSON manifest"):
        s.load(1)
    assert not (tmp_path / "PWNED").exists()
    assert not any(r.ok for r in s.verify())


def test_reference_reader_reads_torch_leaves_and_shared_views(tmp_path: Path) -> None:
    import reference_reader as ref

    s = store(tmp_path)
    buf = torch.randn(200)
    tree = {"a": buf[10:110].view(10, 10), "b": buf[::4], "bf": torch.randn(50).to(torch.bfloat16)}
    v = s.save(tree)
    out, _ = ref.read_version(s.root, v.id)
    assert out["a"].tobytes() == tree["a"].numpy().tobytes()
    assert out["b"].tobytes() == tree["b"].contiguous().numpy().tobytes()
    assert out["bf"].tobytes() == raw(tree["bf"])
