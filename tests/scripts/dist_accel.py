"""A plain Accelerate loop with btckpt (run with ``accelerate launch --cpu --num_processes 2``).

Resume recipe for the prepared dataloader's position (the documented way): build the Accelerator with
``DataLoaderConfiguration(use_seedable_sampler=True)`` and give the DataLoader its own ``generator``;
save ``epoch`` and
``batch`` (batches done in this epoch) in the state; on resume call ``dl.set_epoch(epoch)`` and iterate
``accelerator.skip_first_batches(dl, batch)`` for the partial epoch, then the full ``dl`` afterwards.
"""

from __future__ import annotations

import argparse

import btckpt
import torch
from _rank_exit import exit_rank
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stop-at", type=int, default=-1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    # use_seedable_sampler: the shuffle order is a function of (seed, epoch), so set_epoch() on resume
    # reproduces it (the default sampler draws from a generator that no checkpoint holds).
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Dropout(0.3), torch.nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(40, 5, generator=g), torch.randn(40, 2, generator=g))
    # A generator of its own: creating an iterator (also skip_first_batches') then draws no number from
    # the global torch RNG, which btckpt restores to its state at the save() call.
    dl = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    model, opt, dl = acc.prepare(model, opt, dl)
    torch.manual_seed(100 + acc.process_index)
    pos = {"step": 0, "epoch": 0, "batch": 0}
    state = {"model": model, "optimizer": opt, "position": pos}
    hooked = []
    opt.optimizer.register_step_pre_hook(lambda *a: hooked.append(1))
    with btckpt.Checkpointer(barrier_timeout=60, on_missing="start_fresh", keep_last=None) as ckpt:
        start = ckpt.restore(state)
        acc.print(f"resumed from {start} at {pos}")
        step = pos["step"]
        while step < args.steps:
            dl.set_epoch(pos["epoch"])
            batches = acc.skip_first_batches(dl, pos["batch"]) if pos["batch"] else dl
            for x, y in batches:
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                acc.backward(loss)
                opt.step()
                step += 1
                pos.update(step=step, batch=pos["batch"] + 1)
                if step == args.stop_at:
                    ckpt.save(step, state)
                    ckpt.wait()
                    acc.print(f"stopped at {step}")
                    return 0
                if step >= args.steps:
                    break
            else:
                pos.update(epoch=pos["epoch"] + 1, batch=0)
                continue
            break
    assert hooked, "optimizer step hooks did not fire on the prepared optimizer"
    full = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        full[f"opt.{i}.momentum_buffer"] = st["momentum_buffer"].clone()
    gathered = [None] * acc.num_processes
    torch.distributed.all_gather_object(gathered, torch.get_rng_state().sum().item())
    full["rng_sums"] = torch.tensor(gathered, dtype=torch.float64)
    if acc.is_main_process and args.out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, args.out)
    acc.wait_for_everyone()
    acc.end_training()  # destroy_process_group() while the interpreter is fully alive, after ckpt.close()
    exit_rank(0)  # inside main(): DDP's Reducer still holds the group (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
