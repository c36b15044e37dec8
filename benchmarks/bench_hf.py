"""HF Trainer throughput with a save every K steps: the Trainer's own saving vs btckpt's CheckpointCallback.

Each run is a fresh process (tests/scripts/hf_train.py): tiny-to-small GPT-2 from a config, CPU, same
args and data; contenders alternate round by round (the order rotates), and the medians (with min-max)
are printed. ``none`` trains with saving off: the floor both contenders are compared with.

    PYTHONPATH=integrations python benchmarks/bench_hf.py --rounds 5
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "hf_train.py"


def one(mode: str, work: Path, a: argparse.Namespace) -> dict:
    d = work / mode
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    env = dict(os.environ, BT_CHECKPOINT_DIR=str(d / "ck"), OMP_NUM_THREADS=str(a.threads))
    env["PYTHONPATH"] = str(REPO / "integrations") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(SCRIPT), "--out", str(d / "out"), "--mode", mode, "--resume", "none",
           "--n-layer", str(a.n_layer), "--n-embd", str(a.n_embd), "--bs", str(a.bs), "--samples",
           str(a.steps * a.bs), "--epochs", "1", "--max-steps", str(a.steps), "--save-steps", str(a.every),
           "--save-total-limit", "2", "--result", str(d / "r.json")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
    r = json.loads((d / "r.json").read_text())
    size = sum(f.stat().st_size for f in (d / ("ck" if mode == "btckpt" else "out")).rglob("*") if f.is_file())
    shutil.rmtree(d, ignore_errors=True)
    r["disk_mb"] = size / 1e6
    return r


def fmt(xs: list[float], unit: str = "") -> str:
    return f"{statistics.median(xs):8.3f}{unit} [{min(xs):.3f}-{max(xs):.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5, help="save every K steps")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (on the shared 2-core box, 2 threads under load are 10x noisier)")
    p.add_argument("--modes", default="none,native,btckpt")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    a = p.parse_args()
    modes = a.modes.split(",")
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-hf-"))
    res: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for m in order:
            out = one(m, work, a)
            res[m].append(out)
            print(f"round {r} {m:7s} wall {out['wall_s']:.2f}s  save-block {out['save_block_s']:.3f}s", flush=True)
    print(f"\nGPT-2 n_layer={a.n_layer} n_embd={a.n_embd}, {a.steps} steps, save every {a.every} "
          f"({a.steps // a.every} saves), {a.rounds} rounds; median [min-max]")
    print(f"{'mode':8s} {'steps/s':>24s} {'train wall s':>26s} {'blocked in save s':>26s}")
    for m in modes:
        rs = res[m]
        sps = [x["steps"] / x["wall_s"] for x in rs]
        print(f"{m:8s} {fmt(sps):>24s} {fmt([x['wall_s'] for x in rs]):>26s} "
              f"{fmt([x['save_block_s'] for x in rs]):>26s}")
        if m == "btckpt":
            st = [x["stats"] or {} for x in rs]
            print(f"         btckpt stats: save() block {fmt([s.get('save_block_s', 0.0) for s in st])}, "
                  f"step-gate wait {fmt([s.get('gate_wait_s', 0.0) for s in st])}")
    ckpt_mb = [x["disk_mb"] for x in res.get("btckpt", [])]
    if ckpt_mb:
        print(f"btckpt folder on disk at the end (2 kept): {statistics.median(ckpt_mb):.1f} MB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
