"""Tiny deterministic Lightning run used by tests/test_lightning.py (CPU, seconds).

Prints ``step <N>`` after every optimizer step (flushed), so a parent can kill it at a chosen step.
--io safetensors|torch|async; --resume: fit(ckpt_path=resume_path()) (or --ckpt-path PATH / "last");
--dump FILE: write the final parameters and optimizer moments as safetensors ("{rank}" in FILE: every rank
writes its own, with its RNG). Under torchrun (--strategy ddp --devices 2) each rank trains on its own shard
with its own dropout RNG (seeded per rank in setup()), so a resume is exact only if every rank's RNG is restored.
--progress FILE: every rank appends "STEP <N>" to FILE.<rank> after each step (for kill tests).
--time-interval S with --fake-clock: ModelCheckpoint(train_time_interval=S seconds) against a clock that
advances exactly 1 s per training step (deterministic saves).
--local-every K --tier DIR: the plugin also saves into the local tier DIR every K steps (resume_path searches it);
--kill-at N: at step N's batch end, after every save so far committed, the process SIGKILLs itself.
--lightning-mc: Lightning's own ModelCheckpoint (its defaults: save_top_k=1, no last.ckpt) instead of btckpt's.
--slow-commit S: the writer sleeps S seconds before each commit's manifest (widens the async window);
--kill-after-remove N: SIGKILL right after Lightning's remove_checkpoint returned at step N (inside that window).
--weights-every K: a second (weights-only) ModelCheckpoint, every K steps, keeping all, called before the first.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import timedelta

import lightning as L
import torch
from _rank_exit import exit_rank
from btckpt.lightning import ModelCheckpoint, SafetensorsCheckpointIO, resume_path
from rank_output import say
from safetensors.torch import save_file


class Batches:
    """A resumable, deterministic loader: epoch-seeded shuffle, mid-epoch position in state_dict()."""

    def __init__(self, n: int = 64, bs: int = 4, seed: int = 7, rank: int = 0, world: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(1, keepdim=True) * 0.5 + torch.randn(n, 1, generator=g) * 0.1
        self.x, self.y = self.x[rank::world], self.y[rank::world]  # this rank's shard
        self.bs, self.seed, self.epoch, self.sampler = bs, seed, 0, self
        self._skip = 0
        self._yielded = 0  # batches handed out in this epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x) // self.bs

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        start, self._skip = self._skip, 0
        for i in range(start, len(self)):
            self._yielded = i + 1
            idx = perm[i * self.bs:(i + 1) * self.bs]
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        # Lightning saves at a batch end, before fetching the next batch: resume after the last one handed out
        return {"epoch": self.epoch, "next": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["next"]


CLOCK = [0.0]  # the fake clock's time (--fake-clock): one second per training step


class FakeTime:
    """Stands in for the ``time`` module inside Lightning's model_checkpoint (monotonic() only)."""

    @staticmethod
    def monotonic() -> float:
        return CLOCK[0]


class StartStep(L.Callback):
    """Prints the step a fit starts from, so resume tests assert it (not only the final weights)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        say(f"START {trainer.global_step}")


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.01, sleep: float = 0.0, progress: str = "", kill_at: int = -1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def setup(self, stage: str) -> None:
        # after Lightning's DDP reset_seed() and before a checkpoint's RNG restore: each rank its own RNG
        if self.trainer.world_size > 1:
            torch.manual_seed(1000 + self.global_rank)

    def training_step(self, batch, batch_idx):
        CLOCK[0] += 1.0
        x, y = batch
        self.seen += len(x)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        say(f"step {self.global_step}")
        if self.hparams.progress:
            with open(f"{self.hparams.progress}.{self.global_rank}", "a") as f:
                f.write(f"STEP {self.global_step}\n")
        if self.hparams.sleep:
            time.sleep(self.hparams.sleep)
        if self.global_step == self.hparams.kill_at:  # after the callbacks' saves of this step (they run first)
            self.trainer.strategy.checkpoint_io.wait()
            say(f"killing itself at step {self.global_step}")
            os.kill(os.getpid(), signal.SIGKILL)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def dump_state(trainer: L.Trainer, model: L.LightningModule, path: str) -> None:
    """Write the final parameters, optimizer moments, RNG, step and learning rate to ``path`` (safetensors)."""
    out = {f"param.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt = trainer.optimizers[0]
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state[p].items():
            out[f"opt.{i}.{k}"] = v.detach().clone().contiguous().reshape(v.shape)
    out["rng"] = torch.get_rng_state()
    save_file(out, path, metadata={"global_step": str(trainer.global_step), "lr": str(opt.param_groups[0]["lr"])})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--monitor", default="step")
    ap.add_argument("--no-last", action="store_true")
    ap.add_argument("--io", default="safetensors", choices=["safetensors", "torch", "async"])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt-path", default=None)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--filename", default=None)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--progress", default="")
    ap.add_argument("--restore-rng-ranks", default="all", help="comma list of ranks that restore their RNG")
    ap.add_argument("--time-interval", type=float, default=None)
    ap.add_argument("--fake-clock", action="store_true")
    ap.add_argument("--local-every", type=int, default=None)
    ap.add_argument("--tier", default=None)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--lightning-mc", action="store_true")
    ap.add_argument("--slow-commit", type=float, default=0.0)
    ap.add_argument("--kill-after-remove", type=int, default=-1)
    ap.add_argument("--weights-every", type=int, default=0)
    a = ap.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if a.fake_clock:
        import lightning.pytorch.callbacks.model_checkpoint as mc

        mc.time = FakeTime  # type: ignore[assignment]

    L.seed_everything(0, verbose=False)
    model = Tiny(sleep=a.sleep, progress=a.progress, kill_at=a.kill_at)
    plugins = []
    if a.io == "safetensors":
        restore = a.restore_rng_ranks == "all" or str(rank) in a.restore_rng_ranks.split(",")
        plugins = [SafetensorsCheckpointIO(restore_rng=restore, local_every_steps=a.local_every, local_tier_dir=a.tier)]
    elif a.io == "async":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        plugins = [AsyncCheckpointIO()]
    if a.slow_commit:
        from slow_commit import install

        install(a.slow_commit)
    if a.kill_after_remove >= 0:
        remove = SafetensorsCheckpointIO.remove_checkpoint

        def remove_then_die(io: SafetensorsCheckpointIO, path: object) -> None:
            remove(io, path)
            if trainer.global_step == a.kill_after_remove:
                say(f"killed after remove_checkpoint({os.path.basename(str(path))}) at step {trainer.global_step}")
                os.kill(os.getpid(), signal.SIGKILL)

        SafetensorsCheckpointIO.remove_checkpoint = remove_then_die  # type: ignore[method-assign]
    interval = None if a.time_interval is None else timedelta(seconds=a.time_interval)
    if a.lightning_mc:
        from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

        cb = LightningModelCheckpoint(dirpath=a.dir, every_n_train_steps=a.every)
    else:
        cb = ModelCheckpoint(dirpath=a.dir, filename=a.filename, every_n_train_steps=a.every or None,
                             train_time_interval=interval, save_top_k=a.top_k,
                             monitor=a.monitor or None, mode="max", save_last=not a.no_last)
    weights = [ModelCheckpoint(dirpath=a.dir, filename="weights-{step}", every_n_train_steps=a.weights_every,
                               save_weights_only=True, save_top_k=-1)] if a.weights_every else []
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=a.strategy, max_steps=a.steps,
                        plugins=plugins, callbacks=[*weights, cb, StartStep()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    ckpt = a.ckpt_path or (resume_path(dir=a.dir, local_tier_dir=a.tier) if a.resume else None)
    say(f"resume from {ckpt}")
    trainer.fit(model, train_dataloaders=Batches(rank=rank, world=world), ckpt_path=ckpt)
    dump = a.dump.format(rank=rank) if a.dump else None
    if dump and (trainer.is_global_zero or dump != a.dump):
        dump_state(trainer, model, dump)
    say("done")
    exit_rank(0)  # inside main(): the strategy's DDP model still holds the group (see _rank_exit)


if __name__ == "__main__":
    main()
    exit_rank(0)
