"""One short GPU run: snapshot correctness with kernels in flight, D2H bandwidth, stall vs DCP.

    python benchmarks/gpu_check.py --gib 4 --rounds 3 --batch 1024 --lightning --dir /tmp/btckpt-gpu

(a) checks (with a full arena and with a small memory budget) that a checkpoint equals the state at the
save() call while kernels that write the parameters are still queued before it and optimizer steps
follow it, and that it restores onto the device; (b) measures device->host
bandwidth into btckpt's arena vs a plain pinned copy of the same bytes (target >= 0.8x) and a pageable
copy; (c) measures stall per save (save() + step gate) for btckpt async vs DCP async_save on a multi-GiB
state; (d) prints one table. ``--device cpu --gib 0.1`` runs the same code on CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import btckpt
import torch
from btckpt.layout import flatten_group, plan_layout
from btckpt.manifest import read_manifest
from btckpt.reader import CheckpointReader
from btckpt.snapshot import Stager

warnings.filterwarnings("ignore")
rows: list[tuple[str, str, str]] = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(gib: float, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """Linear layers whose params + Adam moments total about ``gib`` GiB."""
    width = 8192 if gib >= 1 else 1024
    per_layer = width * width * 4 * 3
    depth = max(1, int(gib * 2**30 // per_layer))
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
    model = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    train_step(model, opt, width, device)
    return model, opt, width


BATCH = [64]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int, device: torch.device) -> None:
    loss = model(torch.randn(BATCH[0], width, device=device)).float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def check_correctness(root: Path, device: torch.device, *, budget: int | None, label: str) -> None:
    model, opt, width = make_model(0.5 if device.type == "cuda" else 0.05, device)
    big = [p for p in model.parameters() if p.dim() == 2]
    ok = True
    with btckpt.Checkpointer(
        dir=root / label, keep_last=None, save_rng=False, handle_sigterm=False, memory_budget=budget
    ) as ck:
        for s in range(1, 4):
            with torch.no_grad():  # long in-place kernels still queued when save() is called
                for p in big:
                    for _ in range(20):
                        p.mul_(1.0001).add_(1e-6)
            expect = {k: v.clone() for k, v in model.state_dict().items()}  # queued after those kernels
            ck.save(s, {"model": model, "optimizer": opt})
            train_step(model, opt, width, device)  # gated optimizer.step; more kernels after save()
            train_step(model, opt, width, device)
            ck.wait()
            path = root / label / f"checkpoint-{s}"
            got = CheckpointReader(path, read_manifest(path)).load_group("model")
            for k, v in expect.items():
                if not torch.equal(got[k], v.cpu()):
                    ok = False
                    print(f"  MISMATCH ({label}) at step {s}: {k}")
        model2, opt2, _ = make_model(0.5 if device.type == "cuda" else 0.05, device)  # restore onto the device
        step = ck.restore({"model": model2, "optimizer": opt2})
        for k, v in model2.state_dict().items():
            if step != 3 or v.device != expect[k].device or not torch.equal(v, expect[k]):
                ok = False
                print(f"  RESTORE MISMATCH ({label}): step {step}, {k} on {v.device}")
                break
        stager = ck._stager
        arena = stager._arena
        pinned = arena is not None and arena.is_pinned()
        note = (
            f"arena {stager.arena_bytes / 2**20:.0f} MiB, pinned={pinned}, allocated {stager.allocations}x in 3 saves"
        )
        if device.type == "cuda" and not (pinned and stager.allocations == 1):
            ok = False
    rows.append((f"(a) snapshot == state at save() with kernels in flight, {label}", "PASS" if ok else "FAIL", note))
    if not ok:
        print(f"correctness check {label} FAILED", file=sys.stderr)


def lightning_check(root: Path, device: torch.device) -> None:
    """(a3) btckpt's Lightning plugin on this device: with the background copy (side stream + step gate),
    every checkpoint equals the state at the batch end it was taken at (probed by a callback that runs
    just before ModelCheckpoint), with optimizer steps and more kernels queued right after."""
    import lightning as L
    from btckpt.lightning import ModelCheckpoint, SafetensorsCheckpointIO
    from safetensors.torch import load_file

    width = 1024 if device.type == "cuda" else 64
    probes: dict[int, dict[str, torch.Tensor]] = {}

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.body(batch[0]).float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Probe(L.Callback):  # Lightning runs checkpoint callbacks last, so this sees the state being saved
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step % 4 == 0:
                probes[trainer.global_step] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64 * 16, width))
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=12,
                        plugins=[SafetensorsCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Probe(), ModelCheckpoint(
                            dirpath=root / "lightning", every_n_train_steps=4, save_top_k=-1)])
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=64))
    ok = sorted(probes) == [4, 8, 12]
    for step, want in probes.items():
        got = load_file(str(root / "lightning" / f"checkpoint-{step}" / "model.safetensors"))
        for k, v in want.items():
            if not torch.equal(got[k], v):
                ok = False
                print(f"  LIGHTNING MISMATCH at step {step}: {k}")
    rows.append(("(a3) Lightning plugin, background copy: checkpoint == state at its batch end",
                 "PASS" if ok else "FAIL", f"steps {sorted(probes)}, width {width}"))


def bandwidth(device: torch.device, gib: float, rounds: int) -> None:
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    tensors = dict(enumerate(src.split(max(1, n // 64))))
    flat = [flatten_group("model", {str(k): v for k, v in tensors.items()})]
    layout = plan_layout(flat, max_shard_size=1 << 62)
    stager = Stager(small_bytes=0)
    pinned = torch.empty(n, dtype=torch.float32, pin_memory=device.type == "cuda")
    pageable = torch.empty(n, dtype=torch.float32)
    pageable.zero_()
    keys = {("model", k) for k in flat[0].tensors}
    times: dict[str, list[float]] = {"btckpt arena (side stream)": [], "plain pinned copy": [], "pageable copy": []}
    stager.stage(flat, layout, async_keys=keys, sync=False).wait()  # allocate the arena once
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        stager.stage(flat, layout, async_keys=keys, sync=False).wait()
        times["btckpt arena (side stream)"].append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        pinned.copy_(src, non_blocking=True)
        sync(device)
        times["plain pinned copy"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pageable.copy_(src)
        sync(device)
        times["pageable copy"].append(time.perf_counter() - t0)
    stager.close()
    nbytes = n * 4
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        rows.append(
            (f"(b) D2H {k}", f"{nbytes / v / 2**30:.2f} GiB/s", f"median of {rounds}, {nbytes / 2**30:.1f} GiB")
        )
    ratio = med["plain pinned copy"] / med["btckpt arena (side stream)"]
    rows.append(("(b) arena / plain pinned bandwidth", f"{ratio:.2f}x", "target >= 0.8x"))


def stall(root: Path, device: torch.device, gib: float, rounds: int) -> None:
    import torch.distributed.checkpoint as dcp

    model, opt, width = make_model(gib, device)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    ck = btckpt.Checkpointer(dir=root / "c", keep_last=1, save_rng=False, handle_sigterm=False)
    stager: Any = None
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if device.type == "cuda":
            stager = DefaultStager(StagingOptions(True, False, True, True))
    except Exception as exc:  # noqa: BLE001 - older torch: compare with the plain async_save only
        print(f"DCP DefaultStager unavailable: {exc!r}")
    res: dict[str, list[float]] = {"btckpt async": [], "DCP async_save": []}
    if stager is not None:
        res["DCP async_save (pinned, async stager)"] = []
    step_t: list[float] = []
    failed: dict[str, str] = {}
    host: dict[str, list[float]] = {k: [] for k in res}
    for r in range(rounds):
        for _ in range(2):  # the plain step time of this round (the baseline the stall is measured against)
            sync(device)
            t0 = time.perf_counter()
            train_step(model, opt, width, device)
            sync(device)
            step_t.append(time.perf_counter() - t0)
        base = statistics.median(step_t[-2:])
        for name in list(res) if r % 2 == 0 else list(reversed(res)):
            sync(device)
            t0 = time.perf_counter()
            if name == "btckpt async":
                g0 = ck._gate.waited
                ck.save(r + 1, {"model": model, "optimizer": opt})
                host[name].append(time.perf_counter() - t0)
                train_step(model, opt, width, device)  # the gate orders optimizer.step after the copy
                sync(device)
                host[name][-1] += ck._gate.waited - g0
                res[name].append(time.perf_counter() - t0 - base)
                ck.wait()
            elif name in failed:
                continue
            else:
                try:
                    # one flat dict of tensors: DCP's DefaultStager (torch 2.11) failed to deep-copy the nested one
                    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
                    sd |= {f"optim.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}
                    kw: dict[str, Any] = {"checkpoint_id": str(root / f"dcp-{len(name)}-{r}"), "no_dist": True}
                    if "pinned" in name:
                        kw["async_stager"] = stager
                    fut = dcp.async_save(sd, **kw)
                    staged = getattr(fut, "staging_completion", None)
                    if staged is not None:  # the step may only mutate the state once staging finished
                        staged.result()
                    host[name].append(time.perf_counter() - t0)
                    train_step(model, opt, width, device)
                    sync(device)
                    res[name].append(time.perf_counter() - t0 - base)
                    done = getattr(fut, "upload_completion", fut)
                    done.result()
                    shutil.rmtree(kw["checkpoint_id"], ignore_errors=True)
                except Exception as exc:  # noqa: BLE001 - report the contender as failed, keep measuring
                    failed[name] = repr(exc)[:200]
                    res[name].clear()  # a contender that failed has no valid figure
                    host[name].clear()
                    print(f"{name} failed: {exc!r}", flush=True)
    ck.close()
    if stager is not None:
        stager.close()
    rows.append(("(c) state size", f"{nbytes / 2**30:.2f} GiB", f"train step {statistics.median(step_t):.3f}s"))
    med = {k: statistics.median(v) for k, v in res.items() if v}
    for k, v in med.items():
        rows.append(
            (
                f"(c) stall per save: {k}",
                f"{v:.3f}s",
                f"(save + next step) - plain step; min {min(res[k]):.3f} max {max(res[k]):.3f}",
            )
        )
    for k, why in failed.items():
        rows.append((f"(c) {k}", "ERROR", why))
    for k, v in host.items():
        if not v:
            continue
        rows.append(
            (f"(c) host blocked per save: {k}", f"{statistics.median(v):.3f}s", "save call + step-gate host wait")
        )
    for k, v in med.items():
        if k != "btckpt async":
            rows.append((f"(c) btckpt stall / {k}", f"{med['btckpt async'] / v:.3f}x", "target <= 0.5x"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/btckpt-gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64, help="rows per training step (more: more compute to overlap)")
    ap.add_argument("--lightning", action="store_true", help="also check btckpt's Lightning plugin on the device")
    args = ap.parse_args()
    BATCH[0] = args.batch
    device = torch.device(args.device)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    check_correctness(root, device, budget=None, label="full arena")
    small = 64 << 20 if device.type == "cuda" else 8 << 20
    check_correctness(root, device, budget=small, label=f"{small >> 20} MiB budget (windows)")
    if args.lightning:
        lightning_check(root, device)
    print(f"(a) done in {time.perf_counter() - t0:.0f}s", flush=True)
    bandwidth(device, args.gib, args.rounds)
    print(f"(b) done in {time.perf_counter() - t0:.0f}s", flush=True)
    stall(root, device, args.gib, args.rounds)
    print(f"(c) done in {time.perf_counter() - t0:.0f}s\n", flush=True)
    print(f"| check on {name} | result | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    shutil.rmtree(root, ignore_errors=True)
    if any(r[1] == "FAIL" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
