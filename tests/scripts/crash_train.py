"""A small, real training run for the crash-consistency harness (tests/test_crash.py, benchmarks/crash_soak.py).

Contract every crash-harness training script follows (so other save paths can plug in):
  * it resumes on its own from the newest complete checkpoint in its checkpoint dir (here ``--dir``);
  * it prints ``RESTORED <step|none>`` after resuming and ``TRAINING`` when the first step starts (flushed);
  * on a normal finish it writes ``{"step": N, "digest": "..."}`` to ``--out``: a hash of the final model and
    optimizer tensors, the plain-data state and the next draws of every RNG, so an interrupted-and-resumed
    run can be compared bit for bit with an uninterrupted one.
Faults come from ``BTCKPT_FAULT=phase:kill`` (btckpt.testing.faults), random kills from the harness.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time

import btckpt
import numpy as np
import torch
from rank_output import say


def build(width: int) -> dict:
    # One intra-op thread: a chase of the soak's one unexplained mismatch found an *uninterrupted* reference
    # run whose weights differed from eight identical runs (MKL with 2 threads on a loaded box is not
    # always bitwise reproducible across processes); the harness compares runs bit for bit, so pin it.
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    return {"model": model, "optimizer": opt, "scheduler": sched, "extra": {"loss_sum": 0.0, "seen": []}}


def train_step(state: dict, width: int) -> float:
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    x = torch.randn(16, width) * (1 + random.random())  # torch + python RNGs
    y = torch.from_numpy(np.random.rand(16, 8).astype("float32"))  # numpy RNG
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def digest(state: dict, step: int) -> str:
    h = hashlib.sha256()
    for group in ("model", "optimizer", "scheduler"):
        sd = state[group].state_dict()
        h.update(json.dumps(_plain(sd), sort_keys=True).encode())
        for t in _tensors(sd):
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(state["extra"], sort_keys=True).encode())
    h.update(str(step).encode())
    h.update(torch.rand(4).numpy().tobytes())
    h.update(repr(random.random()).encode())
    h.update(np.random.rand(4).tobytes())
    return h.hexdigest()


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _tensors(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _plain(x):
    if isinstance(x, torch.Tensor):
        return f"tensor{list(x.shape)}{x.dtype}"
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def script_args(**extra: float | int) -> argparse.Namespace:
    """The integration crash scripts' command line: ``--dir --out --steps 30 --every 3`` plus ``extra``
    options (name=default, type from the default); pins one intra-op thread (bitwise-reproducible runs)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=3)
    for name, default in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args()
    torch.set_num_threads(1)
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("sync", "async", "oneshot"), default="sync")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--upload-to", default=None, help="Checkpointer(upload_to=URL): the upload save path")
    ap.add_argument("--tier", action="store_true", help="the tier save path: maybe_save into a local tier beside "
                    "--dir (<dir>-tier) every --every steps, promoted every 2 x --every (reference runs: every time)")
    args = ap.parse_args(argv)

    state = build(args.width)
    if args.mode == "oneshot":
        return oneshot(args, state)
    keep = None if os.environ.get("CRASH_KEEP_ALL") else args.keep_last  # reference runs keep every step
    tier = {}
    if args.tier:  # the reference run promotes every tier step, so each one can be compared with it
        tier = {"local_every_steps": args.every, "local_tier_dir": args.dir.rstrip("/") + "-tier",
                "every_steps": args.every if keep is None else 2 * args.every}
    with btckpt.Checkpointer(dir=args.dir, async_save=args.mode == "async", keep_last=keep,
                             space_margin=0, upload_to=args.upload_to, **tier) as ckpt:
        start = ckpt.restore(state)
        say(f"RESTORED {start if start is not None else 'none'}")
        start = start or 0
        say("TRAINING")
        for step in range(start + 1, args.steps + 1):
            loss = train_step(state, args.width)
            state["extra"]["loss_sum"] += loss
            state["extra"]["seen"].append(step)
            if args.tier:
                if ckpt.maybe_save(step, state) and keep is None and step % args.every == 0:
                    ckpt.wait()  # reference: every promotion commits (a queued one would be superseded by the next)
            elif step % args.every == 0 or step == args.steps:
                ckpt.save(step, state)
            if args.step_sleep:
                time.sleep(args.step_sleep)
        ckpt.wait()
    with open(args.out, "w") as f:
        json.dump({"step": args.steps, "digest": digest(state, args.steps)}, f)
    say("DONE")
    return 0


def oneshot(args: argparse.Namespace, state: dict) -> int:
    """The same run through the one-shot API: btckpt.latest + btckpt.load to resume, btckpt.save to save."""
    from pathlib import Path

    root = Path(args.dir)
    found = btckpt.latest(root) if root.is_dir() else None
    start = btckpt.load(found, state) if found is not None else None
    say(f"RESTORED {start if start is not None else 'none'}")
    say("TRAINING")
    for step in range((start or 0) + 1, args.steps + 1):
        loss = train_step(state, args.width)
        state["extra"]["loss_sum"] += loss
        state["extra"]["seen"].append(step)
        if step % args.every == 0 or step == args.steps:
            btckpt.save(root / f"checkpoint-{step}", state)
    with open(args.out, "w") as f:
        json.dump({"step": args.steps, "digest": digest(state, args.steps)}, f)
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
