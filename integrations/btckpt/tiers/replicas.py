"""Peer replicas: each node's local-tier checkpoint also kept in the next node's memory, fetched back after a loss.

With a local tier (``local_every_steps``) and two or more nodes, node ``i``'s leader sends every tier checkpoint
it commits (this node's part: its folder, manifest included) to node ``(i + 1) mod n``, which keeps it under
``<its tier>/.replicas/node-<i>/`` through the commit protocol (temp folder, every file checked against the
manifest as it lands, manifest last, rename; one complete step kept, plus the one arriving). A node that
starts with its memory lost (a replacement node, a wiped ``/dev/shm``) fetches its part of the newest step
its peer holds back into its own tier before anything resumes, so the usual resume policy and the multi-rank
step agreement find it there; each file is checked against the manifest as it lands, and the fetched part is
vouched for (:func:`btckpt.restore.reader.vouch`), so its restore reads each byte once (into the state, hashed as
it lands) even when it is the only candidate, instead of hashing every file first again. The node serving the
fetch meanwhile verifies its own copy of the step when that copy is its only one (its restore would hash it first),
and vouches for it the same way.

Transport (16 MiB messages, two buffers a side: the next chunk is read or received while the last is on the wire
or being written): a gloo process group of the node leaders alone, made from the job's c10d store under this
Checkpointer's session prefix, never the training process group, so it cannot deadlock with training's
collectives; every exchange runs on a background thread of its own, and every wait is bounded by
``barrier_timeout``. Call order: :meth:`PeerReplicas.create` in the Checkpointer's constructor (every rank;
the node leaders connect, :meth:`recover` runs, all ranks wait for it), :meth:`schedule` after each tier
commit (node leaders, the writer thread; every node schedules the same steps, in the same order),
:meth:`wait` and :meth:`close` from ``wait()``/``close()``.

Guarantees: a replica is complete and verified or absent; a failed exchange (a peer died, a timeout) is logged
and never fails training (the durable dir is unaffected; the next exchange tries again). Replicas are
best-effort redundancy for a node's RAM, not a durable tier.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.world import World
from ..errors import CheckpointError
from ..format.manifest import Manifest
from ..restore.policy import ResumePolicy
from ..restore.reader import verify_and_vouch, vouch
from ..saving.commit import checkpoint_name, remove_stale_temps
from ..saving.destination import LocalDir
from ..saving.priority import background_thread, leave
from ..saving.retention import apply_retention
from ..storage.discovery import CheckpointInfo, inspect, scan
from ..storage.local import make_dirs, new_tag
from ..testing import faults
from .local import REPLICAS, LocalTier, copy_verified, resumable_tier, settled

__all__ = ["PeerReplicas", "recovery_needed", "replicating"]

log = logging.getLogger("btckpt")

_CHUNK = 16 << 20  # bytes per message
_TAGS = 1 << 20  # message tags cycle through this many steps


def replicating(config: Any, world: World, *, recovering: bool = False) -> bool:
    """Whether a Checkpointer of ``config`` in ``world`` keeps peer replicas (the same answer on every rank).
    ``recovering``: whether it would, for a session without ``local_every_steps`` that restarts a job whose
    nodes kept tiers (it only fetches back what a node lost: :func:`recovery_needed`)."""
    return bool((recovering or config.local_every_steps is not None) and config.peer_replicas and world.nodes > 1
                and world.distributed and world.size % world.nodes == 0)


def recovery_needed(config: Any, world: World, durable: Path, *, key: str) -> bool:
    """Whether a session without a tier of its own (no ``local_every_steps``) must still take part in the
    replica exchange at start: a job of several nodes with peer replicas where some node's leader finds a
    resumable tier of its dir (:func:`btckpt.tiers.resumable_tier`), which may hold the replica of a node that
    lost its memory. Every rank calls it (store agreement, the same answer everywhere); without it the node that
    lost its copy would resume an older step although its peer's RAM holds a verified one."""
    if config.local_every_steps is not None or not replicating(config, world, recovering=True):
        return False
    has = world.is_local_leader and resumable_tier(durable, config.local_tier_dir) is not None
    # the intersection of every rank's list is [0] only when no node leader has a tier
    return world.agree_step(key, [] if has else [0], timeout=config.barrier_timeout) != 0


def _tag(step: int, kind: int) -> int:
    return (step % _TAGS) * 4 + kind


class _Link:
    """Messages between two node leaders over the replica process group (bounded waits, a tag per step)."""

    def __init__(self, pg: Any, timeout: float) -> None:
        self.pg, self.timeout = pg, datetime.timedelta(seconds=timeout)

    def send_json(self, obj: Any, dst: int, step: int) -> None:
        raw = json.dumps(obj).encode()
        self._send(torch.tensor([len(raw)], dtype=torch.int64), dst, _tag(step, 0))
        self._send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), dst, _tag(step, 1))

    def recv_json(self, src: int, step: int) -> Any:
        n = torch.zeros(1, dtype=torch.int64)
        self._recv(n, src, _tag(step, 0))
        raw = bytearray(int(n[0]))
        if raw:
            self._recv(torch.frombuffer(raw, dtype=torch.uint8), src, _tag(step, 1))
        return json.loads(bytes(raw) or b"null")

    def send_files(self, folder: Path, man: Manifest, dst: int, step: int) -> None:
        """Every file ``man`` lists, in its order, as the manifest's sizes cut into :data:`_CHUNK`-byte messages:
        the receiver cuts the same sizes the same way (gloo aborts the process on a message of another size).
        Two buffers: the next chunk is read while the one before it is on the wire."""
        bufs = (bytearray(_CHUNK), bytearray(_CHUNK))
        tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in bufs]
        views = [memoryview(b) for b in bufs]
        pending: list[Any] = [None, None]  # each buffer's send in flight: waited for before the buffer is reused
        i = 0
        try:
            for name, entry in man.files.items():
                with open(folder / name, "rb", buffering=0) as f:
                    left = int(entry["size"])
                    while left > 0:
                        n, got = min(left, _CHUNK), 0
                        self._settle(pending[i])
                        pending[i] = None
                        while got < n:
                            k = f.readinto(views[i][got:n])
                            if not k:
                                raise CheckpointError(f"{folder / name}: shorter than its manifest says; not sent")
                            got += k
                        pending[i] = self.pg.send([tensors[i][:n]], dst, _tag(step, 2))
                        i ^= 1
                        left -= n
            for j in (i, i ^ 1):  # in the order sent
                work, pending[j] = pending[j], None
                self._settle(work)
        finally:  # after a failure: the buffers stay alive until the sends in flight from them ended (or timed out)
            for work in pending:
                with contextlib.suppress(Exception):
                    self._settle(work)

    def recv_pieces(self, size: int, src: int, step: int, bufs: tuple[bytearray, bytearray]) -> Iterator[memoryview]:
        """The ``size`` bytes of one file from ``src``, chunk by chunk (consume each before the next): the next
        chunk is received into the other of ``bufs`` (two buffers of the same size, reused) while this one is
        consumed."""
        tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in bufs]
        views = [memoryview(b) for b in bufs]
        sizes = [min(len(bufs[0]), size - at) for at in range(0, size, len(bufs[0]))]
        work = self.pg.recv([tensors[0][:sizes[0]]], src, _tag(step, 2)) if sizes else None
        for k, n in enumerate(sizes):
            self._settle(work)
            if k + 1 < len(sizes):  # the next chunk lands in the other buffer while the caller consumes this one
                work = self.pg.recv([tensors[(k + 1) % 2][:sizes[k + 1]]], src, _tag(step, 2))
            yield views[k % 2][:n]

    def _settle(self, work: Any) -> None:
        if work is not None:
            work.wait(self.timeout)

    def _send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        if t.numel():
            self.pg.send([t], dst, tag).wait(self.timeout)

    def _recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        if t.numel():
            self.pg.recv([t], src, tag).wait(self.timeout)


@dataclass(eq=False)
class _Exchange:
    """One scheduled exchange: its tier step, the folder it sends, its store key (run or dropped, agreed)."""

    step: int
    src: Path
    key: str
    future: Future[None] = field(default_factory=Future)
    dropped: bool = False  # superseded by schedule(), which released its hold


class PeerReplicas:
    """This node's side of the replica ring (see the module doc): what it sends to ``next``, holds for ``prev``."""

    def __init__(self, tier: LocalTier, world: World, *, session: str, timeout: float) -> None:
        self.tier, self.world, self.timeout = tier, world, timeout
        n, me = world.nodes, world.node_rank
        self.next, self.prev = (me + 1) % n, (me - 1) % n
        self.held = tier.root / REPLICAS / f"node-{self.prev}"  # the replicas of prev's part, kept here
        remove_stale_temps(self.held, locked=True)  # a copy cut short by a crash (the tier's lock is this node's)
        store = dist.PrefixStore(f"btckpt/{session}/replicas/", world.store)
        self._pg: Any = dist.ProcessGroupGloo(store, me, n, datetime.timedelta(seconds=timeout))
        self._link = _Link(self._pg, timeout)
        self._bufs = (bytearray(_CHUNK), bytearray(_CHUNK))  # the receiving side's two chunk buffers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btckpt-replica",
                                        initializer=background_thread)
        self._futures: list[Future[None]] = []
        self._mutex = threading.Lock()
        self._session = session
        self._seq = 0  # exchanges scheduled: the same sequence on every node (each schedules the same steps)
        self._waiting: _Exchange | None = None  # scheduled, not started: a newer one supersedes it
        self.superseded = 0  # exchanges dropped before they started (logged)
        self.failures = 0  # exchanges that failed (logged)
        self.exchanged: int | None = None  # the newest step whose exchange completed

    @classmethod
    def create(cls, config: Any, world: World, tier: LocalTier | None, *, session: str) -> PeerReplicas | None:
        """Every rank calls it in the Checkpointer's constructor: the node leaders connect and recover what their
        node lost (:meth:`recover`), every rank waits until that is done; None on ranks that do not exchange
        (non-leaders) and without replicas (:func:`replicating`)."""
        if tier is None or not replicating(config, world, recovering=True):
            return None
        if not 0 <= world.node_rank < world.nodes:
            raise CheckpointError(f"peer replicas need node ranks 0..{world.nodes - 1}, this node says "
                                  f"{world.node_rank} ($BT_NODE_RANK / GROUP_RANK); fix the node rank or set "
                                  "peer_replicas=False")
        tier.copies *= 2  # its own steps and the peer's replicas
        key = f"{session}/replicas/recovered"
        mine: PeerReplicas | None = None
        try:
            if world.is_local_leader:
                mine = cls(tier, world, session=session, timeout=config.barrier_timeout)
                mine.recover(session)
            world.barrier(key, timeout=config.barrier_timeout)
        except BaseException:
            world.fail(key)  # peers waiting in the barrier learn it at once
            if mine is not None:
                mine.close()
            raise
        return mine

    # -- at start: a node that lost its memory fetches its part back -------------------------------------------
    def _own_newest(self, *, at_least: int) -> tuple[int, CheckpointInfo | None]:
        """The newest step this node has a verified copy of in its tier or its durable dir (the resume policy's
        copies, fastest first; a damaged copy is passed over with a warning), reading only steps of at least
        ``at_least`` (the step the holder keeps a replica of: below it the answer only has to be below it, so the
        newest complete one is given unread; with its folder when no other complete copy follows it, so that the
        restore would hash it first); -1: none. A copy verified here is vouched for
        (:func:`btckpt.restore.reader.verify_and_vouch`): the restore that follows does not hash it again."""
        policy = ResumePolicy.for_job(dir=self.tier.durable, load_dir=None, local=self.tier.root)
        candidates = [info for info in policy.candidates() if info.complete]
        for i, info in enumerate(candidates):
            if at_least < 0 or info.step < at_least:
                return info.step, (info if i == len(candidates) - 1 else None)
            problems = verify_and_vouch(info)
            if not problems:
                return info.step, None
            log.warning("btckpt: node %d: %s is damaged (%s); not counted as this node's copy of step %d",
                        self.world.node_rank, info.path, problems[0], info.step)
        return -1, None

    def _held_newest(self) -> int:
        """The newest complete replica held for ``prev`` of this job's shape (-1: none)."""
        for info in scan(self.held, own=True) if self.held.is_dir() else []:
            man = info.manifest
            if info.complete and man is not None and man.world.get("nodes") == self.world.nodes \
                    and man.world.get("node_rank") == self.prev:
                return info.step
        return -1

    def recover(self, session: str) -> int | None:
        """Fetch this node's part of the newest step its holder (``next``) keeps when that is newer than anything
        this node has, into this node's tier; serve ``prev`` the same way (while serving, a node that fetches
        nothing verifies and vouches for its own only copy of its newest step). Node leaders; the step fetched."""
        key = f"{session}/replicas/have"
        held = self._held_newest()
        self.world.publish(f"{key}/held/{self.world.node_rank}", held)
        holder = int(self.world.collect(f"{key}/held/{self.next}", timeout=self.timeout))
        own, unread = self._own_newest(at_least=holder)  # a copy counts as this node's only once it verified
        self.world.publish(f"{key}/own/{self.world.node_rank}", own)
        owner = int(self.world.collect(f"{key}/own/{self.prev}", timeout=self.timeout))
        # both ends decide from the same published figures: the holder serves exactly when the owner fetches
        fetch = holder if holder > own else None
        serve = held if held > owner else None
        sender = None
        if serve is not None:
            sender = threading.Thread(target=self._send_step, args=(self.held, serve, self.prev),
                                      name="btckpt-replica-serve", daemon=True)
            sender.start()
        try:
            if sender is not None and fetch is None and unread is not None:
                # while the peer fetches (this node waits for it anyway), check the copy this node's restore
                # will read: vouched for, the restore then reads it once instead of hashing it first
                problems = verify_and_vouch(unread)
                if problems:
                    log.warning("btckpt: node %d: %s is damaged (%s); the resume passes it over",
                                self.world.node_rank, unread.path, problems[0])
            if fetch is not None:
                t0 = time.perf_counter()
                try:
                    # a copy of that step in the tier is damaged (own < fetch): the verified one supersedes it
                    path = self._receive_into(self.tier.root, fetch, self.next, owner=self.world.node_rank,
                                              supersede=True)
                except Exception as exc:  # noqa: BLE001 - the resume falls back to what this node has
                    log.error("btckpt: node %d: fetching its part of step %d from node %d failed; resuming from "
                              "what this node has: %s", self.world.node_rank, fetch, self.next, exc)
                    return None
                info = inspect(path)
                if info.complete and info.manifest is not None:
                    # every file was checked against the manifest as it landed: the restore that follows reads
                    # each once (into the state, hashed as it lands) instead of hashing it first again
                    with contextlib.suppress(OSError):  # not recorded: the restore verifies it first as usual
                        vouch(path, info.manifest)
                log.warning("btckpt: node %d: fetched its part of step %d from node %d's memory into %s (%.1f MB in "
                            "%.2f s)", self.world.node_rank, fetch, self.next, path,
                            info.size / 1e6, time.perf_counter() - t0)
        finally:
            if sender is not None:
                sender.join()
        return fetch

    # -- while training: every tier commit is sent to next, prev's is received -----------------------------
    def schedule(self, step: int) -> None:
        """Exchange tier step ``step`` in the background: send this node's part to ``next``, receive ``prev``'s
        (node leaders, after the tier commit of ``step``; every node schedules the same steps in order)."""
        src = self.tier.root / checkpoint_name(step)
        self.tier.hold(src)  # retention keeps it until it was sent
        self._seq += 1
        job = _Exchange(step, src, f"{self._session}/replicas/x{self._seq}/go")
        dropped = None
        with self._mutex:
            old = self._waiting
            if old is not None and self._decide(old, "skip") == "skip":  # both nodes drop it, or neither
                old.dropped = True  # released here: _start returns at once if the thread took it meanwhile
                old.future.cancel()
                if old.future in self._futures:
                    self._futures.remove(old.future)
                dropped = old
            self._waiting = job
            self._futures = [f for f in self._futures if not f.done()]
            job.future = self._pool.submit(self._start, job)
            self._futures.append(job.future)
        if dropped is not None:
            self.superseded += 1
            log.warning("btckpt: node %d: peer replica exchange of step %d superseded by step %d before it started "
                        "(exchanges are slower than the tier interval)", self.world.node_rank, dropped.step, step)
            self._done(dropped.src)

    def _decide(self, job: _Exchange, choice: str) -> str:
        """Whether ``job`` runs or is dropped (``choice``: this node's proposal): the first node's proposal, which
        every node then follows; "run" when the store is gone (the exchange then fails at its timeout)."""
        try:
            return str(self.world.propose(job.key, choice))
        except CheckpointError:
            return "run"

    def _start(self, job: _Exchange) -> None:
        """The replica thread: run ``job`` unless a newer one superseded it (here or on the peer, agreed)."""
        with self._mutex:
            if job.dropped:
                return
            if self._waiting is job:
                self._waiting = None
        if self._decide(job, "run") != "run":  # the peer dropped it first: so does this node
            self.superseded += 1
            self._done(job.src)
            return
        self._exchange(job.step, job.src)

    def _done(self, src: Path) -> None:
        self.tier.release(src)
        self.tier.retain()

    def _exchange(self, step: int, src: Path) -> None:
        try:
            sender = threading.Thread(target=self._send_step, args=(self.tier.root, step, self.next),
                                      name="btckpt-replica-send", daemon=True)
            sender.start()
            try:
                self._receive_into(self.held, step, self.prev, owner=self.prev, replace=True)
                apply_retention(self.held, keep_last=1)
            finally:
                sender.join()
            self.exchanged = step
        except Exception as exc:  # noqa: BLE001 - redundancy lost for this step, training and the dir unaffected
            self.failures += 1
            log.error("btckpt: node %d: peer replica of step %d not exchanged (node %d keeps no copy of this "
                      "node's step %d until the next one): %s", self.world.node_rank, step, self.next, step, exc)
        finally:
            self._done(src)

    # -- the two halves of a transfer ---------------------------------------------------------------------------
    def _send_step(self, root: Path, step: int, dst: int) -> None:
        """Send ``root/checkpoint-<step>`` to ``dst`` (a header with its manifest, then its files); a header saying
        there is nothing when it is not complete here. Errors are logged (the receiver reports its side)."""
        src = root / checkpoint_name(step)
        try:
            info = inspect(src)
            man = info.manifest if info.complete else None
            raw = (src / "btckpt.json").read_text() if man is not None else None
            self._link.send_json({"step": step, "manifest": raw}, dst, step)
            if man is not None:
                self._link.send_files(src, man, dst, step)
        except Exception as exc:  # noqa: BLE001 - runs on its own thread; the receiver reports its side too
            log.error("btckpt: node %d: sending %s to node %d failed: %s", self.world.node_rank, src, dst, exc)

    def _receive_into(self, root: Path, step: int, src: int, *, owner: int, replace: bool = False,
                      supersede: bool = False) -> Path:
        """Receive from ``src`` node ``owner``'s part of ``checkpoint-<step>`` into ``root`` through the commit
        protocol (every file checked against the manifest sent with it, which must be of that step, that node
        and this job's node count); the new folder. ``replace``: a folder of that step already there (a replica
        from before a restart that went back to an older step) is replaced. ``supersede``: a folder of that step
        there is a damaged copy (the caller verified it). Either way the folder there is retired only once the
        received one committed (a failed exchange leaves it as it was)."""
        head = self._link.recv_json(src, step)
        if not isinstance(head, dict) or head.get("step") != step:
            raise CheckpointError(f"node {src} sent {str(head)[:200]!r} for step {step}; replicas out of step")
        if head.get("manifest") is None:
            raise CheckpointError(f"node {src} has no complete checkpoint-{step} to send")
        where = f"checkpoint-{step} from node {src}"
        man = Manifest.from_json(str(head["manifest"]).encode(), where=where)
        streams = {name: self._link.recv_pieces(int(entry["size"]), src, step, self._bufs)
                   for name, entry in man.files.items()}
        final = root / checkpoint_name(step)
        # the folder of that step already there is retired only once the received copy committed
        supersede = supersede or (replace and final.is_dir() and not final.is_symlink())
        dest = LocalDir(root)
        commit = dest.part(step, tag=new_tag(), supersede=supersede)
        try:
            if (man.step, man.node_rank, man.world.get("nodes")) != (step, owner, self.world.nodes):
                raise CheckpointError(f"{where}: its manifest is of step {man.step}, node {man.node_rank} of "
                                      f"{man.world.get('nodes')}, not step {step}, node {owner} of {self.world.nodes}")
            if final.exists() and not supersede:
                raise CheckpointError(f"{final} exists already; the copy from node {src} was not kept")
            make_dirs(root, private=True)  # <tier>/.replicas/node-<i>: private, as the whole tier
            dest.begin(commit)
            copy_verified(man, commit, streams.__getitem__, where=where)
            faults.point("replicate")
            return dest.commit(commit, man)
        except (CheckpointError, OSError):
            for stream in streams.values():  # keep the link in step: take the rest of the bytes off the wire
                for _ in stream:
                    pass
            raise
        finally:
            dest.abort(commit)

    # -- end ------------------------------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the exchanges scheduled so far (up to ``timeout`` s); False when one is still running then."""
        with self._mutex:
            futures = list(self._futures)
        return settled(futures, timeout)

    def close(self, *, timeout: float | None = None) -> bool:
        """Finish the queued exchanges (up to ``timeout`` s: after SIGTERM, the grace left), stop the thread, drop
        the process group (node leaders, from close()). False when an exchange was still running then: the
        thread is left to the process's exit and the process group as it is (a replica is complete or absent)."""
        if not self.wait(timeout):
            log.warning("btckpt: node %d: a peer replica exchange was still running when time ran out; left to the "
                        "exit", self.world.node_rank)
            self._pool.shutdown(wait=False, cancel_futures=True)
            return False
        self._pool.submit(leave).result()
        self._pool.shutdown(wait=True)
        pg, self._pg = self._pg, None
        shutdown = getattr(pg, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except RuntimeError:  # pragma: no cover - already torn down by a failed peer
                pass
        return True
