"""HF Trainer + FSDP2 (accelerate ``fsdp_version: 2``) with ``btckpt.hf.CheckpointCallback``: real torchrun,
2 ranks, gloo on CPU, a tiny Llama from a config. Each rank writes its own shards; SIGKILL of the whole job
and resume is bit-identical; 2 -> 1 reshard on resume; the consolidated folder loads with ``from_pretrained``.

accelerate enables FSDP only on GPU-type machines; tests/scripts/hf_fsdp_train.py's ``cpu_fsdp2`` makes it
take its real FSDP2 path (``fsdp2_prepare_model`` -> ``fully_shard``) on ``MULTI_CPU`` (see its doc)."""

from __future__ import annotations

import re
import shutil
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

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
SCRIPT = "hf_fsdp_train.py"


def run(tmp: Path, ckdir: str, *args: str, nproc: int = 2) -> str:
    env = env_with(BT_CHECKPOINT_DIR=str(tmp / ckdir))
    rc, out = finish(torchrun(SCRIPT, ["--out", str(tmp / f"out-{ckdir}"), *args], nproc=nproc, env=env),
                     timeout=240)
    assert rc == 0, out[-4000:]
    return out


def resumed(out: str, nproc: int) -> dict[str, str]:
    # ranks share torchrun's stdout pipe: match, don't split lines
    assert sorted(set(re.findall(r"rank (\d+): fsdp2 (\d+)", out))) == [(str(r), str(nproc)) for r in range(nproc)], \
        out[-3000:]  # the model really was sharded by accelerate's FSDP2 path, over nproc ranks
    steps = dict(re.findall(r"rank (\d+): resumed from (\d+)", out))
    assert sorted(steps) == [str(r) for r in range(nproc)], out[-3000:]
    return steps


def test_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ref = run(tmp_path, "ref", "--max-steps", "10", "--dump", str(tmp_path / "ref.st"))
    assert set(resumed(ref, 2).values()) == {"0"}
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "run"))
    job = torchrun(SCRIPT, ["--out", str(tmp_path / "out-run"), "--max-steps", "10", "--pause-at", "6",
                            "--pause-after", "4", "--progress", str(tmp_path / "progress")], env=env)
    kill_when_paused(job, tmp_path / "progress")  # rank 0 holds at step 6 once checkpoint-4 is committed
    man = only_sharded_checkpoint(tmp_path / "run", 4)
    assert {"config.json", "trainer_state.json"} <= set(man["files"])
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer"}

    out = run(tmp_path, "run", "--max-steps", "10", "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, 2) == {"0": "4", "1": "4"}
    assert_same(tmp_path / "ref.st", tmp_path / "resumed.st")  # model + optimizer moments, bit for bit


def test_reshard_two_ranks_to_one_and_consolidated_folder_is_servable(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import tqdm
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no tqdm monitor thread (the leak check flags it)

    run(tmp_path, "a", "--max-steps", "4", "--consolidate", "--dump-save", f"4:{tmp_path / 'saved.st'}")
    saved = load_st(tmp_path / "saved.st")  # the full model + optimizer state at the save of step 4

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    out = run(tmp_path, "b", "--max-steps", "6", "--dump-start", str(tmp_path / "start.st"), nproc=1)
    assert resumed(out, 1) == {"0": "4"}
    assert_same(tmp_path / "saved.st", tmp_path / "start.st")  # what one rank loaded is what two ranks saved

    served = tmp_path / "a" / "consolidated" / "checkpoint-4"
    assert (served / "model.safetensors").is_file() and (served / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(served)
    weights = model.state_dict()
    expected = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert sorted(weights) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(weights[k], v), k


def test_load_best_model_at_end_loads_the_sharded_best_checkpoint(tmp_path: Path) -> None:
    """``load_best_model_at_end``: HF's FSDP loader expects its own files; the btckpt folder loads instead."""
    import torch

    out = run(tmp_path, "e", "--max-steps", "8", "--save-steps", "2", "--eval-steps", "2", "--lr", "0.05",
              "--consolidate", "--dump", str(tmp_path / "final.st"))
    assert resumed(out, 2) == {"0": "0", "1": "0"}
    best = set(re.findall(r"rank \d+: done 8 best (\S+)", out))
    assert best == {str(tmp_path / "e" / "checkpoint-2")}, out[-3000:]  # the loss rises after step 2 at this lr
    final = load_st(tmp_path / "final.st")
    want = load_st(tmp_path / "e" / "consolidated" / "checkpoint-2" / "model.safetensors")
    assert sorted(f"model.{k}" for k in want) == sorted(k for k in final if k.startswith("model."))
    for k, v in want.items():
        assert torch.equal(final[f"model.{k}"], v), k  # the model ends with the best checkpoint's weights


def test_deepspeed_fsdp1_and_peft_under_fsdp_are_refused_clearly() -> None:
    from types import SimpleNamespace

    from btckpt import ConfigError
    from btckpt.hf import CheckpointCallback

    with pytest.raises(ConfigError, match="DeepSpeed ZeRO stages 1-3"):  # ZeRO 1-3 are supported: test_hf_zero.py
        CheckpointCallback().attach(SimpleNamespace(is_deepspeed_enabled=True))  # type: ignore[arg-type]
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))  # FSDP1: tests/test_hf_fsdp1.py
    fsdp1 = SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=state))
    fsdp1.model = SimpleNamespace(peft_config={}, active_adapter="default")
    with pytest.raises(ConfigError, match="PEFT adapters under FSDP"):
        CheckpointCallback().attach(fsdp1)  # type: ignore[arg-type]
