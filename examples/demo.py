"""Demo: train, SIGKILL the run mid-way, resume from a nested $BT_LOAD_CHECKPOINT_DIR, compare.

    python examples/demo.py

1. an uninterrupted reference run of examples/train_torch.py;
2. the same run, killed with SIGKILL part-way (while checkpoints are being written in the background);
3. its checkpoint folder laid out as the platform downloads it: $BT_LOAD_CHECKPOINT_DIR/<job>/rank-0/;
4. a new job with an empty $BT_CHECKPOINT_DIR resumes from there and finishes;
5. the final weights and optimizer state are compared, bit for bit, with the reference.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import btckpt
import torch
from btckpt.format.manifest import read_manifest
from btckpt.restore.reader import CheckpointReader

HERE = Path(__file__).resolve().parent
TRAIN = [sys.executable, str(HERE / "train_torch.py"), "--steps", "120", "--save-every", "10"]


def final_tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path, read_manifest(path))
    out = {f"model.{k}": v for k, v in reader.load_group("model").items()}
    for i, s in reader.load_group("optimizer")["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in s.items()})
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="btckpt-demo-"))
    env = dict(os.environ)
    print(f"[demo] working in {work}")
    print("[demo] 1/4 reference run, uninterrupted ...", flush=True)
    subprocess.run([*TRAIN, "--final", str(work / "reference")], check=True, capture_output=True,
                   env={**env, "BT_CHECKPOINT_DIR": str(work / "ref-ckpts")})

    print("[demo] 2/4 training run, killed with SIGKILL at step 67 ...", flush=True)
    job1 = work / "job1-ckpts"
    proc = subprocess.Popen([*TRAIN, "--sleep", "0.02"], stdout=subprocess.PIPE, text=True,
                            env={**env, "BT_CHECKPOINT_DIR": str(job1)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step 67 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    print(f"[demo]      killed (exit {proc.returncode}); committed: "
          f"{sorted(p.name for p in job1.glob('checkpoint-*'))}; newest complete: {btckpt.latest(job1).name}")

    print("[demo] 3/4 platform-style download: $BT_LOAD_CHECKPOINT_DIR/4q9g403/rank-0/checkpoint-N/", flush=True)
    load = work / "loaded_checkpoints"
    shutil.copytree(job1, load / "4q9g403" / "rank-0", ignore=shutil.ignore_patterns(".*"))

    print("[demo] 4/4 new job resumes from the nested load dir ...", flush=True)
    res = subprocess.run([*TRAIN, "--final", str(work / "resumed")], check=True, capture_output=True, text=True,
                         env={**env, "BT_CHECKPOINT_DIR": str(work / "job2-ckpts"),
                              "BT_LOAD_CHECKPOINT_DIR": str(load)})
    print("[demo]      " + next(ln for ln in res.stdout.splitlines() if ln.startswith("starting at")))

    ref, got = final_tensors(work / "reference"), final_tensors(work / "resumed")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    nbytes = sum(t.numel() * t.element_size() for t in ref.values())
    print(f"[demo] final weights + optimizer state ({len(ref)} tensors, {nbytes} bytes) "
          f"{'EQUAL' if same else 'DIFFER'} to the uninterrupted run (bit for bit)")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
