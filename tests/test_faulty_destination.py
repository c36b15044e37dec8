"""A multi-node save whose destination fails at one verb on one node, in-process: two nodes as threads over
one ``HashStore`` (``World(store=)``), each committing into its own dir through the real save path
(``run_save``), one of them through a :class:`FaultyDir` (the test double of DCP's ``FaultyStorageWriter``
shape: the chosen verb raises on the chosen node). Whatever fails, no node's folder of that step is complete,
no temp folder is left, and the older step stays complete everywhere. The real-process versions (a SIGKILL at
each phase) are tests/test_crash.py and tests/test_multinode.py.

Internals used: btckpt.distributed.world, btckpt.saving.destination, btckpt.saving.job, btckpt.saving.plan,
btckpt.saving.snapshot, btckpt.storage.discovery (one multi-node save assembled from its parts (plan, stager, job,
destination, a ``World`` over a shared store) so one node's destination can fail at one verb, discovery to judge the
folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from btckpt import CheckpointError, CoordinationError
from btckpt.distributed.world import World
from btckpt.saving.destination import LocalDir
from btckpt.saving.job import SaveJob, run_save
from btckpt.saving.plan import SavePlans, prepare_flat
from btckpt.saving.snapshot import Stager
from btckpt.storage.discovery import inspect


class FaultyDir(LocalDir):
    """A :class:`LocalDir` whose ``verb`` raises ``OSError(EIO)`` (after doing nothing)."""

    def __init__(self, root: Path, verb: str) -> None:
        super().__init__(root)
        self.verb = verb

    def _maybe_fail(self, verb: str) -> None:
        if verb == self.verb:
            raise OSError(5, f"injected failure in {verb}")

    def begin(self, part: Any) -> None:
        self._maybe_fail("begin")
        super().begin(part)

    def put(self, part: Any, name: str, data: bytes) -> tuple[int, str]:
        self._maybe_fail("put")
        return super().put(part, name, data)

    def record(self, part: Any, name: str, size: int, checksum: str) -> None:
        self._maybe_fail("record")
        super().record(part, name, size, checksum)

    def commit(self, part: Any, manifest: Any) -> Path:
        self._maybe_fail("commit")
        return super().commit(part, manifest)


def _save(world: World, root: Path, step: int, dest: LocalDir | None) -> Path:
    state = {"model": {"w": torch.arange(64, dtype=torch.float32) + step, "b": torch.ones(3) * world.node_rank},
             "extra": {"step": step}}
    flat, layout = prepare_flat(SavePlans(keep=False), list(state.items()), max_shard_size=128)
    assert layout is not None and len(layout.files) > 1  # sharded: several files per node
    stager = Stager()
    try:
        staged = stager.stage(flat, layout, async_keys=set(), sync=True)
        job = SaveJob(step=step, root=root, tag=f"save-{step}", world=world, flat=flat, staged=staged,
                      rng={"python": "x"}, barrier_timeout=20, dest=dest)
        return run_save(job)
    finally:
        stager.close()


def _two_nodes(tmp: Path, step: int, faulty: tuple[int, str] | None) -> list[Any]:
    store = dist.HashStore()
    out: list[Any] = [None, None]

    def node(n: int) -> None:
        w = World(n, 2, 0, 1, n, 2, store=store)
        root = tmp / f"node{n}"
        root.mkdir(exist_ok=True)
        dest = FaultyDir(root, faulty[1]) if faulty is not None and faulty[0] == n else None
        try:
            out[n] = _save(w, root, step, dest)
        except BaseException as e:  # noqa: BLE001 - inspected below
            out[n] = e

    threads = [threading.Thread(target=node, args=(n,), name=f"node-{n}") for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a node hung"
    return out


def test_two_nodes_commit_their_parts_through_the_real_save_path(tmp_path: Path):
    got = _two_nodes(tmp_path, 1, None)
    assert got == [tmp_path / "node0" / "checkpoint-1", tmp_path / "node1" / "checkpoint-1"]
    assert all(inspect(p).complete for p in got)


@pytest.mark.parametrize("node", [0, 1])
@pytest.mark.parametrize("verb", ["begin", "put", "record", "commit"])
def test_a_destination_failing_on_one_node_commits_nothing_and_keeps_the_older_step(tmp_path: Path, node: int,
                                                                                   verb: str):
    assert all(isinstance(p, Path) for p in _two_nodes(tmp_path, 1, None))
    got = _two_nodes(tmp_path, 2, (node, verb))
    # the failing node raises its own error (a write error names the folder: CheckpointError), its peer a
    # CoordinationError; only node 1's part may be committed, when node 0 fails after node 1 committed first
    assert isinstance(got[node], (OSError, CheckpointError)) and "injected failure" in str(got[node]), got[node]
    other = got[1 - node]
    assert isinstance(other, CoordinationError) or (node == 0 and isinstance(other, Path)), other
    for n in (0, 1):
        root = tmp_path / f"node{n}"
        names = sorted(p.name for p in root.iterdir())
        assert not [x for x in names if ".tmp-" in x], names  # no temp folder left
        assert inspect(root / "checkpoint-1").complete
    # the step is complete nowhere: node 0, which certifies a multi-node step by committing last, never did
    assert not (tmp_path / "node0" / "checkpoint-2").exists()
