"""Stall per save and throughput loss: TorchCheckpointIO vs AsyncCheckpointIO vs SafetensorsCheckpointIO.

One process, CPU. Each round runs every contender once (order rotated round by round): a Lightning fit of
``--steps`` steps with btckpt's ``ModelCheckpoint(every_n_train_steps=--every, save_top_k=2)`` (Lightning's
own, plus btckpt's hooks, which do nothing for the other IOs), plus a no-save baseline. Contenders:
``safetensors`` (default: parameters and moments copied behind the optimizer step gate) and
``safetensors-sync`` (``background_copy=False``: everything copied before ``save_checkpoint`` returns).
Stall = time inside ``CheckpointIO.save_checkpoint`` plus, for btckpt, the time the next
``optimizer.step()`` waited at the step gate (what the training thread waits in all).
Train time = on_train_start -> on_train_end; "flush" = the rest of fit (teardown waits for async writes).
Prints medians and min-max over rounds.

    PYTHONPATH=integrations python benchmarks/bench_lightning.py --rounds 3 --width 1024 --layers 4
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from btckpt.lightning import ModelCheckpoint, SafetensorsCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO


class Net(L.LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Clock(L.Callback):
    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = ckpt_dir

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        self.gate_s = 0.0

    def on_train_end(self, trainer, pl_module):
        self.train_s = time.perf_counter() - self.t0
        io = trainer.strategy.checkpoint_io
        if isinstance(io, SafetensorsCheckpointIO):  # before teardown closes the Checkpointer (public stats)
            self.gate_s = io.checkpointer(self.ckpt_dir).stats.gate_wait_s


def timed(io):
    stalls: list[float] = []
    inner = io.save_checkpoint

    def save_checkpoint(*a, **k):
        t0 = time.perf_counter()
        inner(*a, **k)
        stalls.append(time.perf_counter() - t0)

    io.save_checkpoint = save_checkpoint
    return io, stalls


def make(kind: str):
    if kind == "torch":
        return TorchCheckpointIO()
    if kind == "async":
        return AsyncCheckpointIO(TorchCheckpointIO())
    if kind == "safetensors":
        return SafetensorsCheckpointIO()
    if kind == "safetensors-sync":
        return SafetensorsCheckpointIO(background_copy=False)
    return None


def run(kind: str, a: argparse.Namespace, root: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = Net(a.width, a.layers)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(a.batch * 8, a.width)),
                                       batch_size=a.batch)
    io = make(kind)
    stalls: list[float] = []
    plugins = []
    if io is not None:
        io, stalls = timed(io)
        plugins = [io]
    d = root / kind
    cbs: list = [Clock(d)]
    if io is not None:
        cbs.append(ModelCheckpoint(dirpath=d, every_n_train_steps=a.every, save_top_k=2, monitor="step",
                                   mode="max"))
    tr = L.Trainer(accelerator="cpu", max_steps=a.steps, plugins=plugins, callbacks=cbs, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   enable_checkpointing=io is not None)
    t0 = time.perf_counter()
    tr.fit(model, data)
    total = time.perf_counter() - t0
    assert tr.global_step == a.steps, (kind, tr.global_step)
    shutil.rmtree(d, ignore_errors=True)
    clock = cbs[0]
    return {"train_s": clock.train_s, "flush_s": total - clock.train_s, "saves": len(stalls),
            "save_med_s": statistics.median(stalls) if stalls else 0.0,
            "stall_s": (sum(stalls) + clock.gate_s) / max(1, len(stalls)), "gate_s": clock.gate_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir on /tmp)")
    ap.add_argument("--only", default="", help="comma list of contenders (default: all)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_lightning_"))
    kinds = [k for k in ["none", "torch", "async", "safetensors-sync", "safetensors"]
             if not a.only or k in a.only.split(",")]
    nparams = a.layers * (a.width * a.width + a.width)
    print(f"model {nparams / 1e6:.1f}M params; checkpoint ~{nparams * 12 / 1e6:.0f} MB (fp32 weights + AdamW "
          f"moments); {a.steps} steps, save every {a.every}; {a.rounds} rounds; dir {root}")
    res: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for r in range(a.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            res[k].append(run(k, a, root))
        print(f"round {r + 1}: " + ", ".join(f"{k} {res[k][-1]['train_s']:.2f}s" for k in kinds), flush=True)
    base = statistics.median(x["train_s"] for x in res["none"])
    print(f"\n{'contender':<18}{'save_checkpoint ms/save':>26}{'stall ms/save (+gate)':>26}{'train s':>18}"
          f"{'loss %':>9}{'flush s':>9}")

    def cell(xs: list[float]) -> str:
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"

    for k in kinds:
        sv = [x["save_med_s"] * 1e3 for x in res[k]]
        st = [x["stall_s"] * 1e3 for x in res[k]]
        tr = [x["train_s"] for x in res[k]]
        fl = statistics.median(x["flush_s"] for x in res[k])
        med = statistics.median(tr)
        print(f"{k:<18}{cell(sv):>26}{cell(st):>26}{cell(tr):>18}{(med / base - 1) * 100:>8.1f}%{fl:>9.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
