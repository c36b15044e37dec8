"""Restore a DeepSpeed ZeRO checkpoint into FSDP2 (for tests/test_hf_zero.py): run under torchrun (gloo, CPU).

The tiny Llama of hf_zero_train.py, built from its config, ``fully_shard`` on each decoder layer and the root,
a plain ``torch.optim.AdamW``; ``btckpt.load(--ckpt, {"model", "optimizer"})`` on every rank (DCP's planner
reads each rank's DTensor shards out of the ZeRO partitions' chunks). Then the full (gathered) weights and
optimizer state are written by rank 0 to ``--dump`` (safetensors, keys ``master.<fqn>`` and
``optim.<fqn>.exp_avg``/``exp_avg_sq``, as hf_zero_train.py's dumps), ``step`` in the metadata; each rank prints
``rank R: fsdp2 W <shard numel>/<full numel>`` (proof the parameters really are sharded).
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from dist_train import say
from hf_zero_train import llama_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--dump", required=True)
    a = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()

    import btckpt
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    torch.manual_seed(123)  # not the trained run's seed: every value must come from the checkpoint
    model = LlamaForCausalLM(llama_config())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = btckpt.load(a.ckpt, {"model": model, "optimizer": opt}, load_rng=False)
    w = model.model.embed_tokens.weight
    say(f"rank {rank}: fsdp2 {dist.get_world_size()} {w.to_local().numel()}/{w.numel()}")

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    if rank == 0:
        from safetensors.torch import save_file

        flat = {f"master.{k}": v.detach().clone().contiguous() for k, v in msd.items()}
        steps = set()
        for fqn, st in osd["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                flat[f"optim.{fqn}.{k}"] = st[k].detach().clone().contiguous()
            steps.add(float(st["step"]))
        save_file(flat, a.dump, metadata={"step": str(step), "optim_steps": json.dumps(sorted(steps))})
    dist.barrier()
    dist.destroy_process_group()
    exit_rank(0)  # inside main(): what holds the group is still alive (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
