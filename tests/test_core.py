"""Checkpointer core behaviour: discovery layouts, retention, fallback, partial restores, preflight, lock.

Internals used: btckpt.storage.discovery, btckpt.storage.local (``storage.local.free_bytes`` patched to fake a full
disk, discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.storage.discovery import scan


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _ck(d: Path, **kw) -> btckpt.Checkpointer:
    return btckpt.Checkpointer(dir=d, handle_sigterm=False, **kw)


def test_latest_in_every_layout_and_env_node_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model()
    flat = tmp_path / "flat"
    btckpt.save(flat / "checkpoint-3", {"model": m})
    btckpt.save(flat / "checkpoint-12", {"model": m})
    (flat / "checkpoint-20").mkdir()  # incomplete (no manifest): skipped
    (flat / "checkpoint-x").mkdir()  # not a step
    assert btckpt.latest(flat) == flat / "checkpoint-12"
    assert btckpt.latest(flat / "checkpoint-3") == flat / "checkpoint-3"  # a checkpoint itself
    nested = tmp_path / "loaded"
    btckpt.save(nested / "jobA" / "rank-0" / "checkpoint-5", {"model": m})
    btckpt.save(nested / "jobB" / "rank-0" / "checkpoint-9", {"model": m})
    btckpt.save(nested / "jobB" / "rank-1" / "checkpoint-40", {"model": m})
    assert btckpt.latest(nested) == nested / "jobB" / "rank-0" / "checkpoint-9"
    monkeypatch.setenv("BT_NODE_RANK", "1")
    assert btckpt.latest(nested) == nested / "jobB" / "rank-1" / "checkpoint-40"
    ranked = tmp_path / "ranked"
    btckpt.save(ranked / "rank-1" / "checkpoint-2", {"model": m})
    assert btckpt.latest(ranked) == ranked / "rank-1" / "checkpoint-2"
    # a size mismatch makes a folder incomplete
    victim = flat / "checkpoint-12" / "model.safetensors"
    with open(victim, "ab") as f:
        f.write(b"x")
    assert btckpt.latest(flat) == flat / "checkpoint-3"


def test_restore_prefers_own_dir_then_load_dir_and_falls_back_past_corruption(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = _model()
    load = tmp_path / "load" / "job" / "rank-0"
    btckpt.save(load / "checkpoint-50", {"model": m})
    own = tmp_path / "own"
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    btckpt.save(own / "checkpoint-7", {"model": m})
    with torch.no_grad():
        m[0].weight.fill_(2.0)
    btckpt.save(own / "checkpoint-8", {"model": m})
    # flip one byte in the newest checkpoint's weights: restore warns, names the file, falls back to 7
    f = own / "checkpoint-8" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    target = _model()
    with _ck(own, load_dir=tmp_path / "load") as ck:
        assert ck.restore({"model": target}) == 7
    assert torch.equal(target[0].weight, torch.ones_like(target[0].weight))
    assert "checkpoint-8/model.safetensors: checksum mismatch" in caplog.text
    with _ck(tmp_path / "fresh", load_dir=tmp_path / "load") as ck:
        assert ck.restore({"model": target}) == 50


def test_restore_loads_only_named_groups_and_strict_false(tmp_path: Path) -> None:
    m, opt = _model(), None
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    btckpt.save(tmp_path / "checkpoint-1", {"model": m, "optimizer": opt, "extra": {"epoch": 3}})
    m2 = _model()
    with torch.no_grad():
        m2[0].weight.zero_()
    extra = {"epoch": 0}
    btckpt.load(tmp_path / "checkpoint-1", {"model": m2})  # weights only: nothing else touched
    assert torch.equal(m2[0].weight, m[0].weight) and extra == {"epoch": 0}
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), torch.nn.Linear(3, 1))
    with pytest.raises(btckpt.StateMismatch) as ei:
        btckpt.load(tmp_path / "checkpoint-1", {"model": bigger})
    msg = str(ei.value)
    assert "missing from the checkpoint" in msg and "3.weight" in msg and "2.weight" in msg and "strict=False" in msg
    before = bigger[3].weight.clone()
    btckpt.load(tmp_path / "checkpoint-1", {"model": bigger}, strict=False)
    assert torch.equal(bigger[0].weight, m[0].weight) and torch.equal(bigger[3].weight, before)


def test_retention_keeps_newest_and_protected_and_never_foreign_folders(tmp_path: Path) -> None:
    m = _model()
    (tmp_path / "checkpoint-0").mkdir()  # someone else's folder: never touched
    with _ck(tmp_path, keep_last=2, async_save=False) as ck:
        for s in range(1, 4):
            ck.save(s, {"model": m})
        ck.protect(tmp_path / "checkpoint-2")
        for s in range(4, 7):
            ck.save(s, {"model": m})
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-0", "checkpoint-2", "checkpoint-5", "checkpoint-6"]


def test_stale_temps_removed_and_existing_step_not_overwritten(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    m = _model()
    stale = tmp_path / ".checkpoint-4.tmp-999999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    with _ck(tmp_path, async_save=False) as ck:
        assert not stale.exists()
        ck.save(4, {"model": m})
        stamp = (tmp_path / "checkpoint-4" / "btckpt.json").stat().st_mtime_ns
        ck.save(4, {"model": m})  # same step again: kept as is, with a warning
        assert (tmp_path / "checkpoint-4" / "btckpt.json").stat().st_mtime_ns == stamp
        (tmp_path / "checkpoint-5").mkdir()
        (tmp_path / "checkpoint-5" / "junk").write_text("x")
        with pytest.raises(btckpt.CheckpointError, match="checkpoint-5 exists but is not a complete"):
            ck.save(5, {"model": m})
    assert "already exists; not saving step 4 again" in caplog.text


def test_preflight_refuses_a_save_that_cannot_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import btckpt.storage.local as storage

    monkeypatch.setattr(storage, "free_bytes", lambda p: 10_000)
    with _ck(tmp_path) as ck:
        with pytest.raises(btckpt.InsufficientSpace, match=r"needs 0\.\d MB plus a 17 MB margin, but only 0\.0 MB"):
            ck.save(1, {"model": _model()})
    assert [p.name for p in tmp_path.iterdir() if p.name != "_tmp"] == [".btckpt.lock"]


def test_second_writer_on_the_same_dir_gets_a_clear_error(tmp_path: Path) -> None:
    with _ck(tmp_path):
        with pytest.raises(btckpt.CheckpointError, match=f"pid {os.getpid()}.*own checkpoint dir"):
            _ck(tmp_path)


def test_checkpoint_dir_env_pointing_at_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(f))
    with pytest.raises(btckpt.ConfigError, match=r"\$BT_CHECKPOINT_DIR .*afile.* is a file"):
        btckpt.Checkpointer()
    assert f.read_text() == "x"


def test_plain_hf_model_folder_is_a_weights_only_warm_start(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    m = _model()
    folder = tmp_path / "hf-model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    assert [i.kind for i in scan(folder)] == ["hf"]
    target, opt = _model(), None
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    caplog.set_level(logging.INFO, logger="btckpt")
    with _ck(tmp_path / "own", load_dir=folder) as ck:
        assert ck.restore({"model": target, "optimizer": opt}) == 0
    assert torch.equal(target[2].bias, m[2].bias)
    assert "plain model folder" in caplog.text


def test_ddp_and_compile_wrappers_save_plain_keys(tmp_path: Path) -> None:
    m = _model()
    wrapped = torch.nn.DataParallel(m)
    p = btckpt.save(tmp_path / "checkpoint-1", {"model": wrapped})
    from safetensors.torch import load_file

    assert set(load_file(p / "model.safetensors")) == set(m.state_dict())
    again = torch.nn.DataParallel(_model())
    btckpt.load(p, {"model": again})
    assert torch.equal(again.module[0].weight, m[0].weight)


def _saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    state: dict = {"w": {}}
    btckpt.load(path, state, load_rng=False)
    return state["w"]


@pytest.mark.parametrize("async_save", [True, False])
def test_save_plan_is_replanned_when_the_structure_changes(tmp_path: Path, async_save: bool) -> None:
    """The cached plan is reused only while names, shapes, dtypes and tensors stay the same; any change
    re-plans and the checkpoint still equals the state at the save() call."""
    a, b = torch.arange(6.0), torch.ones(4, dtype=torch.int64)
    changes = [
        {"a": a, "b": b},                                  # 1: planned
        {"a": a, "b": b},                                  # 2: reused
        {"a": a.reshape(2, 3), "b": b},                    # 3: new shape, same storage
        {"a": a.reshape(2, 3), "b": b.to(torch.int32)},    # 4: new dtype
        {"a": a.reshape(2, 3), "c": b.to(torch.int32)},    # 5: renamed key
        {"a": a.reshape(2, 3), "c": a.reshape(2, 3)},      # 6: now tied to "a"
        {"a": a.reshape(2, 3), "c": a.reshape(2, 3) + 1},  # 7: untied again (new tensor)
        {"a": a.reshape(2, 3), "c": a.reshape(2, 3) + 1},  # 8: a new tensor again, same shape: re-planned
    ]
    reuses = []
    with _ck(tmp_path, keep_last=None, async_save=async_save, save_rng=False) as ck:
        for step, w in enumerate(changes, 1):
            ck.save(step, {"w": w})
            reuses.append(ck.stats.plan_reuses)
    assert reuses == [0, 1, 1, 1, 1, 1, 1, 1]
    for step, w in enumerate(changes, 1):
        got = _saved_tensors(tmp_path / f"checkpoint-{step}")
        assert got.keys() == w.keys(), step
        for k, t in w.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), (step, k)


def test_save_plan_sees_in_place_values_and_new_scalars(tmp_path: Path) -> None:
    """A reused plan copies the tensors' current values and encodes the tree's plain data afresh."""
    w = torch.zeros(3)
    with _ck(tmp_path, keep_last=None, save_rng=False) as ck:
        for step in (1, 2, 3):
            w.fill_(step)
            ck.save(step, {"w": {"t": w, "lr": 0.1 * step, "tags": ["x"] * step}})
        assert ck.stats.plan_reuses == 2  # same tensors at the same paths; the numbers and lists are not planned
    for step in (1, 2, 3):
        state: dict = {"w": {}}
        btckpt.load(tmp_path / f"checkpoint-{step}", state, load_rng=False)
        assert state["w"]["lr"] == pytest.approx(0.1 * step)
        assert state["w"]["tags"] == ["x"] * step
        assert torch.equal(state["w"]["t"], torch.full((3,), float(step)))


@pytest.mark.parametrize("bad", [0, 3, True, "2", 1.0])
def test_io_threads_is_validated(tmp_path: Path, bad: object) -> None:
    with pytest.raises(btckpt.ConfigError, match="io_threads"):
        _ck(tmp_path, io_threads=bad)


def test_io_threads_one_writes_verified_checkpoints(tmp_path: Path) -> None:
    m = _model()
    with _ck(tmp_path, io_threads=1) as ck:
        ck.save(1, {"model": m, "big": torch.randn(1 << 19)})  # 2 MiB: a piece large enough to hash aside
    state = {"model": _model(), "big": torch.zeros(1 << 19)}
    assert btckpt.load(tmp_path / "checkpoint-1", state) == 1
    assert scan(tmp_path)[0].complete
