"""A user's Lightning script with the plugin added and nothing else (tests/test_lightning_platform.py).

``lightning_train.Tiny`` on 16 samples (4 steps an epoch, ``max_epochs=4``: under ``max_steps`` Lightning 2.6
resumes an epoch-end checkpoint one batch off, whatever the CheckpointIO), ``SafetensorsCheckpointIO`` as the
only btckpt piece, and Lightning's **own** checkpointing: ``--callback steps`` (``ModelCheckpoint(every_n_train_steps=
--every)``, ``--dirpath`` optional), or ``--callback none`` (the default ModelCheckpoint Lightning adds: one
checkpoint per epoch end, the default logger on). Prints ``START <global_step>`` when training starts and
``step <N>`` after each step; ``--hang-at N`` stops after step N (``HANG``) and waits to be killed.
``--ckpt-path resume`` passes ``btckpt.lightning.resume_path()``, ``last`` passes ``"last"``; ``--dump FILE``
writes the final parameters, optimizer moments and RNG (lightning_train.dump_state).
"""

from __future__ import annotations

import argparse
import sys
import time

import lightning as L
from btckpt.lightning import SafetensorsCheckpointIO, resume_path
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_train import Batches, Tiny, dump_state
from rank_output import say

HANG_AT = [-1]


class Run(Tiny):
    def on_train_start(self) -> None:
        say(f"START {self.global_step}")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)  # prints "step N"; runs after the callbacks' saves
        if self.global_step == HANG_AT[0]:
            say("HANG")
            time.sleep(600)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--callback", choices=["steps", "none"], default="steps")
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--dirpath", default=None)
    ap.add_argument("--save-last", action="store_true")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--hang-at", type=int, default=-1)
    ap.add_argument("--ckpt-path", choices=["none", "resume", "last"], default="none")
    ap.add_argument("--dump", default=None)
    a = ap.parse_args()
    HANG_AT[0] = a.hang_at

    L.seed_everything(0, verbose=False)
    model = Run()
    callbacks = []
    if a.callback == "steps":
        callbacks = [ModelCheckpoint(dirpath=a.dirpath, every_n_train_steps=a.every, save_last=a.save_last or None)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=a.epochs, plugins=[SafetensorsCheckpointIO()],
                        callbacks=callbacks, logger=a.callback == "none", enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    ckpt = {"none": None, "resume": resume_path(), "last": "last"}[a.ckpt_path]
    say(f"resume from {ckpt}")
    trainer.fit(model, train_dataloaders=Batches(n=16), ckpt_path=ckpt)
    if a.dump:
        dump_state(trainer, model, a.dump)
    say("done")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
