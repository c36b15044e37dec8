"""Distributed runtime edges under torchrun (gloo, 2 ranks): per-operation agreement keys, per-rank plain
state, preemption agreement. Lines ``rank <r>: <WHAT> <value>`` go to stdout for the test to check.

Modes:
  ``agree``   save 2, restore (2), save 4, restore again (4 on every rank: each agreement has its own keys);
              each rank's plain group (and one only rank 1 has) comes back to that rank; then checkpoint-4
              is deleted and saved again with new per-rank values (the manifest lists this attempt's files).
  ``preempt`` train with ``maybe_save`` every step; the test sends SIGTERM to each rank at different times;
              every rank saves the same step and exits 0 (or, a peer being dead, gives up after the grace).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import time
from pathlib import Path

import btckpt
import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from dist_train import say


def agree(ckdir: Path, rank: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    data = {"shard": rank, "offset": 1000 * (rank + 1)}
    state: dict = {"model": model, "data": data}
    if rank == 1:
        state["only1"] = {"seen": [1, 2, 3]}
    ck = btckpt.Checkpointer(dir=str(ckdir), keep_last=None, barrier_timeout=30)
    ck.save(2, state)
    ck.wait()

    def fresh() -> dict:
        out: dict = {"model": model, "data": {}}
        if rank == 1:
            out["only1"] = {}
        return out

    got = fresh()
    say(f"rank {rank}: RESTORE1 {ck.restore(got)} {got['data']} {got.get('only1')}")
    ck.save(4, state)
    ck.wait()
    got = fresh()
    say(f"rank {rank}: RESTORE2 {ck.restore(got)} {got['data']}")
    dist.barrier()
    if rank == 0:  # roll back: delete checkpoint-4, then save step 4 again
        shutil.rmtree(ckdir / "checkpoint-4")
    dist.barrier()
    data["offset"] += 7
    torch.rand(5)  # every rank's RNG moves on: its rng_state file differs from the first attempt's
    ck.save(4, state)
    ck.wait()
    say(f"rank {rank}: SAVED4 {data}")
    if rank == 1:  # a tensor group only rank 1 has cannot be saved (tensor groups come from local rank 0)
        state["mine"] = {"t": torch.ones(3)}
    try:
        ck.save(6, state)
        ck.wait()
        say(f"rank {rank}: SAVED6")
    except btckpt.CheckpointError as exc:
        say(f"rank {rank}: REFUSED6 {type(exc).__name__}: {exc}")
    ck.close()


def preempt(ckdir: Path, rank: int, grace: float, ddp: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = btckpt.Checkpointer(dir=str(ckdir), keep_last=None, barrier_timeout=600, preemption_grace=grace)
    marker = Path(os.environ["PROGRESS"])
    step = 0
    while step < 100_000:
        step += 1
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        if step == 3:
            with open(marker, "a") as f:
                f.write(f"PID {rank} {os.getpid()}\n")
        try:
            ck.maybe_save(step, {"model": model, "optimizer": opt})
        except SystemExit:
            say(f"rank {rank}: STOPPED {step}")
            raise
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["agree", "preempt"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--grace", type=float, default=30.0)
    ap.add_argument("--no-ddp", action="store_true", help="preempt: ranks train independently (no collectives)")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    if args.mode == "agree":
        agree(Path(args.dir), rank)
    else:
        preempt(Path(args.dir), rank, args.grace, ddp=not args.no_ddp)
    dist.destroy_process_group()
    exit_rank(0)  # inside main(): what holds the group is still alive (see _rank_exit)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    exit_rank(code)
