"""The node-local tier (btckpt.tiers): restart time from the tier vs from disk, and the loop cost of tier saves.

    python benchmarks/bench_tiers.py --mb 1024,4096 --peer-mb 1024 --rounds 3 --every 1,10 --dir /var/tmp/btckpt-tiers
    python benchmarks/bench_tiers.py --quick            # smoke: 160 MiB, 1 round, a small loop

``restart``: one checkpoint of ``--mb`` MiB (a transformer-like state) committed in the durable dir (``--dir``)
and in the local tier (``--tier-base``, default ``/dev/shm``). Contenders, alternating order round by round:

- ``tier``: ``Checkpointer(local_every_steps=..., local_tier_dir=...)`` + ``restore({"model": m})`` (the resume
  policy picks the tier's copy of the newest step) + one step that reads a parameter;
- ``disk``: the same restore with the tier gone (the node was replaced), page cache dropped first
  (``drop_caches`` as root, else ``fadvise DONTNEED`` per file, checked with ``mincore``);
- ``DCP load``: ``torch.distributed.checkpoint.load`` of a DCP checkpoint of the same state on the same disk,
  page cache dropped (no checksums);
- ``peer`` (sizes in ``--peer-mb``): a 2-node job on this machine (two processes, gloo, each its own tier and
  dir), node 1 started with its tier and dir empty (a replacement node): from its ``Checkpointer(...)``
  (connecting to node 0, fetching its part from node 0's memory, verified) through ``restore`` to the first
  step, timed inside node 1's process;
- ``peer link`` (with ``peer``): the floor under it, the same bytes sent from node 0's memory to node 1's over
  gloo (the replica link's 16 MiB messages into one reused buffer: no file, no hash, no restore).

Each is timed from the call that starts the restore to the first step that reads a parameter, inside a
process that already imported torch (what a process start adds is the same for every contender).

``loop``: the CPU training loop of ``bench_async.py`` (``--loop-width``, Adam) for ``--steps`` steps, with no
saves, a tier save every ``e`` steps, and a disk save every ``e`` steps, for each ``e`` of ``--every`` (e.g.
``1,10``), ``--rounds`` times in alternating order; prints the median loop time and the cost vs no saves
(goal: tier saves every 10 steps <= 2%). Each loop ends when its saves are durable
in their tier (``wait()``), the tier's last promotion excluded (it runs in the background). ``--warm-saves 2``
times the steady state: each loop starts timing after its first two saves (which allocate the arenas: for the
tier, its two sets of staging files), the loop without saves after as many untimed steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import btckpt  # noqa: E402
from _common import StateModule, drop_file_cache, transformer_like_state  # noqa: E402
from bench_async import build, step  # noqa: E402

warnings.filterwarnings("ignore")


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_node(args: argparse.Namespace) -> int:
    """One node of the 2-node peer job (``--peer-node N``): ``seed`` saves step 1 into its tier (exchanged with
    the peer) and exits without close() (as a crash leaves the tiers); ``restore`` times the restart."""
    import torch.distributed as dist

    node = args.peer_node
    store = dist.TCPStore("127.0.0.1", args.peer_port, 2, node == 0, datetime.timedelta(seconds=300))
    os.environ.update(LOCAL_WORLD_SIZE="1", LOCAL_RANK="0", BT_NODE_RANK=str(node))
    dist.init_process_group("gloo", store=store, rank=node, world_size=2)
    root = Path(args.peer_root)
    if args.peer_phase == "link":  # the floor of any peer restore: the part's bytes across the link, nothing else
        from btckpt.tiers.replicas import _CHUNK

        buf = torch.empty(_CHUNK, dtype=torch.uint8) if node == 1 else torch.ones(_CHUNK, dtype=torch.uint8)
        dist.barrier()
        t0, left = time.perf_counter(), args.peer_mb << 20
        while left > 0:  # the replica link's message size (16 MiB), node 0 -> node 1, as a fetch sends a part
            n = min(left, _CHUNK)
            (dist.send if node == 0 else dist.recv)(buf[:n], 1 - node)
            left -= n
        if node == 1:
            print(f"LINK_S {time.perf_counter() - t0:.4f}", flush=True)
        os._exit(0)
    opts = dict(dir=root / f"dir-{node}", local_every_steps=1, local_tier_dir=root / f"tier-{node}",
                handle_sigterm=False, keep_last=None, barrier_timeout=300, name="bench-peer")
    model = StateModule(transformer_like_state(args.peer_mb << 20, seed=0 if args.peer_phase == "seed" else 1))
    if args.peer_phase == "seed":
        ck = btckpt.Checkpointer(**opts)
        ck.maybe_save(1, {"model": model})
        ck.wait()  # the tier commit and its exchange with the peer
        sys.stdout.flush()
        os._exit(0)  # no close(): the tiers stay, as after a crash
    checkpointer = btckpt.Checkpointer  # imported before the clock starts, as in the other contenders' process
    dist.barrier()
    import resource

    from btckpt.restore.reader import READS

    t0, c0, k0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    ck = checkpointer(**opts)
    t1, c1, reads = time.perf_counter(), time.process_time(), dict(READS)
    k1 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    got = ck.restore({"model": model})
    mb = {k: (READS[k] - reads[k]) / 1e6 for k in ("verify_bytes", "vouched_bytes", "direct_bytes")}
    print(f"PEER_PARTS node {node}: connect+fetch {t1 - t0:.3f}s (CPU {c1 - c0:.3f}s, {k1 - k0:.3f}s of it in the "
          f"kernel), restore {time.perf_counter() - t1:.3f}s (CPU {time.process_time() - c1:.3f}s; MB hashed first "
          f"{mb['verify_bytes']:.0f}, vouched {mb['vouched_bytes']:.0f}, read into the model "
          f"{mb['direct_bytes']:.0f})", flush=True)
    float(next(iter(model.parameters())).sum())
    took = time.perf_counter() - t0
    assert got == 1, got
    if node == 1:
        print(f"PEER_S {took:.4f}", flush=True)
    os._exit(0)  # no close(): nothing to promote or remove, the parent resets the folders


def _peer_job(mb: int, root: Path, phase: str, *, both: bool = False) -> str:
    port = _free_port()
    cmd = [sys.executable, __file__, "--peer-mb", str(mb), "--peer-root", str(root), "--peer-port", str(port),
           "--peer-phase", phase, "--peer-node"]
    procs = [subprocess.Popen([*cmd, str(n)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"peer node failed ({p.returncode}):\n{out[-3000:]}")
    return outs[0] + outs[1] if both else outs[1]


def peer_rounds(mb: int, rounds: int, disk: Path, tier_base: Path) -> list[float]:
    """Node 1's restart seconds (from ``Checkpointer(...)`` to the first step) with its memory and dir empty."""
    root, pristine = tier_base / f"peer-{mb}", tier_base / f"peer-{mb}-pristine"
    shutil.rmtree(root, ignore_errors=True)
    _peer_job(mb, root, "seed")
    assert (root / "tier-0" / ".replicas" / "node-1" / "checkpoint-1" / "btckpt.json").is_file()
    shutil.rmtree(root / "tier-1")
    shutil.rmtree(root / "dir-1")
    shutil.copytree(root / "tier-0", pristine)
    out = []
    for r in range(-1, rounds):
        shutil.rmtree(root / "tier-0", ignore_errors=True)
        shutil.rmtree(root / "tier-1", ignore_errors=True)
        shutil.rmtree(root / "dir-1", ignore_errors=True)
        shutil.copytree(pristine, root / "tier-0")
        text = _peer_job(mb, root, "restore", both=True)
        print(" ".join(ln for ln in text.splitlines() if "PEER_PARTS" in ln or "fetched" in ln))
        assert "fetched its part of step 1 from node 0" in text, text[-2000:]
        if r >= 0:
            out.append(float(text.split("PEER_S ")[1].split()[0]))
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(pristine, ignore_errors=True)
    return out


def link_round(mb: int, tier_base: Path) -> float:
    """Seconds to move ``mb`` MiB from node 0's memory to node 1's over gloo on this machine's loopback, in the
    replica link's 16 MiB messages (into one reused buffer: no file, no hash, no restore)."""
    return float(_peer_job(mb, tier_base / f"link-{mb}", "link").split("LINK_S ")[1].split()[0])


def restart(mb: int, rounds: int, disk: Path, tier_base: Path, *, peer: bool) -> dict[str, list[float]]:
    """Seconds from the restore's first call to the first step: from the tier, from disk, DCP load, a peer."""
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
    import torch.distributed.checkpoint as dcp

    dcp_dir = disk / f"restart-{mb}-dcp"
    shutil.rmtree(dcp_dir, ignore_errors=True)
    dcp.save({"model": StateModule(tensors).state_dict()}, checkpoint_id=str(dcp_dir), no_dist=True)
    del tensors
    target = StateModule(transformer_like_state(mb << 20, seed=1))
    names = ["tier", "disk", "DCP load"] + (["peer", "peer link"] if peer else [])
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-1, rounds):  # round -1 warms up (untimed)
        for name in (names if r % 2 == 0 else names[::-1]):
            if name == "peer link":
                got = link_round(mb, tier_base)
                if r >= 0:
                    out[name].append(got)
                continue
            if name == "peer":
                got_s = peer_rounds(mb, 1, disk, tier_base)
                if r >= 0:
                    out[name] += got_s
                continue
            shutil.rmtree(tier, ignore_errors=True)
            if name == "tier":
                shutil.copytree(pristine, tier)
            else:
                drop_file_cache(_files(durable / "checkpoint-1") + _files(dcp_dir))
            t0 = time.perf_counter()
            if name == "DCP load":
                sd = target.state_dict()
                dcp.load({"model": sd}, checkpoint_id=str(dcp_dir), no_dist=True)
                target.load_state_dict(sd)
                float(next(iter(target.parameters())).sum())
                if r >= 0:
                    out[name].append(time.perf_counter() - t0)
                continue
            ck = btckpt.Checkpointer(**opts)
            got = ck.restore({"model": target})
            float(next(iter(target.parameters())).sum())  # the first step touches the weights
            if r >= 0:
                out[name].append(time.perf_counter() - t0)
            ck.close()
            assert got == 1, got
    for p in (durable, tier, pristine, dcp_dir):
        shutil.rmtree(p, ignore_errors=True)
    return out


class _CopyFloor:
    """The ``copy`` contender: at each due step, ``copy_`` every tensor of the state (model and optimizer state)
    into a preallocated buffer (allocated at the first save): the physical floor of a tier save on a CPU box."""

    def __init__(self) -> None:
        self.every, self.bufs = 0, []  # type: ignore[var-annotated]

    @staticmethod
    def _tensors(state: dict) -> list[torch.Tensor]:
        out = list(state["model"].state_dict().values())
        for st in state["optimizer"].state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out

    def maybe_save(self, s: int, state: dict) -> None:
        if self.every and s % self.every:
            return
        src = self._tensors(state)
        if not self.bufs:
            self.bufs = [torch.empty_like(t) for t in src]
        with torch.no_grad():
            for b, t in zip(self.bufs, src, strict=True):
                b.copy_(t)

    def wait(self) -> None:
        pass

    def close(self) -> None:
        self.bufs = []


def _loop_once(name: str, every: int, width: int, steps: int, disk: Path, tier_base: Path,
               warm: int = 0) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of one loop."""
    model, opt = build(width)
    state = {"model": model, "optimizer": opt}
    root, tier = disk / f"loop-{name}", tier_base / f"loop-{name}"
    shutil.rmtree(root, ignore_errors=True)
    opts: dict = dict(dir=root, handle_sigterm=False, keep_last=2)
    if name.startswith("tier"):
        opts.update(local_every_steps=every, local_tier_dir=tier)
    elif name == "disk":
        opts.update(every_steps=every)
    if name == "copy":  # the floor (issue 24, item 6): a bare copy_ of the same state into buffers made once
        ck: Any = _CopyFloor()
        ck.every = every
    else:
        ck = btckpt.Checkpointer(**opts)
    if name == "tier-copy":  # the path before the arena became the tier: staged in memory, then written (A/B)
        ck._arena_for = lambda root: None  # type: ignore[method-assign]
    first = warm * max(every, 1)  # untimed: the first ``warm`` saves, which allocate the arenas (steady state after)
    for s in range(1, first + 1):
        step(model, opt, width)
        if name != "none":
            ck.maybe_save(s, state)
    ck.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(first + 1, first + steps + 1):
        step(model, opt, width)
        if name != "none":
            ck.maybe_save(s, state)
    ck.wait()
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    ck.close()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(tier, ignore_errors=True)
    return took, cpu


LOOP_CONTENDERS = ("tier", "copy", "tier-copy", "disk")


def loop(width: int, steps: int, everies: list[int], rounds: int, disk: Path,
         tier_base: Path, warm: int = 0, contenders: tuple[str, ...] = LOOP_CONTENDERS,
         ) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(wall, CPU) seconds of loops with no saves, a bare ``copy_`` of the state every ``e`` steps (``copy``, the
    floor), tier saves every ``e`` steps (``tier``; ``tier-copy``: the same
    with the snapshot staged in memory and then written, the path before the arena became the tier) and disk
    saves every ``e`` steps (each ``e`` of ``everies``), ``rounds`` times, the order alternating round by round
    (a warm-up loop first, untimed; each loop after ``warm`` untimed save intervals)."""
    configs = [("none", 0)] + [(n, e) for e in everies for n in contenders]
    _loop_once("none", 0, width, steps, disk, tier_base)  # warm-up: torch's start-up, the allocator
    out: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
    for r in range(rounds):
        for name, every in (configs if r % 2 == 0 else configs[::-1]):
            out[(name, every)].append(_loop_once(name, every, width, steps, disk, tier_base, warm))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="1024", help="state sizes in MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/btckpt-bench-tiers", help="the durable dir (a real disk)")
    ap.add_argument("--tier-base", default="/dev/shm", help="where the tier folders go (a tmpfs)")
    ap.add_argument("--loop-width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", default="10", help="tier/disk save intervals for the loop, comma-separated")
    ap.add_argument("--parts", default="restart,loop")
    ap.add_argument("--contenders", default=",".join(LOOP_CONTENDERS),
                    help="loop: the savers beside 'none', comma-separated (tier,copy: issue 24 item 6's pair)")
    ap.add_argument("--warm-saves", type=int, default=0, help="loop: time from after this many saves (2: the "
                    "arenas are allocated, steady state); 0: from the Checkpointer's start")
    ap.add_argument("--quick", action="store_true", help="smoke: 160 MiB, 1 round, a 256-wide 20-step loop")
    ap.add_argument("--peer-mb", default="1024", help="sizes (MiB) that also get the peer contender ('' for none: "
                    "it needs ~4x the size in RAM)")
    ap.add_argument("--peer-node", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peer-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--peer-root", default="", help=argparse.SUPPRESS)
    ap.add_argument("--peer-phase", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_node is not None:
        args.peer_mb = int(args.peer_mb)
        return peer_node(args)
    if args.quick:
        args.mb, args.rounds, args.loop_width, args.steps, args.peer_mb = "160", 1, 256, 20, "160"
    disk = Path(args.dir)
    tier_base = Path(args.tier_base) / f"btckpt-bench-tiers-{os.getpid()}"
    disk.mkdir(parents=True, exist_ok=True)
    tier_base.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        if "restart" in args.parts:
            peer_sizes = {int(x) for x in args.peer_mb.split(",") if x.strip()}
            for mb in (int(x) for x in args.mb.split(",")):
                res = restart(mb, args.rounds, disk, tier_base, peer=mb in peer_sizes)
                d = statistics.median(res["disk"])
                for name, times in res.items():
                    m = statistics.median(times)
                    print(f"restart {mb} MiB, {name:8s}: median {m:.3f}s (min {min(times):.3f}, max {max(times):.3f}; "
                          f"{mb / 1024 / m:.2f} GiB/s), {d / m:.2f}x the speed of disk  [n={len(times)}]")
        if "loop" in args.parts:
            everies = [int(x) for x in str(args.every).split(",")]
            res2 = loop(args.loop_width, args.steps, everies, args.rounds, disk, tier_base, args.warm_saves,
                        tuple(c for c in args.contenders.split(",") if c))
            none = [w for w, _ in res2[("none", 0)]]
            none_cpu = [c for _, c in res2[("none", 0)]]
            base = statistics.median(none)
            print(f"loop width {args.loop_width}, {args.steps} steps, no saves: median {base:.3f}s "
                  f"(min {min(none):.3f}, max {max(none):.3f}; CPU {statistics.median(none_cpu):.2f}s)  "
                  f"[n={args.rounds}]")
            for (name, every), got in res2.items():
                if name == "none":
                    continue
                times, cpus = [w for w, _ in got], [c for _, c in got]
                m = statistics.median(times)
                # paired: each round against that round's loop without saves (run next to it), then the median
                costs = sorted(100 * (t / n - 1) for t, n in zip(times, none, strict=True))
                per_save = statistics.median((c - n) / (args.steps // every) for c, n in zip(cpus, none_cpu,
                                                                                               strict=True))
                if name == "tier" and ("copy", every) in res2:  # issue 24, item 6: the tier save vs the copy floor
                    floor = [w for w, _ in res2[("copy", every)]]
                    # a round whose copy loop ran no slower than its loop without saves has no floor to divide
                    # by (noise larger than the copy): it is left out of the ratio, and counted
                    ratio = sorted((t - n) / (f - n) for t, f, n in zip(times, floor, none, strict=True) if f > n)
                    if ratio:
                        print(f"loop width {args.loop_width}, a tier save every {every}: its cost over no saves is "
                              f"{statistics.median(ratio):.2f}x the bare copy_'s (paired per round: {ratio[0]:.2f}x "
                              f".. {ratio[-1]:.2f}x; goal <= 1.5x)  [n={len(ratio)} of {args.rounds}: rounds whose "
                              "copy loop was no slower than no saves left out]")
                print(f"loop width {args.loop_width}, {args.steps} steps, a {name} save every {every}: median "
                      f"{m:.3f}s, {100 * (m / base - 1):+.1f}% vs no saves; paired per round: median "
                      f"{statistics.median(costs):+.1f}% ({costs[0]:+.1f}% .. {costs[-1]:+.1f}%); CPU per save "
                      f"{per_save * 1e3:.0f} ms (median, paired)  [n={args.rounds}]")
    finally:
        shutil.rmtree(tier_base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
