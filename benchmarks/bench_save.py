"""Save and restore throughput of btckpt vs dd, torch.save and safetensors, on a 1 GiB state.

    python benchmarks/bench_save.py --gib 1 --rounds 8 --dir /tmp/btckpt-bench

Contenders alternate round by round on the same disk, the order rotating so each takes every
position; medians and spread are printed, and ratios are computed from medians (and from the best
round of each) of the same run. Reads drop the page cache first (root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import btckpt  # noqa: E402
from _common import StateModule, dd_write, drop_caches, fsync_path, summary, transformer_like_state  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/btckpt-bench")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between contenders")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    module = StateModule(transformer_like_state(int(args.gib * (1 << 30))))
    state = {k: v.detach() for k, v in module.state_dict().items()}
    target = StateModule({k.removeprefix("p."): torch.zeros_like(v) for k, v in state.items()})
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"state: {len(state)} tensors, {nbytes / 2**30:.2f} GiB; torch {torch.__version__}")

    ckpt = btckpt.Checkpointer(dir=root / "btckpt", async_save=False, keep_last=None, save_rng=False,
                               handle_sigterm=False)
    step = [0]

    def w_btckpt() -> Path:
        step[0] += 1
        ckpt.save(step[0], {"model": module})
        return root / "btckpt" / f"checkpoint-{step[0]}"

    def w_dd() -> Path:
        p = root / "dd.bin"
        dd_write(p, nbytes)
        return p

    def w_torch() -> Path:
        p = root / "torch.pt"
        torch.save(state, p)
        fsync_path(p)
        return p

    def w_st() -> Path:
        p = root / "st.safetensors"
        save_file(state, p)
        fsync_path(p)
        return p

    writers = {"btckpt": w_btckpt, "dd conv=fsync": w_dd, "torch.save+fsync": w_torch, "save_file+fsync": w_st}
    wt: dict[str, list[float]] = {k: [] for k in writers}
    rt: dict[str, list[float]] = {"btckpt.load": [], "load_file": []}
    last: dict[str, Path] = {}
    for r in range(args.rounds):
        names = list(writers)
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: each contender takes each position
        for name in order:
            os.sync()
            time.sleep(args.pause)  # let the disk settle: this disk slows down after a few GiB in a row
            if name in last:  # rewrite onto fresh files each round, like a new checkpoint would
                old = last.pop(name)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            t0 = time.perf_counter()
            last[name] = writers[name]()
            wt[name].append(time.perf_counter() - t0)
        for name in (["btckpt.load", "load_file"] if r % 2 == 0 else ["load_file", "btckpt.load"]):
            drop_caches()
            t0 = time.perf_counter()
            if name == "load_file":  # restore = the bytes end up in the model's parameters
                target.load_state_dict(load_file(last["save_file+fsync"]))
            else:
                btckpt.load(last["btckpt"], {"model": target}, load_rng=False)
            rt[name].append(time.perf_counter() - t0)
            for k, v in target.state_dict().items():
                assert torch.equal(v, state[k]), k
                v.zero_()
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in {**wt, **rt}.items()), flush=True)
    ckpt.close()
    import xxhash

    blob = memoryview(torch.cat([t.reshape(-1) for t in state.values()]).view(torch.uint8).numpy())
    hash_t = []
    for _ in range(3):
        t0 = time.perf_counter()
        h = xxhash.xxh3_64()
        for off in range(0, len(blob), 32 << 20):
            h.update(blob[off:off + (32 << 20)])
        hash_t.append(time.perf_counter() - t0)
    cached = drop_caches()
    print(f"\npage cache dropped before reads: {cached}")
    gib = nbytes / 2**30
    print("\n| contender | time | GiB/s (median) |\n|---|---|---|")
    for k, v in {**wt, **rt}.items():
        print(f"| {k} | {summary(v)} | {gib / statistics.median(v):.2f} |")
    med = {k: statistics.median(v) for k, v in {**wt, **rt}.items()}
    print("\nratios (throughput, from medians of this run):")
    print(f"  btckpt save / dd conv=fsync      = {med['dd conv=fsync'] / med['btckpt']:.2f}x   (target >= 0.9)")
    print(f"  btckpt save / torch.save+fsync   = {med['torch.save+fsync'] / med['btckpt']:.2f}x")
    print(f"  btckpt save / save_file+fsync    = {med['save_file+fsync'] / med['btckpt']:.2f}x   (target >= 1.2)")
    print(f"  btckpt.load / load_file          = {med['load_file'] / med['btckpt.load']:.2f}x   (target >= 1.0)")
    mn = {k: min(v) for k, v in {**wt, **rt}.items()}
    print("ratios from the best round of each (this disk is bimodal: the same write takes ~0.8 s or ~3 s):")
    print(f"  btckpt save / dd conv=fsync      = {mn['dd conv=fsync'] / mn['btckpt']:.2f}x")
    print(f"  btckpt save / torch.save+fsync   = {mn['torch.save+fsync'] / mn['btckpt']:.2f}x")
    print(f"  btckpt save / save_file+fsync    = {mn['save_file+fsync'] / mn['btckpt']:.2f}x")
    print(f"  btckpt.load / load_file          = {mn['load_file'] / mn['btckpt.load']:.2f}x")
    hm = statistics.median(hash_t)
    print(f"  checksum (xxh3-64) of the state: {hm:.3f}s = {100 * hm / med['btckpt']:.1f}% of btckpt's save time "
          "(target < 10%)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
