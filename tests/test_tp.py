"""Tensor parallel and 2-D (FSDP2 x TP) DTensor state under real torchrun with gloo on CPU.

Placements other than FSDP's Shard(0): ColwiseParallel (Shard(0)), RowwiseParallel (Shard(1) weight, Replicate
bias) and, in 2-D, FSDP2's _StridedShard over TP. Saved in one layout, restored in another (other world size,
other parallelism, a plain single process) and consolidated: full tensors must be equal.

Internals used: btckpt.consolidate, btckpt.distributed.shards, btckpt.format.manifest (the shard merge and the
manifest's tiling check on hand-made parts, the consolidation function).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dist_launch import PY, SCRIPTS, assert_same, env_with, finish, load_st, torchrun

pytestmark = pytest.mark.slow


def _run(tmp: Path, ck: str, mode: str, nproc: int, out: str, *extra: str) -> str:
    env = env_with(BT_CHECKPOINT_DIR=str(tmp / ck))
    args = ["--mode", mode, "--out", str(tmp / out), *extra]
    if mode == "plain":
        p = subprocess.run([PY, str(SCRIPTS / "dist_tp.py"), *args], env=env, capture_output=True, text=True,
                           timeout=180)
        rc, text = p.returncode, p.stdout + p.stderr
    else:
        rc, text = finish(torchrun("dist_tp.py", args, nproc=nproc, env=env), timeout=240)
    assert rc == 0, text[-4000:]
    if "--train" not in extra:
        restored = re.findall(r"rank (\d+): restored (\d+|None)", text)
        assert sorted(restored) == [(str(r), "3") for r in range(nproc)], text[-3000:]
    return text


def _restore_into(tmp: Path, saved: str, mode: str, nproc: int) -> None:
    ck = f"ck-{mode}{nproc}"
    shutil.copytree(tmp / "ck", tmp / ck)
    _run(tmp, ck, mode, nproc, f"{mode}{nproc}.st")
    assert_same(tmp / saved, tmp / f"{mode}{nproc}.st")


def test_tp_saves_shards_and_restores_in_other_layouts(tmp_path: Path) -> None:
    import json

    import torch
    from btckpt.consolidate import consolidate

    _run(tmp_path, "ck", "tp", 2, "saved.st", "--train", "3")
    man = json.loads((tmp_path / "ck" / "checkpoint-3" / "btckpt.json").read_text())
    chunks = {k: [(c["offsets"], c["sizes"]) for c in v["__tensor__"]["sharded"]["chunks"]]
              for k, v in man["state"]["model"].items()}
    assert chunks["2.weight"] == [([0, 0], [4, 5]), ([0, 5], [4, 5])]  # RowwiseParallel: Shard(1)
    assert chunks["2.bias"] == [([0], [4])]  # Replicate: written once
    assert chunks["0.weight"] == [([0, 0], [5, 6]), ([5, 0], [5, 6])]  # ColwiseParallel: Shard(0)
    _restore_into(tmp_path, "saved.st", "plain", 1)
    _restore_into(tmp_path, "saved.st", "fsdp", 2)
    _restore_into(tmp_path, "saved.st", "tp", 2)
    dest = consolidate(tmp_path / "ck", tmp_path / "served")
    want = load_st(tmp_path / "saved.st")
    got = load_st(dest / "model.safetensors")
    assert sorted(got) == sorted(k[6:] for k in want if k.startswith("model."))
    for k, v in got.items():
        assert torch.equal(v, want[f"model.{k}"]), k


def test_2d_fsdp_over_tp_four_ranks_reshards(tmp_path: Path) -> None:
    """FSDP2 over TP on a 2 x 2 mesh (dim 0 is _StridedShard + Shard): every rank's piece is written; restores
    into TP on 2 ranks and into one plain process; a TP checkpoint restores into the 2-D layout."""
    _run(tmp_path, "ck", "2d", 4, "saved.st", "--train", "3")
    _restore_into(tmp_path, "saved.st", "tp", 2)
    _restore_into(tmp_path, "saved.st", "plain", 1)
    shutil.rmtree(tmp_path / "ck")
    _run(tmp_path, "ck", "tp", 2, "tp-saved.st", "--train", "3")
    assert_same(tmp_path / "saved.st", tmp_path / "tp-saved.st")  # same training, other layout
    _restore_into(tmp_path, "tp-saved.st", "2d", 4)


def test_shards_with_holes_are_refused() -> None:
    from btckpt import UnsupportedValue
    from btckpt.distributed.shards import ShardedPart, merge_trees
    from btckpt.format.manifest import tiling_problem

    def part(off: int, rank: int) -> dict:
        return {"__tensor__": {"part": {"key": "w", "shape": [4, 2], "dtype": "F32", "offsets": [off, 0],
                                        "sizes": [1, 2], "file": f"m-{rank}", "key2": "", "node": 0}}}

    with pytest.raises(UnsupportedValue, match="do not tile its shape"):
        merge_trees([{"w": part(0, 0)}, {"w": part(2, 1)}], path="model", leaf=ShardedPart.merge_leaf)
    # at load, the manifest's parse refuses the same holes (manifest.tiling_problem), before any chunk is read
    assert tiling_problem([4, 2], [{"offsets": [0, 0], "sizes": [2, 2]}])
    assert tiling_problem([4, 2], [{"offsets": [0, 0], "sizes": [2, 2]}, {"offsets": [2, 0], "sizes": [2, 2]}]) is None
