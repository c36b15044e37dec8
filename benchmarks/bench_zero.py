"""DeepSpeed ZeRO on CPU (2 ranks, gloo, ``DS_ACCELERATOR=cpu``): btckpt vs DeepSpeed's own ``save_checkpoint``
on the same engine, in one run, contenders alternating round by round.

    DS_ACCELERATOR=cpu python benchmarks/bench_zero.py [--stage 3] [--rounds 5] [--hidden 512] [--layers 4]

A Llama built from a config (``--hidden``, ``--layers``, vocab 8000) under ``deepspeed.initialize`` with ZeRO
``--stage`` and DeepSpeed's AdamW. Each round saves once with each contender between two training steps, in a
rotated order, and measures on rank 0, between barriers:

- ``btckpt async``: the stall = ``save()`` blocking + the step gate's wait in the next step
  (``ckpt.stats``); ``total``: until committed (``wait()``).
- ``btckpt sync``: ``Checkpointer(async_save=False).save()``: the save (until committed) is the stall.
  ``total`` of the async contender includes the one training step that runs while it writes.
- ``deepspeed``: ``engine.save_checkpoint(dir)`` (synchronous: the stall; ``global_step<N>/*.pt`` pickles,
  every rank's optimizer partition plus the module weights written by rank 0 -- for ZeRO-3 the module file
  holds the partitioned placeholders, so a servable model still needs ``zero_to_fp32.py``).

Also the step time without a save (median) and the bytes each contender wrote (all ranks).

Then ``--restore-rounds`` rounds of restore into the same live engine (each contender's newest checkpoint of
the save rounds, order alternating), rank 0's time between barriers (the files are in the page cache for both):

- ``btckpt``: what the HF callback's resume does (``btckpt.hf.deepspeed.load_engine``): ``inspect`` the folder
  (manifest), then ``load_zero`` (every rank reads and checksums the full tensors its fragments need, checks
  them all, then fills its fp32 master partition, its optimizer moments and its model partition);
- ``deepspeed``: ``engine.load_checkpoint(dir)`` (module and optimizer states, ``torch.load`` of the pickles).
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

HERE = Path(__file__).resolve()


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def worker(a: argparse.Namespace) -> None:
    import btckpt
    import deepspeed
    import torch
    import torch.distributed as dist
    from btckpt.distributed.zero import ZeroState, plain_data
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ds = {"zero_optimization": {"stage": a.stage}, "train_micro_batch_size_per_gpu": 2,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0}
    engine, opt, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    ids = torch.randint(0, 8000, (2, 64))

    def step() -> float:
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    root = Path(a.root)
    zs = ZeroState(engine.module, engine.optimizer)

    def state() -> dict:
        zs.counters = {"global_steps": int(engine.global_steps)}
        return {"zero": zs, "deepspeed": plain_data(zs)}

    gate = [engine.optimizer.optimizer]
    bt = {m: btckpt.Checkpointer(dir=str(root / f"bt-{m}"), keep_last=1, async_save=m == "async")
          for m in ("async", "sync")}
    res: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}
    plain_steps: list[float] = []

    def bt_save(m: str, n: int) -> tuple[float, float]:
        ck = bt[m]
        before = ck.stats.gate_wait_s
        t0 = time.perf_counter()
        ck.save(n, state(), optimizers=gate)
        block = time.perf_counter() - t0
        if m == "sync":  # save() returned after the commit
            step()
            return block, block
        step()  # the gate waits (if at all) in this step's optimizer step
        stall = block + ck.stats.gate_wait_s - before
        ck.wait()
        return stall, time.perf_counter() - t0

    def ds_save(n: int) -> tuple[float, float]:
        folder = root / "ds"
        t0 = time.perf_counter()
        engine.save_checkpoint(str(folder), tag=f"global_step{n}")
        took = time.perf_counter() - t0
        step()
        return took, took

    order = ["btckpt async", "btckpt sync", "deepspeed"]
    n = 100
    for r in range(a.rounds):
        plain_steps.append(step())
        for name in order[r % 3:] + order[:r % 3]:
            n += 1
            dist.barrier()
            if name == "deepspeed":
                shutil.rmtree(root / "ds", ignore_errors=True) if rank == 0 else None
                dist.barrier()
                stall, total = ds_save(n)
            else:
                stall, total = bt_save(name.split()[1], n)
            dist.barrier()
            res.setdefault(f"{name}.stall", []).append(stall)
            res.setdefault(f"{name}.total", []).append(total)
            if rank == 0:
                folder = root / "ds" if name == "deepspeed" else root / f"bt-{name.split()[1]}" / f"checkpoint-{n}"
                nbytes[name] = _bytes(folder)
    for ck in bt.values():
        ck.close()

    from btckpt.distributed.zero import load_zero, read_tensor
    from btckpt.restore.reader import NodeParts
    from btckpt.storage.discovery import inspect

    bt_folder = btckpt.latest(root / "bt-sync")
    assert bt_folder is not None

    def bt_restore() -> None:  # btckpt.hf.deepspeed.load_engine, on the bench's engine
        info = inspect(bt_folder)
        assert info.complete and info.manifest is not None, info.reason
        parts = NodeParts(info.path, info.manifest)
        data = load_zero(zs, info.manifest.state, read_tensor(parts, info.manifest.node_rank), where=str(info.path))
        engine.global_steps = int(data["counters"]["global_steps"])

    def ds_restore() -> None:
        path, _ = engine.load_checkpoint(str(root / "ds"), load_lr_scheduler_states=False)
        assert path is not None, "deepspeed found no checkpoint"

    restore = {"btckpt": bt_restore, "deepspeed": ds_restore}
    for r in range(a.restore_rounds):
        for name in list(restore)[r % 2:] + list(restore)[:r % 2]:
            dist.barrier()
            t0 = time.perf_counter()
            restore[name]()
            dist.barrier()
            res.setdefault(f"restore.{name}", []).append(time.perf_counter() - t0)
        step()  # the restored engine trains
    if rank == 0:
        out = {"stage": a.stage, "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                               for p in engine.module.parameters()),
               "step_s": statistics.median(plain_steps), "results": res, "bytes": nbytes}
        Path(a.json).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--restore-rounds", type=int, default=None, help="restore rounds (default: --rounds)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--root", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.restore_rounds is None:
        a.restore_rounds = a.rounds
    if a.worker:
        worker(a)
        return
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
        js = Path(tmp) / "out.json"
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE),
               "--worker", "--root", str(Path(tmp) / "ck"), "--json", str(js), "--stage", str(a.stage),
               "--rounds", str(a.rounds), "--restore-rounds", str(a.restore_rounds), "--hidden", str(a.hidden),
               "--layers", str(a.layers)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL if not os.environ.get("VERBOSE") else None)
        out = json.loads(js.read_text())
    print(f"ZeRO-{out['stage']}, {out['params'] / 1e6:.1f} M parameters, 2 ranks, step {out['step_s']:.3f} s "
          f"(median, no save), {a.rounds} rounds (median [min-max])")
    print("| contender | stall per save (s) | until durable (s) | bytes written (MB, all ranks) |")
    print("|---|---|---|---|")
    for name in ("btckpt async", "btckpt sync", "deepspeed"):
        s, t = out["results"][f"{name}.stall"], out["results"][f"{name}.total"]
        print(f"| {name} | {statistics.median(s):.3f} [{min(s):.3f}-{max(s):.3f}] | {statistics.median(t):.3f} "
              f"[{min(t):.3f}-{max(t):.3f}] | {out['bytes'].get(name, 0) / 1e6:.1f} |")
    print(f"\nrestore into the live engine, {a.restore_rounds} rounds (median [min-max])")
    print("| contender | restore (s) |")
    print("|---|---|")
    for name in ("btckpt", "deepspeed"):
        t = out["results"][f"restore.{name}"]
        print(f"| {name} | {statistics.median(t):.3f} [{min(t):.3f}-{max(t):.3f}] |")


if __name__ == "__main__":
    main()
