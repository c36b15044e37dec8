"""``btckpt.load(<one named checkpoint>, {"model": fsdp2_model})`` under torchrun: the sharded checkpoint that
dist_hf.py saved loads into a fresh FSDP2 model (reshard through DCP); rank 0 dumps the full weights."""

from __future__ import annotations

import sys

import btckpt
import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from rank_output import say


def main() -> int:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    src, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    from dist_hf import tiny_fsdp_llama

    _, model = tiny_fsdp_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # so the check below cannot pass by the seed alone
    step = btckpt.load(src, {"model": model}, load_rng=False)
    say(f"rank {dist.get_rank()}: loaded step {step}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, out)
    dist.barrier()
    dist.destroy_process_group()
    exit_rank(0)  # inside main(): what holds the group is still alive (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
