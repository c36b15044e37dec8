"""DDP under real torchrun (gloo, CPU): kill -9 of the whole job + restart is bit-identical; a rank
killed mid-write makes the survivor raise CoordinationError within the timeout, and nothing commits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_launch import env_with, finish, kill_and_resume, kill_session, raw_ranks

pytestmark = pytest.mark.slow


def test_ddp_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    kill_and_resume(tmp_path, "ddp")
    man = json.loads((tmp_path / "run" / "checkpoint-12" / "btckpt.json").read_text())
    assert man["world"]["size"] == 2
    assert {"rng_state_0.json", "rng_state_1.json", "model.safetensors"} <= set(man["files"])
    assert "0.weight" in man["state"]["model"]  # unwrapped keys, no "module." prefix


def test_ddp_leader_killed_during_write(tmp_path: Path) -> None:
    """Rank 0 (the writer, host of the store) dies while writing: rank 1 raises, nothing commits."""
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"), BTCKPT_FAULT="write_data:kill@0")
    procs = raw_ranks("dist_train.py", ["--mode", "ddp", "--save-once-at", "3", "--timeout", "20"], world=2,
                      env=env)
    try:
        results = [finish(p, timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_session(p)
    assert results[0][0] == -9
    rc, out = results[1]
    assert rc != 0 and "CoordinationError" in out, out[-3000:]
    assert not (tmp_path / "ck" / "checkpoint-3").exists()
    # the dead leader's temp folder is never listed, and the next start removes it
    import btckpt

    assert btckpt.latest(tmp_path / "ck") is None
    btckpt.Checkpointer(dir=tmp_path / "ck", handle_sigterm=False).close()
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".checkpoint-")]


def test_ddp_follower_killed_during_write(tmp_path: Path) -> None:
    """Rank 1 dies in the write phase: rank 0 raises CoordinationError within barrier_timeout, no commit."""
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"), BTCKPT_FAULT="write_rng:kill@1")
    procs = raw_ranks("dist_train.py", ["--mode", "ddp", "--save-once-at", "3", "--timeout", "8"], world=2, env=env)
    try:
        results = [finish(p, timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_session(p)
    assert results[1][0] == -9
    rc, out = results[0]
    assert rc != 0 and "CoordinationError" in out and "reached" in out, out[-3000:]
    assert not (tmp_path / "ck" / "checkpoint-3").exists()
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".checkpoint-")]  # leader aborted
