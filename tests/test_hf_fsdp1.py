"""HF Trainer + FSDP1 (``fsdp="full_shard"``, ``fsdp_config={"version": 1, ...}``) with
``btckpt.hf.CheckpointCallback``: real torchrun, 2 ranks, gloo on CPU, a tiny Llama from a config
(tests/scripts/hf_fsdp_train.py ``--fsdp-version 1``; its doc says how accelerate is made to take its FSDP1
path on CPU). Each rank writes its own shards of the sharded state dict (no pickle); SIGKILL of the whole job
and resume from the own dir and from a nested load dir equal an uninterrupted run (step, loss curve, weights
and optimizer moments bit for bit); the checkpoint reshards into one rank and into FSDP2; the consolidated
folder loads with ``from_pretrained``."""

from __future__ import annotations

import json
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


def run(tmp: Path, ckdir: str, *args: str, nproc: int = 2, version: int = 1, **env: str) -> str:
    e = env_with(BT_CHECKPOINT_DIR=str(tmp / ckdir), **env)
    rc, out = finish(torchrun(SCRIPT, ["--out", str(tmp / f"out-{ckdir}"), "--fsdp-version", str(version), *args],
                              nproc=nproc, env=e), timeout=300)
    assert rc == 0, out[-4000:]
    return out


def resumed(out: str, nproc: int, version: int = 1) -> dict[str, str]:
    # ranks share torchrun's stdout pipe: match, don't split lines
    assert sorted(set(re.findall(rf"rank (\d+): fsdp{version} (\d+)", out))) == [
        (str(r), str(nproc)) for r in range(nproc)], out[-3000:]  # really FSDP1 (FSDP2) over nproc ranks
    steps = dict(re.findall(r"rank (\d+): resumed from (\d+)", out))
    assert sorted(steps) == [str(r) for r in range(nproc)], out[-3000:]
    return steps


def meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def same_run(ref: Path, got: Path) -> None:
    """Step, learning rate, the logged loss curve, and every weight and optimizer moment bit for bit."""
    assert_same(ref, got)
    a, b = meta(ref), meta(got)
    assert len(json.loads(a["losses"])) == 10
    assert (a["step"], a["lr"], a["losses"]) == (b["step"], b["lr"], b["losses"])


def test_sigkill_then_resume_from_own_dir_and_nested_load_dir_equals_uninterrupted(tmp_path: Path) -> None:
    ref = run(tmp_path, "ref", "--max-steps", "10", "--dump", str(tmp_path / "ref.st"))
    assert set(resumed(ref, 2).values()) == {"0"}
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "run"))
    job = torchrun(SCRIPT, ["--out", str(tmp_path / "out-run"), "--fsdp-version", "1", "--max-steps", "10",
                            "--pause-at", "6", "--pause-after", "4", "--progress", str(tmp_path / "progress")], env=env)
    kill_when_paused(job, tmp_path / "progress")  # rank 0 holds at step 6 once checkpoint-4 is committed
    man = only_sharded_checkpoint(tmp_path / "run", 4)
    ck = tmp_path / "run" / "checkpoint-4"
    assert {"config.json", "trainer_state.json"} <= set(man["files"])
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer"}
    emb = man["state"]["model"]["model.embed_tokens.weight"]["__tensor__"]["sharded"]  # HF keys, FSDP1's stripped
    assert emb["shape"] == [64, 16] and [(c["offsets"], c["sizes"]) for c in emb["chunks"]] == [
        ([0, 0], [32, 16]), ([32, 0], [32, 16])]
    assert not [p.name for p in ck.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".distcp")]
    load = tmp_path / "loaded" / "job7" / "rank-0"  # the platform's nested layout, for the next job
    shutil.copytree(tmp_path / "run", load)

    out = run(tmp_path, "run", "--max-steps", "10", "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, 2) == {"0": "4", "1": "4"}
    same_run(tmp_path / "ref.st", tmp_path / "resumed.st")

    out = run(tmp_path, "fresh", "--max-steps", "10", "--dump", str(tmp_path / "from_load.st"),
              BT_LOAD_CHECKPOINT_DIR=str(tmp_path / "loaded"))
    assert resumed(out, 2) == {"0": "4", "1": "4"}
    same_run(tmp_path / "ref.st", tmp_path / "from_load.st")


def test_reshard_into_one_rank_and_fsdp2_and_consolidated_folder_is_servable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import tqdm
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no tqdm monitor thread (the leak check flags it)

    run(tmp_path, "a", "--max-steps", "4", "--consolidate", "--dump-save", f"4:{tmp_path / 'saved.st'}")
    saved = load_st(tmp_path / "saved.st")  # the full model + optimizer state at the save of step 4

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # FSDP1 on one rank (NO_SHARD)
    out = run(tmp_path, "b", "--max-steps", "6", "--dump-start", str(tmp_path / "start1.st"), nproc=1)
    assert resumed(out, 1) == {"0": "4"}
    assert_same(tmp_path / "saved.st", tmp_path / "start1.st")  # what one rank loaded is what two ranks saved

    shutil.copytree(tmp_path / "a", tmp_path / "c")  # FSDP2 on two ranks
    out = run(tmp_path, "c", "--max-steps", "6", "--dump-start", str(tmp_path / "start2.st"), version=2)
    assert resumed(out, 2, version=2) == {"0": "4", "1": "4"}
    assert_same(tmp_path / "saved.st", tmp_path / "start2.st")

    served = tmp_path / "a" / "consolidated" / "checkpoint-4"
    assert (served / "model.safetensors").is_file() and (served / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(served)  # a plain model, one process
    weights = model.state_dict()
    expected = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert sorted(weights) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(weights[k], v), k


def test_hybrid_sharding_is_refused_clearly() -> None:
    from types import SimpleNamespace

    from btckpt import ConfigError
    from btckpt.hf import CheckpointCallback
    from torch.distributed.fsdp import ShardingStrategy

    plugin = SimpleNamespace(fsdp_version=1, sharding_strategy=ShardingStrategy.HYBRID_SHARD)
    tr = SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    with pytest.raises(ConfigError, match="HYBRID_SHARD.*fsdp='full_shard'"):
        CheckpointCallback().attach(tr)  # type: ignore[arg-type]
