"""Per-rank bytes and save time of FSDP2 state (model + AdamW) for world sizes 1, 2, 4 on CPU (gloo):
btckpt (Checkpointer, sync and async) vs DCP ``save`` (FileSystemWriter) and ``async_save``, same state.

    python benchmarks/bench_distributed.py [--worlds 1 2 4] [--rounds 3] [--hidden 1024] [--layers 4]

Contenders alternate within each round. Times are wall seconds on rank 0, between barriers:
``block`` = time the training loop was blocked (save() return / async_save return), ``total`` = until the
checkpoint is durable/committed. Bytes per rank = bytes that rank wrote into the checkpoint folder.
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
        kind = "btckpt" if name.startswith("btckpt") else "dcp"
        nbytes[name] = _rank_bytes(folder, rank, kind)

    ckpts = {m: btckpt.Checkpointer(dir=str(root / f"bt-{m}"), keep_last=1, async_save=m == "async", save_rng=False)
             for m in ("sync", "async")}
    state = {"model": model, "optimizer": opt}
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
    for ck in ckpts.values():
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
        print(f"  {'contender':<16} {'MB/rank (r0..)':<28} {'block s median [min-max]':<28} total s median [min-max]")
        for name in ("btckpt_sync", "btckpt_async", "dcp_save", "dcp_async_save"):
            per_rank = " ".join(f"{b[name] / 1e6:.1f}" for b in res["bytes_per_rank"])
            cells = []
            for part in ("block", "total"):
                v = res["times"][f"{name}.{part}"]
                cells.append(f"{statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]")
            print(f"  {name:<16} {per_rank:<28} {cells[0]:<28} {cells[1]}")


if __name__ == "__main__":
    main()
