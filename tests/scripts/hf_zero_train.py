"""A tiny HF Trainer run under DeepSpeed ZeRO (stage 1, 2 or 3) on CPU with gloo, for tests/test_hf_zero.py.

Run under torchrun with ``DS_ACCELERATOR=cpu``. A 2-layer Llama built from a config (attention dropout on: RNG
matters), a synthetic dataset, ``TrainingArguments(use_cpu=True, deepspeed=zero_config(S))`` (hf_train.py: AdamW,
no JIT-built op; ``use_cpu``: without it accelerate leaves each rank a world of one and DeepSpeed refuses the batch
sizes), ``btckpt.hf.CheckpointCallback`` saving every ``--save-steps``,
resume through ``trainer.train(resume_from_checkpoint=btckpt.hf.resume_checkpoint())``.

Lines printed: ``rank R: zero S W`` (after checking the engine really is ZeRO stage S over W ranks) and
``rank R: resumed from N``. ``--pause-at N``: rank 0 writes ``PAUSED`` to ``--progress`` once step N begins
*and* checkpoint ``--pause-after`` is committed, then waits to be SIGKILLed with the whole job. ``--dump``
writes the final full fp32 weights and optimizer moments (DeepSpeed's ``safe_get_full_*``, rank 0);
``--dump-save N:FILE`` the same right after the save of step N; ``--dump-start`` at ``on_train_begin``.

Internals used: btckpt.distributed.zero (ZeRO's optimizer and stage, to assert the run really is under DeepSpeed
ZeRO).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from dist_train import say
from hf_train import SEQ, VOCAB, Synthetic, zero_config


def full_state(trainer) -> dict[str, torch.Tensor]:
    """Full fp32 master weights, model weights and Adam moments, on every rank (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for n, p in trainer.model.named_parameters():
        out[f"master.{n}"] = safe_get_full_fp32_param(p).detach().clone().contiguous()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"optim.{n}.{k}"] = safe_get_full_optimizer_state(p, k).detach().clone().contiguous()
    return out


def dump(trainer, path: str) -> None:
    flat = full_state(trainer)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        eng = trainer.model_wrapped
        save_file(flat, path, metadata={"step": str(trainer.state.global_step), "engine": str(eng.global_steps),
                                        "lr": repr(trainer.lr_scheduler.get_last_lr())})


def llama_config():
    """The tiny Llama every ZeRO script builds (attention dropout on: RNG matters; untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                       attention_dropout=0.1, tie_word_embeddings=False)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="the Trainer's output_dir")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--consolidate", action="store_true")
    p.add_argument("--progress", default=None)
    p.add_argument("--pause-at", type=int, default=None)
    p.add_argument("--pause-after", type=int, default=None)
    p.add_argument("--dump", default=None)
    p.add_argument("--dump-start", default=None)
    p.add_argument("--dump-save", default=None)
    a = p.parse_args()

    import btckpt
    from btckpt.hf import CheckpointCallback, resume_checkpoint
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    ds = zero_config(a.stage)
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=2, max_steps=a.max_steps, learning_rate=1e-3,
        warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01, save_strategy="steps",
        save_steps=a.save_steps, logging_steps=1, report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, deepspeed=ds,
    )
    dump_save = a.dump_save.split(":", 1) if a.dump_save else None

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            from btckpt.distributed.zero import zero_optimizer, zero_stage

            tr = trainer
            zo = zero_optimizer(tr.optimizer)
            assert tr.is_deepspeed_enabled and zo is not None and zero_stage(zo) == a.stage, type(tr.optimizer)
            say(f"rank {args.process_index}: zero {a.stage} {dist.get_world_size()}")
            say(f"rank {args.process_index}: resumed from {state.global_step}")
            if a.dump_start:
                dump(tr, a.dump_start)

        def on_step_begin(self, args, state, control, **kw):
            if a.pause_at is not None and state.global_step == a.pause_at and args.process_index == 0:
                target = Path(os.environ["BT_CHECKPOINT_DIR"]) / f"checkpoint-{a.pause_after}"
                deadline = time.monotonic() + 60
                while btckpt.latest(target.parent) != target and time.monotonic() < deadline:
                    time.sleep(0.02)
                with open(a.progress, "a") as f:
                    f.write("PAUSED\n")
                time.sleep(3600)  # the test SIGKILLs the whole job now

        def on_save(self, args, state, control, **kw):
            if dump_save and state.global_step == int(dump_save[0]):
                dump(trainer, dump_save[1])

    opts = {"consolidate": True} if a.consolidate else {}
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(48, 1),
                      callbacks=[CheckpointCallback(**opts), Probe()])
    trainer.train(resume_from_checkpoint=resume_checkpoint())
    if a.dump:
        dump(trainer, a.dump)
    say(f"rank {args.process_index}: done {trainer.state.global_step}")
    exit_rank(0)  # inside main(): the DeepSpeed engine still holds the group (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
