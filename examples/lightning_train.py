"""Lightning + btckpt in a few lines: atomic, async, pickle-free checkpoints and resume (CPU, seconds).

    python examples/lightning_train.py            # run twice: the second run resumes where the first stopped
    BT_CHECKPOINT_DIR=/tmp/ck python examples/lightning_train.py
    torchrun --nproc_per_node=2 examples/lightning_train.py --ddp    # 2 CPU processes (gloo)

A run that finds no checkpoint is preempted at step 100: it sends itself SIGTERM (what a cluster does), so
btckpt's ModelCheckpoint saves last.ckpt and the process exits with status 0. The next run resumes there and
finishes at step 200. Under DDP only rank 0 writes, but btckpt's ModelCheckpoint puts every rank's RNG state
into the same checkpoint, and each rank restores its own on resume.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
import torch
from btckpt.lightning import ModelCheckpoint, SafetensorsCheckpointIO, resume_path


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class PreemptAt(L.Callback):
    """Stand-in for a cluster's preemption: SIGTERM to this process after optimizer step ``step`` (rank 0 only:
    under DDP the other rank learns it through btckpt's store agreement and stops at the same step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.is_global_zero:
            print(f"step {self.step}: sending SIGTERM to this process (as a preemption would)")
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    L.seed_everything(0)
    x = torch.randn(512, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)
    ddp = {"strategy": "ddp", "devices": 2} if "--ddp" in sys.argv else {}
    ckpt = resume_path()  # newest complete checkpoint in $BT_CHECKPOINT_DIR, else $BT_LOAD_CHECKPOINT_DIR, else None
    print(f"resuming from {ckpt}" if ckpt else "starting fresh (this run is preempted at step 100)")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=200, logger=False, enable_progress_bar=False,
        plugins=[SafetensorsCheckpointIO()],
        # btckpt's ModelCheckpoint: dirpath defaults to $BT_CHECKPOINT_DIR (else Lightning's own: with
        # logger=False, <default_root_dir>/checkpoints, here ./checkpoints, where resume_path() looks);
        # SIGTERM saves last.ckpt at the next batch end and stops cleanly.
        callbacks=[ModelCheckpoint(every_n_train_steps=50, save_top_k=2, monitor="step", mode="max",
                                   save_last=True), *([] if ckpt else [PreemptAt(100)])],
        **ddp,
    )
    trainer.fit(Regressor(), data, ckpt_path=ckpt)
    print(f"done at step {trainer.global_step}; checkpoints in {trainer.checkpoint_callback.dirpath}")


if __name__ == "__main__":
    main()
