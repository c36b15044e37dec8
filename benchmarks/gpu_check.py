"""One short GPU run: snapshot correctness with kernels in flight, D2H bandwidth, step time vs DCP.

    python benchmarks/gpu_check.py --gib 4,16 --rounds 2 --batch 1024 --lightning --dir /tmp/btckpt-gpu
    python benchmarks/gpu_check.py --device cpu --gib 0.1 --rounds 2      # CPU smoke (device parts skipped)
    python benchmarks/gpu_check.py --only-restore --restore-gib 4          # (e) alone

(a) checks (with a full arena, with a small memory budget, and through a local tier whose files are the
arena) that a checkpoint equals the state at the save() call while kernels that write the parameters are
still queued before it and optimizer steps follow it, and that it restores onto the device; (b) measures
device->host bandwidth into btckpt's arena and into a local tier's file arena (mapped, cudaHostRegister'ed)
vs a plain pinned copy of the same bytes (target >= 0.8x) and a pageable copy; (c) per state size, the
step-time increase over a window of steps whose first one saves (mean and worst step) and the host memory
each contender adds (PSS of this process and its children, /dev/shm), for btckpt async, a btckpt local-tier
save (``save_local``), DCP ``async_save`` by default and in its zero-overhead mode (torchtitan's
ASYNC_WITH_PINNED_MEM: a checkpoint process fed by a reused pinned, shared-memory, async ``DefaultStager``);
(e) the restore onto the device (issue 24): ``Checkpointer.restore`` of a checkpoint of the model, an older
step present, into the built model on the device (btckpt reads each file through a pinned staging ring and
copies host->device on a side stream while the next span is read) vs safetensors' ``load_file(device=...)`` +
``load_state_dict`` and a plain pinned H2D copy of the same bytes (the floor), bytes in the page cache, checked
equal; on CPU the same restore into CPU tensors (the one-pass path) vs ``load_file``; (d) prints one table.
On CPU the device-only parts are skipped with a message.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import btckpt
import torch
from btckpt.format.layout import flatten_group, plan_layout
from btckpt.format.manifest import read_manifest
from btckpt.restore.reader import CheckpointReader
from btckpt.saving.snapshot import Stager

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
VERBOSE = [False]
TIER_BASE = ["/dev/shm"]  # where local tiers go (a tmpfs)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int, device: torch.device) -> None:
    loss = model(torch.randn(BATCH[0], width, device=device)).float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def check_correctness(root: Path, device: torch.device, *, budget: int | None, label: str,
                      tier: bool = False) -> None:
    """``tier``: every save goes through a local tier in /dev/shm (staged into its files: the file arena),
    then is promoted into the dir, which is what is compared."""
    model, opt, width = make_model(0.5 if device.type == "cuda" else 0.05, device)
    big = [p for p in model.parameters() if p.dim() == 2]
    ok = True
    tier_opts: dict[str, Any] = {"local_every_steps": 1, "local_tier_dir": f"{TIER_BASE[0]}/btckpt-gpu-{label}"}
    with btckpt.Checkpointer(
        dir=root / label, keep_last=None, save_rng=False, handle_sigterm=False, memory_budget=budget,
        **(tier_opts if tier else {}),
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
        fig = ck.stats
        pinned = fig.arena_pinned
        note = (f"arena {fig.arena_bytes / 2**20:.0f} MiB, pinned={pinned}, "
                f"allocated {fig.arena_allocations}x in 3 saves")
        if device.type == "cuda" and not (pinned and (tier or fig.arena_allocations == 1)):
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
    tier = Path("/dev/shm/btckpt-gpu-check") if Path("/dev/shm").is_dir() else Path(TIER_BASE[0])
    into = tier / ".arena-bw-0"  # a local tier's file arena: the tier's files, mapped and cudaHostRegister'ed
    fstager = Stager(small_bytes=0)
    times: dict[str, list[float]] = {"btckpt arena (side stream)": [], "btckpt tier file arena": [],
                                     "plain pinned copy": [], "pageable copy": []}
    stager.stage(flat, layout, async_keys=keys, sync=False).wait()  # allocate the arena once
    for _ in range(2):  # and both file arenas
        fstager.stage(flat, layout, async_keys=keys, sync=False, into=into).wait()
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        stager.stage(flat, layout, async_keys=keys, sync=False).wait()
        times["btckpt arena (side stream)"].append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        fstager.stage(flat, layout, async_keys=keys, sync=False, into=into).wait()
        times["btckpt tier file arena"].append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        pinned.copy_(src, non_blocking=True)
        sync(device)
        times["plain pinned copy"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pageable.copy_(src)
        sync(device)
        times["pageable copy"].append(time.perf_counter() - t0)
    file_pinned = fstager.arena_pinned
    stager.close()
    fstager.close()
    shutil.rmtree(tier, ignore_errors=True)
    nbytes = n * 4
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        rows.append(
            (f"(b) D2H {k}", f"{nbytes / v / 2**30:.2f} GiB/s", f"median of {rounds}, {nbytes / 2**30:.1f} GiB")
        )
    ratio = med["plain pinned copy"] / med["btckpt arena (side stream)"]
    rows.append(("(b) arena / plain pinned bandwidth", f"{ratio:.2f}x", "target >= 0.8x"))
    ratio = med["plain pinned copy"] / med["btckpt tier file arena"]
    rows.append(("(b) tier file arena / plain pinned bandwidth", f"{ratio:.2f}x",
                 f"target >= 0.8x; registered (pinned): {file_pinned}"))


def host_memory() -> dict[str, int]:
    """Host memory of this process and its children (DCP's checkpoint process): PSS (shared and pinned pages
    counted once across processes), and what /dev/shm holds."""
    import psutil

    me = psutil.Process()
    pss = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            pss += p.memory_full_info().pss
        except psutil.Error:
            pass
    return {"pss": pss, "shm": shutil.disk_usage("/dev/shm").used}


def ensure_process_group(device: torch.device) -> bool:
    """DCP's process-based checkpointer needs a process group (one rank here); True if this call made it."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # where DCP's checkpoint process finds its TCPStore
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The nested state dict torchtitan hands DCP (model and optimizer state dicts, as they come)."""
    return {"model": model.state_dict(), "optim": opt.state_dict()}


class DcpContender:
    """DCP ``async_save`` in one configuration. ``zero_overhead``: torchtitan's ASYNC_WITH_PINNED_MEM mode, a
    checkpoint *process* (``AsyncCheckpointerType.PROCESS``) fed by one ``DefaultStager`` (pinned, shared-memory,
    async staging, non-blocking copies; pinned and non-blocking only on CUDA) reused across saves and closed
    once at the end, with cached save plans; the next ``optimizer.step`` waits for the staging, as
    torchtitan's ``maybe_wait_for_staging`` does. Otherwise the default ``async_save`` (a thread, pageable
    staging on the calling thread)."""

    def __init__(self, device: torch.device, *, zero_overhead: bool) -> None:
        from torch.distributed.checkpoint import DefaultSavePlanner
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.zero_overhead = zero_overhead
        self.stager: Any = None
        self.planner: Any = None
        self.pending: Any = None
        self.staging: Any = None
        cuda = device.type == "cuda"
        self.new_stager = lambda: DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=True,
                                                               use_async_staging=True, use_non_blocking_copy=cuda))
        # Some torch builds close the StateDictStager at the end of every DefaultStager._stage; close() clears its
        # deep-copy dispatch table, so the next stage of any dict raises KeyError(<class 'type'>) (RESULTS.md,
        # "DCP's DefaultStager after close()"). There, the stager cannot be reused (and its cached storages were
        # dropped by that close anyway): each save gets a new one.
        self.reusable = "close()" not in inspect.getsource(DefaultStager._stage)
        if zero_overhead:
            self.stager = self.new_stager()
            self.planner = DefaultSavePlanner(enable_plan_caching=True)

    def save(self, sd: dict[str, Any], checkpoint_id: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.finish()  # one save in flight, as torchtitan waits for the previous upload
        kw: dict[str, Any] = {"checkpoint_id": checkpoint_id}
        if self.zero_overhead and not self.reusable:
            self.stager.close()
            self.stager = self.new_stager()
        if self.zero_overhead:
            kw |= {"async_checkpointer_type": AsyncCheckpointerType.PROCESS, "async_stager": self.stager,
                   "planner": self.planner}
        else:
            kw["no_dist"] = True
        fut = dcp.async_save(sd, **kw)
        self.staging = getattr(fut, "staging_completion", None)
        self.pending = getattr(fut, "upload_completion", fut)

    def before_optimizer_step(self) -> None:
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def finish(self) -> None:
        self.before_optimizer_step()
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.finish()
        if self.stager is not None:
            self.stager.close()
            self.stager = None


def stop_dcp_process() -> None:
    """Ask DCP's checkpoint process (a module-level daemon) to exit, so the check leaves nothing behind."""
    from torch.distributed.checkpoint import _async_process_executor as ape

    proc = getattr(ape, "_CHECKPOINT_PROCESS", None)
    if proc is not None:
        ape._CHECKPOINT_PROCESS = None
        del proc


def window(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int, device: torch.device, steps: int,
           save: Any = None, before_step: Any = None) -> list[float]:
    """Times of ``steps`` training steps; ``save()`` is called at the start of the first one (inside its
    time), ``before_step()`` before each optimizer step (DCP's wait for its staging)."""
    out = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        if i == 0 and save is not None:
            save()
        loss = model(torch.randn(BATCH[0], width, device=device)).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def stall(root: Path, device: torch.device, gib: float, rounds: int, steps: int) -> None:
    """Step-time increase over a window of ``steps`` steps whose first one saves (mean and worst step, minus
    the plain step time: the median step of the save-free windows run before each contender, all rounds),
    and host memory each contender adds, per contender, rounds alternating."""
    model, opt, width = make_model(gib, device)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    label = f"{nbytes / 2**30:.1f} GiB"
    names = ["btckpt async", "btckpt tier save (RAM, file arena)", "DCP async_save (default)",
             "DCP zero-overhead (process, pinned+shm stager)"]
    if nbytes * 2.2 > shutil.disk_usage(TIER_BASE[0]).free:
        print(f"skipping the btckpt tier save at {label}: {TIER_BASE[0]} has too little free for its two copies",
              flush=True)
        names.remove("btckpt tier save (RAM, file arena)")
    if nbytes * 1.1 > shutil.disk_usage("/dev/shm").free:
        print(f"skipping DCP zero-overhead at {label}: /dev/shm has {shutil.disk_usage('/dev/shm').free >> 20} MiB "
              "free, its shared-memory staging needs the state's size", flush=True)
        names.pop()
    try:
        made_pg = ensure_process_group(device)
    except Exception as exc:  # noqa: BLE001 - report, compare the others
        print(f"no process group for DCP's process-based checkpointer: {exc!r}", flush=True)
        made_pg = False
        names = [n for n in names if "zero-overhead" not in n]
    ck = btckpt.Checkpointer(dir=root / "c", keep_last=1, save_rng=False, handle_sigterm=False)
    ckt = btckpt.Checkpointer(dir=root / "t", keep_last=1, save_rng=False, handle_sigterm=False, local_every_steps=1,
                              local_tier_dir=f"{TIER_BASE[0]}/btckpt-gpu-stall")
    dcps = {n: DcpContender(device, zero_overhead="zero" in n) for n in names if n.startswith("DCP")}
    inc: dict[str, list[float]] = {n: [] for n in names}
    worst: dict[str, list[float]] = {n: [] for n in names}
    blocked: dict[str, list[float]] = {n: [] for n in names}
    mem: dict[str, dict[str, int]] = {}
    failed: dict[str, str] = {}
    base_all: list[float] = []
    window(model, opt, width, device, steps)  # warm-up, not measured
    if "btckpt tier save (RAM, file arena)" in names:  # both file arenas made before measuring (steady state)
        for s in (1, 2):
            ckt.save_local(s, {"model": model, "optimizer": opt})
            ckt.wait()
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else list(reversed(names)):
                if name in failed:
                    continue
                base = window(model, opt, width, device, steps)
                base_all += base
                before = host_memory()
                try:
                    if name == "btckpt async":
                        g0 = ck.stats.gate_wait_s
                        times = window(model, opt, width, device, steps,
                                       save=lambda r=r: ck.save(r + 1, {"model": model, "optimizer": opt}))
                        blocked[name].append(ck.stats.gate_wait_s - g0)
                        held = host_memory()  # while the save is still being written
                        ck.wait()
                    elif name.startswith("btckpt tier"):
                        g0 = ckt.stats.gate_wait_s
                        times = window(model, opt, width, device, steps,
                                       save=lambda r=r: ckt.save_local(r + 3, {"model": model, "optimizer": opt}))
                        blocked[name].append(ckt.stats.gate_wait_s - g0)
                        held = host_memory()
                        ckt.wait()
                    else:
                        c = dcps[name]
                        cid = str(root / f"dcp-{names.index(name)}-{r}")
                        times = window(model, opt, width, device, steps,
                                       save=lambda c=c, cid=cid: c.save(dcp_state(model, opt), cid),
                                       before_step=c.before_optimizer_step)
                        held = host_memory()
                        c.finish()
                        shutil.rmtree(cid, ignore_errors=True)
                except Exception as exc:  # noqa: BLE001 - report the contender as failed, keep measuring
                    failed[name] = repr(exc)[:300]
                    print(f"{name} failed: {exc!r}", flush=True)
                    continue
                if VERBOSE[0]:
                    print(f"  {name}: plain {[round(t, 3) for t in base]}, with save {[round(t, 3) for t in times]}")
                inc[name].append(statistics.mean(times))  # minus the plain step time, below
                worst[name].append(max(times))
                # what this contender added (its staging buffers, kept across saves or not), max over rounds
                mem[name] = {k: max(mem.get(name, {}).get(k, 0), held[k] - before[k]) for k in held}
    finally:
        ck.close()
        ckt.close()  # promotes its newest step into root/t, then removes the tier
        for c in dcps.values():
            try:
                c.close()
            except Exception as exc:  # noqa: BLE001
                print(f"closing a DCP contender: {exc!r}", flush=True)
        stop_dcp_process()
        if made_pg:
            import torch.distributed as dist

            dist.destroy_process_group()
    ref = statistics.median(base_all)  # the plain step: every window without a save, all rounds
    inc = {k: [t - ref for t in v] for k, v in inc.items()}
    worst = {k: [t - ref for t in v] for k, v in worst.items()}
    rows.append((f"(c) state {label}", f"step {ref:.3f}s",
                 f"window {steps} steps, the first saves; {rounds} rounds alternating"))
    med = {k: statistics.median(v) for k, v in inc.items() if v}
    for k, v in med.items():
        rows.append((f"(c) {label} step-time increase: {k}", f"mean {v * 1e3:.1f} ms/step",
                     f"worst step +{statistics.median(worst[k]) * 1e3:.0f} ms; host memory held: PSS "
                     f"+{mem[k]['pss'] / 2**30:.2f} GiB, /dev/shm +{mem[k]['shm'] / 2**30:.2f} GiB"))
    for k, v in blocked.items():
        if v:
            rows.append((f"(c) {label} gate wait per save: {k}", f"{statistics.median(v) * 1e3:.1f} ms", ""))
    for k, why in failed.items():
        rows.append((f"(c) {label} {k}", "ERROR", why))
    for k, c in dcps.items():
        if c.zero_overhead:
            rows.append((f"(c) {label} {k}: stager reused across saves", "yes" if c.reusable else "NO",
                         "" if c.reusable else "this torch closes DefaultStager's StateDictStager after each stage "
                         "(KeyError(<class 'type'>) on reuse): a new stager per save"))
    for k, v in med.items():
        if k.startswith("DCP") and "btckpt async" in med and v > 0:
            rows.append((f"(c) {label} btckpt increase / {k}", f"{med['btckpt async'] / v:.2f}x", "target <= 0.5x"))


def restore_path(root: Path, device: torch.device, gib: float, rounds: int) -> None:
    """(e): restore onto ``device`` (module doc), page cache warm, medians of ``rounds``."""
    from btckpt.restore import reader as rd
    from safetensors.torch import load_file

    model, _, _ = make_model(gib, device)
    folder = root / "restore"
    shutil.rmtree(folder, ignore_errors=True)
    with btckpt.Checkpointer(dir=folder, save_rng=False, handle_sigterm=False, async_save=False) as ck:
        ck.save(1, {"model": model})
        ck.save(2, {"model": model})
    want = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    files = sorted((folder / "checkpoint-2").glob("model*.safetensors"))
    nbytes = sum(v.numel() * v.element_size() for v in want.values())
    for p in files:  # warm the page cache: the contenders compare the host->device side
        p.read_bytes()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def c_btckpt() -> None:
        with btckpt.Checkpointer(dir=folder, save_rng=False, handle_sigterm=False) as ck:
            assert ck.restore({"model": model}) == 2

    def c_load_file() -> None:
        sd: dict[str, torch.Tensor] = {}
        for p in files:
            sd.update(load_file(str(p), device=str(device)))
        model.load_state_dict(sd)

    def c_pinned() -> None:
        dev.copy_(host, non_blocking=True)

    contenders = {"btckpt restore (H2D ring)" if device.type == "cuda" else "btckpt restore (one pass, CPU)":
                  c_btckpt, f"load_file(device={device.type!r}) + load_state_dict": c_load_file}
    if device.type == "cuda":
        contenders["plain pinned H2D copy (floor)"] = c_pinned
    times: dict[str, list[float]] = {}
    ring0 = rd.READS["ring_bytes"]
    for r in range(rounds):
        for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            if not name.startswith("plain"):
                got = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                ok = all(torch.equal(got[k], v) for k, v in want.items())
                rows.append((f"(e) {name} restores the state exactly", "ok" if ok else "FAIL", f"round {r}"))
    for name, v in times.items():
        med = statistics.median(v)
        rows.append((f"(e) {name}", f"{med:.3f}s, {nbytes / med / 2**30:.2f} GiB/s",
                     f"median of {rounds}, {nbytes / 2**30:.2f} GiB, page cache warm, {min(v):.3f}..{max(v):.3f}"))
    if device.type == "cuda":
        rows.append(("(e) bytes through the pinned ring", f"{(rd.READS['ring_bytes'] - ring0) / 2**30:.2f} GiB",
                     "every file holding a device destination"))
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", default="4,16", help="state sizes for (c), GiB, comma-separated; (b) uses the first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=int, default=6, help="training steps per measured window (the first saves)")
    ap.add_argument("--dir", default="/tmp/btckpt-gpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64, help="rows per training step (more: more compute to overlap)")
    ap.add_argument("--lightning", action="store_true", help="also check btckpt's Lightning plugin on the device")
    ap.add_argument("--verbose", action="store_true", help="print every window's step times")
    ap.add_argument("--restore-gib", type=float, default=None, help="state size for (e), GiB (default: the first)")
    ap.add_argument("--only-restore", action="store_true", help="run (e) alone")
    args = ap.parse_args()
    BATCH[0] = args.batch
    VERBOSE[0] = args.verbose
    sizes = [float(g) for g in args.gib.split(",")]
    device = torch.device(args.device)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    restore_path(root, device, args.restore_gib if args.restore_gib is not None else sizes[0], max(3, args.rounds))
    print(f"(e) done in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.only_restore:
        sizes = []
    else:
        check_correctness(root, device, budget=None, label="full arena")
        small = 64 << 20 if device.type == "cuda" else 8 << 20
        check_correctness(root, device, budget=small, label=f"{small >> 20} MiB budget (windows)")
        check_correctness(root, device, budget=None, label="local tier (file arena)", tier=True)
        if args.lightning:
            lightning_check(root, device)
        print(f"(a) done in {time.perf_counter() - t0:.0f}s", flush=True)
        if device.type == "cuda":
            bandwidth(device, sizes[0], max(3, args.rounds))
            print(f"(b) done in {time.perf_counter() - t0:.0f}s", flush=True)
        else:
            print("(b) D2H bandwidth: skipped, no CUDA device (pinned vs pageable copies need one)", flush=True)
    for gib in sizes:
        stall(root, device, gib, args.rounds, args.window)
        print(f"(c) {gib:g} GiB done in {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\n| check on {name} | result | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    shutil.rmtree(root, ignore_errors=True)
    if any(r[1] in ("FAIL", "ERROR") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
