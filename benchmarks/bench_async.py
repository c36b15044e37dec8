"""Stall per save (btckpt async vs sync vs the peers), training throughput loss, and host memory.

    python benchmarks/bench_async.py --rounds 3 --dir /tmp/btckpt-bench-async
    python benchmarks/bench_async.py --parts loop,cpu --loop-mb 400 --every 4 --threads 2 --rounds 5

State: a ~1 GiB training state of many tensors (five 4096x4096 linears, biases and 64 small LayerNorms,
plus Adam's two moments). Stall = time the save call blocks + time btckpt's step gate holds the next
``optimizer.step()``. Contenders alternate round by round; medians and spread are printed.

``loop`` (issue 13 section 1): a CPU training loop over a ``--loop-mb`` model + AdamW state with torch on
``--threads`` threads (default: every core), a save every ``--every`` steps; contenders no save, btckpt
async, btckpt sync, DCP ``async_save`` (default config) and two floors, their order rotated round by round
(each, the baseline too, at every place over ``len(contenders)`` rounds). Per-save
loss = (loop time with saves - loop time without) / saves, each loop ending when its last save is durable;
the steady loss leaves that final wait out (what a long run pays per save), and each round prints where
the seconds went (training steps slowed by the background work, the save calls, the final wait). The
floors bound any background save from below: ``floor copy`` copies the state into a reused buffer on a
thread (no gate, no write), ``floor copy+write`` also writes that buffer to one file and fsyncs it.
``cpu``: CPU seconds per saved GiB of each stage (arena copy, xxh3 checksum, write, fsync) and of whole
saves (btckpt sync, btckpt async, DCP async_save), from the process's CPU clock.
All figures come from public APIs (``Checkpointer.stats`` for the step gate).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import btckpt  # noqa: E402
from _common import fsync_path, summary  # noqa: E402

warnings.filterwarnings("ignore")


class Net(torch.nn.Module):
    def __init__(self, width: int = 4096, depth: int = 5, norms: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(256) for _ in range(norms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        y = x[:, :256]
        for n in self.norms:
            y = n(y)
        return x.mean() + y.mean()


def build(width: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step(model, opt, width)  # materialise Adam's moments
    return model, opt


def step(model: Net, opt: torch.optim.Optimizer, width: int) -> None:
    loss = model(torch.randn(16, width))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def state_bytes(model: Net, opt: torch.optim.Optimizer) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
    return n


def flat_tensors(model: Net, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"optim.{i}.{k}"] = v
    return out


class Contender:
    """One way to save; ``save`` returns the seconds it stalled training, ``settle`` waits (untimed)."""

    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root / self.name.replace(" ", "_").replace("+", "_")
        self.root.mkdir(parents=True)
        self.n = 0

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        raise NotImplementedError

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass

    def gate_wait(self) -> float:
        return 0.0


class BtckptAsync(Contender):
    name = "btckpt async"
    sync = False

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ck = btckpt.Checkpointer(dir=self.root, keep_last=1, async_save=not self.sync, save_rng=False,
                                      handle_sigterm=False)

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        self.n += 1
        t0 = time.perf_counter()
        self.ck.save(self.n, {"model": model, "optimizer": opt})
        return time.perf_counter() - t0

    def gate_wait(self) -> float:
        return self.ck.stats.gate_wait_s

    def settle(self) -> None:
        self.ck.wait()

    def close(self) -> None:
        self.ck.close()


class BtckptSync(BtckptAsync):
    name = "btckpt sync"
    sync = True


class TorchSave(Contender):
    name = "torch.save+fsync"

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        p = self.root / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, p)
        fsync_path(p)
        return time.perf_counter() - t0


class SaveFile(Contender):
    name = "save_file+fsync"

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        p = self.root / "ckpt.safetensors"
        save_file(flat_tensors(model, opt), p)
        fsync_path(p)
        return time.perf_counter() - t0


class DcpThread(Contender):
    name = "DCP async_save (thread)"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fut: Any = None

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        import torch.distributed.checkpoint as dcp

        self.n += 1
        t0 = time.perf_counter()
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        self.fut = dcp.async_save(sd, checkpoint_id=str(self.root / f"step-{self.n}"), no_dist=True)
        return time.perf_counter() - t0

    def settle(self) -> None:
        if self.fut is not None:
            self.fut.result()
            shutil.rmtree(self.root / f"step-{self.n}", ignore_errors=True)


class DcpProcess(Contender):
    name = "DCP async_save (process, cached stager)"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)
        cuda = torch.cuda.is_available()
        # torchtitan's "async_with_pinned_mem": pinned + shared memory, cached staging buffers
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=True,
                                                   use_async_staging=cuda, use_non_blocking_copy=cuda))
        self.resp: Any = None

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.n += 1
        t0 = time.perf_counter()
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        self.resp = dcp.async_save(sd, checkpoint_id=str(self.root / f"step-{self.n}"),
                                   async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=self.stager)
        staged = getattr(self.resp, "staging_completion", None)
        if staged is not None:  # the step may not run before staging finished
            staged.result()
        return time.perf_counter() - t0

    def settle(self) -> None:
        fut = getattr(self.resp, "upload_completion", self.resp)
        if fut is not None:
            fut.result()
            shutil.rmtree(self.root / f"step-{self.n}", ignore_errors=True)

    def close(self) -> None:
        self.stager.close()


class LightningAsync(Contender):
    name = "Lightning AsyncCheckpointIO"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        self.io = AsyncCheckpointIO(TorchCheckpointIO())

    def save(self, model: Net, opt: torch.optim.Optimizer) -> float:
        self.n += 1
        t0 = time.perf_counter()
        self.io.save_checkpoint({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]},
                                self.root / f"step-{self.n}.ckpt")
        return time.perf_counter() - t0

    def settle(self) -> None:
        self.io.teardown()
        for p in self.root.glob("*.ckpt"):
            p.unlink()


ALL = [BtckptAsync, BtckptSync, TorchSave, SaveFile, DcpThread, DcpProcess, LightningAsync]


def bench_stall(root: Path, rounds: int, width: int) -> dict[str, list[float]]:
    model, opt = build(width)
    print(f"state: {state_bytes(model, opt) / 2**30:.2f} GiB in {len(flat_tensors(model, opt))} tensors", flush=True)
    contenders: list[Contender] = []
    for cls in ALL:
        try:
            contenders.append(cls(root))
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"skipping {cls.name}: {type(exc).__name__}: {exc}")
    stalls: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for c in order:
            g0 = c.gate_wait()
            try:
                blocked = c.save(model, opt)
            except Exception as exc:  # noqa: BLE001
                print(f"  {c.name} failed: {type(exc).__name__}: {exc}")
                continue
            step(model, opt, width)  # training goes on; btckpt's gate may hold this step's optimizer.step
            stalls[c.name].append(blocked + c.gate_wait() - g0)
            c.settle()
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in stalls.items() if v), flush=True)
    for c in contenders:
        c.close()
    return stalls


def bench_throughput(root: Path, rounds: int, width: int, steps: int, every: int) -> dict[str, list[float]]:
    model, opt = build(width)
    out: dict[str, list[float]] = {"no saves": [], "btckpt async": [], "DCP async_save (thread)": []}
    for r in range(rounds):
        names = list(out) if r % 2 == 0 else list(reversed(out))
        for name in names:
            c: Contender | None = None
            if name == "btckpt async":
                c = BtckptAsync(root / f"tp{r}")
            elif name.startswith("DCP"):
                c = DcpThread(root / f"tp{r}")
            t0 = time.perf_counter()
            for i in range(1, steps + 1):
                step(model, opt, width)
                if c is not None and i % every == 0:
                    c.settle() if isinstance(c, DcpThread) else None  # DCP: one save in flight at a time
                    c.save(model, opt)
            dt = (time.perf_counter() - t0) / steps
            if c is not None:
                c.settle()
                c.close()
            out[name].append(dt)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s/step" for k, v in out.items() if v), flush=True)
    return out


def bench_memory(root: Path, saves: int, width: int) -> tuple[int, int, list[int]]:
    """Peak RSS of the training loop with a save every step, minus the peak of the same loop without saves
    (Adam's temporaries and the gradients come and go in both)."""
    import psutil

    model, opt = build(width)
    nbytes = state_bytes(model, opt)
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(10):
        step(model, opt, width)
    base = peak[0]
    peaks: list[int] = []
    with btckpt.Checkpointer(dir=root / "mem", keep_last=1, save_rng=False, handle_sigterm=False) as ck:
        for i in range(1, saves + 1):
            ck.save(i, {"model": model, "optimizer": opt})
            step(model, opt, width)
            ck.wait()
            peaks.append(peak[0] - base)
    stop.set()
    th.join()
    return nbytes, base, peaks


class LoopNet(torch.nn.Module):
    """Linear layers of ``width``; ``depth`` chosen so that weights + AdamW's two moments are ``mb`` MB."""

    def __init__(self, mb: int, width: int = 2048) -> None:
        super().__init__()
        depth = max(1, round(mb * 1e6 / 12 / (width * width + width)))
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layers(x)).pow(2).mean()


class _Floor:
    """The least any background save does (a lower bound, not a checkpoint: no step gate, so the copy may race
    ``optimizer.step()``; no checksum, no manifest): one thread copies every tensor into a buffer allocated and
    touched once, and with ``write`` writes the buffer to one file in 32 MiB pieces and fsyncs it (the previous
    file removed). One save in flight; ``save`` waits for the one before."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: Path, *, write: bool) -> None:
        self.sources = [t for t in flat_tensors(model, opt).values() if t.numel()]  # type: ignore[arg-type]
        total = sum(t.numel() * t.element_size() for t in self.sources)
        self.buf = torch.zeros(total, dtype=torch.uint8)
        self.views, at = [], 0
        for t in self.sources:
            n = t.numel() * t.element_size()
            self.views.append(self.buf[at:at + n].view(t.dtype).view(t.shape))
            at += n
        self.root, self.write, self.n = root, write, 0
        self.thread: threading.Thread | None = None

    def save(self) -> None:
        self.settle()
        self.n += 1
        self.thread = threading.Thread(target=self._run, args=(self.n,), daemon=True)
        self.thread.start()

    def _run(self, n: int) -> None:
        torch._foreach_copy_(self.views, self.sources)
        if not self.write:
            return
        path = self.root / f"floor-{n}.bin"
        mv = memoryview(self.buf.numpy())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for at in range(0, len(mv), 32 << 20):
                os.write(fd, mv[at:at + (32 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        (self.root / f"floor-{n - 1}.bin").unlink(missing_ok=True)

    def settle(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def _loop_once(kind: str, root: Path, mb: int, batch: int, every: int,
               saves: int) -> tuple[float, int, dict[str, float]]:
    """One loop of ``every * (saves + 1)`` steps with ``saves`` saves; returns (seconds, saves, parts): the
    seconds in training steps (``steps``), in the save calls (``save``: snapshot and any back-pressure wait for
    the previous save; DCP: ``state_dict()``, the wait for the previous future and ``async_save``), in the
    final wait for the last save (``final``: ``close()`` / the last future); btckpt's step gate (``gate``, part
    of ``steps``) and the process's CPU seconds, every thread (``cpu``)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = LoopNet(mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, model.width)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).backward()
        opt.step()

    train_step()  # AdamW's moments exist before the clock starts
    ck = None
    if kind.startswith("btckpt"):
        ck = btckpt.Checkpointer(dir=root / kind.replace(" ", "_"), keep_last=1, save_rng=False,
                                 async_save=kind == "btckpt async", handle_sigterm=False)
    floor = _Floor(model, opt, root, write=kind == "floor copy+write") if kind.startswith("floor") else None
    fut: Any = None
    n = 0
    parts = {"steps": 0.0, "save": 0.0, "final": 0.0, "gate": 0.0, "cpu": 0.0}
    clock = time.perf_counter
    c0 = time.process_time()  # every thread of the process: training, the copy thread, the writer
    t0 = clock()
    for i in range(1, every * (saves + 1) + 1):
        ts = clock()
        train_step()
        t1 = clock()
        parts["steps"] += t1 - ts
        if kind == "no save" or i % every or n >= saves:
            continue
        n += 1
        state = {"model": model, "optimizer": opt}
        if ck is not None:
            ck.save(i, state)
        elif floor is not None:
            floor.save()
        else:
            if fut is not None:
                fut.result()  # one DCP save in flight at a time
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            fut = dcp.async_save(sd, checkpoint_id=str(root / f"dcp-{i}"), no_dist=True)
        parts["save"] += clock() - t1
    tf = clock()
    if ck is not None:
        parts["gate"] = ck.stats.gate_wait_s  # optimizer.step() held for the snapshot's copies (in "steps")
        ck.close()
    if fut is not None:
        fut.result()
    if floor is not None:
        floor.settle()
    dt = clock() - t0
    parts["final"] = clock() - tf
    parts["cpu"] = time.process_time() - c0
    for p in root.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    return dt, n, parts


def bench_loop(root: Path, rounds: int, mb: int, batch: int, every: int,
               saves: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-save loss (seconds) of each contender, one value per round (contenders alternate): the whole loop's
    (the final wait for the last save included), and the steady one (the same loop up to its last step: the
    final wait left out, what a long run pays per save). Prints where each contender's seconds went."""
    kinds = ["no save", "btckpt async", "btckpt sync", "DCP async_save", "floor copy", "floor copy+write"]
    loss: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    steady: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    (root / "loop").mkdir(exist_ok=True)
    for r in range(rounds):
        # rotated: every contender, the no-save baseline included, runs at every place in the round's order
        # (with the baseline always first, its place alone moved every loss by up to ~700 ms per save here)
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        times = {k: _loop_once(k, root / "loop", mb, batch, every, saves) for k in order}
        base, _, base_parts = times["no save"]
        for k in kinds[1:]:
            dt, n, parts = times[k]
            loss[k].append((dt - base) / max(1, n))
            steady[k].append((dt - parts["final"] - base) / max(1, n))
        place = order.index("no save") + 1
        print(f"round {r + 1} (no save {base:.2f}s, run {place} of {len(order)}): "
              + ", ".join(f"{k} {v[-1] * 1e3:+.0f} ms/save" for k, v in loss.items()), flush=True)
        for k in kinds[1:]:
            dt, n, parts = times[k]
            print(f"    {k}: per save: steps slower by {(parts['steps'] - base_parts['steps']) / n * 1e3:+.0f} ms "
                  f"(step gate {parts['gate'] / n * 1e3:.0f} ms of it), in save() {parts['save'] / n * 1e3:.0f} ms, "
                  f"extra CPU {(parts['cpu'] - base_parts['cpu']) / n * 1e3:+.0f} ms; final wait "
                  f"{parts['final'] * 1e3:.0f} ms (steady {steady[k][-1] * 1e3:+.0f} ms/save)", flush=True)
    return loss, steady


def bench_cpu(root: Path, mb: int) -> dict[str, float]:
    """CPU seconds (process clock) per saved GiB, per stage and per whole save."""
    import torch.distributed.checkpoint as dcp
    import xxhash

    torch.manual_seed(0)
    model = LoopNet(mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, model.width)).backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    nbytes = state_bytes(model, opt)  # type: ignore[arg-type]
    gib = nbytes / 2**30
    flat = flat_tensors(model, opt)  # type: ignore[arg-type]
    out: dict[str, float] = {}

    def cpu(name: str, fn: Any) -> None:
        c0 = time.process_time()
        fn()
        out[name] = (time.process_time() - c0) / gib

    arena = torch.empty(nbytes, dtype=torch.uint8)
    views, pos = [], 0
    for t in flat.values():
        nb = t.numel() * t.element_size()
        views.append(arena[pos:pos + nb].view(t.dtype).view(t.shape))
        pos += nb
    cpu("arena copy (foreach)", lambda: torch._foreach_copy_(views, list(flat.values())))
    mv = memoryview(arena.numpy())
    cpu("xxh3 checksum", lambda: xxhash.xxh3_64(mv).hexdigest())
    p = root / "cpu.bin"

    def write() -> None:
        with open(p, "wb") as f:
            chunk = 32 << 20
            for off in range(0, len(mv), chunk):
                f.write(mv[off:off + chunk])
    cpu("write (page cache)", write)
    cpu("fsync", lambda: fsync_path(p))
    p.unlink()
    cpu("btckpt sync save (all)", lambda: btckpt.save(root / "cpu-sync", state, save_rng=False))
    shutil.rmtree(root / "cpu-sync")
    with btckpt.Checkpointer(dir=root / "cpu-async", keep_last=1, save_rng=False, handle_sigterm=False) as ck:
        ck.save(1, state)  # the first save allocates and plans; measure a steady one
        ck.wait()
        cpu("btckpt async save + commit (all)", lambda: (ck.save(2, state), ck.wait()))
    shutil.rmtree(root / "cpu-async")

    def dcp_save() -> None:
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        dcp.async_save(sd, checkpoint_id=str(root / "cpu-dcp"), no_dist=True).result()
    cpu("DCP async_save + result (all)", dcp_save)
    shutil.rmtree(root / "cpu-dcp", ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/btckpt-bench-async")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--mem-saves", type=int, default=50)
    ap.add_argument("--parts", default="stall,throughput,memory,loop,cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--loop-mb", type=int, default=400, help="loop/cpu: MB of model + AdamW state")
    ap.add_argument("--loop-batch", type=int, default=256)
    ap.add_argument("--loop-saves", type=int, default=4, help="loop: saves per loop")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    parts = set(args.parts.split(","))
    torch.set_num_threads(max(1, args.threads))
    if "stall" in parts:
        stalls = bench_stall(root, args.rounds, args.width)
        print("\n| contender | stall per save (save() + step gate) |\n|---|---|")
        for k, v in stalls.items():
            if v:
                print(f"| {k} | {summary(v)} |")
        med = {k: statistics.median(v) for k, v in stalls.items() if v}
        a = med.get("btckpt async")
        if a is not None:
            for peer in ("torch.save+fsync", "DCP async_save (thread)", "DCP async_save (process, cached stager)"):
                if peer in med:
                    print(f"  btckpt async stall / {peer} = {a / med[peer]:.3f}x")
    if "throughput" in parts:
        tp = bench_throughput(root, max(2, args.rounds - 1), args.width, args.steps, args.every)
        base = statistics.median(tp["no saves"])
        print(f"\n| training loop (save every {args.every} steps) | s/step | throughput loss vs no saves |")
        print("|---|---|---|")
        for k, v in tp.items():
            m = statistics.median(v)
            print(f"| {k} | {summary(v)} | {100 * (m - base) / base:+.1f}% |")
    if "memory" in parts:
        nbytes, base, peaks = bench_memory(root, args.mem_saves, args.width)
        print(f"\nhost memory over {len(peaks)} saves: state {nbytes / 2**30:.2f} GiB; peak RSS of the loop without "
              f"saves {base / 2**30:.2f} GiB; peak extra RSS with a save every step "
              f"{max(peaks) / 2**30:.2f} GiB = {max(peaks) / nbytes:.3f}x state; after save 1 "
              f"{peaks[0] / nbytes:.3f}x, after save {len(peaks)} {peaks[-1] / nbytes:.3f}x (growth "
              f"{(peaks[-1] - peaks[0]) / 2**20:.1f} MiB)")
    if "loop" in parts:
        loss, steady = bench_loop(root, args.rounds, args.loop_mb, args.loop_batch, args.every, args.loop_saves)
        for title, table in (("loss per save, ms (final wait included)", loss),
                             ("steady loss per save, ms (final wait left out)", steady)):
            print(f"\n| CPU loop ({args.loop_mb} MB state, {args.threads} threads, save every {args.every} steps) "
                  f"| {title} |\n|---|---|")
            for k, v in table.items():
                ms = [x * 1e3 for x in v]
                print(f"| {k} | median {statistics.median(ms):+.0f} (min {min(ms):+.0f}, max {max(ms):+.0f}, "
                      f"n={len(ms)}) |")
            med = {k: statistics.median(v) for k, v in table.items()}
            for peer in ("DCP async_save", "btckpt sync", "floor copy", "floor copy+write"):
                if med[peer] > 0:
                    print(f"  btckpt async / {peer} = {med['btckpt async'] / med[peer]:.2f}x")
                else:
                    print(f"  btckpt async / {peer}: {peer} lost nothing measurable ({med[peer] * 1e3:+.0f} ms)")
    if "cpu" in parts:
        cost = bench_cpu(root, args.loop_mb)
        print("\n| stage | CPU s per GiB |\n|---|---|")
        for k, v in cost.items():
            print(f"| {k} | {v:.3f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
