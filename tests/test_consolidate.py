"""``consolidate``: an FSDP2-sharded checkpoint -> an HF model folder that from_pretrained loads.

Internals used: btckpt.consolidate, btckpt.distributed.world, btckpt.storage.discovery (the consolidation function
and its save-time ``Consolidator`` (``btckpt consolidate`` is a command, not an import), a ``World`` to build one,
discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_launch import env_with, finish, load_st, torchrun

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


def _same(a: dict, b: dict) -> None:
    import torch

    assert set(a) == set(b), (sorted(a), sorted(b))
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def test_save_time_consolidation_fsdp2_two_ranks(tmp_path: Path) -> None:
    """Checkpointer(consolidate=True) under torchrun: rank 0 writes <dir>/consolidated/checkpoint-<step>/ in the
    background; it equals the full model, from_pretrained loads it, the checkpoints themselves are untouched."""
    import json

    import tqdm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tqdm.tqdm.monitor_interval = 0
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"))
    rc, out = finish(torchrun("dist_consolidate.py", [str(tmp_path), "1"], nproc=2, env=env), timeout=240)
    assert rc == 0, out[-4000:]
    import re

    assert dict(re.findall(r"rank (\d): consolidator on this rank: (\w+)", out)) == {"0": "True", "1": "False"}
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
    man = json.loads((ck / "checkpoint-3" / "btckpt.json").read_text())
    assert set(man["files"]) == {"model-rank00000.safetensors", "model-rank00001.safetensors",
                                 "optimizer-rank00000.safetensors", "optimizer-rank00001.safetensors",
                                 "rng_state_0.json", "rng_state_1.json", "config.json"}
    cons = ck / "consolidated"
    assert [p.name for p in cons.iterdir()] == ["checkpoint-3"]  # keep_last=1 applies here too; no temp left
    dest = cons / "checkpoint-3"
    assert (dest / "model.safetensors").is_file() and (dest / "config.json").is_file()
    assert not list(dest.glob("*rank*")) and not list(dest.glob("rng_state*"))
    want = load_st(tmp_path / "full-3.st")
    _same(want, load_file(str(dest / "model.safetensors")))
    _same(want, AutoModelForCausalLM.from_pretrained(dest).state_dict())
    import btckpt

    assert btckpt.latest(ck) == ck / "checkpoint-3"  # the consolidated tree is not taken for a checkpoint


def test_save_time_consolidation_keeps_every_step_and_single_process(tmp_path: Path) -> None:
    import btckpt
    import torch
    from safetensors.torch import load_file

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with btckpt.Checkpointer(dir=str(tmp_path / "ck"), keep_last=2, consolidate=str(tmp_path / "serve")) as ck:
        for step in range(1, 5):
            with torch.no_grad():
                net[0].weight.add_(1.0)
            ck.save(step, {"model": net})
            ck.wait()
            ck._consolidator.close()  # type: ignore[union-attr]  # deterministic for the assertion below
            got = load_file(str(tmp_path / "serve" / f"checkpoint-{step}" / "model.safetensors"))
            _same({k: v.detach() for k, v in net.state_dict().items()}, got)
        ck.protect(tmp_path / "ck" / "checkpoint-4")
    assert sorted(p.name for p in (tmp_path / "serve").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_consolidator_done_stays_bounded_over_many_saves(tmp_path: Path) -> None:
    """``Consolidator.done`` lists only the consolidated folders retention still keeps: it does not grow
    with the number of saves."""
    import btckpt
    import torch

    net = torch.nn.Linear(3, 2)
    serve = tmp_path / "serve"
    with btckpt.Checkpointer(dir=str(tmp_path / "ck"), keep_last=2, consolidate=str(serve)) as ck:
        cons = ck._consolidator
        assert cons is not None
        for step in range(1, 13):
            ck.save(step, {"model": net})
            ck.wait()
            cons.close()  # this step's consolidation has finished
            on_disk = sorted((p for p in serve.iterdir() if p.name.startswith("checkpoint-")),
                             key=lambda p: int(p.name.split("-")[1]))
            assert cons.done == on_disk, step
            assert [p.name for p in cons.done] == [f"checkpoint-{s}" for s in range(max(1, step - 1), step + 1)]


def test_save_time_consolidation_errors(tmp_path: Path) -> None:
    import btckpt
    import torch
    from btckpt import CheckpointConfig, CheckpointError, ConfigError
    from btckpt.consolidate import Consolidator
    from btckpt.distributed.world import World

    for bad in ("", "s3://b/x", 3, str(tmp_path / "ck")):
        with pytest.raises(ConfigError, match="consolidate"):
            CheckpointConfig(dir=str(tmp_path / "ck"), consolidate=bad)  # type: ignore[arg-type]
    two = World(rank=0, size=2, local_rank=0, local_size=1, node_rank=0, nodes=2)
    cfg = CheckpointConfig(dir=str(tmp_path / "node0"), consolidate=True)
    with pytest.raises(ConfigError, match="rank-<node>"):
        Consolidator.create(cfg, two, tmp_path / "node0")
    cfg = CheckpointConfig(dir=str(tmp_path / "shared" / "rank-0"), consolidate=True)
    assert Consolidator.create(cfg, two, tmp_path / "shared" / "rank-0") is not None
    # no "model" group: the save commits, the consolidation error surfaces once, from the next call
    ck = btckpt.Checkpointer(dir=str(tmp_path / "nm"), consolidate=True)
    try:
        ck.save(1, {"weights": torch.nn.Linear(2, 2)})
        with pytest.raises(CheckpointError, match="no group 'model'"):
            ck.wait()  # raises here when the consolidation already failed, else below
            ck._consolidator.close()  # type: ignore[union-attr]
            ck.wait()
        ck.wait()  # raised once only
    finally:
        ck.close()
    assert (tmp_path / "nm" / "checkpoint-1" / "btckpt.json").is_file()


def test_one_shot_save_beside_a_checkpoint_of_the_same_step(tmp_path: Path) -> None:
    """consolidate(ck/checkpoint-3, ck/served): the output commits under its own name, never by way of
    <parent>/checkpoint-3 (which exists here)."""
    import btckpt
    import torch
    from btckpt.consolidate import consolidate

    d = tmp_path / "ck"
    btckpt.save(d / "checkpoint-3", {"model": torch.nn.Linear(2, 2)})
    dest = consolidate(d / "checkpoint-3", d / "served")
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint-3", "served"]
    assert btckpt.load(dest, {"model": torch.nn.Linear(2, 2)}) == 3


def test_a_damaged_consolidated_copy_is_written_again_not_kept(tmp_path: Path) -> None:
    """A consolidated folder whose sizes are right but whose bytes are damaged is not "done": when its step is
    consolidated again (a restart re-submits it), it is rewritten from the verified checkpoint (it used to be
    skipped because it was complete by sizes)."""
    import btckpt
    import torch
    from btckpt.consolidate import Consolidator
    from btckpt.storage.discovery import inspect, verify
    from safetensors.torch import load_file

    net = torch.nn.Linear(3, 2)
    serve = tmp_path / "serve"
    with btckpt.Checkpointer(dir=str(tmp_path / "ck"), keep_last=2, consolidate=str(serve)) as ck:
        ck.save(1, {"model": net})
    dest = serve / "checkpoint-1" / "model.safetensors"
    raw = bytearray(dest.read_bytes())
    raw[-1] ^= 0xFF
    dest.write_bytes(bytes(raw))
    assert verify(inspect(serve / "checkpoint-1")) != []
    cons = Consolidator(serve, keep_last=2)
    cons.submit(tmp_path / "ck" / "checkpoint-1")
    cons.close()
    assert cons.take_error() is None
    assert verify(inspect(serve / "checkpoint-1")) == []
    got = load_file(str(dest))
    assert torch.equal(got["weight"], net.weight.detach()) and torch.equal(got["bias"], net.bias.detach())
