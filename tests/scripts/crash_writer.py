"""A writer process for tests/test_concurrent.py: takes the checkpoint dir, saves, then holds it.

Prints ``LOCKED`` once its Checkpointer started, ``SAVED <step>`` after each committed save, and waits
for a line on stdin (or EOF) before closing. A refused start prints ``REFUSED <message>`` and exits 3.
"""

from __future__ import annotations

import argparse
import sys

import btckpt
import torch
from rank_output import say


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hold", action="store_true", help="wait for stdin before closing")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    state = {"model": torch.nn.Linear(64, 64), "extra": {"writer": args.seed}}
    try:
        ck = btckpt.Checkpointer(dir=args.dir, async_save=True, keep_last=None)
    except btckpt.CheckpointError as exc:
        say(f"REFUSED {exc}")
        return 3
    with ck:
        say("LOCKED")
        for step in range(args.first, args.first + args.saves):
            ck.save(step, state)
            ck.wait()
            say(f"SAVED {step}")
        if args.hold:
            sys.stdin.readline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
