"""A single-process loop with the node-local tier, for tests/test_tiers.py.

    tier_loop.py DIR TIER --steps 9 --weights-at 8 --weights W.pt --crash   # dies (os._exit(9)) after step 9
    tier_loop.py DIR TIER --steps 0 --ready-at 5                             # runs until SIGTERM
    tier_loop.py DIR TIER --steps 0 --ready-at 5 --slow promote:sleep20 --grace 2   # SIGTERM with a slow copy

Each step adds 1 to a Linear's weight (after ``fence()``: an in-place edit outside ``optimizer.step()``) and
calls ``maybe_save`` (tier every 2 steps, durable every ``--every``). ``--weights`` saves the weight at step
``--weights-at`` (torch.save); ``--ready-at`` prints READY (rank_output.say) at that step, after ``--slow``
(a btckpt.testing.faults ``phase:action``) is armed once every save so far committed. ``--every 0``
without a tier (``TIER`` ``-``): durable saves only. ``--grace``: ``preemption_grace``. ``--consolidate``:
``consolidate=``.
"""

from __future__ import annotations

import argparse
import os
import time

import btckpt
import torch
from btckpt.testing import faults
from rank_output import say


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("tier")
    ap.add_argument("--steps", type=int, default=9, help="0: until SIGTERM")
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--weights-at", type=int, default=-1)
    ap.add_argument("--weights", default="")
    ap.add_argument("--ready-at", type=int, default=-1)
    ap.add_argument("--crash", action="store_true", help="end with os._exit(9): no close(), the tier stays")
    ap.add_argument("--slow", default="", help="phase:action armed at --ready-at (e.g. write_data:sleep20)")
    ap.add_argument("--grace", type=float, default=120.0)
    ap.add_argument("--consolidate", default="", help="consolidate= (servable weights written in the background)")
    args = ap.parse_args()
    torch.manual_seed(0)
    m = torch.nn.Linear(64, 64)
    state = {"model": m, "extra": {"step": 0}}
    forever = args.steps == 0
    tier = args.tier != "-"
    every = args.every if (not forever or not tier) else None
    ck = btckpt.Checkpointer(dir=args.dir, local_every_steps=2 if tier else None,
                             local_tier_dir=args.tier if tier else None, keep_last=None, every_steps=every,
                             handle_sigterm=forever, preemption_grace=args.grace,
                             consolidate=args.consolidate or False)
    s = 0
    while forever or s < args.steps:
        s += 1
        ck.fence()
        with torch.no_grad():
            m.weight.add_(1.0)
        state["extra"]["step"] = s
        ck.maybe_save(s, state)
        if s == args.weights_at:
            torch.save(m.weight.detach().clone(), args.weights)
        if s == args.ready_at:
            if args.slow:
                ck.wait()
                phase, _, action = args.slow.partition(":")
                faults.arm(phase, action)
            say("READY")
        if forever:
            time.sleep(0.02)
    ck.wait()
    if args.crash:
        os._exit(9)
    ck.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
