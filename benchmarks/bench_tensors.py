"""Cost per tensor (issue 13 section 4): does ``save()`` grow with the number of tensors?

State: a ``torch.nn.ParameterList`` of N float32 parameters with Adam's state (exp_avg, exp_avg_sq and a
``step`` counter per parameter: 4N tensors). For each N:

- btckpt ``Checkpointer(async_save=True)``: time ``save()`` blocks, first save and steady state (median
  of the next ``--saves``), and save + commit;
- DCP ``async_save`` (default config): time it blocks, and until its future resolves;
- synchronous one-shot save: ``btckpt.save`` vs safetensors ``save_file`` of the same tensors (both fsynced);
- restore: ``btckpt.load`` into the model + optimizer vs ``load_file`` alone (bytes to a dict) and vs
  ``load_file`` + ``load_state_dict`` of the model and the optimizer (what a restore with safetensors costs);
  page cache warm for all. The sync save and restore contenders alternate over ``--rounds`` rounds (medians).

    PYTHONPATH=integrations python benchmarks/bench_tensors.py --dir /tmp/btckpt-bench-tensors
    PYTHONPATH=integrations python benchmarks/bench_tensors.py --quick     # N / 100, a smoke test

A/B in one run (``--against``): the save measurements only (first and steady ``save()``, ``btckpt.save`` vs
``save_file``), each round running this checkout's ``integrations/`` and then the other one's, each in a fresh
process, over ``--rounds`` rounds; medians and min-max over the rounds:

    python benchmarks/bench_tensors.py --against /tmp/base/integrations --tensors 80000,400000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import btckpt  # noqa: E402
from _common import fsync_path  # noqa: E402

warnings.filterwarnings("ignore")

SIZES = [(1_000, 256 << 10), (20_000, 1 << 10), (100_000, 64)]  # (parameters, bytes each)


def build(n: int, nbytes: int) -> tuple[torch.nn.ParameterList, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(nbytes // 4)) for _ in range(n)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def train_step(model: torch.nn.ParameterList, opt: torch.optim.Optimizer) -> None:
    for p in model:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def flat(model: torch.nn.ParameterList, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"optim.{i}.{k}"] = v
    return out


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_one(root: Path, n: int, nbytes: int, saves: int, rounds: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    model, opt = build(n, nbytes)
    state = {"model": model, "optimizer": opt}
    r: dict[str, Any] = {"tensors": len(flat(model, opt))}
    with btckpt.Checkpointer(dir=root / "async", keep_last=1, save_rng=False, handle_sigterm=False) as ck:
        blocks, totals = [], []
        for i in range(1, saves + 2):
            t0 = time.perf_counter()
            ck.save(i, state)
            blocks.append(time.perf_counter() - t0)
            train_step(model, opt)  # the step gate holds this step until the snapshot's copies are done
            ck.wait()
            totals.append(time.perf_counter() - t0)
        st = ck.stats
    r["first block"], r["steady block"] = blocks[0], statistics.median(blocks[1:])
    r["steady spread"] = (min(blocks[1:]), max(blocks[1:]))
    r["save+commit"] = statistics.median(totals[1:])
    r["gate wait (all saves)"] = st.gate_wait_s
    r["plan reuses"] = st.plan_reuses
    shutil.rmtree(root / "async")

    sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    t0 = time.perf_counter()
    fut = dcp.async_save(sd, checkpoint_id=str(root / "dcp"), no_dist=True)
    r["DCP block"] = time.perf_counter() - t0
    fut.result()
    r["DCP total"] = time.perf_counter() - t0
    shutil.rmtree(root / "dcp", ignore_errors=True)

    tensors = flat(model, opt)
    p = root / "plain.safetensors"
    groups = opt.state_dict()["param_groups"]

    def load_and_apply() -> None:
        loaded = load_file(p)
        model.load_state_dict({k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")})
        st: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in loaded.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                st.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": st, "param_groups": groups})

    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        shutil.rmtree(root / "sync", ignore_errors=True)
        for name, fn in [("save_file", lambda: (save_file(tensors, p), fsync_path(p))),
                         ("btckpt.save", lambda: btckpt.save(root / "sync", state, save_rng=False)),
                         ("load_file", lambda: load_file(p)),
                         ("load_file+load_state_dict", load_and_apply),
                         ("btckpt.load", lambda: btckpt.load(root / "sync", state, load_rng=False))]:
            times.setdefault(name, []).append(timed(fn))
    for name, ts in times.items():
        r[name] = statistics.median(ts)
        r[name + " spread"] = (min(ts), max(ts))
    p.unlink()
    shutil.rmtree(root / "sync")
    return r


def bench_saves(root: Path, n: int, nbytes: int, saves: int) -> dict[str, Any]:
    """The save side only, one process: first and steady ``save()`` (async), then sync ``btckpt.save`` and
    ``save_file`` of the same tensors (one each, alternating order is the caller's)."""
    model, opt = build(n, nbytes)
    state = {"model": model, "optimizer": opt}
    r: dict[str, Any] = {"tensors": len(flat(model, opt)), "btckpt": btckpt.__file__}
    # the floors under any first save, which must learn the state's tensors (a steady one holds them already):
    # torch's own state_dict() of the model and the optimizer, and a bare walk listing the tensor references
    r["state_dict"] = statistics.median(timed(lambda: (model.state_dict(), opt.state_dict())) for _ in range(3))
    r["walk"] = statistics.median(timed(lambda: list(model.parameters()) + [
        v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]) for _ in range(3))
    with btckpt.Checkpointer(dir=root / "async", keep_last=1, save_rng=False, handle_sigterm=False) as ck:
        blocks = []
        for i in range(1, saves + 2):
            t0 = time.perf_counter()
            ck.save(i, state)
            blocks.append(time.perf_counter() - t0)
            train_step(model, opt)
            ck.wait()
    shutil.rmtree(root / "async")
    r["first"], r["steady"] = blocks[0], blocks[1:]
    tensors = flat(model, opt)
    p = root / "plain.safetensors"
    r["save_file"] = timed(lambda: (save_file(tensors, p), fsync_path(p)))
    p.unlink()
    r["btckpt.save"] = timed(lambda: btckpt.save(root / "sync", state, save_rng=False))
    shutil.rmtree(root / "sync")
    return r


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ms ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f}, n={len(xs)})"


def ab(a: argparse.Namespace) -> None:
    """Alternate this checkout and ``--against`` round by round, each size in a fresh process per contender."""
    here = str(Path(__file__).resolve().parent.parent / "integrations")
    contenders = {"this": here, "against": str(Path(a.against).resolve())}
    sizes = [_size(int(t)) for t in a.tensors.split(",")]
    res: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in range(a.rounds):
        for n, nbytes in sizes:
            order = list(contenders) if rnd % 2 == 0 else list(reversed(contenders))
            for name in order:
                env = dict(os.environ, PYTHONPATH=contenders[name])
                out = subprocess.run([sys.executable, __file__, "--worker", f"{n}:{nbytes}", "--dir",
                                      str(Path(a.dir) / name), "--saves", str(a.saves), "--threads", str(a.threads)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                res.setdefault((name, n), []).append(r)
                print(f"round {rnd + 1} {name} N={n} ({r['tensors']} tensors): first {r['first'] * 1e3:.0f} ms, "
                      f"steady {_spread(r['steady'])}, btckpt.save {r['btckpt.save']:.2f} s, "
                      f"save_file {r['save_file']:.2f} s", flush=True)
    print(f"\ncontenders: this = {contenders['this']}, against = {contenders['against']}; "
          f"torch {torch.__version__}, {a.threads} torch thread(s)")
    print("| contender | tensors | save() first | save() steady: median (min-max, n) | first / steady "
          "| btckpt.save / save_file: median (min-max) | floors: state_dict(), bare walk (/ steady) |")
    print("|---|---|---|---|---|---|---|")
    for (name, _n), rs in res.items():
        firsts = [r["first"] for r in rs]
        steady = [x for r in rs for x in r["steady"]]
        ratios = [r["btckpt.save"] / r["save_file"] for r in rs]
        print(f"| {name} | {rs[0]['tensors']:,} | {_spread(firsts)} | {_spread(steady)} "
              f"| {statistics.median(firsts) / statistics.median(steady):.1f}x "
              f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {_floors(rs, statistics.median(steady))} |")


def _floors(rs: list[dict[str, Any]], steady: float) -> str:
    sd, walk = (statistics.median(r[k] for r in rs) for k in ("state_dict", "walk"))
    return f"{sd * 1e3:.1f} ms ({sd / steady:.1f}x), {walk * 1e3:.1f} ms ({walk / steady:.1f}x)"


def _size(tensors: int) -> tuple[int, int]:
    """(parameters, bytes each) of SIZES for a tensor count (4 tensors per parameter with Adam)."""
    for n, nbytes in SIZES:
        if 4 * n == tensors:
            return n, nbytes
    return tensors // 4, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/btckpt-bench-tensors")
    ap.add_argument("--saves", type=int, default=5, help="steady-state saves after the first")
    ap.add_argument("--quick", action="store_true", help="N / 100 and 2 steady saves (a smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the sync save/restore contenders")
    ap.add_argument("--against", help="A/B: another checkout's integrations/ folder (see the module doc)")
    ap.add_argument("--tensors", default="80000,400000", help="A/B: tensor counts, comma-separated")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.against:
        ab(a)
        return
    if a.worker:
        n, nbytes = map(int, a.worker.split(":"))
        root = Path(a.dir)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        try:
            print(json.dumps(bench_saves(root, n, nbytes, a.saves)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sizes = [(max(10, n // 100), b) for n, b in SIZES] if a.quick else SIZES
    saves = 2 if a.quick else a.saves
    rows = []
    for n, nbytes in sizes:
        r = bench_one(root, n, nbytes, saves, 1 if a.quick else a.rounds)
        rows.append((n, nbytes, r))
        print(f"N={n} x {nbytes} B ({r['tensors']} tensors): " + ", ".join(
            f"{k} {v:.3f}s" for k, v in r.items() if isinstance(v, float)), flush=True)
    print("\n| N params x bytes (tensors) | save() first | save() steady (min-max) | save+commit | DCP block "
          "| DCP total | btckpt.save / save_file | btckpt.load / load_file "
          "| btckpt.load / (load_file + load_state_dict) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, nbytes, r in rows:
        lo, hi = r["steady spread"]
        print(f"| {n:,} x {nbytes} B ({r['tensors']:,}) | {r['first block'] * 1e3:.0f} ms "
              f"| {r['steady block'] * 1e3:.1f} ms ({lo * 1e3:.1f}-{hi * 1e3:.1f}) | {r['save+commit']:.2f} s "
              f"| {r['DCP block'] * 1e3:.0f} ms | {r['DCP total']:.2f} s "
              f"| {r['btckpt.save']:.2f}/{r['save_file']:.2f} s = {r['btckpt.save'] / r['save_file']:.2f}x "
              f"| {r['btckpt.load']:.2f}/{r['load_file']:.2f} s = {r['btckpt.load'] / r['load_file']:.2f}x "
              f"| {r['btckpt.load']:.2f}/{r['load_file+load_state_dict']:.2f} s = "
              f"{r['btckpt.load'] / r['load_file+load_state_dict']:.2f}x |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
