"""Format v1: safetensors files readable by the safetensors library, every dtype, JSON state, sharding.

Internals used: btckpt.format.layout, btckpt.format.manifest, btckpt.format.state, btckpt.restore.reader (the format
under test: the dtype table, manifests, the state mapping and the reader).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt import UnsupportedValue
from btckpt.format.layout import DTYPE_TO_ST
from btckpt.format.manifest import read_manifest
from btckpt.restore.reader import CheckpointReader
from safetensors import safe_open
from safetensors.torch import load_file


def _roundtrip(tmp_path: Path, state: dict, **kw) -> tuple[dict, Path]:
    path = btckpt.save(tmp_path / "checkpoint-7", state, **kw)
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in state.items()}
    assert btckpt.load(path, target) == 7
    return target, path


def _all_dtypes() -> list[torch.dtype]:
    return sorted(DTYPE_TO_ST, key=str)


@pytest.mark.parametrize("dtype", _all_dtypes(), ids=str)
def test_every_dtype_roundtrips_bitwise_and_loads_with_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (3, 5, 8), dtype=torch.uint8, generator=g)
    t = raw.view(dtype) if torch.empty((), dtype=dtype).element_size() <= 8 else raw
    state = {"w": t, "scalar": t.flatten()[0].clone().reshape(()), "empty": t[:0]}
    out, path = _roundtrip(tmp_path, state)
    for k in state:
        assert out[k].dtype == dtype and out[k].shape == state[k].shape
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), state[k].contiguous().reshape(-1).view(torch.uint8)), k
    if dtype in (torch.uint16, torch.uint32, torch.uint64, getattr(torch, "float8_e8m0fnu", None)):
        return  # the safetensors library maps these only on some versions
    lib = load_file(path / "w.safetensors")
    assert torch.equal(lib["w"].view(torch.uint8), t.contiguous().view(torch.uint8))


def test_complex128_and_sparse_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValue, match="complex128.*view_as_real") as ei:
        btckpt.save(tmp_path / "c", {"extra": {"z": torch.zeros(2, dtype=torch.complex128)}})
    assert "extra.z" in str(ei.value)
    with pytest.raises(UnsupportedValue, match="meta device"):
        btckpt.save(tmp_path / "m", {"model": torch.nn.Linear(2, 2, device="meta")})
    assert not [p for p in tmp_path.iterdir() if p.name != "_tmp"]


def test_noncontiguous_zero_dim_and_tied_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(5, 3)
    state = {"extra": {"t": base.t(), "s": base[:, ::2], "z": torch.tensor(3.5), "a": tied, "b": tied}}
    path = btckpt.save(tmp_path / "checkpoint-1", state)
    man = read_manifest(path)
    refs = man.state["extra"]
    assert refs["a"] == refs["b"]  # stored once, referenced twice
    with safe_open(str(path / "extra.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a", "s", "t", "z"]
    loaded = CheckpointReader(path, man).load_group("extra")
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["s"], base[:, ::2])
    assert loaded["z"].shape == () and loaded["z"].item() == 3.5
    assert loaded["a"].data_ptr() == loaded["b"].data_ptr()


def test_model_keys_equal_state_dict_and_tied_module_restores_tied(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.norm = torch.nn.LayerNorm(4)

    m = Tied()
    path = btckpt.save(tmp_path / "checkpoint-3", {"model": m})
    keys = set(load_file(path / "model.safetensors"))
    assert keys == {"emb.weight", "norm.weight", "norm.bias"}  # tied weight stored once (HF does the same)
    m2 = Tied()
    btckpt.load(path, {"model": m2})
    assert m2.head.weight is m2.emb.weight and torch.equal(m2.emb.weight, m.emb.weight)

    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    p2 = btckpt.save(tmp_path / "checkpoint-4", {"model": plain})
    lib = load_file(p2 / "model.safetensors")
    assert set(lib) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(lib[k], v)


def test_json_values_roundtrip_exactly(tmp_path: Path) -> None:
    extra = {"i": 3, "f": 0.1, "inf": float("inf"), "ninf": float("-inf"), "nan": float("nan"), "s": "x",
             "none": None, "b": True, "t": (1, (2, [3])), "l": [1.5, None], 4: "int key", (1, 2): "tuple key",
             "__tensor__": "looks like a tag", "nested": {"deep": {"x": [{"y": ()}]}}}
    path = btckpt.save(tmp_path / "checkpoint-1", {"extra": extra})
    out: dict = {"extra": {}}
    btckpt.load(path, out)
    got = out["extra"]
    assert math.isnan(got.pop("nan")) and math.isnan(extra["nan"])
    want = {k: v for k, v in extra.items() if k != "nan"}
    assert got == want
    assert isinstance(got["t"], tuple) and isinstance(got["t"][1], tuple)
    assert isinstance(got["nested"]["deep"]["x"][0]["y"], tuple)
    raw = (path / "btckpt.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw  # strict JSON
    json.loads(raw)


def test_non_json_values_name_the_key(tmp_path: Path) -> None:
    for bad, key in [({"opt": {"x": object()}}, "x"), ({"extra": {"when": Path("/x")}}, "when"),
                     ({"extra": {"s": {1, 2}}}, "s"), ({"extra": {"dt": torch.float32}}, "dt")]:
        with pytest.raises(UnsupportedValue, match=key) as ei:
            btckpt.save(tmp_path / "checkpoint-1", bad)
        assert "never pickles" in str(ei.value)
    assert not [p for p in tmp_path.iterdir() if p.name != "_tmp"]


def test_sharding_with_a_lowered_max_size_writes_hf_index(tmp_path: Path) -> None:
    m = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    path = btckpt.save(tmp_path / "checkpoint-2", {"model": m}, max_shard_size=1500)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted({v for v in index["weight_map"].values()})
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(m.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in m.state_dict().values())
    merged = {}
    for f in files:
        merged.update(load_file(path / f))
    for k, v in m.state_dict().items():
        assert torch.equal(merged[k], v)


def test_data_sections_are_page_aligned_and_tensors_aligned(tmp_path: Path) -> None:
    state = {"extra": {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5, dtype=torch.float64),
                       "c": torch.ones(7, dtype=torch.float16)}}
    path = btckpt.save(tmp_path / "checkpoint-1", state)
    raw = (path / "extra.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 4096 == 0
    header = json.loads(raw[8:8 + n])
    for name, info in header.items():
        if name == "__metadata__":
            continue
        size = {"F64": 8, "F16": 2, "I8": 1}[info["dtype"]]
        assert info["data_offsets"][0] % size == 0


def test_sync_direct_write_and_async_arena_write_give_identical_files(tmp_path: Path) -> None:
    """A sync save writes straight from the tensors, an async one from the staging arena: same bytes."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    state = {"extra": {
        "noncontig": base.t(),  # a transposed view
        "conj": torch.randn(4, dtype=torch.complex64, generator=g).conj(),  # lazy conjugate bit
        "neg": torch.randn(3, generator=g).to(torch.cfloat).conj().imag,  # lazy negative bit
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "flags": torch.rand(7, generator=g) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "big": torch.randn(300_000, generator=g),  # > 1 MiB: hashed on the second thread, several pieces
    }}
    for async_save in (False, True):
        with btckpt.Checkpointer(dir=tmp_path / str(async_save), async_save=async_save, save_rng=False,
                                 copy_inline_bytes=0, handle_sigterm=False) as ck:
            ck.save(1, state)
    a, b = tmp_path / "False" / "checkpoint-1", tmp_path / "True" / "checkpoint-1"
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors")
    assert names and names == sorted(p.name for p in b.iterdir() if p.suffix == ".safetensors")
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    loaded = load_file(str(a / names[0]))
    for k, v in state["extra"].items():
        got = next(t for name, t in loaded.items() if name.endswith(k))
        assert torch.equal(got, v.resolve_conj().resolve_neg()), k


def test_optimizer_state_with_many_params_loads_exactly_through_the_id_lookup(tmp_path: Path) -> None:
    """torch's Optimizer.load_state_dict looks every state tensor's id up in its group's list (quadratic in
    the parameter count); btckpt hands it groups with O(1) lookup. Two param groups with different
    hyper-parameters and 2,000 parameters: the restored optimizer equals the saved one, group by group,
    keeps its own param lists, and the next step matches an uninterrupted run bit for bit."""
    import copy

    from btckpt.format.state import optimizer_state_for_loading

    def build() -> tuple[torch.nn.ParameterList, torch.optim.Optimizer]:
        torch.manual_seed(0)
        ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3)) for _ in range(2000)])
        opt = torch.optim.AdamW([{"params": list(ps)[:700], "lr": 0.1}, {"params": list(ps)[700:], "lr": 0.01}])
        return ps, opt

    def step(ps: torch.nn.ParameterList, opt: torch.optim.Optimizer) -> None:
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.1 + i % 7)
        opt.step()

    ps, opt = build()
    step(ps, opt)
    btckpt.save(tmp_path / "ck", {"model": ps, "optimizer": opt})
    step(ps, opt)  # the uninterrupted run's next step
    ps2, opt2 = build()
    assert btckpt.load(tmp_path / "ck", {"model": ps2, "optimizer": opt2}) == 0
    step(ps2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2, strict=True))
    assert all(g["params"] is not None and type(g["params"]) is list for g in opt2.param_groups)
    a, b = opt.state_dict(), opt2.state_dict()
    assert [g["lr"] for g in b["param_groups"]] == [0.1, 0.01]
    assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for k in a["state"] for n in ("exp_avg", "step"))

    fast = optimizer_state_for_loading(a)
    ids = fast["param_groups"][1]["params"]
    assert list(ids) == a["param_groups"][1]["params"] and 1999 in ids and 5 not in ids
    assert 1999 in copy.deepcopy(fast)["param_groups"][1]["params"]  # torch deep-copies the groups first
    assert fast["state"] is a["state"] and a["param_groups"][1]["params"].__class__ is list  # input untouched
