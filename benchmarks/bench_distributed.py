"""Per-rank bytes and save time of FSDP2 state (model + AdamW) for world sizes 1, 2, 4 on CPU (gloo):
btckpt (Checkpointer, sync and async) vs DCP ``save`` (FileSystemWriter) and ``async_save``, same state.

    python benchmarks/bench_distributed.py [--worlds 1 2 4] [--rounds 3] [--hidden 1024] [--layers 4]

Contenders alternate within each round. Times are wall seconds on rank 0, between barriers:
``block`` = time the training loop was blocked (save() return / async_save return), ``total`` = until the
checkpoint is durable/committed. Bytes per rank = bytes that rank wrote into the checkpoint folder.

A second table compares writers on the model's FSDP2 state dict alone (DCP's HuggingFaceStorageWriter
cannot write optimizer param groups): btckpt (sync) vs ``dcp.save`` with ``HuggingFaceStorageWriter(
save_distributed=True)``, and with servable full weights as well: btckpt + ``btckpt.consolidate`` on rank 0
(sync), btckpt async with ``consolidate=True`` (background on rank 0; total = until the consolidated folder
is committed) vs the HF writer's ``enable_consolidation=True``.
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


def _rank_bytes(folder: Path, rank: int, kind: str) -> int:
    if kind == "btckpt":
        return sum(f.stat().st_size for f in folder.iterdir() if f"rank{rank:05d}" in f.name)
    if kind == "hf":
        return sum(f.stat().st_size for f in folder.rglob(f"shard-{rank + 1:05d}-*"))
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(f"__{rank}_"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(args: argparse.Namespace) -> None:
    import btckpt
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from btckpt.consolidate import consolidate
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.hidden, args.hidden) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, args.hidden)).sum().backward()
    opt.step()
    root = Path(args.root)
    results: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}

    def timed(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        dist.barrier()
        t0 = time.perf_counter()
        block, folder = fn()
        total = time.perf_counter() - t0
        dist.barrier()
        results.setdefault(f"{name}.block", []).append(block)
        results.setdefault(f"{name}.total", []).append(total)
        kind = "btckpt" if name.startswith(("btckpt", "bt_")) else "hf" if name.startswith("hf") else "dcp"
        nbytes[name] = _rank_bytes(folder, rank, kind)

    ckpts = {m: btckpt.Checkpointer(dir=str(root / f"bt-{m}"), keep_last=1, async_save=m == "async", save_rng=False)
             for m in ("sync", "async")}
    state = {"model": model, "optimizer": opt}
    mck = btckpt.Checkpointer(dir=str(root / "btm"), keep_last=1, async_save=False, save_rng=False)
    cck = btckpt.Checkpointer(dir=str(root / "btc"), keep_last=1, async_save=True, save_rng=False, consolidate=True)

    def model_only(step: int) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        def bt_model():  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            mck.save(step, {"model": model})
            return time.perf_counter() - t0, root / "btm" / f"checkpoint-{step}"

        def bt_model_consol():  # type: ignore[no-untyped-def]
            folder = root / f"btmc-{step}"
            t0 = time.perf_counter()
            ck = btckpt.Checkpointer(dir=str(folder), keep_last=None, async_save=False, save_rng=False)
            ck.save(step, {"model": model})
            ck.close()
            if rank == 0:
                consolidate(folder / f"checkpoint-{step}", folder / "served")
            dist.barrier()
            return time.perf_counter() - t0, folder / f"checkpoint-{step}"

        def bt_async_bg_consol():  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            cck.save(step, {"model": model})
            block = time.perf_counter() - t0
            cck.wait()
            while cck.consolidating:  # rank 0's background consolidation of this step
                time.sleep(0.005)
            dist.barrier()
            return block, root / "btc" / f"checkpoint-{step}"

        def hf(consol: bool):  # type: ignore[no-untyped-def]
            folder = root / f"hf{int(consol)}-{step}"
            msd = get_model_state_dict(model)
            t0 = time.perf_counter()
            dcp.save(msd, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True,
                                                                  enable_consolidation=consol))
            return time.perf_counter() - t0, folder

        timed("bt_model", bt_model)
        timed("hf_writer", lambda: hf(False))
        timed("bt_model+consolidate", bt_model_consol)
        timed("bt_async+bg_consolidate", bt_async_bg_consol)
        timed("hf_writer+consolidation", lambda: hf(True))

    step = 0
    for _ in range(args.rounds):
        step += 1
        for mode, ck in ckpts.items():
            def run_bt(ck=ck, mode=mode, step=step):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                ck.save(step, state)
                block = time.perf_counter() - t0
                ck.wait()
                return block, root / f"bt-{mode}" / f"checkpoint-{step}"

            timed(f"btckpt_{mode}", run_bt)

        def run_dcp(step=step):  # type: ignore[no-untyped-def]
            msd, osd = get_state_dict(model, opt)
            folder = root / f"dcp-{step}"
            t0 = time.perf_counter()
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
            return time.perf_counter() - t0, folder

        def run_dcp_async(step=step):  # type: ignore[no-untyped-def]
            msd, osd = get_state_dict(model, opt)
            folder = root / f"dcpa-{step}"
            t0 = time.perf_counter()
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
            block = time.perf_counter() - t0
            fut.result()
            return block, folder

        timed("dcp_save", run_dcp)
        timed("dcp_async_save", run_dcp_async)
        model_only(step)
    for ck in (*ckpts.values(), mck, cck):
        ck.close()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, nbytes)
    if rank == 0:
        print("RESULT " + json.dumps({"world": world, "times": results, "bytes_per_rank": gathered}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--root", default="")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    state_mb = args.layers * (args.hidden * args.hidden + args.hidden) * 4 * 3 / 1e6
    print(f"FSDP2 state: {args.layers} x Linear({args.hidden}, {args.hidden}) + AdamW = {state_mb:.1f} MB "
          f"(params + 2 moments), {args.rounds} rounds, {os.cpu_count()} CPUs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parents[1] / "integrations") + os.pathsep + env.get("PYTHONPATH", "")
    for world in args.worlds:
        root = Path(tempfile.mkdtemp(prefix="btckpt-bench-dist-", dir=os.environ.get("BENCH_DIR")))
        try:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   f"--master-port={_free_port()}", str(HERE), "--worker",
                   "--root", str(root), "--rounds", str(args.rounds), "--hidden", str(args.hidden),
                   "--layers", str(args.layers)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(f"world {world}: no result")
        res = json.loads(line[7:])
        print(f"\nworld size {world}")
        print(f"  {'contender':<24} {'MB/rank (r0..)':<20} {'block s median [min-max]':<28} total s median [min-max]")
        names = ["btckpt_sync", "btckpt_async", "dcp_save", "dcp_async_save", "", "bt_model", "hf_writer",
                 "bt_model+consolidate", "bt_async+bg_consolidate", "hf_writer+consolidation"]
        for name in names:
            if not name:
                print("  model state only (HF writer comparison):")
                continue
            per_rank = " ".join(f"{b[name] / 1e6:.1f}" for b in res["bytes_per_rank"])
            cells = []
            for part in ("block", "total"):
                v = res["times"][f"{name}.{part}"]
                cells.append(f"{statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]")
            print(f"  {name:<24} {per_rank:<20} {cells[0]:<28} {cells[1]}")


if __name__ == "__main__":
    main()
