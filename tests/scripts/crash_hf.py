"""The crash harness's HF Trainer save path: a tiny GPT-2 (from a config) trained by ``Trainer`` with
``btckpt.hf.CheckpointCallback`` (async saves, ``save_total_limit`` -> keep_last), resumed on its own.
``--zero 3`` (under ``torchrun --nproc_per_node=2`` with ``DS_ACCELERATOR=cpu``): the same run under DeepSpeed
ZeRO (stage 1-3, gloo on CPU; every rank writes its own partition), the markers from rank 0 only, the digest
over the full fp32 master weights and Adam moments (gathered) and every rank's next RNG draws.

Follows the contract in ``crash_train.py``'s docstring: ``RESTORED <step|none>``, ``TRAINING``, and on a
normal finish ``{"step", "digest"}`` in ``--out`` (model, optimizer, scheduler, step and the next draws of
every RNG: an interrupted-and-resumed run must match an uninterrupted one bit for bit).

Internals used: btckpt.distributed.zero (ZeRO's optimizer and stage, to assert the run really is under DeepSpeed
ZeRO).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

import numpy as np
import torch
from _rank_exit import exit_rank
from crash_train import _plain, _tensors, script_args
from rank_output import say


def main() -> int:
    a = script_args(keep_last=2, zero=0)

    from btckpt.hf import CheckpointCallback, resume_checkpoint
    from hf_train import VOCAB, Synthetic, zero_config
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    class Announce(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if rank == 0:
                say("TRAINING")

    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_layer=2, n_embd=32, n_head=2,
                                       tie_word_embeddings=not a.zero))  # ZeRO: no tied (frozen-alias) params
    ds = None
    if a.zero:
        ds = zero_config(a.zero)
    keep = None if os.environ.get("CRASH_KEEP_ALL") else a.keep_last
    args = TrainingArguments(
        output_dir=a.dir.rstrip("/") + "-hf-output", per_device_train_batch_size=4, max_steps=a.steps,
        learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01, save_strategy="steps",
        save_steps=a.every, save_total_limit=keep, logging_steps=1, report_to="none", seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, deepspeed=ds)
    cb = CheckpointCallback(dir=a.dir, auto_resume=False, keep_last=keep)
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(24, 1), callbacks=[cb, Announce()])
    start = resume_checkpoint(dir=a.dir)
    if rank == 0:
        say(f"RESTORED {start.rsplit('-', 1)[1] if start else 'none'}")
    trainer.train(resume_from_checkpoint=start)
    if a.zero:
        return _zero_digest(trainer, a.out, rank)

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


def _zero_digest(trainer, out: str, rank: int) -> int:
    """The digest of a ZeRO run (collectives: every rank calls it): full fp32 master weights and moments,
    the scheduler, the step and every rank's next RNG draws; rank 0 writes it."""
    import torch.distributed as dist
    from btckpt.distributed.zero import zero_optimizer, zero_stage
    from hf_zero_train import full_state

    zo = zero_optimizer(trainer.optimizer)
    assert trainer.is_deepspeed_enabled and zo is not None and zero_stage(zo) > 0, type(trainer.optimizer)
    full = full_state(trainer)
    draws = [torch.rand(4).numpy().tobytes().hex(), repr(random.random()), np.random.rand(4).tobytes().hex()]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, draws)
    if rank == 0:
        h = hashlib.sha256()
        for k in sorted(full):
            h.update(k.encode() + full[k].reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps(_plain(trainer.lr_scheduler.state_dict()), sort_keys=True).encode())
        h.update(json.dumps([trainer.state.global_step, zero_stage(zo), every]).encode())
        with open(out, "w") as f:
            json.dump({"step": trainer.state.global_step, "digest": h.hexdigest()}, f)
        say("DONE")
    dist.barrier()
    exit_rank(0)  # inside main(): the DeepSpeed engine still holds the group (see _rank_exit)


if __name__ == "__main__":
    if "--zero" in sys.argv:  # a torchrun rank: leave without interpreter teardown (see _rank_exit)
        exit_rank(main())
    sys.exit(main())
