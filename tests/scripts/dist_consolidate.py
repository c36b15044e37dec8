"""Tiny Llama under FSDP2 (gloo, CPU) with save-time consolidation: ``Checkpointer(consolidate=True)``.

Saves at steps 1, 2 and 3 (keep_last=1) with a training step between; after each save, rank 0 dumps the
full model state dict to ``OUT/full-<step>.st`` for the test to compare with ``<dir>/consolidated/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import btckpt
import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from rank_output import say


def main() -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = Path(sys.argv[1])
    keep_last = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from dist_hf import tiny_fsdp_llama

    cfg, model = tiny_fsdp_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with btckpt.Checkpointer(keep_last=keep_last, consolidate=True) as ckpt:
        for step in (1, 2, 3):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            ckpt.save(step, state, extra_files={"config.json": cfg.to_json_string().encode()})
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            if rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in full.items()}, str(out / f"full-{step}.st"))
        say(f"rank {rank}: consolidator on this rank: {ckpt._consolidator is not None}")
    dist.barrier()
    dist.destroy_process_group()
    exit_rank(0)  # inside main(): what holds the group is still alive (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
