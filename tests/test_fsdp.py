"""FSDP2 (fully_shard, DTensor) under real torchrun with gloo on CPU: per-rank shard files, no gather,
kill -9 + resume bit-identical, resharding N -> M ranks through DCP's planner, rank death mid-write.

Internals used: btckpt.restore.dcp (DCP's optimizer-key mapping called directly on a malformed tree (no public path
gets it there)).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist_launch import (
    PY,
    SCRIPTS,
    assert_same,
    env_with,
    finish,
    kill_and_resume,
    kill_session,
    raw_ranks,
    run_job,
)

pytestmark = pytest.mark.slow
WIDTH = "18"  # uneven shards on 4 ranks (5, 5, 5, 3)


def test_fsdp_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    kill_and_resume(tmp_path, "fsdp")
    ck = tmp_path / "run" / "checkpoint-12"
    man = json.loads((ck / "btckpt.json").read_text())
    assert {"model-rank00000.safetensors", "model-rank00001.safetensors", "optimizer-rank00000.safetensors",
            "optimizer-rank00001.safetensors"} <= set(man["files"])
    assert "model.safetensors" not in man["files"]  # nobody gathered the full model
    ref = man["state"]["model"]["0.weight"]["__tensor__"]["sharded"]
    assert ref["shape"] == [16, 6] and [c["offsets"] for c in ref["chunks"]] == [[0, 0], [8, 0]]
    from safetensors import safe_open

    with safe_open(str(ck / "model-rank00001.safetensors"), "pt") as f:
        assert list(f.get_slice("0.weight").get_shape()) == [8, 6]  # only its own half
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer"}


def _save_then_restore(tmp: Path, n: int, m: int, *, m_mode: str = "fsdp") -> None:
    run_job(tmp, "a", "saved.st", "--steps", "4", "--every", "4", "--width", WIDTH, mode="fsdp", nproc=n)
    assert (tmp / "a" / "checkpoint-4" / f"model-rank{n - 1:05d}.safetensors").is_file()
    shutil.copytree(tmp / "a", tmp / "b")
    if m_mode == "plain":  # one process, no process group, a plain nn.Module
        env = env_with(BT_CHECKPOINT_DIR=str(tmp / "b"))
        import subprocess

        p = subprocess.run([PY, str(SCRIPTS / "dist_train.py"), "--mode", "plain", "--steps", "4", "--width", WIDTH,
                            "--expect-resume", "4", "--out", str(tmp / "restored.st")], env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    else:
        run_job(tmp, "b", "restored.st", "--steps", "4", "--expect-resume", "4", "--width", WIDTH, mode=m_mode,
                nproc=m)
    assert_same(tmp / "saved.st", tmp / "restored.st")


@pytest.mark.parametrize(("n", "m"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_reshard_fsdp(tmp_path: Path, n: int, m: int) -> None:
    _save_then_restore(tmp_path, n, m)


def test_reshard_fsdp_into_plain_single_process(tmp_path: Path) -> None:
    _save_then_restore(tmp_path, 2, 1, m_mode="plain")


def test_fsdp_rank_killed_during_write(tmp_path: Path) -> None:
    """Rank 1 dies while writing its shard file: rank 0 raises CoordinationError within the timeout."""
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"), BTCKPT_FAULT="write_data:kill@1")
    procs = raw_ranks("dist_train.py", ["--mode", "fsdp", "--save-once-at", "2", "--timeout", "8"], world=2, env=env)
    try:
        results = [finish(p, timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_session(p)
    assert results[1][0] == -9
    rc, out = results[0]
    assert rc != 0 and "CoordinationError" in out, out[-3000:]
    assert not (tmp_path / "ck" / "checkpoint-2").exists()


def test_ddp_checkpoint_restores_into_fsdp_model_and_optimizer(tmp_path: Path) -> None:
    """A DDP checkpoint (plain, replicated optimizer state numbered 0..n-1) restores into FSDP2's DTensor model
    *and* optimizer: equal full state, and training on from it matches DDP training on bit for bit."""
    run_job(tmp_path, "a", "saved.st", "--steps", "4", "--every", "4", "--width", WIDTH, mode="ddp", nproc=2)
    for d in ("b", "c", "d"):
        shutil.copytree(tmp_path / "a", tmp_path / d)
    run_job(tmp_path, "b", "restored.st", "--steps", "4", "--expect-resume", "4", "--width", WIDTH, mode="fsdp")
    assert_same(tmp_path / "saved.st", tmp_path / "restored.st")
    on = ["--steps", "8", "--every", "100", "--expect-resume", "4", "--width", WIDTH]
    run_job(tmp_path, "c", "fsdp8.st", *on, mode="fsdp")  # the optimizer's moments are DTensors now
    run_job(tmp_path, "d", "ddp8.st", *on, mode="ddp")
    assert_same(tmp_path / "ddp8.st", tmp_path / "fsdp8.st")


def test_plain_optimizer_into_sharded_needs_matching_param_groups(tmp_path: Path) -> None:
    from btckpt import StateMismatch
    from btckpt.restore.dcp import _plain_optimizer_as_fqn

    tree = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    with pytest.raises(StateMismatch, match="param groups do not match"):
        _plain_optimizer_as_fqn("optimizer", tree, {"param_groups": [{"params": ["w"]}]}, None, 0,  # type: ignore[arg-type]
                                tmp_path)
    ok = _plain_optimizer_as_fqn("optimizer", tree, {"param_groups": [{"params": ["w", "b"]}]}, None, 0,  # type: ignore[arg-type]
                                 tmp_path)
    assert ok == {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w", "b"]}]}
