"""Two simulated nodes on one machine: two torchrun launches (--nnodes=2, c10d rendezvous), each with its
own $BT_CHECKPOINT_DIR and $BT_NODE_RANK. A checkpoint resumes only when every node's part is complete."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from dist_launch import assert_same, env_with, finish, free_port, kill_session, run_job, torchrun

pytestmark = pytest.mark.slow


def two_nodes(tmp: Path, tag: str, args: list[str], *, load: Path | None = None, mode: str = "ddp") -> list[str]:
    port = free_port()
    jobs = []
    try:
        for node in (0, 1):
            env = env_with(BT_CHECKPOINT_DIR=str(tmp / tag / f"node{node}"), BT_NODE_RANK=str(node))
            if load is not None:
                env["BT_LOAD_CHECKPOINT_DIR"] = str(load)
            jobs.append(torchrun("dist_train.py", ["--mode", mode, *args], nproc=1, env=env, port=port, nnodes=2,
                                 node_rank=node, rdzv=True))
            time.sleep(0.5)
        results = [finish(j, timeout=180) for j in jobs]
    finally:
        for j in jobs:
            kill_session(j)
    for rc, out in results:
        assert rc == 0, out[-4000:]
    return [out for _, out in results]


def test_each_node_commits_its_part_and_resume_needs_every_part(tmp_path: Path) -> None:
    two_nodes(tmp_path, "train", ["--steps", "6", "--every", "3", "--out", str(tmp_path / "a.st")])
    for node in (0, 1):
        man = json.loads((tmp_path / "train" / f"node{node}" / "checkpoint-6" / "btckpt.json").read_text())
        assert man["world"] == {"size": 2, "nodes": 2, "node_rank": node}
        assert f"rng_state_{node}.json" in man["files"] and "model.safetensors" in man["files"]
    # The platform's download layout: $BT_LOAD_CHECKPOINT_DIR/<job>/rank-<node>/checkpoint-<step>/
    load = tmp_path / "load"
    for node in (0, 1):
        shutil.copytree(tmp_path / "train" / f"node{node}", load / "job1" / f"rank-{node}")
    two_nodes(tmp_path, "r1", ["--steps", "6", "--expect-resume", "6", "--out", str(tmp_path / "b.st")], load=load)
    assert_same(tmp_path / "a.st", tmp_path / "b.st")  # both parts -> resumed exactly
    # Node 1's part of step 6 is complete but damaged (one flipped byte): both ranks fall back together to 3
    # (before, node 0 restored 6 while node 1 fell back, so the replicas diverged)
    weights = load / "job1" / "rank-1" / "checkpoint-6" / "model.safetensors"
    good = weights.read_bytes()
    blob = bytearray(good)
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    outs = two_nodes(tmp_path, "r1b", ["--steps", "6", "--expect-resume", "3"], load=load)
    assert any("is damaged" in o for o in outs)
    assert any("not complete and verified on every rank" in o for o in outs)
    weights.write_bytes(good)
    (load / "job1" / "rank-1" / "checkpoint-6" / "btckpt.json").unlink()  # node 1's part incomplete
    outs = two_nodes(tmp_path, "r2", ["--steps", "6", "--expect-resume", "3"], load=load)
    assert any("not complete and verified on every rank" in o for o in outs)
    shutil.rmtree(load / "job1" / "rank-1")  # node 1's parts missing altogether
    two_nodes(tmp_path, "r3", ["--steps", "0", "--expect-resume", "-1"], load=load)


def test_sharded_multinode_reshards_onto_one_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 over 2 nodes x 1 rank; both parts side by side -> a 1-node, 2-rank job restores exactly."""
    two_nodes(tmp_path, "train", ["--steps", "4", "--every", "4", "--out", str(tmp_path / "a.st")], mode="fsdp")
    for node in (0, 1):
        files = json.loads((tmp_path / "train" / f"node{node}" / "checkpoint-4" / "btckpt.json").read_text())["files"]
        assert f"model-rank{node:05d}.safetensors" in files and f"model-rank{1 - node:05d}.safetensors" not in files
    load = tmp_path / "load"
    for node in (0, 1):
        shutil.copytree(tmp_path / "train" / f"node{node}", load / "job1" / f"rank-{node}")
    env_dir = tmp_path / "single"
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(load))
    run_job(env_dir, "ck", "b.st", "--steps", "4", "--expect-resume", "4", mode="fsdp", nproc=2)
    assert_same(tmp_path / "a.st", env_dir / "b.st")


def _two_node_consolidate(tmp: Path, dirs: list[Path]) -> list[tuple[int, str]]:
    port = free_port()
    jobs = []
    try:
        for node in (0, 1):
            env = env_with(BT_CHECKPOINT_DIR=str(dirs[node]), BT_NODE_RANK=str(node))
            jobs.append(torchrun("dist_consolidate.py", [str(tmp), "2"], nproc=1, env=env, port=port, nnodes=2,
                                 node_rank=node, rdzv=True))
            time.sleep(0.5)
        return [finish(j, timeout=240) for j in jobs]
    finally:
        for j in jobs:
            kill_session(j)


def test_save_time_consolidation_across_two_nodes(tmp_path: Path) -> None:
    """consolidate=True on 2 nodes x 1 rank (FSDP2): with every node's dir at <shared>/rank-<node>, global rank 0
    reads both parts and writes the full model; in any other layout every rank refuses at construction."""
    import torch
    from safetensors.torch import load_file

    shared = tmp_path / "shared"
    results = _two_node_consolidate(tmp_path, [shared / "rank-0", shared / "rank-1"])
    for rc, out in results:
        assert rc == 0, out[-4000:]
    zero = next(n for n in (0, 1) if (shared / f"rank-{n}" / "consolidated").is_dir())
    dest = shared / f"rank-{zero}" / "consolidated" / "checkpoint-3"
    assert not (shared / f"rank-{1 - zero}" / "consolidated").exists()  # only global rank 0 consolidates
    want = load_file(str(tmp_path / "full-3.st"))
    got = load_file(str(dest / "model.safetensors"))
    assert set(want) == set(got) and all(torch.equal(v, got[k]) for k, v in want.items())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # keep_last=2
    results = _two_node_consolidate(tmp_path, [tmp_path / "node0", tmp_path / "node1"])
    for rc, out in results:
        assert rc != 0 and "rank-<node> layout" in out, out[-3000:]
