"""The store agreements of :class:`btckpt.distributed.world.World`, several ranks as threads over one injected
``HashStore`` (``World(store=)``): the same code paths torchrun jobs take (tests/test_runtime_dist.py keeps one
real torchrun run per agreement), without starting processes.

Internals used: btckpt.distributed.world, btckpt.saving.destination (``World``'s store agreements and the multi-node
commit order under test, ranks as threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed as dist
from btckpt import CoordinationError
from btckpt.distributed.world import StopAgreement, World
from btckpt.saving.destination import commit_in_order


def _ranks(size: int, *, local_size: int = 1) -> list[World]:
    store = dist.HashStore()
    return [World(r, size, r % local_size, local_size, r // local_size, size // local_size, store=store)
            for r in range(size)]


def _run(worlds: list[World], body: Callable[[World], Any], *, timeout: float = 30) -> list[Any]:
    """``body(world)`` on one thread per rank; the results by rank (an exception is returned, not raised)."""
    out: list[Any] = [None] * len(worlds)

    def one(w: World) -> None:
        try:
            out[w.rank] = body(w)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out[w.rank] = e

    threads = [threading.Thread(target=one, args=(w,), name=f"rank-{w.rank}") for w in worlds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def test_an_injected_store_makes_the_world_distributed_and_is_the_one_used():
    w = _ranks(2)[0]
    assert w.distributed and w.store is not None and not dist.is_initialized()
    assert World().store is None and World(0, 2).store is None  # no store given, no process group: a no-op


def test_a_sigterm_on_one_rank_stops_every_rank_at_the_same_step():
    worlds = _ranks(3)
    gate = threading.Barrier(3)  # ranks in lockstep, as DDP's all-reduce keeps them

    def train(w: World) -> int:
        agreement = StopAgreement(w, "stop/run-1")
        for step in range(1, 50):
            gate.wait(10)
            if agreement.due(step, local=(w.rank == 1 and step == 7)):
                return step
            gate.wait(10)  # every rank has checked this step before anyone moves on
        raise AssertionError("never stopped")

    assert _run(worlds, train) == [8, 8, 8]  # the signalled rank proposed the next step; all stop there


def test_a_barrier_waits_for_every_rank_and_names_the_shortfall_on_timeout():
    worlds = _ranks(3)
    assert _run(worlds, lambda w: w.barrier("b1", timeout=10)) == [None, None, None]
    got = _run(worlds[:2], lambda w: w.barrier("b2", timeout=0.5))
    assert all(isinstance(e, CoordinationError) and "only 2 of 3 ranks reached 'b2'" in str(e) for e in got)


def test_a_failing_rank_releases_its_waiting_peers_at_once():
    worlds = _ranks(2)

    def body(w: World) -> float:
        t0 = time.monotonic()
        if w.rank == 1:
            time.sleep(0.2)
            w.fail("b")
            return 0.0
        w.barrier("b", timeout=60)
        return time.monotonic() - t0

    got = _run(worlds, body)
    assert isinstance(got[0], CoordinationError) and "rank 1 failed during 'b'" in str(got[0])


def test_ranks_agree_on_the_newest_step_all_of_them_hold():
    worlds = _ranks(3)
    held = {0: [3, 6, 9], 1: [3, 6, 9, 12], 2: [3, 6]}
    assert _run(worlds, lambda w: w.agree_step("resume", held[w.rank], timeout=10)) == [6, 6, 6]


def test_node_zero_commits_after_every_other_node_and_a_failure_stops_it():
    worlds = _ranks(3)
    order: list[int] = []
    lock = threading.Lock()

    def commit(w: World) -> None:
        def do() -> None:
            with lock:
                order.append(w.node_rank)
        if w.node_rank == 0:
            time.sleep(0.1)  # node 0 is first to the barrier: it must still wait for the others' commits
        commit_in_order(w, do, key="save-1", timeout=10)

    assert _run(worlds, commit) == [None, None, None]
    assert sorted(order[:2]) == [1, 2] and order[2] == 0

    order.clear()

    def broken(w: World) -> None:
        def do() -> None:
            if w.node_rank == 2:
                raise OSError("disk full")
            with lock:
                order.append(w.node_rank)
        commit_in_order(w, do, key="save-2", timeout=60)

    got = _run(worlds, broken)
    assert isinstance(got[2], OSError) and isinstance(got[0], CoordinationError)
    assert 0 not in order  # node 0's part never committed: the checkpoint is not complete anywhere


@pytest.mark.parametrize("size", [2, 4])
def test_proposals_settle_on_the_first_value(size: int):
    worlds = _ranks(size)
    got = _run(worlds, lambda w: w.propose("name", f"from-{w.rank}"))
    assert len(set(got)) == 1 and got[0].startswith("from-")


# -- whole Checkpointers, one per rank-thread (the session, save and restore agreements go through the store) ------
def test_checkpointers_as_threads_agree_on_sessions_created_in_a_different_order_per_rank(tmp_path):
    """Two Checkpointers per rank, on two dirs, created in the opposite order on each rank (both open at once):
    each finds its peer by identity, saves with it and restores its own rank's plain state (tests/test_sessions.py
    runs the same under torchrun)."""
    import btckpt
    import torch

    def body(w: World) -> dict:
        dirs = ["a", "b"] if w.rank == 0 else ["b", "a"]
        cks = {d: btckpt.Checkpointer(dir=tmp_path / d, world=w, handle_sigterm=False) for d in dirs}
        try:
            for d, ck in sorted(cks.items()):  # each save is collective: the same order on every rank
                ck.save(1, {"model": torch.nn.Linear(2, 2), "extra": {"dir": d, "rank": w.rank}})
                ck.wait()
        finally:
            for ck in cks.values():
                ck.close()
        got = {}
        for d in ("a", "b"):
            with btckpt.Checkpointer(dir=tmp_path / d, world=w, handle_sigterm=False) as ck:
                state = {"model": torch.nn.Linear(2, 2), "extra": {}}
                got[d] = (ck.restore(state), state["extra"])
        return got

    out = _run(_ranks(2, local_size=2), body)
    for r in (0, 1):
        assert out[r] == {d: (1, {"dir": d, "rank": r}) for d in ("a", "b")}, out[r]


def test_checkpointers_as_threads_on_two_nodes_resume_from_the_newest_step_every_node_holds(tmp_path):
    """Two nodes (one rank each, a dir each): node 1's part of step 2 is damaged, so both resume from step 1
    (the agreed step), never node 0 from 2 and node 1 from 1."""
    import btckpt
    import torch

    def save(w: World) -> None:
        with btckpt.Checkpointer(dir=tmp_path / f"node{w.rank}", world=w, handle_sigterm=False, name="job") as ck:
            for step in (1, 2):
                ck.save(step, {"model": torch.nn.Linear(2, 2), "extra": {"step": step}})

    _run(_ranks(2), save)
    victim = next((tmp_path / "node1" / "checkpoint-2").glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))

    def restore(w: World) -> tuple:
        with btckpt.Checkpointer(dir=tmp_path / f"node{w.rank}", world=w, handle_sigterm=False, name="job") as ck:
            state = {"model": torch.nn.Linear(2, 2), "extra": {}}
            return ck.restore(state), state["extra"]

    assert _run(_ranks(2), restore) == [(1, {"step": 1}), (1, {"step": 1})]
