"""HF Trainer under FSDP1 (2 ranks, gloo, CPU): btckpt's CheckpointCallback vs the Trainer's own FSDP1 save.

One torchrun job (the script relaunches itself under torchrun); a small Llama from a config trained a few
steps with ``fsdp="full_shard"``, ``fsdp_config={"version": 1, "state_dict_type": "SHARDED_STATE_DICT"}``
(HF's sharded FSDP1 checkpoint: DCP files + pickles; its default FULL_STATE_DICT crashes inside torch on CPU).
Then, round by round, alternating which goes first:

- ``btckpt``: the stall (``Trainer._save_checkpoint`` as the callback replaces it: returns once the
  snapshot is taken) and the sync time (stall + wait until committed);
- ``hf``: the Trainer's own ``_save_checkpoint`` (synchronous: stall = sync time);
- restore: btckpt ``load_groups`` of model + optimizer vs HF's ``_load_from_checkpoint`` +
  ``_load_optimizer_and_scheduler`` on the same folder kinds.

Times are rank 0's, between barriers; medians with min-max printed as JSON.

    PYTHONPATH=integrations python benchmarks/bench_fsdp1.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms ({min(xs) * 1000:.0f}-{max(xs) * 1000:.0f})"


def rank_main(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    import torch
    import torch.distributed as dist
    from hf_fsdp_train import cpu_fsdp2
    from hf_train import Synthetic

    cpu_fsdp2()  # accelerate's FSDP branch on MULTI_CPU (test harness; see its doc)
    from btckpt.adapters import load_groups, open_checkpoint
    from btckpt.hf import CheckpointCallback
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    work = Path(a.work)
    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, fsdp="full_shard",
        fsdp_config={"version": 1, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                     "sync_module_states": False, "cpu_ram_efficient_loading": False,
                     "state_dict_type": "SHARDED_STATE_DICT"})
    cb = CheckpointCallback(auto_resume=False)
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(16, 1), callbacks=[cb])
    trainer.train(resume_from_checkpoint=False)
    rank = dist.get_rank()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    hf_save = cb._orig["_save_checkpoint"]
    hf_load_model = cb._orig["_load_from_checkpoint"]
    res: dict[str, list[float]] = {"btckpt_stall": [], "btckpt_sync": [], "hf_save": [], "btckpt_restore": [],
                                   "hf_restore": []}

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    step = 100
    for r in range(a.rounds):
        for who in (["btckpt", "hf"] if r % 2 == 0 else ["hf", "btckpt"]):
            step += 1
            trainer.state.global_step = step
            if who == "btckpt":
                dist.barrier()
                t0 = time.perf_counter()
                trainer._save_checkpoint(trainer.model, None)  # the callback's replacement: async save
                stall = time.perf_counter() - t0
                cb.ckpt.wait()
                dist.barrier()
                res["btckpt_stall"].append(stall)
                res["btckpt_sync"].append(time.perf_counter() - t0)
                folder = cb.ckpt.root / f"checkpoint-{step}"
                info = open_checkpoint(folder)
                res["btckpt_restore"].append(timed(lambda info=info: load_groups(
                    info, {"model": trainer.model, "optimizer": opt}, ["model", "optimizer"], rank=rank)))
            else:
                res["hf_save"].append(timed(lambda: hf_save(trainer.model, None)))
                folder = Path(args.output_dir) / f"checkpoint-{step}"
                res["hf_restore"].append(timed(lambda folder=folder: (hf_load_model(str(folder), trainer.model_wrapped),
                                                        trainer._load_optimizer_and_scheduler(str(folder)))))
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(folder, ignore_errors=True)
    root = cb.ckpt.root
    cb.close()
    if rank == 0:
        sizes = {"btckpt": sum(f.stat().st_size for f in root.glob("checkpoint-*/*") if f.is_file())
                 / max(1, len(list(root.glob("checkpoint-*"))))}
        out = {k: summary(v) for k, v in res.items()}
        out["params"] = n_params
        out["btckpt_folder_bytes"] = int(sizes["btckpt"])
        print(json.dumps(out, indent=1))
    dist.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--work", default="")
    a = ap.parse_args()
    if "RANK" in os.environ:
        rank_main(a)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-fsdp1-") as work:
        env = dict(os.environ, BT_CHECKPOINT_DIR=str(Path(work) / "ck"), OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "integrations"), str(REPO / "tests" / "scripts"),
                                             env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--rounds", str(a.rounds), "--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab",
               str(a.vocab), "--work", work]
        return subprocess.run(cmd, env=env, timeout=3600).returncode


if __name__ == "__main__":
    raise SystemExit(main())
