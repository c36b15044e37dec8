"""A tiny HF Trainer run under FSDP2 (accelerate ``fsdp_version: 2``) or FSDP1 (``--fsdp-version 1``:
``fsdp="full_shard"``, ``fsdp_config={"version": 1, ...}``) on CPU with gloo, for tests/test_hf_fsdp.py and
tests/test_hf_fsdp1.py.

Run under torchrun. A 2-layer Llama built from a config (attention dropout on: RNG matters), a synthetic
dataset, ``btckpt.hf.CheckpointCallback`` saving every ``--save-steps``, resume through
``trainer.train(resume_from_checkpoint=btckpt.hf.resume_checkpoint())``.

CPU harness (:func:`cpu_fsdp2`, test-only; btckpt itself does not depend on it): accelerate enables FSDP
only for accelerator (GPU-type) distributed types. ``AcceleratorState.__init__`` sets
``distributed_type = FSDP`` and ``fsdp_plugin`` inside its ``MULTI_GPU/MULTI_XPU/...`` branch
(accelerate/state.py, ~line 985-1013), and never for ``MULTI_CPU``; so on a CPU machine
``TrainingArguments(fsdp=..., use_cpu=True)`` silently trains with DDP. The harness wraps
``AcceleratorState.__init__`` and, when a ``fsdp_plugin`` was given and the state came out ``MULTI_CPU``,
does what that branch does: ``distributed_type = FSDP``, ``fsdp_plugin = plugin`` (and the shared
``PartialState`` distributed type). Nothing else is touched: ``Accelerator.prepare`` then runs its real
``fsdp2_prepare_model`` -> ``fully_shard`` over gloo, and the Trainer its real FSDP code paths
(``is_fsdp_enabled``, model loaded after wrapping, DTensor parameters and optimizer state). FSDP1 needs one
more thing on CPU: accelerate passes ``device_id=accelerator.device`` to ``FullyShardedDataParallel``, which on
``MULTI_CPU`` is ``cpu:<local rank>``, while FSDP1 computes on ``cpu`` and refuses the mismatch ("Inconsistent
compute device and `device_id`"): the harness sets the state's device to ``cpu``, as a GPU run's is
``cuda:<local rank>``.

Lines printed: ``rank R: resumed from S`` (S = the Trainer's global_step at ``on_train_begin``; 0 for a
fresh start) and ``rank R: fsdp2 W`` / ``rank R: fsdp1 W`` (W = world size, after checking the model really is
FSDP2- / FSDP1-sharded).
``--pause-at N``: rank 0 writes ``PAUSED`` to ``--progress`` once step N begins *and* checkpoint
``--pause-after`` is committed, then waits to be SIGKILLed with the whole job. ``--dump`` writes the final
full model + optimizer state (safetensors, rank 0; its metadata: step, learning rate, the logged loss curve);
``--dump-start`` the same at ``on_train_begin`` (the
state just loaded); ``--dump-save N:FILE`` the same right after the save of step N.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _rank_exit import exit_rank
from dist_train import as_flat, say
from hf_train import SEQ, VOCAB, Synthetic


def cpu_fsdp2() -> None:
    """Make accelerate take its FSDP branch on ``MULTI_CPU`` (see the module doc); test harness only."""
    from accelerate import state as acc_state
    from accelerate.utils import DistributedType

    original = acc_state.AcceleratorState.__init__

    def init(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
             *args, **kwargs):
        original(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # as accelerate's GPU branch does
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            acc_state.PartialState._shared_state["distributed_type"] = self.distributed_type
            if getattr(fsdp_plugin, "fsdp_version", 1) == 1:  # FSDP1 computes on "cpu", not "cpu:<rank>"
                self.device = torch.device("cpu")
                acc_state.PartialState._shared_state["device"] = self.device

    acc_state.AcceleratorState.__init__ = init


def full_state(trainer) -> dict[str, torch.Tensor]:
    """Full (unsharded) model + optimizer state, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return as_flat(get_model_state_dict(trainer.model, options=opts),
                   get_optimizer_state_dict(trainer.model, opt, options=opts))


def dump(trainer, path: str) -> None:
    flat = full_state(trainer)
    if dist.get_rank() == 0:
        import json

        from safetensors.torch import save_file

        losses = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]  # the loss curve
        save_file(flat, path, metadata={"step": str(trainer.state.global_step),
                                        "lr": repr(trainer.lr_scheduler.get_last_lr()), "losses": json.dumps(losses)})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="the Trainer's output_dir")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--consolidate", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps, load the best at the end")
    p.add_argument("--progress", default=None)
    p.add_argument("--pause-at", type=int, default=None)
    p.add_argument("--pause-after", type=int, default=None)
    p.add_argument("--dump", default=None)
    p.add_argument("--dump-start", default=None)
    p.add_argument("--dump-save", default=None)
    p.add_argument("--fsdp-version", type=int, default=2, choices=[1, 2])
    p.add_argument("--sharding", default="full_shard", help="FSDP1's strategy (fsdp=...)")
    a = p.parse_args()

    cpu_fsdp2()
    import btckpt
    from btckpt.hf import CheckpointCallback, resume_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                      attention_dropout=0.1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if a.fsdp_version == 2:
        fsdp_kw = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                              "reshard_after_forward": True})
    else:  # as a user writes FSDP1 (sync_module_states=True is refused by torch on CPU)
        fsdp_kw = dict(fsdp=a.sharding, fsdp_config={
            "version": 1, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "sync_module_states": False,
            "cpu_ram_efficient_loading": False})
    eval_kw = {}
    if a.eval_steps:
        eval_kw = dict(eval_strategy="steps", eval_steps=a.eval_steps, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", greater_is_better=False, per_device_eval_batch_size=2)
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=2, max_steps=a.max_steps, learning_rate=a.lr,
        warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01, save_strategy="steps",
        save_steps=a.save_steps, logging_steps=1, report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, **fsdp_kw, **eval_kw,
    )
    dump_save = a.dump_save.split(":", 1) if a.dump_save else None

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

            tr = trainer
            if a.fsdp_version == 2:
                assert tr.is_fsdp_enabled and isinstance(tr.model, FSDPModule), type(tr.model)
                assert all(type(p).__name__ == "DTensor" for p in tr.model.parameters())
            else:  # the root and every decoder layer are FSDP1 units; parameters are plain (1-D flat shards on
                # several ranks; on one, FSDP1 runs NO_SHARD and keeps their shapes)
                assert tr.is_fsdp_enabled and isinstance(tr.model, FullyShardedDataParallel), type(tr.model)
                assert len(FullyShardedDataParallel.fsdp_modules(tr.model)) == 3
                assert all(type(p).__name__ == "Parameter" for p in tr.model.parameters())
                assert dist.get_world_size() == 1 or all(p.dim() == 1 for p in tr.model.parameters())
            say(f"rank {args.process_index}: fsdp{a.fsdp_version} {dist.get_world_size()}")
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
                      eval_dataset=Synthetic(8, 2) if a.eval_steps else None,
                      callbacks=[CheckpointCallback(**opts), Probe()])
    trainer.train(resume_from_checkpoint=resume_checkpoint())
    if a.dump:
        dump(trainer, a.dump)
    say(f"rank {args.process_index}: done {trainer.state.global_step} best {trainer.state.best_model_checkpoint}")
    exit_rank(0)  # inside main(): the Trainer's wrapped model still holds the group (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
