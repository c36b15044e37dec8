"""Restart time: from ``Checkpointer(...)`` to the first training step, page cache dropped.

    python benchmarks/bench_restart.py --sizes 1,4 --rounds 3 --dir /var/tmp/btckpt-restart [--s3]
    python benchmarks/bench_restart.py --quick          # smoke: 160 MiB, 1 round, s3 included

Contenders, in one run, alternating order round by round, each after the page cache was dropped
(``/proc/sys/vm/drop_caches`` as root, else ``posix_fadvise(DONTNEED)`` per file, checked with ``mincore``):

- ``btckpt restore``: ``Checkpointer(dir=...)`` + ``restore({"model": m})`` (checksums verified, everything
  verified before anything is applied) + one step that reads a parameter;
- ``load_file + load_state_dict``: safetensors' loader on the same bytes (no checksums);
- ``DCP load``: ``torch.distributed.checkpoint.load`` of a DCP checkpoint of the same state;
- ``dd``: ``dd if=<file> of=/dev/null bs=16M`` of every file btckpt reads (the disk's raw read speed).
- with ``--s3``: ``btckpt restore`` from ``s3://`` (moto server on 127.0.0.1; download + verify + load, the
  download cache emptied before each round) vs the download alone (``fs.get`` of the same files).

Prints per contender the median time, GB/s, and btckpt's ratio to dd's speed (goal >= 0.9x), plus the bytes
btckpt read (``/proc/self/io`` ``rchar``) per checkpoint byte (1.0 = each byte read once).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import btckpt
import torch
from _common import StateModule, drop_file_cache, io_counters, moto_s3, transformer_like_state
from safetensors.torch import load_file

warnings.filterwarnings("ignore")


def first_step(model: torch.nn.Module) -> float:
    """The first training step after the restart: here, one read of every parameter's first element."""
    return float(sum(p.view(-1)[0] for p in model.parameters()))


def fresh_model(tensors: dict[str, torch.Tensor]) -> StateModule:
    """The restart's target model (built before the timed part, as a training script does)."""
    return StateModule({k: torch.zeros_like(v) for k, v in tensors.items()})


def add_s3(contenders: dict[str, tuple[Callable[[], float], list[Path]]], root: Path, ck_dir: Path,
           tensors: dict[str, torch.Tensor], check: Callable[[torch.nn.Module, str], None]) -> None:
    """Upload the checkpoint to ``s3://restart/run`` (moto) and add the two s3 contenders: btckpt's restore
    from the URL (its download cache emptied each time) and the download alone (``fs.get`` of every file)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(ck_dir) + "/", "restart/run/checkpoint-1/", recursive=True)
    fs.invalidate_cache()
    cache = root / "s3-cache"
    os.environ["BTCKPT_CACHE"] = str(cache)

    def c_s3() -> float:
        shutil.rmtree(cache, ignore_errors=True)
        model = fresh_model(tensors)
        t0 = time.perf_counter()
        with btckpt.Checkpointer(dir=root / "s3-own", load_dir="s3://restart/run", save_rng=False,
                                 handle_sigterm=False) as ck:
            step = ck.restore({"model": model})
            first_step(model)
            dt = time.perf_counter() - t0
        assert step == 1, step
        check(model, "btckpt s3")
        return dt

    def c_s3_get() -> float:
        out = root / "s3-get"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        fs.get("restart/run/checkpoint-1/", str(out) + "/", recursive=True)
        return time.perf_counter() - t0

    contenders["btckpt restore from s3:// (moto)"] = (c_s3, [])
    contenders["s3 download only (fs.get)"] = (c_s3_get, [])


def run_size(gib: float, rounds: int, root: Path, with_s3: bool) -> list[str]:
    nbytes = int(gib * 2**30)
    tensors = transformer_like_state(nbytes)
    src = StateModule(tensors)
    own = root / "own"
    btckpt.save(own / "checkpoint-1", {"model": src}, save_rng=False)
    ck_dir = own / "checkpoint-1"
    files = sorted(p for p in ck_dir.iterdir() if p.is_file())
    st_file = ck_dir / "model.safetensors"
    dcp_dir = root / "dcp"
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": src.state_dict()}, checkpoint_id=str(dcp_dir), no_dist=True)
    dcp_files = sorted(p for p in dcp_dir.rglob("*") if p.is_file())
    want = {k: v.clone() for k, v in src.state_dict().items()}
    del src
    total = sum(p.stat().st_size for p in files)

    times: dict[str, list[float]] = {}
    rchar: list[float] = []
    how = ""

    def check(model: torch.nn.Module, label: str) -> None:
        got = model.state_dict()
        if any(not torch.equal(got[k], v) for k, v in want.items()):
            raise SystemExit(f"{label}: the restored state differs from the saved one")

    def c_btckpt() -> float:
        model = fresh_model(tensors)
        before = io_counters()["rchar"]
        t0 = time.perf_counter()
        with btckpt.Checkpointer(dir=own, save_rng=False, handle_sigterm=False) as ck:
            step = ck.restore({"model": model})
            first_step(model)
            dt = time.perf_counter() - t0
        rchar.append((io_counters()["rchar"] - before) / total)
        assert step == 1, step
        check(model, "btckpt")
        return dt

    def c_safetensors() -> float:
        model = fresh_model(tensors)
        t0 = time.perf_counter()
        model.load_state_dict(load_file(str(st_file)))
        first_step(model)
        dt = time.perf_counter() - t0
        check(model, "safetensors")
        return dt

    def c_dcp() -> float:
        model = fresh_model(tensors)
        t0 = time.perf_counter()
        sd = {"model": model.state_dict()}
        dcp.load(sd, checkpoint_id=str(dcp_dir), no_dist=True)
        model.load_state_dict(sd["model"])
        first_step(model)
        dt = time.perf_counter() - t0
        check(model, "DCP")
        return dt

    def c_dd() -> float:
        t0 = time.perf_counter()
        for p in files:
            subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=16M", "status=none"], check=True)
        return time.perf_counter() - t0

    contenders: dict[str, tuple[Callable[[], float], list[Path]]] = {
        "btckpt restore (checksums)": (c_btckpt, files),
        "load_file + load_state_dict": (c_safetensors, files),
        "DCP load": (c_dcp, dcp_files),
        "dd (raw read)": (c_dd, files),
    }
    with contextlib.ExitStack() as stack:
        if with_s3:
            stack.enter_context(moto_s3("restart"))
            add_s3(contenders, root, ck_dir, tensors, check)
        for r in range(rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                fn, paths = contenders[name]
                how = drop_file_cache(paths or files)
                times.setdefault(name, []).append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    dd = med["dd (raw read)"]
    lines = [f"state {total / 2**30:.2f} GiB in {len(files)} files; page cache: {how}; rounds {rounds}",
             "| contender | median | GB/s | speed / dd's | min..max |", "|---|---|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.3f}s | {total / v / 1e9:.2f} | {dd / v:.2f}x | "
                     f"{min(times[k]):.3f}..{max(times[k]):.3f} |")
    lines.append(f"btckpt restore read {statistics.median(rchar):.3f} bytes per checkpoint byte (rchar); goal: "
                 f"speed / dd's >= 0.9x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="state sizes in GiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp folder on /var/tmp)")
    ap.add_argument("--s3", action="store_true", help="also restore from s3:// (moto server on 127.0.0.1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 160 MiB, 1 round, s3 included")
    args = ap.parse_args()
    sizes = [160 / 1024] if args.quick else [float(s) for s in args.sizes.split(",")]
    rounds = 1 if args.quick else args.rounds
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="btckpt-restart-", dir="/var/tmp"))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, dir {base}",
          flush=True)
    try:
        for gib in sizes:
            root = base / f"{gib:g}gib"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            for line in run_size(gib, rounds, root, args.s3 or args.quick):
                print(line, flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
