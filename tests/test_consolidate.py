"""``consolidate``: an FSDP2-sharded checkpoint -> an HF model folder that from_pretrained loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dist_launch import env_with, finish, load_st, torchrun  # noqa: E402

pytestmark = pytest.mark.slow


def test_consolidate_fsdp_checkpoint_loads_with_from_pretrained(tmp_path: Path) -> None:
    import torch
    import tqdm
    from transformers import AutoModelForCausalLM

    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread (the leak check would flag it)

    from btckpt.consolidate import consolidate, main

    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"))
    rc, out = finish(torchrun("dist_hf.py", [str(tmp_path / "full.st")], nproc=2, env=env), timeout=240)
    assert rc == 0, out[-4000:]
    ck = tmp_path / "ck" / "checkpoint-1"
    assert (ck / "model-rank00001.safetensors").is_file() and not (ck / "model.safetensors").exists()
    dest = consolidate(tmp_path / "ck", tmp_path / "served", max_shard_size=20_000)
    assert (dest / "model.safetensors.index.json").is_file() and (dest / "config.json").is_file()
    assert not list(dest.glob("*rank*")) and not list(dest.glob("rng_state*"))
    model = AutoModelForCausalLM.from_pretrained(dest)
    want = load_st(tmp_path / "full.st")
    got = model.state_dict()
    assert set(want) == set(got)
    for k, v in want.items():
        assert torch.equal(v, got[k]), k
    assert main([str(ck), str(tmp_path / "served")]) == 1  # refuses to overwrite
    assert main([str(ck), str(tmp_path / "one")]) == 0 and (tmp_path / "one" / "model.safetensors").is_file()
