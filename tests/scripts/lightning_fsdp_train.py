"""Tiny Lightning run under FSDP2 (``fully_shard`` in ``configure_model``) for tests/test_lightning_fsdp.py.

Run with torchrun (CPU, gloo): ``--strategy btckpt`` is ``btckpt.lightning.ModelParallelStrategy`` (every rank
writes its own shards through SafetensorsCheckpointIO), ``--strategy lightning`` Lightning's own (refused
with the plugin); ``--strategy fsdp1`` is ``btckpt.lightning.FSDPStrategy`` (FSDP1, each Linear and the root
wrapped by ``auto_wrap_policy``; nothing in ``configure_model``), ``--strategy lightning-fsdp1`` Lightning's own
``FSDPStrategy`` (refused). On CPU FSDP1 needs ``device_id=cpu``, which Lightning's FSDPStrategy never passes
(it passes ``root_device.index``, None for CPU, and FSDP1 then asks for an accelerator): :func:`cpu_fsdp1`
(test harness only) fills it in. Lightning's own ``FSDPStrategy`` also refuses ``accelerator="cpu"`` by an
exact type check, which a subclass passes. Each rank trains on its own data shard with its own dropout RNG
(lightning_train.Tiny).
Prints ``rank R: resumed at step N`` at train start. --pause-at N --pause-after K: after step N, rank 0 waits
until ``checkpoint-K`` is committed, writes ``PAUSED`` to --progress and hangs (the test then SIGKILLs the job).
--dump FILE: the full model + optimizer state (gathered; rank 0 writes it) at the end; --dump-start FILE:
the same right after a resume (before any step).

Internals used: btckpt.storage.discovery (discovery's inspect, to wait until a folder has committed).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from _rank_exit import exit_rank
from btckpt.lightning import FSDPStrategy, ModelCheckpoint, ModelParallelStrategy, SafetensorsCheckpointIO, resume_path
from dist_train import as_flat
from lightning_train import Batches, Tiny
from rank_output import say
from safetensors.torch import save_file


def full_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) model + optimizer state on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    return as_flat(get_model_state_dict(module, options=opts), get_optimizer_state_dict(module, opt, options=opts))


class Sharded(Tiny):
    def __init__(self, dump_start: str = "", pause: tuple[int, int, str, str] | None = None, tp: bool = False,
                 fsdp1: bool = False) -> None:
        super().__init__()
        self.dump_start, self.tp, self.fsdp1 = dump_start, tp, fsdp1
        self.pause = pause  # (at step, after checkpoint, its folder's parent, progress file)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.fsdp1:  # the strategy wraps the model (auto_wrap_policy)
            return
        if self.tp:  # tensor parallel: first Linear split by output features, the second by input features
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                               {"0": ColwiseParallel(), "3": RowwiseParallel()})
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.pause and self.global_step == self.pause[0] and self.global_rank == 0:
            from btckpt.storage.discovery import inspect

            folder = Path(self.pause[2]) / f"checkpoint-{self.pause[1]}"
            while not inspect(folder).complete:
                time.sleep(0.05)
            with open(self.pause[3], "a") as f:
                f.write("PAUSED\n")
            time.sleep(600)

    def on_train_start(self) -> None:
        say(f"rank {self.global_rank}: resumed at step {self.global_step}")
        if self.dump_start:
            dump(self, self.dump_start)


class HFSharded(Sharded):
    """A LightningModule holding a tiny transformers Llama (``self.model``), each layer and the model under FSDP2."""

    def __init__(self, **kw) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__(**kw)
        del self.net, self.seen
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                          tie_word_embeddings=False)
        self.model = LlamaForCausalLM(cfg)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        ids = (x.abs() * 10).long() % 64
        return self.model(input_ids=ids, labels=ids).loss


def cpu_fsdp1() -> None:
    """FSDP1 on a CPU-only machine: ``device_id=cpu`` when none was given (see the module doc); test harness only."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    original = FullyShardedDataParallel.__init__

    def init(self, *args, device_id=None, **kwargs):
        if device_id is None and not torch.accelerator.is_available():
            device_id = torch.device("cpu")
        original(self, *args, device_id=device_id, **kwargs)

    FullyShardedDataParallel.__init__ = init


def dump(module: L.LightningModule, path: str) -> None:
    opt = module.trainer.optimizers[0]
    if getattr(module, "fsdp1", False):  # the FSDP1 root wraps the LightningModule: its state dict has the keys
        state = full_state(module.trainer.strategy.model, opt)
        state = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in state.items()}
    else:
        state = full_state(module, opt)
    if module.trainer.is_global_zero:
        save_file(state, path, metadata={"global_step": str(module.trainer.global_step),
                                         "lr": str(opt.param_groups[0]["lr"])})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--strategy", default="btckpt", choices=["btckpt", "lightning", "fsdp1", "lightning-fsdp1"])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt-path", default=None)
    ap.add_argument("--progress", default="")
    ap.add_argument("--dump", default="")
    ap.add_argument("--dump-start", default="")
    ap.add_argument("--hf", action="store_true", help="a transformers model inside the LightningModule")
    ap.add_argument("--tp", action="store_true", help="tensor parallel over all ranks instead of FSDP2")
    ap.add_argument("--default-sizes", action="store_true",
                    help="ModelParallelStrategy() with its default sizes (one node: data_parallel 1, tensor_parallel "
                         "= all ranks), FSDP2 on the data_parallel mesh: tensors replicated over tensor_parallel")
    ap.add_argument("--pause-at", type=int, default=-1)
    ap.add_argument("--pause-after", type=int, default=-1)
    a = ap.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    L.seed_everything(0, verbose=False)
    pause = (a.pause_at, a.pause_after, a.dir, a.progress) if a.pause_at >= 0 else None
    fsdp1 = a.strategy in ("fsdp1", "lightning-fsdp1")
    model = HFSharded(dump_start=a.dump_start) if a.hf else Sharded(dump_start=a.dump_start, pause=pause, tp=a.tp,
                                                                    fsdp1=fsdp1)
    cb = ModelCheckpoint(dirpath=a.dir, every_n_train_steps=a.every, save_top_k=-1, save_last=True)
    dp = 1 if a.tp or a.default_sizes else world  # every tensor-parallel rank sees the same batches
    if fsdp1:
        cpu_fsdp1()
        cls1 = FSDPStrategy if a.strategy == "fsdp1" else L.pytorch.strategies.FSDPStrategy
        strategy = cls1(auto_wrap_policy={torch.nn.Linear})
    else:
        cls = ModelParallelStrategy if a.strategy == "btckpt" else L.pytorch.strategies.ModelParallelStrategy
        strategy = cls() if a.default_sizes else cls(data_parallel_size=dp, tensor_parallel_size=world // dp)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=a.steps,
                        plugins=[SafetensorsCheckpointIO()], callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    ckpt = a.ckpt_path or (resume_path(dir=a.dir) if a.resume else None)
    say(f"rank {rank}: resume from {ckpt}")
    trainer.fit(model, train_dataloaders=Batches(rank=rank % dp, world=dp), ckpt_path=ckpt)
    if a.dump:
        dump(model, a.dump)
    say(f"rank {rank}: done")
    exit_rank(0)  # inside main(): the strategy's model still holds the group (see _rank_exit)


if __name__ == "__main__":
    main()
    exit_rank(0)
