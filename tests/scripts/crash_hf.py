"""The crash harness's HF Trainer save path: a tiny GPT-2 (from a config) trained by ``Trainer`` with
``btckpt.hf.CheckpointCallback`` (async saves, ``save_total_limit`` -> keep_last), resumed on its own.

Follows the contract in ``crash_train.py``'s docstring: ``RESTORED <step|none>``, ``TRAINING``, and on a
normal finish ``{"step", "digest"}`` in ``--out`` (model, optimizer, scheduler, step and the next draws of
every RNG: an interrupted-and-resumed run must match an uninterrupted one bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

import numpy as np
import torch
from crash_train import _plain, _tensors, script_args
from rank_output import say


def main() -> int:
    a = script_args(keep_last=2)

    from btckpt.hf import CheckpointCallback, resume_checkpoint
    from hf_train import VOCAB, Synthetic
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    class Announce(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            say("TRAINING")

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_layer=2, n_embd=32, n_head=2))
    keep = None if os.environ.get("CRASH_KEEP_ALL") else a.keep_last
    args = TrainingArguments(
        output_dir=a.dir.rstrip("/") + "-hf-output", per_device_train_batch_size=4, max_steps=a.steps,
        learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01, save_strategy="steps",
        save_steps=a.every, save_total_limit=keep, logging_steps=1, report_to="none", seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    cb = CheckpointCallback(dir=a.dir, auto_resume=False, keep_last=keep)
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(24, 1), callbacks=[cb, Announce()])
    start = resume_checkpoint(dir=a.dir)
    say(f"RESTORED {start.rsplit('-', 1)[1] if start else 'none'}")
    trainer.train(resume_from_checkpoint=start)

    h = hashlib.sha256()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for sd in (model.state_dict(), opt.state_dict(), trainer.lr_scheduler.state_dict()):
        h.update(json.dumps(_plain(sd), sort_keys=True).encode())
        for t in _tensors(sd):
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(str(trainer.state.global_step).encode())
    h.update(torch.rand(4).numpy().tobytes() + repr(random.random()).encode() + np.random.rand(4).tobytes())
    with open(a.out, "w") as f:
        json.dump({"step": trainer.state.global_step, "digest": h.hexdigest()}, f)
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
