"""A model-based fault test of a whole job (issue 22, section 5): hypothesis drives a job of 1-2 nodes x 1-2
ranks on this machine through combined events (tier saves, promotions, kills, a wiped tier, a damaged byte in
one copy, a slow or full dir, SIGTERM, restarts with or without a tier, a re-created dir, a folder planted by
another user) and checks DESIGN.md's rules after each one.

Each rank is a real process (forked from this one, torch already imported, so a start costs milliseconds),
several ranks form a real gloo process group over a FileStore, a kill is a real SIGKILL and a SIGTERM a real
signal through btckpt's handler and its at-exit close. Nodes are separate dirs and tiers (as on a
cluster, where each node has its own /dev/shm); the tier is the default one (``default_tier_dir``).

Invariants, after every event (:meth:`JobModel.check`) and after every restart (:meth:`JobModel.restart`):

- every rank resumes the same step, with that step's weights;
- that step is the newest one with a verified copy on every node (tier of the dir's current incarnation, dir,
  peer replica), computed from the files, never from btckpt's answers; so never older than the newest durable
  verified step, and never a step another user planted;
- the last verified copy of a step is never deleted unless a newer step is complete on every node (an event
  that destroys copies itself, a wipe or damage, is exempt);
- a tier holds at most ``COPIES + 1`` complete steps of its own (README: two, a third while one is promoted;
  checked while work is in flight, one more waiting, and one more with several nodes);
- after a clean close nothing of btckpt is left in shared memory for the job;
- files outside btckpt's own folders are unchanged (a sentinel, and the file a planted lock link points to);
- after SIGTERM every rank exits 0 within ``preemption_grace`` + slack.

CI runs a bounded number of examples (fixed seeds); ``BTCKPT_MODEL_EVENTS=10000`` runs at least that many
events with random seeds (``benchmarks/job_model.sh``), printing every violation (its seed and events) and the
count and wall time at the end; ``BTCKPT_MODEL_SEED=S`` reruns one example, ``BTCKPT_MODEL_TRACE=1`` shows
each rank's log and each event's time.

Internals used: btckpt.checkpointer, btckpt.distributed.world, btckpt.storage.discovery, btckpt.tiers,
btckpt.tiers.local (the Checkpointer's exit hook, a ``World`` per simulated rank, the tier's folder, identity and
copy bounds the model checks, discovery to judge the folders on disk (complete, verified), which no public name
reports).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import btckpt  # imported here, so each forked rank starts in milliseconds  # noqa: F401
import btckpt.checkpointer  # noqa: F401
import pytest
import torch  # noqa: F401
import torch.distributed  # noqa: F401

EVENTS = int(os.environ.get("BTCKPT_MODEL_EVENTS", "0") or 0)  # offline: run at least this many events
STEPS_PER_EXAMPLE = 30
TRACE = bool(os.environ.get("BTCKPT_MODEL_TRACE"))
# offline triage only, never in CI: invariants relaxed for defects other fixes are known to address (the report
# names each): "orphan": a session without a tier that resumed from one leaves it at clean close (issue 22, 3);
# "incarnation": a tier of a deleted and re-created dir is resumed from (issue 22, 3)
KNOWN = set(filter(None, os.environ.get("BTCKPT_MODEL_KNOWN", "").split(",")))
SKIP = set(filter(None, os.environ.get("BTCKPT_MODEL_SKIP", "").split(",")))  # rules left out (offline triage)
EXAMPLES = 12  # CI: about a minute on 2 cores
GRACE = 3.0
SLACK = 3.0
REPLY_S = 60.0
FOREIGN_UID = 54321
COUNT = {"events": 0, "examples": 0, "restarts": 0}


# -- the rank process -----------------------------------------------------------------------------------------
def _value(step: int) -> float:
    return float(step)


def _worker(conn: Any, place: dict[str, int], store: str, opts: dict[str, Any]) -> None:
    """One rank: builds its Checkpointer and answers commands from the test until told to close (or killed)."""
    import logging

    import btckpt
    import torch
    import torch.distributed as dist
    from btckpt.checkpointer import _close_at_exit
    from btckpt.distributed.world import World
    from btckpt.testing import faults

    logging.getLogger("btckpt").setLevel(logging.WARNING)
    if TRACE:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter(f"[rank {place['rank']}] %(message)s"))
        logging.getLogger("btckpt").addHandler(handler)
    torch.set_num_threads(1)
    size = place["size"]
    if TRACE:
        print(f"rank {place['rank']}: forked", file=sys.stderr)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=place["rank"], world_size=size)
    world = World(place["rank"], size, place["local_rank"], place["local_size"], place["node"], place["nodes"],
                  distributed=size > 1)
    model = torch.nn.Linear(4, 4)
    state = {"model": model, "extra": {"step": -1}}
    ck = None
    t0 = time.monotonic()
    try:
        ck = btckpt.Checkpointer(world=world, **opts)
        if TRACE:
            print(f"rank {place['rank']}: checkpointer in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        _ = ck.preempted  # a training loop that calls maybe_save: SIGTERM is acted on, not passed on
        conn.send(("ok", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test (a refusal may be the right answer)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        conn.close()
        if size > 1:
            dist.destroy_process_group()
        return
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "restore":
                with torch.no_grad():
                    model.weight.fill_(-7.0)
                t0 = time.monotonic()
                got = ck.restore(state)
                if TRACE:
                    print(f"rank {place['rank']}: restore in {time.monotonic() - t0:.1f}s", file=sys.stderr)
                w = float(model.weight.flatten()[0]) if got is not None else None
                same = bool(torch.all(model.weight == model.weight.flatten()[0]))
                tier = ck._tier.root if ck._tier is not None and place["local_rank"] == 0 else None  # the live one
                conn.send(("ok", (got, w, same, state["extra"]["step"], str(tier) if tier else None)))
            elif cmd in ("tier", "durable", "maybe"):
                ck.fence()
                with torch.no_grad():
                    model.weight.fill_(_value(arg))
                    model.bias.fill_(_value(arg))
                state["extra"]["step"] = arg
                if cmd == "tier":
                    ck.save_local(arg, state)
                elif cmd == "durable":
                    ck.save(arg, state)
                else:
                    try:
                        ck.maybe_save(arg, state)
                    except SystemExit as stop:  # the preemption exit: the at-exit close, as at interpreter exit
                        conn.send(("exit", None))
                        _close_at_exit(weakref.ref(ck))
                        os._exit(int(stop.code or 0))
                conn.send(("ok", None))
            elif cmd == "wait":
                ck.wait()
                conn.send(("ok", None))
            elif cmd == "fault":
                faults.disarm()
                if arg:
                    faults.arm(*arg)
                conn.send(("ok", None))
            elif cmd == "close":
                try:
                    ck.close()
                    conn.send(("ok", None))
                except BaseException as exc:  # noqa: BLE001
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
                if size > 1:
                    dist.destroy_process_group()
                return
        except BaseException as exc:  # noqa: BLE001 - an error of one command; the rank goes on
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"))


# -- the job seen from outside ------------------------------------------------------------------------------
@dataclass
class Rank:
    proc: Any
    conn: Any
    node: int


@dataclass
class Job:
    """The job's folders: per node its dir and (default) tier; the sentinel outside btckpt's folders."""

    base: Path
    nodes: int
    ranks_per_node: int
    dirs: list[Path] = field(default_factory=list)
    tiers: list[Path] = field(default_factory=list)
    live: dict[int, Path] = field(default_factory=dict)  # node -> the tier folder its live session reported

    def __post_init__(self) -> None:
        from btckpt.tiers import default_tier_dir

        self.dirs = [self.base / f"node{n}" / "ckpt" for n in range(self.nodes)]
        for d in self.dirs:
            d.mkdir(parents=True)
        self.tiers = [default_tier_dir(d) for d in self.dirs]
        for t in self.tiers:
            assert not t.exists(), t
        self.sentinel = self.base / "outside.txt"
        self.sentinel.write_text("user data\n")
        self.victim = self.base / "victim.txt"  # what a planted lock link points at
        self.victim.write_text("victim\n")

    @property
    def size(self) -> int:
        return self.nodes * self.ranks_per_node

    def outside(self) -> tuple[str, str]:
        return self.sentinel.read_text(), self.victim.read_text()


def _tier_folders(job: Job, node: int, holders_ok: list[bool]) -> list[Path]:
    """Node ``node``'s tier folders: its default tier (when it is the job's tier of the dir's current
    incarnation) and the fresh private folder its live session uses when that path was taken
    (``tiers.local.place``; its copies end with the session: a restart looks only at the default path)."""
    out = [job.tiers[node]] if holders_ok[node] else []
    live = job.live.get(node)
    if live is not None and live != job.tiers[node]:
        out.append(live)
    return [t for t in out if t.is_dir()]


def _copies(job: Job, node: int, holders_ok: list[bool]) -> list[Path]:
    """Every checkpoint folder that holds node ``node``'s part: its dir, its tier folders (:func:`_tier_folders`),
    and its replicas in the other nodes' tier folders."""
    from btckpt.storage.discovery import scan
    from btckpt.tiers.local import REPLICAS

    found = [i.path for i in scan(job.dirs[node], own=True)]
    for t in _tier_folders(job, node, holders_ok):
        found += [i.path for i in scan(t, own=True)]
    for other in range(job.nodes):
        for t in _tier_folders(job, other, holders_ok) if other != node else []:
            held = t / REPLICAS / f"node-{node}"
            if held.is_dir():
                found += [i.path for i in scan(held, own=True)]
    return found


def _verified_steps(job: Job, node: int, tier_ok: list[bool]) -> set[int]:
    from btckpt.storage.discovery import inspect, verify

    steps = set()
    for path in _copies(job, node, tier_ok):
        try:
            info = inspect(path)
            if info.complete and info.manifest is not None and not verify(info):
                steps.add(info.step)
        except Exception:  # noqa: BLE001 - a folder retired under us: not a copy
            pass
    return steps


def _tier_steps(tier: Path) -> int:
    from btckpt.storage.discovery import scan

    return sum(1 for i in scan(tier, own=True) if i.complete) if tier.is_dir() else 0


def _flip_byte(path: Path, offset_seed: int) -> None:
    size = path.stat().st_size
    if size == 0:
        return
    at = offset_seed % size
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


class JobModel:
    """The job, its rules and invariants (see the module doc)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.job: Job | None = None
        self.ranks: list[Rank] = []
        self.step = 0
        self.tier_ok: list[bool] = []  # the tier belongs to the dir's current incarnation (not re-created since)
        self.with_tier = True
        self.planted: list[Path] = []
        self.common: set[int] = set()  # steps verified on every node after the last event
        self.outside: tuple[str, str] = ("", "")
        self.faulty = False  # a fault is armed on the ranks (slow or full dir)
        self.log: list[str] = []
        COUNT["examples"] += 1

    # -- helpers ---------------------------------------------------------------------------------------
    def note(self, what: str) -> None:
        COUNT["events"] += 1
        self.log.append(what)

    def fail(self, what: str) -> None:
        raise AssertionError(f"seed {self.seed} (BTCKPT_MODEL_SEED={self.seed} reruns it): {what}\n"
                             f"events: {' ; '.join(self.log)}")

    def alive(self) -> bool:
        return bool(self.ranks)

    def ask(self, cmd: str, arg: Any = None, *, ranks: list[Rank] | None = None) -> list[tuple[str, Any]]:
        targets = self.ranks if ranks is None else ranks
        for r in targets:
            r.conn.send((cmd, arg))
        out = []
        for r in targets:
            try:
                if not r.conn.poll(REPLY_S):
                    self.fail(f"rank of node {r.node} did not answer {cmd!r} within {REPLY_S:.0f}s (a hang)")
                out.append(r.conn.recv())
            except (EOFError, OSError):
                r.proc.join(5)
                self.fail(f"rank of node {r.node} died during {cmd!r} (exit code {r.proc.exitcode})")
        return out

    def start(self) -> list[tuple[str, Any]]:
        assert self.job is not None
        job = self.job
        ctx = multiprocessing.get_context("fork")
        store = job.base / f"store-{uuid.uuid4().hex[:8]}"
        self.ranks = []
        for rank in range(job.size):
            node, local = divmod(rank, job.ranks_per_node)
            place = {"rank": rank, "size": job.size, "local_rank": local, "local_size": job.ranks_per_node,
                     "node": node, "nodes": job.nodes}
            opts: dict[str, Any] = {"dir": str(job.dirs[node]), "keep_last": 2, "handle_sigterm": True,
                                    "preemption_grace": GRACE, "barrier_timeout": 30.0, "on_error": "warn",
                                    "name": "model", "peer_replicas": job.nodes > 1}
            if self.with_tier:
                opts["local_every_steps"] = 1
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(theirs, place, str(store), opts), daemon=True)
            proc.start()
            theirs.close()
            self.ranks.append(Rank(proc, ours, node))
        out = []
        for r in self.ranks:
            if not r.conn.poll(REPLY_S):
                self.fail("a rank did not start")
            out.append(r.conn.recv())
        return out

    def stop(self, *, kill: bool) -> None:
        for r in self.ranks:
            if kill and r.proc.is_alive():
                os.kill(r.proc.pid, signal.SIGKILL)
            r.proc.join(30)
            if r.proc.is_alive():
                os.kill(r.proc.pid, signal.SIGKILL)
                r.proc.join(10)
            r.conn.close()
        self.ranks = []
        if self.job is not None and any(t != self.job.tiers[n] for n, t in self.job.live.items()):
            # the sessions' fresh private tier folders are unreachable from here on (a restart looks at the default
            # path only, README "Shared places"): their copies ended with the sessions, not deleted by btckpt
            self.job.live = {}
            self.common = self.verified_common()
        elif self.job is not None:
            self.job.live = {}

    def verified_common(self) -> set[int]:
        assert self.job is not None
        sets = [_verified_steps(self.job, n, self.tier_ok) for n in range(self.job.nodes)]
        return set.intersection(*sets) if sets else set()

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self, nodes: int, ranks: int) -> None:
        base = Path(os.environ.get("BTCKPT_MODEL_BASE", "/tmp")) / f"btckpt-model-{uuid.uuid4().hex[:10]}"
        base.mkdir(parents=True)
        self.job = Job(base, nodes, ranks if nodes == 1 else 1)
        self.tier_ok = [True] * nodes
        self.outside = self.job.outside()
        self.note(f"setup(nodes={nodes}, ranks={self.job.ranks_per_node})")
        self.restart_job(with_tier=True)

    def teardown(self) -> None:
        if os.environ.get("BTCKPT_MODEL_TRACE"):
            print("example:", " ; ".join(self.log), file=sys.stderr)
        if self.ranks:
            self.stop(kill=True)
        if self.job is not None:
            for t in self.job.tiers:
                shutil.rmtree(t, ignore_errors=True)
                # the fresh private folders sessions used while the default path was planted (tiers.local.place)
                for fresh in t.parent.parent.glob(f"btckpt-{os.geteuid()}-{t.name}-*"):
                    shutil.rmtree(fresh, ignore_errors=True)
            shutil.rmtree(self.job.base, ignore_errors=True)

    # -- rules: a running job ----------------------------------------------------------------------------
    def save(self) -> None:
        durable = self.rng.random() < 0.4
        self.step += 1
        kind = "durable" if durable or not self.with_tier else "tier"
        self.note(f"{kind}({self.step})")
        self.ask(kind, self.step)

    def wait(self) -> None:
        self.note("wait")
        self.ask("wait")

    def dir_fault(self) -> None:
        fault = self.rng.choice(["slow", "full", "none", "none"])
        phase = "promote" if self.with_tier else "write_data"
        arg = {"slow": (phase, "sleep1.5"), "full": (phase, "enospc"), "none": None}[fault]
        self.faulty = arg is not None
        self.note(f"dir_{fault}")
        self.ask("fault", arg)

    def close(self) -> None:
        self.note("close")
        answers = self.ask("close")
        self.stop(kill=False)
        clean = all(a[0] == "ok" for a in answers)
        if clean and not self.faulty and not ("orphan" in KNOWN and not self.with_tier):
            assert self.job is not None
            # kept only while its newest step has no verified copy in the dir (a promotion failed)
            durable = [_verified_steps(self.job, n, [False] * self.job.nodes) for n in range(self.job.nodes)]
            # a folder another user planted at the tier path is theirs, not btckpt's to remove
            left = [str(t) for n, t in enumerate(self.job.tiers)
                    if t.exists() and t.lstat().st_uid == os.geteuid()
                    and (not _scan_complete(t) or _scan_complete(t)[0].step in durable[n])]
            if left:
                self.fail(f"a clean close left the tier in shared memory although its newest step is durable: "
                          f"{left}")
        self.faulty = False

    def kill(self) -> None:
        """SIGKILL one rank (mid-flight: no wait before it); its peers go too, as torchrun's restart does."""
        victim = self.rng.randint(0, len(self.ranks) - 1)
        self.note(f"kill(rank {victim})")
        os.kill(self.ranks[victim].proc.pid, signal.SIGKILL)
        self.stop(kill=True)
        self.faulty = False

    def sigterm(self) -> None:
        """A real SIGTERM to one rank; every rank then stops at the agreed step and must exit 0 within the grace
        (+ slack), the at-exit close included."""
        victim, slow = self.rng.randint(0, len(self.ranks) - 1), self.rng.random() < 0.3
        self.note(f"sigterm(rank {victim}, slow={slow})")
        if slow:
            self.ask("fault", ("promote" if self.with_tier else "write_data", "sleep20"))
        os.kill(self.ranks[victim].proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        t0 = time.monotonic()
        pending = list(self.ranks)
        for _ in range(4):
            if not pending:
                break
            self.step += 1
            answers = self.ask("maybe", self.step, ranks=pending)
            pending = [r for r, a in zip(pending, answers, strict=True) if a[0] != "exit"]
        if pending:
            self.fail("after SIGTERM some rank did not stop within 4 steps")
        for r in self.ranks:
            r.proc.join(GRACE + SLACK + 30)
        took = time.monotonic() - t0
        codes = [r.proc.exitcode for r in self.ranks]
        self.stop(kill=True)
        if codes != [0] * len(codes):
            self.fail(f"after SIGTERM the ranks exited with {codes}, not 0")
        if took > GRACE + SLACK:
            self.fail(f"after SIGTERM the job took {took:.1f}s to exit (grace {GRACE:.0f}s)")
        self.faulty = False

    # -- rules: between runs ---------------------------------------------------------------------------------
    def restart(self) -> None:
        with_tier = self.rng.random() < 0.75
        self.note(f"restart(tier={with_tier})")
        self.restart_job(with_tier=with_tier)

    def restart_job(self, *, with_tier: bool) -> None:
        assert self.job is not None
        expected = self.verified_common()
        newest = max(expected) if expected else None
        self.with_tier = with_tier
        t0 = time.monotonic()
        answers = self.start()
        if TRACE:
            print(f"start in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        COUNT["restarts"] += 1
        errors = [a[1] for a in answers if a[0] != "ok"]
        if errors:
            planted = any(str(p) in e for p in self.planted for e in errors)
            fine = [r for r, a in zip(self.ranks, answers, strict=True) if a[0] == "ok"]
            if fine:
                self.ask("close", ranks=fine)
            self.stop(kill=False)
            if planted:  # refused with an error naming the taken path: a valid answer; the admin removes it
                self.note("start refused the planted folder")
                self.unplant()
                return self.restart_job(with_tier=with_tier)
            self.fail(f"the job did not start: {errors}")
        got = self.ask("restore")
        if any(a[0] != "ok" for a in got):
            self.fail(f"restore failed: {[a[1] for a in got if a[0] != 'ok']} (expected step {newest})")
        steps = {a[1][0] for a in got}
        if len(steps) != 1:
            self.fail(f"ranks resumed different steps: {[a[1][0] for a in got]}")
        step = steps.pop()
        if step != newest:
            self.fail(f"resumed step {step}, but the newest step with a verified copy on every node is {newest} "
                      f"(verified on all nodes: {sorted(expected)})")
        job = self.job
        job.live = {r.node: Path(a[1][4]) for r, a in zip(self.ranks, got, strict=True) if a[1][4]}
        for a in got:
            _, w, same, extra, _tier = a[1]
            if step is not None and (w != _value(step) or not same or extra != step):
                self.fail(f"resumed step {step} with weights {w} (uniform: {same}), extra {extra}")
        self.step = step if step is not None else 0
        self.common = self.verified_common()
        # a tier that was not ours is discarded or replaced by now; what the job makes from here is its own
        self.tier_ok = [True] * self.job.nodes
        self.unplant()

    def damage(self) -> None:
        """Flip one byte of one file of one copy (a tier's, a dir's or a replica's)."""
        from btckpt.storage.discovery import scan
        from btckpt.tiers.local import REPLICAS

        assert self.job is not None
        node = self.rng.randint(0, self.job.nodes - 1)
        where, seed = self.rng.choice(["tier", "dir", "replica"]), self.rng.randrange(2**31)
        roots = {"tier": [self.job.tiers[node]], "dir": [self.job.dirs[node]],
                 "replica": [self.job.tiers[o] / REPLICAS / f"node-{node}" for o in range(self.job.nodes) if o != node]}
        folders = [i.path for r in roots[where] if r.is_dir() for i in scan(r, own=True) if i.complete]
        if not folders:
            return
        folder = folders[seed % len(folders)]
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                       and p.name != "manifest.json")
        if not files:
            return
        target = files[(seed // 7) % len(files)]
        self.note(f"damage({where}, node {node}, {folder.name}/{target.name})")
        _flip_byte(target, seed)
        self.common = self.verified_common()  # destroyed on purpose: not a deletion by btckpt

    def wipe_tier(self) -> None:
        """A node lost its memory (a node replaced): its tier is gone."""
        assert self.job is not None
        node = self.rng.randint(0, self.job.nodes - 1)
        self.note(f"wipe_tier(node {node})")
        shutil.rmtree(self.job.tiers[node], ignore_errors=True)
        self.common = self.verified_common()

    def recreate_dir(self) -> None:
        """The user deletes the checkpoint dir and starts a new run at the same path: the old tiers belong to
        another incarnation and must never be resumed from."""
        assert self.job is not None
        self.note("recreate_dir")
        for d in self.job.dirs:
            shutil.rmtree(d)
            d.mkdir()
        self.tier_ok = ["incarnation" in KNOWN] * self.job.nodes
        self.common = self.verified_common()

    def plant(self) -> None:
        """Another user (uid 54321) owns the node's tier path: a lock link to a file of the job's user and, when
        ``valid``, an identity record naming the job's dir and a checkpoint with weights of its own."""
        assert self.job is not None
        node, valid = self.rng.randint(0, self.job.nodes - 1), self.rng.random() < 0.5
        tier = self.job.tiers[node]
        if tier.exists():
            return
        self.note(f"plant(node {node}, valid={valid})")
        from btckpt.tiers import IDENTITY

        tier.parent.mkdir(parents=True, exist_ok=True)
        tier.mkdir(mode=0o755)
        (tier / ".btckpt.lock").symlink_to(self.job.victim)
        if valid:
            record = {"format": "btckpt-tier/1", "dir": str(self.job.dirs[node].resolve())}
            (tier / IDENTITY).write_text(json.dumps(record))
            src = next((i.path for i in _scan_complete(self.job.dirs[node])), None)
            if src is not None:
                shutil.copytree(src, tier / "checkpoint-999999")
        for p in [tier, *tier.rglob("*")]:
            os.lchown(p, FOREIGN_UID, FOREIGN_UID)
        self.planted.append(tier)
        self.tier_ok[node] = False

    def unplant(self) -> None:
        for p in self.planted:
            if p.is_dir() and p.lstat().st_uid == FOREIGN_UID:
                shutil.rmtree(p)
        self.planted = []

    # -- invariants ------------------------------------------------------------------------------------------
    def rules_hold(self) -> None:
        if self.job is None:
            return
        if self.alive() and not self.faulty:
            self.ask("wait")  # quiescent: every background save and promotion so far finished
        if self.job.outside() != self.outside:
            self.fail(f"a file outside btckpt's folders changed: {self.job.outside()} != {self.outside}")
        from btckpt.tiers.local import COPIES

        # README "Memory": two steps, +1 while one is promoted; while work is in flight (a slow or full dir: the
        # check does not wait) one more waits behind the promotion, and with several nodes one more that another
        # node already started (or sent to the peer)
        limit = COPIES + 1 if not self.faulty else COPIES + 2 + (self.job.nodes > 1)
        for t in {*self.job.tiers, *self.job.live.values()}:
            n = _tier_steps(t)
            if n > limit:
                self.fail(f"tier {t} holds {n} steps (documented: {COPIES}, +1 while promoting; in flight: {limit})")
        now = self.verified_common()
        gone = {s for s in self.common - now if not any(n > s for n in now)}
        if gone:
            self.fail(f"step(s) {sorted(gone)}: their last verified copy was deleted with no newer step complete "
                      f"everywhere (verified now: {sorted(now)})")
        self.common = now


def _scan_complete(root: Path) -> list[Any]:
    from btckpt.storage.discovery import scan

    return [i for i in scan(root, own=True) if i.complete] if root.is_dir() else []


RUNNING = ("save", 6), ("wait", 2), ("dir_fault", 1), ("close", 2), ("kill", 2), ("sigterm", 1)
STOPPED = ("restart", 6), ("damage", 3), ("wipe_tier", 1), ("recreate_dir", 1), ("plant", 1)


def run_example(seed: int, events: int) -> None:
    """One seeded run of ``events`` events (rules drawn by weight among those that apply), checking the
    invariants after each; the failure names the seed and the events so far."""
    model = JobModel(seed)
    try:
        model.setup(nodes=model.rng.choice([1, 1, 2]), ranks=model.rng.choice([1, 2]))
        for _ in range(events):
            table = RUNNING if model.alive() else STOPPED
            name = model.rng.choices([n for n, _ in table], weights=[0 if n in SKIP else w for n, w in table])[0]
            t = time.monotonic()
            getattr(model, name)()
            model.rules_hold()
            if TRACE:
                model.log[-1] += f" [{time.monotonic() - t:.1f}s]"
        if model.alive():
            model.close()
            model.rules_hold()
    finally:
        model.teardown()


@pytest.mark.timeout(0 if EVENTS else 600)  # offline: as long as its events take
def test_job_model() -> None:
    """The seeded job model: CI runs a few examples (about a minute on 2 cores); BTCKPT_MODEL_EVENTS=N runs at
    least N events (every violation is printed with its seed and events, and the run goes on), BTCKPT_MODEL_SEED=S
    one example."""
    t0 = time.monotonic()
    violations: list[str] = []
    if os.environ.get("BTCKPT_MODEL_SEED"):
        seeds: Any = [int(os.environ["BTCKPT_MODEL_SEED"])]
    elif EVENTS:
        seeds = iter(lambda: int.from_bytes(os.urandom(4), "little"), None)
    else:
        seeds = range(EXAMPLES)
    for seed in seeds:
        try:
            run_example(seed, STEPS_PER_EXAMPLE)
        except AssertionError as exc:
            if not EVENTS:
                raise
            violations.append(str(exc))
            print(f"\nVIOLATION {len(violations)}: {exc}", file=sys.stderr, flush=True)
        if EVENTS and COUNT["examples"] % 50 == 0:
            print(f"job model: {COUNT['events']} events so far, {len(violations)} violations, "
                  f"{time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
        if EVENTS and COUNT["events"] >= EVENTS:
            break
    print(f"\njob model: {COUNT['events']} events, {COUNT['examples']} examples, {COUNT['restarts']} restarts, "
          f"{len(violations)} violations, {time.monotonic() - t0:.0f}s", file=sys.stderr)
    assert not violations, f"{len(violations)} violations; the first: {violations[0]}"
