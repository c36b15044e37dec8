"""Lightning + FSDP2 (``fully_shard`` in ``configure_model``) or tensor parallel, with
``btckpt.lightning.ModelParallelStrategy`` and ``SafetensorsCheckpointIO``: real torchrun, 2 ranks, gloo on CPU
(Lightning's ModelParallelStrategy runs on CPU as it is). Each rank writes its own shards; SIGKILL of the whole
job and resume is bit-identical; 2 -> 1 reshard on resume; the consolidated folder holds the full weights; a
tensor-parallel resume is bit-identical. Lightning's own ModelParallelStrategy / FSDPStrategy with the plugin
are refused (they save and load around it).

Internals used: btckpt.storage.discovery (discovery to judge the folders on disk (complete, verified), which no
public name reports).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from dist_launch import (
    assert_same,
    env_with,
    finish,
    kill_when_paused,
    load_st,
    only_sharded_checkpoint,
    torchrun,
)

pytest.importorskip("lightning")
pytestmark = pytest.mark.slow
SCRIPT = "lightning_fsdp_train.py"


def run(tmp: Path, ckdir: str, *args: str, nproc: int = 2, ok: bool = True) -> str:
    rc, out = finish(torchrun(SCRIPT, ["--dir", str(tmp / ckdir), *args], nproc=nproc, env=env_with()), timeout=240)
    if ok:
        assert rc == 0, out[-4000:]
    else:
        assert rc != 0, out[-4000:]
    return out


def resumed(out: str, nproc: int) -> set[str]:
    # ranks share torchrun's stdout pipe: match, don't split lines
    steps = dict(re.findall(r"rank (\d+): resumed at step (\d+)", out))
    assert sorted(steps) == [str(r) for r in range(nproc)], out[-3000:]
    return set(steps.values())


def test_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ref = run(tmp_path, "ref", "--steps", "10", "--dump", str(tmp_path / "ref.st"))
    assert resumed(ref, 2) == {"0"}
    job = torchrun(SCRIPT, ["--dir", str(tmp_path / "run"), "--steps", "10", "--pause-at", "6", "--pause-after", "4",
                            "--progress", str(tmp_path / "progress")], env=env_with())
    kill_when_paused(job, tmp_path / "progress")  # rank 0 holds at step 6 once checkpoint-4 is committed
    only_sharded_checkpoint(tmp_path / "run", 4)
    ck = tmp_path / "run" / "checkpoint-4"
    assert not any(p.suffix in (".pt", ".distcp") for p in ck.iterdir())  # not Lightning's DCP + pickle path
    out = run(tmp_path, "run", "--steps", "10", "--resume", "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, 2) == {"4"}
    assert_same(tmp_path / "ref.st", tmp_path / "resumed.st")


def test_resume_on_one_rank_reshards_and_consolidates(tmp_path: Path) -> None:
    from btckpt import ConfigError
    from btckpt.lightning import SafetensorsCheckpointIO

    run(tmp_path, "run", "--steps", "8", "--dump", str(tmp_path / "at8.st"))
    out = run(tmp_path, "run", "--steps", "10", "--resume", "--dump-start", str(tmp_path / "start.st"), nproc=1)
    assert resumed(out, 1) == {"8"}
    assert_same(tmp_path / "at8.st", tmp_path / "start.st")  # model + optimizer, resharded 2 -> 1, exact
    assert (tmp_path / "run" / "checkpoint-10").is_dir()  # and the one rank trained on and saved
    # a servable folder from the sharded checkpoint: the existing consolidation gathers the full weights
    import subprocess

    cons = tmp_path / "cons"
    r = subprocess.run([sys.executable, "-m", "btckpt.cli", "consolidate", str(tmp_path / "run" / "checkpoint-8"),
                        str(cons)], env=env_with(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    full, weights = load_st(tmp_path / "at8.st"), load_st(cons / "model.safetensors")
    assert sorted(weights) == sorted(k[len("model."):] for k in full if k.startswith("model."))
    assert all(weights[k].equal(full[f"model.{k}"]) for k in weights)
    # the plain plugin (one process, no sharded strategy) refuses a sharded folder instead of half-loading it
    with pytest.raises(ConfigError, match="ModelParallelStrategy"):
        SafetensorsCheckpointIO().load_checkpoint(tmp_path / "run" / "checkpoint-8")


def test_lightning_own_sharded_strategies_are_refused(tmp_path: Path) -> None:
    out = run(tmp_path, "run", "--steps", "4", "--strategy", "lightning", ok=False)
    assert "ConfigError" in out and "btckpt.lightning.ModelParallelStrategy" in out, out[-3000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing saved around it

    from btckpt import ConfigError
    from btckpt.lightning import SafetensorsCheckpointIO, check_strategy
    from lightning.pytorch.strategies import FSDPStrategy

    fsdp1 = FSDPStrategy()
    fsdp1.checkpoint_io = SafetensorsCheckpointIO()
    with pytest.raises(ConfigError, match="FSDPStrategy .FSDP1."):
        check_strategy(fsdp1)


def test_tensor_parallel_resume_is_bit_identical(tmp_path: Path) -> None:
    import shutil

    ref = run(tmp_path, "ref", "--tp", "--steps", "10", "--dump", str(tmp_path / "ref.st"))
    assert resumed(ref, 2) == {"0"}
    man = json.loads((tmp_path / "ref" / "checkpoint-4" / "btckpt.json").read_text())
    assert {"model-rank00000.safetensors", "model-rank00001.safetensors"} <= set(man["files"])
    (tmp_path / "run").mkdir()  # a job that stopped after its step-4 commit: only that checkpoint to resume from
    shutil.copytree(tmp_path / "ref" / "checkpoint-4", tmp_path / "run" / "checkpoint-4")
    out = run(tmp_path, "run", "--tp", "--steps", "10", "--resume", "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, 2) == {"4"}
    assert_same(tmp_path / "ref.st", tmp_path / "resumed.st")


def test_one_ranks_dtensor_state_is_refused_not_saved(tmp_path: Path) -> None:
    """A strategy that hands the plugin a dict of DTensors on rank 0 only (e.g. a custom one) gets a clear
    error instead of a checkpoint holding rank 0's shards alone."""
    import torch
    import torch.distributed as dist
    from btckpt import ConfigError
    from btckpt.lightning import SafetensorsCheckpointIO
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        w = distribute_tensor(torch.ones(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)])
        io = SafetensorsCheckpointIO(async_save=False)
        with pytest.raises(ConfigError, match=r"'state_dict\.net\.weight' is a DTensor.*ModelParallelStrategy"):
            io.save_checkpoint({"state_dict": {"net.weight": w}, "global_step": 3}, tmp_path / "ck" / "last.ckpt")
        io.teardown()
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "ck" / "checkpoint-3").exists()


def test_hf_model_inside_gives_a_servable_folder_and_reshards(tmp_path: Path) -> None:
    """A LightningModule holding a transformers model under FSDP2: the sharded checkpoint is keyed like the HF
    model and carries config.json, so ``btckpt consolidate`` gives a ``from_pretrained`` folder; a resume on
    one rank loads it (the model and optimizer shards) exactly."""
    pytest.importorskip("transformers")
    import subprocess

    run(tmp_path, "run", "--hf", "--steps", "4", "--dump", str(tmp_path / "at4.st"))
    ck = tmp_path / "run" / "checkpoint-4"
    files = {p.name for p in ck.iterdir()}
    assert {"config.json", "model-rank00000.safetensors", "model-rank00001.safetensors"} <= files
    cons = tmp_path / "served"
    r = subprocess.run([sys.executable, "-m", "btckpt.cli", "consolidate", str(ck), str(cons)], env=env_with(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import tqdm
    from transformers import AutoModelForCausalLM

    tqdm.tqdm.monitor_interval = 0  # from_pretrained's progress bar would start tqdm's monitor thread (a "leak")
    full = load_st(tmp_path / "at4.st")
    served = AutoModelForCausalLM.from_pretrained(cons).state_dict()
    assert sorted(served) == sorted(k[len("model.model."):] for k in full if k.startswith("model.model."))
    assert all(v.equal(full[f"model.model.{k}"]) for k, v in served.items())
    out = run(tmp_path, "run", "--hf", "--steps", "6", "--resume", "--dump-start", str(tmp_path / "start.st"), nproc=1)
    assert resumed(out, 1) == {"4"}
    assert_same(tmp_path / "at4.st", tmp_path / "start.st")


def test_default_sizes_fsdp2_on_the_data_parallel_mesh_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """ModelParallelStrategy() with its defaults on one node (data_parallel 1, tensor_parallel 2) and the
    usual FSDP2 configure_model (fully_shard(mesh=device_mesh["data_parallel"])): every tensor is whole on
    both ranks. The first save used to fail ("the shards do not tile its shape"); now it commits one copy,
    and a resume from step 8 ends with the uninterrupted run's weights and optimizer state."""
    ref = run(tmp_path, "ref", "--default-sizes", "--steps", "10", "--dump", str(tmp_path / "ref.st"))
    assert resumed(ref, 2) == {"0"}
    from btckpt.storage.discovery import inspect

    run(tmp_path, "run", "--default-sizes", "--steps", "8")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert inspect(tmp_path / "run" / "checkpoint-8").complete
    out = run(tmp_path, "run", "--default-sizes", "--steps", "10", "--resume", "--dump", str(tmp_path / "res.st"))
    assert resumed(out, 2) == {"8"}
    assert_same(tmp_path / "ref.st", tmp_path / "res.st")
