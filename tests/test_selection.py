"""One selection rule and one deletion scope for every entry point (DESIGN.md, "Rules every entry point
shares"): the Checkpointer, ``btckpt.load``/``latest``, HF's ``resume_checkpoint``, Lightning's
``resume_path`` and the CLI choose the same checkpoint, skip the same damaged ones, and fail the same way
when a resume was asked for and nothing is there; retention deletes only the writer's own folders.

Internals used: btckpt.cli, btckpt.saving.retention (retention called directly, the command's ``main``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.cli import main as cli_main
from safetensors.torch import save_file

pytest.importorskip("transformers")
pytest.importorskip("lightning")

from btckpt.hf import resume_checkpoint  # noqa: E402
from btckpt.lightning import SafetensorsCheckpointIO, resume_path  # noqa: E402

TS = {"trainer_state.json": b"{}"}  # makes a folder an HF Trainer checkpoint for resume_checkpoint()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _train_state(seed: int = 0) -> dict:
    m = _model(seed)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {"model": m, "optimizer": opt}


def _ck(d: Path, **kw) -> btckpt.Checkpointer:
    return btckpt.Checkpointer(dir=d, handle_sigterm=False, async_save=False, **kw)


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _flip_byte(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))


def _steps(d: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in d.iterdir() if p.name.startswith("checkpoint-"))


def test_retention_deletes_only_the_writers_own_folders(tmp_path: Path) -> None:
    """Other jobs' folders and nested layouts beside the own checkpoints are never deleted (keep_last=1)."""
    root = tmp_path / "root"
    m = _model()
    btckpt.save(root / "previous-job" / "rank-0" / "checkpoint-7", {"model": m})
    btckpt.save(root / "previous-job" / "rank-0" / "checkpoint-9", {"model": m})
    btckpt.save(root / "rank-0" / "checkpoint-3", {"model": m})
    btckpt.save(root / "other" / "checkpoint-1", {"model": m})  # not a supported layout: never touched either
    (root / "notes.txt").write_text("keep me")
    foreign = {d: _tree(root / d) for d in ("previous-job", "rank-0", "other")}
    state = _train_state()
    with _ck(root, keep_last=1) as ck:
        for step in (1, 2, 3, 4):
            ck.save(step, state)
        ck.wait()
    assert _steps(root) == [4]
    for d, files in foreign.items():
        assert _tree(root / d) == files, d
    assert (root / "notes.txt").read_text() == "keep me"
    # the Checkpointer's consolidation retention is the same loop (apply_retention): scope likewise
    from btckpt.saving.retention import apply_retention

    assert apply_retention(root, keep_last=1) == []
    assert all(_tree(root / d) == files for d, files in foreign.items())


def test_model_file_at_top_does_not_hide_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``trainer.save_model(dir)`` leaves model.safetensors + config.json at the top: the folder still holds
    checkpoints, restore resumes the newest one (optimizer included) and retention keeps working."""
    root = tmp_path / "run"
    root.mkdir()
    save_file({k: v.contiguous() for k, v in _model(5).state_dict().items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))
    state = _train_state()
    with _ck(root, keep_last=2) as ck:
        for step in (1, 2, 3, 4, 5):
            snap = copy.deepcopy(state["optimizer"].state_dict())
            ck.save(step, state)
            state["optimizer"].step()
        ck.wait()
    assert _steps(root) == [4, 5]  # retention ran (it stopped before: five folders kept)
    assert (root / "model.safetensors").is_file() and (root / "config.json").is_file()  # never deleted
    fresh = _train_state(seed=1)
    with _ck(root) as ck:
        assert ck.restore(fresh) == 5  # not 0 (a weights-only warm start from the top-level model file)
    got = fresh["optimizer"].state_dict()["state"]
    assert got.keys() == snap["state"].keys()
    for k, want in snap["state"].items():
        assert torch.equal(got[k]["exp_avg"], want["exp_avg"]) and torch.equal(got[k]["step"], want["step"])
    assert float(got[0]["step"]) == 5.0
    assert btckpt.load(root, _train_state(seed=3)) == 5
    assert btckpt.latest(root) == root / "checkpoint-5"
    # a plain model folder without checkpoints under it is still a weights-only warm start
    (root / "checkpoint-4").rename(tmp_path / "away4")
    (root / "checkpoint-5").rename(tmp_path / "away5")
    warm = {"model": _model(9)}
    assert btckpt.load(root, warm) == 0
    assert torch.equal(warm["model"][0].weight, _model(5)[0].weight)


def _damaged_tree(own: Path) -> None:
    """checkpoint-2 good, checkpoint-4 with one flipped byte, checkpoint-6 with a FIFO for a listed file."""
    for step in (2, 4, 6):
        btckpt.save(own / f"checkpoint-{step}", _train_state(step), extra_files=TS)
    _flip_byte(own / "checkpoint-4" / "model.safetensors")
    victim = own / "checkpoint-6" / "trainer_state.json"
    victim.unlink()
    os.mkfifo(victim)


def test_damaged_newest_is_skipped_by_every_entry_point(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "own"
    _damaged_tree(own)
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(own))
    monkeypatch.delenv("BT_LOAD_CHECKPOINT_DIR", raising=False)
    bad = str(own / "checkpoint-4")
    good = own / "checkpoint-2"

    def warned() -> None:
        msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(bad in m and "model.safetensors" in m for m in msgs), msgs
        assert any(str(own / "checkpoint-6") in m and "trainer_state.json" in m for m in msgs), msgs
        caplog.clear()

    caplog.set_level(logging.WARNING, logger="btckpt")
    state = _train_state(seed=7)
    with _ck(own) as ck:
        assert ck.latest() == good  # what restore() will load
        assert any(bad in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert ck.restore(state) == 2
    assert torch.equal(state["model"][0].weight, _train_state(2)["model"][0].weight)
    warned()
    assert btckpt.load(own, _train_state(seed=7)) == 2
    warned()
    assert btckpt.latest(own) == good
    warned()
    assert resume_checkpoint() == str(good)
    warned()
    assert resume_path() == str(good)
    warned()
    io = SafetensorsCheckpointIO(async_save=False)  # fit(ckpt_path=<folder of checkpoints>) resolves alike
    got = io.load_checkpoint(own)
    io.teardown()
    assert torch.equal(got["state_dict"]["0.weight"], _train_state(2)["model"][0].weight)
    warned()
    capsys.readouterr()
    assert cli_main(["verify", str(own), "--json"]) == 1  # every checkpoint checked: the damaged ones fail
    out = json.loads(capsys.readouterr().out)
    assert out["resume"] == {"step": 2, "path": str(good)} and out["ok"] is False
    failed = {c["path"]: " ".join(c["problems"]) for c in out["checkpoints"] if c["status"] == "failed"}
    assert "model.safetensors" in failed[bad] and "trainer_state.json" in failed[str(own / "checkpoint-6")]
    assert cli_main(["verify", bad]) == 1  # named itself: its problem is reported, no fallback
    assert "model.safetensors: checksum mismatch" in capsys.readouterr().err


def test_load_dir_set_but_nothing_complete_raises_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    own, load = tmp_path / "own", tmp_path / "load"
    load.mkdir()
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(own))
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(load))

    def all_raise() -> None:
        with pytest.raises(btckpt.NoCheckpointFound, match="on_missing='start_fresh'"):
            resume_checkpoint()
        with pytest.raises(btckpt.NoCheckpointFound, match="on_missing='start_fresh'"):
            resume_path()
        with _ck(own, load_dir=load) as ck, pytest.raises(btckpt.NoCheckpointFound):
            ck.restore(_train_state())
        assert resume_checkpoint(on_missing="start_fresh") is None
        assert resume_path(on_missing="start_fresh") is None
        with _ck(own, load_dir=load, on_missing="start_fresh") as ck:
            assert ck.restore(_train_state()) is None

    all_raise()  # empty load dir
    nested = load / "job1" / "rank-0"
    btckpt.save(nested / "checkpoint-3", _train_state(), extra_files=TS)
    _flip_byte(nested / "checkpoint-3" / "optimizer.safetensors")
    (own / "checkpoint-9").mkdir(parents=True)  # never committed
    all_raise()  # only a damaged one (and an incomplete own one)
    (own / "checkpoint-9").rmdir()
    # once a good one is there, every entry point resumes from it (asserted by step)
    btckpt.save(nested / "checkpoint-1", _train_state(), extra_files=TS)
    assert resume_checkpoint() == str(nested / "checkpoint-1")
    assert resume_path() == str(nested / "checkpoint-1")
    with _ck(own, load_dir=load) as ck:
        assert ck.restore(_train_state()) == 1
