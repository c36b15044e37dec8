"""The node-local tier (btckpt.tiers): restart time from the tier vs from disk, and the loop cost of tier saves.

    python benchmarks/bench_tiers.py --mb 1024,4096 --rounds 3 --dir /var/tmp/btckpt-tiers
    python benchmarks/bench_tiers.py --quick            # smoke: 160 MiB, 1 round, a small loop

``restart``: one checkpoint of ``--mb`` MiB (a transformer-like state) committed in the durable dir (``--dir``)
and in the local tier (``--tier-base``, default ``/dev/shm``). Contenders, alternating order round by round:

- ``tier``: ``Checkpointer(local_every_steps=..., local_tier_dir=...)`` + ``restore({"model": m})`` (the resume
  policy picks the tier's copy of the newest step) + one step that reads a parameter;
- ``disk``: the same restore with the tier gone (the node was replaced), page cache dropped first
  (``drop_caches`` as root, else ``fadvise DONTNEED`` per file, checked with ``mincore``).

``loop``: the CPU training loop of ``bench_async.py`` (``--loop-width``, Adam) for ``--steps`` steps, with no
saves, a tier save every ``--every`` steps, and a disk save every ``--every`` steps; prints each loop's time
and the cost vs no saves (goal: tier saves every 10 steps <= 2%). Each loop ends when its saves are durable
in their tier (``wait()``), the tier's last promotion excluded (it runs in the background).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import btckpt  # noqa: E402
from _common import StateModule, drop_file_cache, transformer_like_state  # noqa: E402
from bench_async import build, step  # noqa: E402

warnings.filterwarnings("ignore")


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def restart(mb: int, rounds: int, disk: Path, tier_base: Path) -> dict[str, list[float]]:
    """Seconds from ``Checkpointer(...)`` to the first step, restoring from the tier and from disk."""
    tensors = transformer_like_state(mb << 20)
    durable, tier, pristine = disk / f"restart-{mb}", tier_base / f"tier-{mb}", tier_base / f"tier-{mb}-pristine"
    for p in (durable, tier, pristine):
        shutil.rmtree(p, ignore_errors=True)
    opts = dict(dir=durable, local_every_steps=1, local_tier_dir=tier, handle_sigterm=False, keep_last=None)
    ck = btckpt.Checkpointer(every_steps=1, **opts)
    ck.maybe_save(1, {"model": StateModule(tensors)})  # a tier save, promoted into the durable dir
    ck.wait()
    shutil.copytree(tier, pristine)  # the tier as a crash leaves it (close() removes it)
    ck.close()
    del tensors
    target = StateModule(transformer_like_state(mb << 20, seed=1))
    out: dict[str, list[float]] = {"tier": [], "disk": []}
    for r in range(-1, rounds):  # round -1 warms up (untimed)
        for name in (("tier", "disk") if r % 2 == 0 else ("disk", "tier")):
            shutil.rmtree(tier, ignore_errors=True)
            if name == "tier":
                shutil.copytree(pristine, tier)
            else:
                drop_file_cache(_files(durable / "checkpoint-1"))
            t0 = time.perf_counter()
            ck = btckpt.Checkpointer(**opts)
            got = ck.restore({"model": target})
            float(next(iter(target.parameters())).sum())  # the first step touches the weights
            if r >= 0:
                out[name].append(time.perf_counter() - t0)
            ck.close()
            assert got == 1, got
    for p in (durable, tier, pristine):
        shutil.rmtree(p, ignore_errors=True)
    return out


def loop(width: int, steps: int, every: int, disk: Path, tier_base: Path) -> dict[str, float]:
    """Loop seconds with no saves, tier saves every ``every`` steps, and disk saves every ``every`` steps."""
    out = {}
    for name in ("warm-up", "none", "tier", "disk"):
        model, opt = build(width)
        state = {"model": model, "optimizer": opt}
        root, tier = disk / f"loop-{name}", tier_base / f"loop-{name}"
        shutil.rmtree(root, ignore_errors=True)
        opts: dict = dict(dir=root, handle_sigterm=False, keep_last=2)
        if name == "tier":
            opts.update(local_every_steps=every, local_tier_dir=tier)
        elif name == "disk":
            opts.update(every_steps=every)
        ck = btckpt.Checkpointer(**opts)
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            step(model, opt, width)
            if name != "none":
                ck.maybe_save(s, state)
        ck.wait()
        out[name] = time.perf_counter() - t0  # warm-up: the first loop pays torch's start-up
        ck.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tier, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="1024", help="state sizes in MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/btckpt-bench-tiers", help="the durable dir (a real disk)")
    ap.add_argument("--tier-base", default="/dev/shm", help="where the tier folders go (a tmpfs)")
    ap.add_argument("--loop-width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--parts", default="restart,loop")
    ap.add_argument("--quick", action="store_true", help="smoke: 160 MiB, 1 round, a 256-wide 20-step loop")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.rounds, args.loop_width, args.steps = "160", 1, 256, 20
    disk = Path(args.dir)
    tier_base = Path(args.tier_base) / f"btckpt-bench-tiers-{os.getpid()}"
    disk.mkdir(parents=True, exist_ok=True)
    tier_base.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        if "restart" in args.parts:
            for mb in (int(x) for x in args.mb.split(",")):
                res = restart(mb, args.rounds, disk, tier_base)
                t, d = statistics.median(res["tier"]), statistics.median(res["disk"])
                print(f"restart {mb} MiB: tier {t:.3f}s ({mb / 1024 / t:.2f} GiB/s), disk (cache dropped) {d:.3f}s "
                      f"({mb / 1024 / d:.2f} GiB/s): tier {d / t:.1f}x faster  [n={args.rounds}]")
        if "loop" in args.parts:
            res2 = loop(args.loop_width, args.steps, args.every, disk, tier_base)
            base = res2["none"]
            for name in ("tier", "disk"):
                print(f"loop width {args.loop_width}, {args.steps} steps, a {name} save every {args.every}: "
                      f"{res2[name]:.3f}s vs {base:.3f}s without saves: {100 * (res2[name] / base - 1):+.1f}%")
    finally:
        shutil.rmtree(tier_base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
