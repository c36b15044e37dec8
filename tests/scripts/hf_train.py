"""A tiny, deterministic HF Trainer run used by tests/test_hf.py and benchmarks/bench_hf.py.

GPT-2 built from a config (2 layers, 32 wide, dropout on: RNG matters), a synthetic dataset, CPU.
Options pick the checkpointing (btckpt callback, HF native, none), how to resume, and faults to inject:
``--kill-at N`` SIGKILLs this process when step N begins; ``--progress FILE`` records each finished step
(tests send real signals when a step shows up). ``--dump FILE`` writes the final parameters and
optimizer state as safetensors (rank 0) for bit-exact comparison. ``--local-every K --tier DIR``: the callback
also saves into the local tier DIR every K steps (``--wait-commit`` then waits for the tier's checkpoint).
``--slow-commit S``: btckpt's writer sleeps S seconds before each commit (a kill then lands inside a save).
``--count-collectives``: counts ``torch.distributed.all_reduce`` calls made from btckpt's code and prints
``BTCKPT_ALL_REDUCE rank=<r> n=<n>`` at the end.
Prints ``RESUME <folder>`` (``--resume line``) and ``START <global_step>`` when training begins.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
from _rank_exit import exit_rank
from rank_output import say
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

VOCAB = 64
SEQ = 16


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def zero_config(stage: int) -> dict:
    """The DeepSpeed config of the ZeRO tests (hf_zero_train.py, crash_hf.py): ZeRO ``stage``, AdamW with HF's
    "auto" values, and no JIT-compiled op. DeepSpeed's "AdamW" would JIT-build its fused_adam and its CPU comm
    backend deepspeed_shm_comm (together ~150 CPU-s, 1.5-2.5 min of a 2-core CI machine's both cores, per fresh
    venv): ``torch_adam`` makes the engine's optimizer ``torch.optim.AdamW`` (the engine, its ZeRO partitioning
    and checkpoint state are the same), and marking the shm op incompatible (DeepSpeed's own table, the same a
    non-Linux host gets) makes its collectives plain gloo ones. Neither is what btckpt checkpoints differently."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return {"zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                      "eps": "auto", "torch_adam": True}},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto"}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


class Faults(TrainerCallback):
    def __init__(self, kill_at: int | None, progress: str | None, step_sleep: float, wait_commit: int | None = None,
                 root: str | None = None) -> None:
        self.kill_at, self.progress, self.step_sleep, self.wait_commit = kill_at, progress, step_sleep, wait_commit
        self.root = root or os.environ.get("BT_CHECKPOINT_DIR", "./checkpoints")

    def on_train_begin(self, args, state, control, **kw):
        if args.process_index == 0:
            say(f"START {state.global_step}")

    def on_step_begin(self, args, state, control, **kw):
        if self.kill_at is not None and state.global_step == self.kill_at:
            # On a loaded machine the first save may still be in flight: the kill must leave something to
            # resume from (later saves may still be caught mid-write), so wait for one commit (bounded).
            import btckpt

            root = self.root
            deadline = time.monotonic() + 60
            want = f"checkpoint-{self.wait_commit}" if self.wait_commit else None

            def committed() -> bool:
                found = btckpt.latest(root)
                return found is not None and (want is None or Path(found).name == want)

            while not committed() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kw):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.progress and args.process_index == 0:
            with open(self.progress, "a") as f:
                f.write(f"{state.global_step}\n")


def dump(trainer: Trainer, path: str) -> None:
    from safetensors.torch import save_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    out = {f"param/{k}": v.detach().clone().contiguous() for k, v in model.named_parameters()}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"opt/{idx}/{k}"] = v.detach().clone().contiguous()
    meta = {"param_groups": json.dumps(sd["param_groups"]), "step": str(trainer.state.global_step),
            "last_lr": json.dumps(trainer.lr_scheduler.get_last_lr())}
    save_file(out, path, metadata=meta)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="the Trainer's output_dir")
    p.add_argument("--mode", choices=["btckpt", "native", "none"], default="btckpt")
    p.add_argument("--resume", choices=["line", "auto", "none", "native"], default="line")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--save-strategy", default="steps")
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps, keep the best (eval_loss)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--tokenizer", action="store_true")
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--wait-commit", type=int, default=None, help="with --kill-at: first wait for checkpoint-N")
    p.add_argument("--progress", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--dump", default=None)
    p.add_argument("--result", default=None, help="write a JSON summary (rank 0)")
    p.add_argument("--local-every", type=int, default=None, help="local_every_steps (with --tier)")
    p.add_argument("--tier", default=None, help="local_tier_dir")
    p.add_argument("--slow-commit", type=float, default=0.0)
    p.add_argument("--count-collectives", action="store_true")
    a = p.parse_args()
    calls = [0]
    if a.count_collectives:
        import sys

        import torch.distributed as dist

        all_reduce = dist.all_reduce

        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("btckpt"):
                calls[0] += 1
            return all_reduce(*args, **kwargs)

        dist.all_reduce = counted
    if a.slow_commit:
        from slow_commit import install

        install(a.slow_commit)

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_layer=a.n_layer, n_embd=a.n_embd, n_head=2)
    model = GPT2LMHeadModel(cfg)
    eval_kw = {}
    if a.eval_steps:
        eval_kw = dict(eval_strategy="steps", eval_steps=a.eval_steps, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", greater_is_better=False)
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.bs, per_device_eval_batch_size=a.bs,
        num_train_epochs=a.epochs, max_steps=a.max_steps, gradient_accumulation_steps=a.ga,
        learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01,
        save_strategy=a.save_strategy if a.mode != "none" else "no", save_steps=a.save_steps,
        save_total_limit=a.save_total_limit, logging_steps=1, report_to="none", seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, **eval_kw,
    )
    callbacks: list[TrainerCallback] = [Faults(a.kill_at, a.progress, a.step_sleep, a.wait_commit,
                                                root=a.out if a.mode == "native" else a.tier)]
    cb = None
    if a.mode == "btckpt":
        from btckpt.hf import CheckpointCallback

        tier = {"local_every_steps": a.local_every, "local_tier_dir": a.tier} if a.local_every else {}
        cb = CheckpointCallback(auto_resume=(a.resume == "auto"), **tier)
        callbacks.insert(0, cb)
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(a.samples, 1),
                      eval_dataset=Synthetic(8, 2) if a.eval_steps else None, callbacks=callbacks,
                      processing_class=tiny_tokenizer() if a.tokenizer else None)
    save_s = [0.0]
    inner_save = trainer._save_checkpoint  # HF's own, or the callback's replacement: time what blocks training

    def timed_save(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner_save(*args, **kwargs)
        finally:
            save_s[0] += time.perf_counter() - t

    trainer._save_checkpoint = timed_save
    t0 = time.perf_counter()
    if a.resume == "line":
        from btckpt.hf import resume_checkpoint

        start = resume_checkpoint(local_tier_dir=a.tier)
        say(f"RESUME {start}")
        trainer.train(resume_from_checkpoint=start)
    elif a.resume == "native":
        from transformers.trainer_utils import get_last_checkpoint

        start = get_last_checkpoint(a.out) if os.path.isdir(a.out) else None
        say(f"RESUME {start}")
        trainer.train(resume_from_checkpoint=start)
    else:
        trainer.train()
    wall = time.perf_counter() - t0
    if trainer.args.process_index == 0:
        if a.dump:
            dump(trainer, a.dump)
        if a.result:
            Path(a.result).write_text(json.dumps({
                "wall_s": wall, "save_block_s": save_s[0], "steps": trainer.state.global_step,
                "best": trainer.state.best_model_checkpoint,
                "stats": cb.stats if cb is not None else None}))
    if a.count_collectives:
        say(f"BTCKPT_ALL_REDUCE rank={trainer.args.process_index} n={calls[0]}")
    say(f"DONE {trainer.state.global_step}")
    exit_rank(0)  # inside main(): the Trainer's DDP model still holds the group (see _rank_exit)


if __name__ == "__main__":
    exit_rank(main())
