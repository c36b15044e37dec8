"""FSDP1 (``FullyShardedDataParallel``, flat parameters) under real torchrun with gloo on CPU, the core path
(tests/scripts/dist_train.py ``--mode fsdp1``): each rank saves its own row blocks of the sharded state dict as
safetensors with chunk records (FSDP2's format), kill -9 + resume is bit-identical, and the checkpoint
reshards through DCP's planner into FSDP1 on another world size, FSDP2, a plain process, and back; a rank
killed while writing its shard leaves nothing committed; chunks that do not tile are refused.

Internals used: btckpt.format.manifest (the manifest parsed to check the sharded tensor records).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dist_launch import PY, SCRIPTS, assert_same, env_with, finish, kill_and_resume, kill_session, raw_ranks, run_job

pytestmark = pytest.mark.slow
WIDTH = "18"  # 18 rows: FSDP1's torch.chunk rows on 4 ranks are 5, 5, 5, 3


def _no_pickle(folder: Path) -> None:
    bad = [p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".distcp")]
    assert not bad, bad


def test_fsdp1_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    kill_and_resume(tmp_path, "fsdp1")
    ck = tmp_path / "run" / "checkpoint-12"
    man = json.loads((ck / "btckpt.json").read_text())
    assert {"model-rank00000.safetensors", "model-rank00001.safetensors", "optimizer-rank00000.safetensors",
            "optimizer-rank00001.safetensors"} <= set(man["files"])
    assert "model.safetensors" not in man["files"]  # nobody gathered the full model
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer"}
    ref = man["state"]["model"]["0.weight"]["__tensor__"]["sharded"]  # FQN keys: FSDP1's wrappers stripped
    assert ref["shape"] == [16, 6] and [c["offsets"] for c in ref["chunks"]] == [[0, 0], [8, 0]]
    moment = man["state"]["optimizer"]["state"]["0.weight"]["exp_avg"]["__tensor__"]["sharded"]
    assert [(c["offsets"], c["sizes"], c["file"]) for c in moment["chunks"]] == [
        ([0, 0], [8, 6], "optimizer-rank00000.safetensors"), ([8, 0], [8, 6], "optimizer-rank00001.safetensors")]
    from safetensors import safe_open

    with safe_open(str(ck / "model-rank00001.safetensors"), "pt") as f:
        assert list(f.get_slice("0.weight").get_shape()) == [8, 6]  # only its own half
    _no_pickle(ck)


def _save_then_restore(tmp: Path, n: int, m: int, *, saved_mode: str = "fsdp1", m_mode: str = "fsdp1") -> None:
    run_job(tmp, "a", "saved.st", "--steps", "4", "--every", "4", "--width", WIDTH, mode=saved_mode, nproc=n)
    if saved_mode != "ddp":
        assert (tmp / "a" / "checkpoint-4" / f"model-rank{n - 1:05d}.safetensors").is_file()
    shutil.copytree(tmp / "a", tmp / "b")
    if m_mode == "plain":  # one process, no process group, a plain nn.Module
        env = env_with(BT_CHECKPOINT_DIR=str(tmp / "b"))
        p = subprocess.run([PY, str(SCRIPTS / "dist_train.py"), "--mode", "plain", "--steps", "4", "--width", WIDTH,
                            "--expect-resume", "4", "--out", str(tmp / "restored.st")], env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    else:
        run_job(tmp, "b", "restored.st", "--steps", "4", "--expect-resume", "4", "--width", WIDTH, mode=m_mode,
                nproc=m)
    assert_same(tmp / "saved.st", tmp / "restored.st")  # what was loaded is what was saved, bit for bit


@pytest.mark.parametrize(("n", "m"), [(2, 1), (2, 4), (4, 2)])
def test_reshard_fsdp1(tmp_path: Path, n: int, m: int) -> None:
    """FSDP1 on n ranks -> FSDP1 on m (on one rank FSDP1 runs NO_SHARD: a full state dict)."""
    _save_then_restore(tmp_path, n, m)


def test_reshard_fsdp1_into_plain_single_process(tmp_path: Path) -> None:
    _save_then_restore(tmp_path, 2, 1, m_mode="plain")


@pytest.mark.parametrize(("saved", "target"), [("fsdp1", "fsdp"), ("fsdp", "fsdp1"), ("ddp", "fsdp1")])
def test_reshard_across_engines(tmp_path: Path, saved: str, target: str) -> None:
    """FSDP1 -> FSDP2 and back, and a DDP checkpoint (plain tensors) into FSDP1: 2 ranks each."""
    _save_then_restore(tmp_path, 2, 2, saved_mode=saved, m_mode=target)


def test_fsdp1_rank_killed_during_write_of_its_shard(tmp_path: Path) -> None:
    """Rank 1 dies while writing its shard file: rank 0 raises CoordinationError, nothing is committed."""
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"), BTCKPT_FAULT="write_data:kill@1")
    procs = raw_ranks("dist_train.py", ["--mode", "fsdp1", "--save-once-at", "2", "--timeout", "8"], world=2,
                      env=env)
    try:
        results = [finish(p, timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_session(p)
    assert results[1][0] == -9
    rc, out = results[0]
    assert rc != 0 and "CoordinationError" in out, out[-3000:]
    ck = tmp_path / "ck"
    assert not (ck / "checkpoint-2").exists()
    for tmp in ck.glob(".checkpoint-*"):  # the dead save's temp folder: never a checkpoint
        shutil.rmtree(tmp)


def test_fsdp1_chunks_that_do_not_tile_are_refused(tmp_path: Path) -> None:
    """A manifest whose FSDP1 row blocks leave a hole is refused on load (CorruptCheckpoint), not zero-filled."""
    import btckpt
    import torch

    run_job(tmp_path, "a", "saved.st", "--steps", "4", "--every", "4", "--width", WIDTH, mode="fsdp1", nproc=2)
    from btckpt.format.manifest import Manifest

    ck = tmp_path / "a" / "checkpoint-4"
    man = Manifest.from_json((ck / "btckpt.json").read_bytes(), where="x")
    ref = man.state["model"]["0.weight"]["__tensor__"]["sharded"]
    ref["chunks"] = ref["chunks"][:1]  # rank 1's rows gone; the manifest re-signed, as an attacker would
    (ck / "btckpt.json").write_bytes(man.to_json())
    net = torch.nn.Sequential(torch.nn.Linear(6, 18), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(18, 3))
    with pytest.raises(btckpt.CorruptCheckpoint, match="overlap or leave holes"):
        btckpt.load(ck, {"model": net})
