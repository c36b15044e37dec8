"""A tiny plain-PyTorch training loop that checkpoints with btckpt and resumes by itself.

    python examples/train_torch.py --steps 200 --save-every 20

Saves to $BT_CHECKPOINT_DIR (default ./checkpoints); on start it resumes from the newest complete
checkpoint there, else from $BT_LOAD_CHECKPOINT_DIR (the platform's nested <job>/rank-<node>/ layout).
Kill it at any moment (SIGKILL or SIGTERM) and start it again: it continues exactly where it was.
"""

from __future__ import annotations

import argparse
import random
import time

import btckpt
import numpy as np
import torch


def batch(step: int, *, size: int = 32, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The data for ``step``: a pure function of the step, so the data position resumes with it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, dim, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin() + 0.1 * torch.randn(size, 1, generator=g)
    return x, y


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.GELU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    return model, opt, sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to make kills land mid-run)")
    ap.add_argument("--final", default=None, help="write the final state here (btckpt.save) for comparison")
    ap.add_argument("--sync", action="store_true", help="synchronous saves instead of async")
    args = ap.parse_args()

    model, opt, sched = build()
    state = {"model": model, "optimizer": opt, "scheduler": sched, "extra": {"losses": []}}
    with btckpt.Checkpointer(every_steps=args.save_every, async_save=not args.sync, on_missing="raise") as ckpt:
        start = ckpt.restore(state) or 0
        print(f"starting at step {start}", flush=True)
        for step in range(start + 1, args.steps + 1):
            x, y = batch(step)
            noise = torch.randn(()) * 1e-3 + random.random() * 1e-6 + float(np.random.rand()) * 1e-6
            loss = torch.nn.functional.mse_loss(model(x), y) + noise
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = loss.item()
            state["extra"]["losses"].append(round(loss_value, 6))
            if ckpt.maybe_save(step, state):
                print(f"saved step {step}", flush=True)
            print(f"step {step} loss {loss_value:.5f}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
        ckpt.wait()
    if args.final:
        btckpt.save(args.final, {"model": model, "optimizer": opt, "scheduler": sched, "extra": state["extra"]},
                    step=args.steps, save_rng=False)
    print("done", flush=True)


if __name__ == "__main__":
    main()
