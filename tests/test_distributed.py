"""DDP under real torchrun (gloo, CPU): kill -9 of the whole job + restart is bit-identical; a rank
killed mid-write makes the survivor raise CoordinationError within the timeout, and nothing commits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dist_launch import assert_same, env_with, finish, kill_session, raw_ranks, torchrun, wait_for_line  # noqa: E402

pytestmark = pytest.mark.slow


def _run(tmp: Path, ckdir: str, out: str, *extra: str, mode: str = "ddp", nproc: int = 2) -> str:
    env = env_with(BT_CHECKPOINT_DIR=str(tmp / ckdir))
    rc, text = finish(torchrun("dist_train.py", ["--mode", mode, "--out", str(tmp / out), *extra], nproc=nproc,
                               env=env), timeout=180)
    assert rc == 0, text[-4000:]
    return text


def kill_and_resume(tmp: Path, mode: str, nproc: int = 2) -> None:
    _run(tmp, "ref", "ref.st", mode=mode, nproc=nproc)
    env = env_with(BT_CHECKPOINT_DIR=str(tmp / "run"), PROGRESS=str(tmp / "progress"))
    job = torchrun("dist_train.py", ["--mode", mode, "--sleep", "0.15"], nproc=nproc, env=env)
    try:
        wait_for_line(tmp / "progress", "STEP", count=8, timeout=150, proc=job)
    finally:
        kill_session(job)  # SIGKILL the agent and every rank at once
        job.communicate(timeout=60)
    assert not (tmp / "run" / "checkpoint-12").exists()
    text = _run(tmp, "run", "resumed.st", mode=mode, nproc=nproc)
    resumed = [ln for ln in text.splitlines() if "resumed from" in ln]
    assert len(resumed) == nproc and all("resumed from None" not in ln for ln in resumed), text[-3000:]
    assert_same(tmp / "ref.st", tmp / "resumed.st")
    assert not [p for p in (tmp / "run").iterdir() if p.name.startswith(".checkpoint-")]


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
