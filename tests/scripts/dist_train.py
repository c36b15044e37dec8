"""A tiny deterministic training job for the distributed tests (gloo on CPU).

Run under torchrun (or with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set). Modes: ``ddp``, ``fsdp`` (FSDP2
``fully_shard``), ``fsdp1`` (FSDP1 ``FullyShardedDataParallel``: each Linear and the root, FULL_SHARD,
``use_orig_params``; ``device_id=cpu``, which FSDP1 needs on a machine without an accelerator), ``plain``
(no wrapper; with world size 1 it runs without a process group). Resumes from
the newest complete checkpoint, trains to ``--steps``, saves every ``--every`` steps, and writes the final
full state (model + optimizer moments) to ``--out`` from rank 0 as safetensors.

Progress lines ``STEP <n>`` go to ``$PROGRESS`` (a file) so a test can SIGKILL the job mid-run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import btckpt
import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from rank_output import say


def build(mode: str, width: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(width, 3))
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net), net
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(net)
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        root = FSDP(net, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), device_id=torch.device("cpu"),
                    use_orig_params=True)
        return root, root
    return net, net


def full_state(mode: str, net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of model + optimizer as full (unsharded) tensors, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if mode in ("fsdp", "fsdp1"):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        msd = get_model_state_dict(net, options=opts)
        osd = get_optimizer_state_dict(net, opt, options=opts)
    else:
        msd = get_model_state_dict(net)
        osd = get_optimizer_state_dict(net, opt)
    return as_flat(msd, osd)


def as_flat(msd: dict, osd: dict) -> dict[str, torch.Tensor]:
    """Model and optimizer state dicts as one flat dict of contiguous tensor copies (``model.*``, ``optim.*``)."""
    out = {f"model.{k}": v.detach().clone().contiguous() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            out[f"optim.{fqn}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    return out


def train_step(ddp: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    """One step on this rank's next random batch (its RNG stream is restored with the checkpoint)."""
    x = torch.randn(8, 6)
    y = torch.randn(8, 3)
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def end_rank(mode: str, net: torch.nn.Module, opt: torch.optim.Optimizer, *, out: str, rank: int,
             distributed: bool, step: int) -> int:
    """Write the final full state to ``out`` (rank 0), leave the process group, say so."""
    tensors = full_state(mode, net, opt)
    if out and rank == 0:
        from safetensors.torch import save_file

        save_file(tensors, out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    say(f"rank {rank}: done at {step}")
    exit_rank(0)  # inside the caller's main(): DDP's Reducer still holds the group (see _rank_exit)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="ddp", choices=["ddp", "fsdp", "fsdp1", "plain"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--save-once-at", type=int, default=-1, help="save only at this step, wait, exit")
    ap.add_argument("--expect-resume", type=int, default=-2, help="fail unless restore returns this (-1: None)")
    args = ap.parse_args()

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.mode != "plain"
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank() if distributed else 0
    ddp, net = build(args.mode, args.width)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    extra = {"step": 0}
    state = {"model": ddp, "optimizer": opt, "scheduler": sched, "extra": extra}
    torch.manual_seed(1000 + rank)  # per-rank data and dropout streams

    ckpt = btckpt.Checkpointer(keep_last=2, async_save=not args.sync, barrier_timeout=args.timeout,
                               on_missing="start_fresh")
    start = ckpt.restore(state)
    say(f"rank {rank}: resumed from {start}")
    if args.expect_resume != -2 and (start if start is not None else -1) != args.expect_resume:
        say(f"rank {rank}: expected resume {args.expect_resume}, got {start}")
        ckpt.close()
        return 3
    step = start or 0
    assert extra["step"] == step, (extra, step)
    progress = os.environ.get("PROGRESS")
    while step < args.steps:
        step += 1
        train_step(ddp, opt, sched)
        extra["step"] = step
        if args.save_once_at == step:
            ckpt.save(step, state)
            ckpt.wait()
            ckpt.close()
            say(f"rank {rank}: saved once at {step}")
            return 0
        if args.save_once_at < 0 and step % args.every == 0:
            ckpt.save(step, state)
        if progress and rank == 0:
            with open(progress, "a") as f:
                f.write(f"STEP {step}\n")
        if args.sleep:
            time.sleep(args.sleep)
    ckpt.close()
    return end_rank(args.mode, net, opt, out=args.out, rank=rank, distributed=distributed, step=step)


if __name__ == "__main__":
    exit_rank(main())
