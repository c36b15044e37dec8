"""The watched save plan (btckpt.saving.watch): a steady save() does not walk the state, and every structure
change (replaced parameters and buffers, `.data` reassignment, new optimizer state, load_state_dict, new param
groups, hooks...) still lands in the checkpoint exactly as the state was at the save() call.

Internals used: btckpt.format.manifest, btckpt.oneshot, btckpt.restore.reader, btckpt.saving.job (the one-shot
save's ``run_save`` and the job's spied on (how often the state is walked), manifests and the reader).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import btckpt
import pytest
import torch
from btckpt.format.manifest import read_manifest
from btckpt.restore.reader import CheckpointReader


def _build() -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(6, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _saved(path: Path, group: str) -> Any:
    return CheckpointReader(path, read_manifest(path)).load_group(group)


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return copy.deepcopy(tree)


def _same(a: Any, b: Any, where: str = "") -> None:
    """Equal trees; tensors equal in dtype, shape and every value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b) if isinstance(b, dict) else b)
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}.{i}")
    else:
        assert a == b, (where, a, b)


@pytest.fixture
def state_dict_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts module/optimizer ``state_dict()`` calls (the walk the watched plan avoids)."""
    calls: list[str] = []
    module_sd, optim_sd = torch.nn.Module.state_dict, torch.optim.Optimizer.state_dict

    def m_sd(self: torch.nn.Module, *a: Any, **k: Any) -> Any:
        if not k.get("prefix") and "destination" not in k:  # the top-level call, not torch's recursion
            calls.append(type(self).__name__)
        return module_sd(self, *a, **k)

    def o_sd(self: torch.optim.Optimizer) -> Any:
        calls.append(type(self).__name__)
        return optim_sd(self)

    monkeypatch.setattr(torch.nn.Module, "state_dict", m_sd)
    monkeypatch.setattr(torch.optim.Optimizer, "state_dict", o_sd)
    return calls


def test_a_steady_save_does_not_walk_the_state(tmp_path: Path, state_dict_calls: list[str]) -> None:
    """Once planned, a save of an unchanged model + optimizer calls no ``state_dict()``, and each checkpoint
    still holds that save's values."""
    model, opt = _build()
    state = {"model": model, "optimizer": opt, "ema": torch.zeros(3)}
    expected = []
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, save_rng=False, handle_sigterm=False) as ck:
        for step in (1, 2, 3):
            _step(model, opt)
            state["ema"].add_(1.0)
            expected.append(_clone({"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": state["ema"]}))
            state_dict_calls.clear()
            ck.save(step, state)
            if step > 1:
                assert state_dict_calls == [], step
        assert ck.stats.plan_reuses == 2
    for step, exp in enumerate(expected, 1):
        for group in ("model", "optimizer", "ema"):
            _same(exp[group], _saved(tmp_path / f"checkpoint-{step}", group), f"{step}:{group}")


def _param(model: torch.nn.Sequential) -> torch.nn.Parameter:
    return model[0].weight


def _replace_param(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[3].weight = torch.nn.Parameter(torch.full((2, 8), 0.25))


def _replace_param_new_shape(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[3].bias = torch.nn.Parameter(torch.arange(5.0))


def _assign_buffer(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[1].running_mean = torch.full((8,), 7.0)


def _buffer_in_dict(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[1]._buffers["running_var"] = torch.full((8,), 3.0)  # what module.to() does: no registration hook


def _data_same_shape(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    _param(m).data = torch.full((8, 4), -2.0)


def _data_new_shape(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[0].bias.data = torch.arange(3.0)


def _data_new_dtype(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[0].bias.data = m[0].bias.data.to(torch.float64)


def _module_double(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m.double()


def _requires_grad(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    _param(m).requires_grad_(False)
    with torch.no_grad():
        _param(m).mul_(3.0)


def _state_entry_replaced(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    o.state[_param(m)]["exp_avg"] = torch.full((8, 4), 5.0)


def _state_entry_added(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    o.state[_param(m)]["extra"] = torch.ones(2)


def _load_state_dict(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    sd = _clone(o.state_dict())
    for st in sd["state"].values():
        st["exp_avg"].fill_(9.0)
    o.load_state_dict(sd)


def _module_load_state_dict_assign(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    sd = _clone(m.state_dict())
    sd["3.weight"] = torch.full((2, 8), 4.0)
    m.load_state_dict(sd, assign=True)


def _add_param_group(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    o.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.5})


def _lr_changed(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    o.param_groups[0]["lr"] = 0.125


def _submodule_added(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    m[2].add_module("extra", torch.nn.Linear(2, 2))


def _submodule_deleted(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    del m._modules["1"]  # no hook: the module dicts are compared


def _param_deleted(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    del m[3].bias


def _state_dict_hook(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    def hook(module: torch.nn.Module, sd: dict[str, Any], prefix: str, local: Any) -> None:
        sd[prefix + "weight"] = torch.full((2, 8), 6.0)

    m[3].register_state_dict_post_hook(hook)


def _optimizer_state_dict_hook(m: torch.nn.Sequential, o: torch.optim.Optimizer) -> None:
    def hook(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        sd["param_groups"][0]["note"] = "hooked"
        return sd

    o.register_state_dict_post_hook(hook)


CHANGES: dict[str, tuple[Callable[[torch.nn.Sequential, torch.optim.Optimizer], None], bool]] = {
    # name: (the change, whether a training step can follow it)
    "parameter replaced": (_replace_param, True),
    "parameter replaced, new shape": (_replace_param_new_shape, False),
    "buffer re-assigned (module.buf = t)": (_assign_buffer, True),
    "buffer replaced in module._buffers": (_buffer_in_dict, True),
    ".data reassigned": (_data_same_shape, True),
    ".data reassigned, new shape": (_data_new_shape, False),
    ".data reassigned, new dtype": (_data_new_dtype, False),
    "module.double()": (_module_double, False),
    "requires_grad_ then an in-place edit": (_requires_grad, True),
    "optimizer state entry replaced": (_state_entry_replaced, True),
    "optimizer state entry added": (_state_entry_added, True),
    "optimizer load_state_dict": (_load_state_dict, True),
    "module load_state_dict(assign=True)": (_module_load_state_dict_assign, False),
    "param group added": (_add_param_group, True),
    "learning rate changed": (_lr_changed, True),
    "submodule added": (_submodule_added, True),
    "submodule deleted from _modules": (_submodule_deleted, False),
    "parameter deleted": (_param_deleted, False),
    "module state_dict hook registered": (_state_dict_hook, True),
    "optimizer state_dict hook registered": (_optimizer_state_dict_hook, True),
}


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("name", list(CHANGES))
def test_a_structure_change_after_a_watched_save_is_in_the_checkpoint(tmp_path: Path, name: str, async_save: bool,
                                                                      state_dict_calls: list[str]) -> None:
    change, can_train = CHANGES[name]
    model, opt = _build()
    state = {"model": model, "optimizer": opt}
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, save_rng=False, handle_sigterm=False,
                             async_save=async_save) as ck:
        _step(model, opt)
        ck.save(1, state)
        _step(model, opt)
        state_dict_calls.clear()
        ck.save(2, state)
        assert state_dict_calls == []  # the save before the change was a watched one
        change(model, opt)
        expected = _clone({"model": model.state_dict(), "optimizer": opt.state_dict()})
        ck.save(3, state)
        if can_train:
            _step(model, opt)  # training goes on: the snapshot holds the state at the save() call
        ck.wait()
    for group in ("model", "optimizer"):
        _same(expected[group], _saved(tmp_path / "checkpoint-3", group), f"{name}:{group}")


def test_optimizer_state_created_by_the_first_step_is_saved(tmp_path: Path, state_dict_calls: list[str]) -> None:
    """Saved before any step (no optimizer state yet, watched), then after the step that creates it."""
    model, opt = _build()
    state = {"model": model, "optimizer": opt}
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, save_rng=False, handle_sigterm=False) as ck:
        ck.save(1, state)
        state_dict_calls.clear()
        ck.save(2, state)
        assert state_dict_calls == []
        _step(model, opt)
        expected = _clone(opt.state_dict())
        assert expected["state"]
        ck.save(3, state)
        _step(model, opt)
    _same(expected, _saved(tmp_path / "checkpoint-3", "optimizer"))


def test_a_tensor_group_whose_data_is_reassigned_is_saved_anew(tmp_path: Path) -> None:
    t = torch.zeros(4)
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, save_rng=False, handle_sigterm=False) as ck:
        ck.save(1, {"t": t})
        ck.save(2, {"t": t})
        t.data = torch.arange(6, dtype=torch.float64)
        ck.save(3, {"t": t})
    _same(torch.arange(6, dtype=torch.float64), _saved(tmp_path / "checkpoint-3", "t"))


def test_an_unrelated_module_built_between_saves_only_costs_a_walk(tmp_path: Path, state_dict_calls: list[str]) -> None:
    """Any registration in the process sends the next save back to the walk (correct, slower); the one after
    is watched again."""
    model, opt = _build()
    state = {"model": model, "optimizer": opt}
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, save_rng=False, handle_sigterm=False) as ck:
        ck.save(1, state)
        torch.nn.Linear(2, 2)
        state_dict_calls.clear()
        ck.save(2, state)
        assert sorted(state_dict_calls) == ["Adam", "Sequential"]
        state_dict_calls.clear()
        ck.save(3, state)
        assert state_dict_calls == []


def test_a_one_shot_save_runs_without_cyclic_gc_and_restores_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """btckpt.save pauses the cyclic collector (with 10^5 tensors alive its full collections cost more than the
    save) and turns it back on afterwards, also when the save fails."""
    import gc

    import btckpt.saving.job as job_mod

    seen: list[bool] = []
    real = job_mod.run_save

    def spy(job: Any) -> Any:
        seen.append(gc.isenabled())
        return real(job)

    monkeypatch.setattr("btckpt.oneshot.run_save", spy)
    model, opt = _build()
    assert gc.isenabled()
    btckpt.save(tmp_path / "a", {"model": model, "optimizer": opt}, save_rng=False)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(btckpt.CheckpointError):
        btckpt.save(tmp_path / "a", {"model": model}, save_rng=False)  # exists: refused
    assert gc.isenabled()
