"""A tiny deterministic DDP (or FSDP2: ``--mode fsdp``) job (gloo, CPU) with the node-local tier, for
tests/test_tiers.py.

Saves into the local tier (``--tier``) every ``--local-every`` steps and promotes into ``$BT_CHECKPOINT_DIR``
every ``--every`` steps. With ``--kill-at N --kill-marker F``: rank ``--kill-rank`` waits for its saves so far
to commit at step N and SIGKILLs itself, once (the marker file remembers it across torchrun's restarts).
Prints ``rank <r>: resumed from <step>`` (rank_output.say) and writes the final model + optimizer tensors
to ``--out`` from rank 0 (safetensors).

Internals used: btckpt.restore.reader (its byte counters, printed so the test can tell what the restore hashed
first and what it read once, which no public name reports).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal

import btckpt
import torch
import torch.distributed as dist
from dist_train import build, end_rank, train_step
from rank_output import say


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--local-every", type=int, default=2, help="0: no local_every_steps (a tier-less session)")
    ap.add_argument("--tier", required=True,
                    help="the local tier folder; {node} becomes $BT_NODE_RANK; '': the default one")
    ap.add_argument("--out", default="")
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--kill-rank", type=int, default=1)
    ap.add_argument("--kill-marker", default="")
    ap.add_argument("--width", type=int, default=16, help="hidden width (500000: files of tens of MB)")
    ap.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"], help="fsdp: FSDP2, every rank saves its shards")
    args = ap.parse_args()

    # torchrun's agent keeps its store across restarts, and gloo's connect keys from the killed attempt would
    # still be there: each attempt gets a prefix of its own
    rank, world, timeout = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), datetime.timedelta(seconds=60)
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, hosts, timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)
    ddp, net = build(args.mode, args.width)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    extra = {"step": 0}
    state = {"model": ddp, "optimizer": opt, "scheduler": sched, "extra": extra}
    torch.manual_seed(1000 + rank)  # per-rank data and dropout streams (restored from the checkpoint's RNG)

    # handle_sigterm=False: torchrun stops the surviving rank with SIGTERM, which should end it at once here
    tier = args.tier.format(node=os.environ.get("BT_NODE_RANK", "0"))
    # a run that kills a node (--kill-at): the survivor's save waits for the dead peer until the barrier timeout
    # (then fails, as it should); 20 s instead of 60 keeps that wait short and is still ample for a live peer
    wait = 20 if args.kill_at >= 0 else 60
    ckpt = btckpt.Checkpointer(keep_last=2, barrier_timeout=wait, every_steps=args.every, on_missing="start_fresh",
                               local_every_steps=args.local_every or None, local_tier_dir=tier or None,
                               handle_sigterm=False)
    first = ckpt.candidates()
    start = ckpt.restore(state)
    say(f"rank {rank}: resumed from {start}" + (f" in {first[0].path.parent}" if start is not None else ""))
    from btckpt.restore.reader import READS

    say(f"rank {rank}: restore hashed {READS['verify_bytes']} bytes first, vouched for {READS['vouched_bytes']}")
    step = start or 0
    assert extra["step"] == step, (extra, step)
    while step < args.steps:
        step += 1
        train_step(ddp, opt, sched)
        extra["step"] = step
        ckpt.maybe_save(step, state)
        if step == args.kill_at and rank == args.kill_rank and not os.path.exists(args.kill_marker):
            ckpt.wait()  # the local-tier save of this step (and what came before) committed
            open(args.kill_marker, "w").close()
            say(f"rank {rank}: killing itself at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    return end_rank(args.mode, net, opt, out=args.out, rank=rank, distributed=True, step=step)


if __name__ == "__main__":
    from _rank_exit import exit_rank

    exit_rank(main())
