"""The crash harness's torchrun save paths: 2 ranks (gloo on CPU), DDP (or FSDP1 with ``--fsdp1 1``: each rank
writes its own shards), an async Checkpointer on ``--dir``; run it under ``torchrun --nproc_per_node=2``.

Follows the contract in ``crash_train.py``'s docstring, from rank 0 only (ranks share torchrun's stdout):
``RESTORED <step|none>``, ``TRAINING``, and on a normal finish ``{"step", "digest"}`` in ``--out``: the model
and optimizer (replicated by DDP), the scheduler, the step, and the next draws of every rank's RNGs
(gathered), so a resumed job must match an uninterrupted one bit for bit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import time

import btckpt
import numpy as np
import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from crash_train import _plain, _tensors, script_args
from rank_output import say


def main() -> int:
    a = script_args(sleep=0.02, fsdp1=0)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 3))
    if a.fsdp1:  # FSDP1: each Linear and the root (device_id=cpu: FSDP1 needs it without an accelerator)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        ddp = FSDP(net, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), device_id=torch.device("cpu"),
                   use_orig_params=True)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    extra = {"step": 0, "losses": []}
    state = {"model": ddp, "optimizer": opt, "scheduler": sched, "extra": extra}
    torch.manual_seed(1000 + rank)  # per-rank data and dropout streams
    random.seed(rank)
    np.random.seed(rank)
    keep = None if os.environ.get("CRASH_KEEP_ALL") else 2
    with btckpt.Checkpointer(dir=a.dir, keep_last=keep, async_save=True, barrier_timeout=120,
                             handle_sigterm=False) as ckpt:
        start = ckpt.restore(state)
        if rank == 0:
            say(f"RESTORED {start if start is not None else 'none'}")
            say("TRAINING")
        for step in range((start or 0) + 1, a.steps + 1):
            x = torch.randn(8, 6) * (1 + random.random())
            y = torch.from_numpy(np.random.rand(8, 3).astype("float32"))
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            extra["step"] = step
            # plain state of a replicated group must be the same on every rank (rank 0 saves it): the mean loss
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            extra["losses"].append(float(mean) / dist.get_world_size())
            if step % a.every == 0 or step == a.steps:
                ckpt.save(step, state)
            if a.sleep:
                time.sleep(a.sleep)
    draws = [torch.rand(4).numpy().tobytes().hex(), repr(random.random()), np.random.rand(4).tobytes().hex(),
             extra["losses"]]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, draws)
    sds = [net.state_dict(), opt.state_dict(), sched.state_dict()]
    if a.fsdp1:  # the full (gathered) model and optimizer state, on every rank (a collective)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        sds[:2] = [get_model_state_dict(ddp, options=opts), get_optimizer_state_dict(ddp, opt, options=opts)]
    if rank == 0:
        h = hashlib.sha256()
        for sd in sds:
            h.update(json.dumps(_plain(sd), sort_keys=True).encode())
            for t in _tensors(sd):
                h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps([extra["step"], every]).encode())
        with open(a.out, "w") as f:
            json.dump({"step": extra["step"], "digest": h.hexdigest()}, f)
        say("DONE")
    dist.barrier()
    dist.destroy_process_group()
    exit_rank(0)  # inside main(): DDP's Reducer still holds the group (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
