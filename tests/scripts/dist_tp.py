"""Tensor parallel (and 2-D FSDP x TP) under torchrun with gloo on CPU: save, then restore in another layout.

Layouts (``--mode``): ``tp`` (1-D mesh over every rank: ColwiseParallel on the first Linear, RowwiseParallel on
the second, so weights are Shard(0) / Shard(1) and the second bias is Replicate), ``fsdp`` (FSDP2), ``2d``
(mesh dp x tp = world/2 x 2: TP inside, FSDP2 across), ``plain`` (one process, no process group).

``--train N``: train N steps, save checkpoint N, write the full state (model + AdamW state) to ``--out``.
Without it: restore the newest checkpoint and write the restored full state to ``--out``.
"""

from __future__ import annotations

import argparse
import os

import btckpt
import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from rank_output import say

WIDTH = 10


def build(mode: str, world: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 4))
    if mode in ("plain",):
        return net
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    if mode == "tp":
        parallelize_module(net, init_device_mesh("cpu", (world,)), plan)
    elif mode == "fsdp":
        fully_shard(net)
    elif mode == "2d":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(net, mesh["tp"], plan)
        fully_shard(net, mesh=mesh["dp"])
    return net


def full_state(net: torch.nn.Module, opt: torch.optim.Optimizer, distributed: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=distributed)
    msd = get_model_state_dict(net, options=opts)
    osd = get_optimizer_state_dict(net, opt, options=opts)
    from dist_train import as_flat

    return as_flat(msd, osd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="tp", choices=["tp", "fsdp", "2d", "plain"])
    ap.add_argument("--train", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    distributed = args.mode != "plain"
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    net = build(args.mode, world)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    state = {"model": net, "optimizer": opt}
    with btckpt.Checkpointer(keep_last=None, on_missing="start_fresh") as ckpt:
        if args.train:
            gen = torch.Generator().manual_seed(5)
            for _ in range(args.train):
                x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 4, generator=gen)  # same batch everywhere
                torch.nn.functional.mse_loss(net(x), y).backward()
                opt.step()
                opt.zero_grad()
            ckpt.save(args.train, state)
        else:
            step = ckpt.restore(state)
            say(f"rank {rank}: restored {step}")
    tensors = full_state(net, opt, distributed)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(tensors, args.out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    say(f"rank {rank}: done")
    exit_rank(0)  # inside main(): what holds the group is still alive (see _rank_exit)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_rank(main())
