"""A step has several copies (tier, own dir, peer replica, load dir, remote cache): a damaged copy is dropped
alone and the next copy of the same step is tried before any older step (DESIGN.md, Selection and
Completeness); a copy is deleted only when a verified one of its step exists (Deletion); and readers of a
running job's tier re-scan when their pick is retired, reporting damage only for bytes that did not match
(Reading). Each test here failed before its fix.

Internals used: btckpt.cli, btckpt.restore.policy, btckpt.restore.resume, btckpt.storage.discovery, btckpt.tiers
(the resume policy and ``restore_from`` to restore from one chosen copy, the tier's ``promote`` and folder, the
command's ``main``, discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.cli import main as cli_main
from btckpt.storage.discovery import inspect, verify
from conftest import PY
from dist_launch import SCRIPTS, env_with, finish, kill_session, torchrun
from test_tiers import _state, _steps, _train, _two_nodes  # the tier tests' helpers
from test_upload import s3  # noqa: F401 - fixtures


def _flip(folder: Path) -> Path:
    """Flip the last byte (tensor data) of the largest safetensors file of ``folder``: sizes stay right."""
    victim = max((p for p in folder.iterdir() if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return victim


# -- the multi-rank agreement tries every copy of a step -------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_resume_from_the_dirs_copy_when_the_tiers_copy_is_damaged(tmp_path: Path) -> None:
    """2 ranks on one node (torchrun, gloo): the tier's copy of step 8 is damaged, the dir holds a verified
    copy of 8. Every rank resumes from 8 (the agreement used to check only the first copy and drop the step)."""
    run, ram = tmp_path / "run", tmp_path / "ram"
    env = env_with(BT_CHECKPOINT_DIR=str(run))
    job = torchrun("tier_train.py", ["--tier", str(ram), "--every", "4", "--steps", "9", "--kill-at", "8",
                                     "--kill-rank", "0",
                                     "--kill-marker", str(tmp_path / "killed")], env=env)
    try:
        rc, out = finish(job, timeout=240)
    finally:
        kill_session(job)
    assert rc != 0 and "rank 0: killing itself at step 8" in out, out[-3000:]
    assert _steps(run) == [4, 8] and _steps(ram) == [8], out[-3000:]
    _flip(ram / "checkpoint-8")
    assert verify(inspect(run / "checkpoint-8")) == [] and verify(inspect(ram / "checkpoint-8")) != []
    job = torchrun("tier_train.py", ["--tier", str(ram), "--every", "4", "--steps", "8"], env=env)
    try:
        rc, out = finish(job, timeout=240)
    finally:
        kill_session(job)
    assert rc == 0, out[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: resumed from 8" in out, out[-4000:]
    assert "checksum mismatch" in out and str(ram / "checkpoint-8") in out  # the damaged copy is named
    assert verify(inspect(run / "checkpoint-8")) == [] and not ram.exists()  # 8 durable: the tier went


# -- peer replicas: a damaged own copy does not hide the peer's verified replica --------------------------------
@pytest.mark.slow
def test_a_damaged_own_tier_copy_is_replaced_by_the_peers_verified_replica(tmp_path: Path) -> None:
    """Node 1's own tier copy of step 8 is damaged (sizes right), node 0's RAM holds a verified replica of
    node 1's 8: node 1 fetches it (its own newest used to be judged complete by sizes), the damaged copy is
    replaced through the commit protocol, and every rank resumes from 8 instead of the dirs' 6."""
    results = _two_nodes(tmp_path, "run", ["--kill-at", "8", "--kill-marker", str(tmp_path / "killed")])
    assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
    held = tmp_path / "ram-run-0" / ".replicas" / "node-1" / "checkpoint-8"
    assert verify(inspect(held)) == []
    own = tmp_path / "ram-run-1" / "checkpoint-8"
    _flip(own)
    assert inspect(own).complete and verify(inspect(own)) != []
    results = _two_nodes(tmp_path, "run", ["--steps", "8"])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"rank {node}: resumed from 8" in out, out[-3000:]
    assert "node 1: fetched its part of step 8 from node 0's memory" in results[1][1], results[1][1][-3000:]
    for node in (0, 1):  # step 8 became durable on both nodes (verified), and the tiers went at the clean close
        durable = tmp_path / "run" / f"node{node}"
        assert 8 in _steps(durable) and verify(inspect(durable / "checkpoint-8")) == []
        assert not (tmp_path / f"ram-run-{node}").exists()


@pytest.mark.slow
def test_a_tierless_restart_still_fetches_a_lost_node_part_from_the_peers_replica(tmp_path: Path) -> None:
    """Node 1's tier is wiped (a replacement node) and the job restarts *without* ``local_every_steps``; node 0's
    RAM holds a verified replica of node 1's step 8. Node 1 fetches it all the same (the exchange used to be set
    up only with a tier, so every rank resumed the dirs' 6), both nodes resume 8, the session promotes it into
    both dirs and its clean close removes the tiers it claimed. The default tier path (the only one a session
    without ``local_every_steps`` knows)."""
    from btckpt.tiers import default_tier_dir

    tiers = [default_tier_dir(tmp_path / "run" / f"node{node}") for node in (0, 1)]
    try:
        results = _two_nodes(tmp_path, "run", ["--tier", "", "--kill-at", "8",
                                               "--kill-marker", str(tmp_path / "killed")])
        assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
        assert verify(inspect(tiers[0] / ".replicas" / "node-1" / "checkpoint-8")) == []
        for node in (0, 1):
            assert 8 not in _steps(tmp_path / "run" / f"node{node}")
        shutil.rmtree(tiers[1])
        results = _two_nodes(tmp_path, "run", ["--tier", "", "--steps", "8", "--local-every", "0"])
        for node, (rc, out) in enumerate(results):
            assert rc == 0, out[-4000:]
            assert f"rank {node}: resumed from 8" in out, out[-3000:]
        assert "node 1: fetched its part of step 8 from node 0's memory" in results[1][1], results[1][1][-3000:]
        for node in (0, 1):
            durable = tmp_path / "run" / f"node{node}"
            assert 8 in _steps(durable) and verify(inspect(durable / "checkpoint-8")) == []
            assert not tiers[node].exists()
    finally:
        for t in tiers:
            shutil.rmtree(t, ignore_errors=True)


@pytest.mark.slow
def test_replica_exchanges_slower_than_the_tier_interval_coalesce(tmp_path: Path) -> None:
    """A tier save every step, each peer exchange taking 1.5 s: exchanges do not queue without bound (each queued
    one used to hold its tier step, so the tier grew with the backlog and close() sent them all); a newer one
    supersedes the one waiting, on both nodes alike, and the job still ends cleanly with its newest step durable."""
    results = _two_nodes(tmp_path, "run", ["--steps", "10", "--local-every", "1", "--every", "5"],
                         BTCKPT_FAULT="replicate:sleep1.5")
    for rc, out in results:
        assert rc == 0, out[-4000:]
    logs = results[0][1] + results[1][1]
    assert "superseded by step" in logs, logs[-4000:]
    dropped = {int(m) for m in re.findall(r"peer replica exchange of step (\d+) superseded", logs)}
    assert dropped and max(dropped) < 10, dropped
    for node in (0, 1):
        durable = tmp_path / "run" / f"node{node}"
        assert 10 in _steps(durable) and verify(inspect(durable / "checkpoint-10")) == []
        assert not (tmp_path / f"ram-run-{node}").exists()


@pytest.mark.slow
def test_a_step_durable_on_one_node_and_only_in_the_others_tier_is_promoted_at_close(tmp_path: Path) -> None:
    """Node 0 dies inside the promotion of step 4 after node 1 committed its part (node 0 commits last), then node
    1's tier is wiped. The restart resumes 4 (node 0 from its tier, node 1 from its dir) and closes at once: the
    close promotes node 0's tier copy into its dir (node 1 joins without copying). It used to agree only on steps
    every node's *tier* held, found none, and removed node 0's tier: its only copy of step 4."""
    results = _two_nodes(tmp_path, "run", ["--every", "4", "--steps", "8"], BTCKPT_FAULT="promote:kill@0")
    assert results[0][0] != 0, results[0][1][-3000:]
    node0, node1 = tmp_path / "run" / "node0", tmp_path / "run" / "node1"
    assert 4 not in _steps(node0) and 4 in _steps(node1), (_steps(node0), _steps(node1))
    assert 4 in _steps(tmp_path / "ram-run-0")
    shutil.rmtree(tmp_path / "ram-run-1")
    results = _two_nodes(tmp_path, "run", ["--every", "4", "--steps", "4"])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"rank {node}: resumed from 4" in out, out[-3000:]
    for durable in (node0, node1):
        assert 4 in _steps(durable) and verify(inspect(durable / "checkpoint-4")) == [], _steps(durable)
    assert not (tmp_path / "ram-run-0").exists() and not (tmp_path / "ram-run-1").exists()


# -- promotion: a damaged dir copy of the step never counts as "already there" ---------------------------------
def _tier_ck(tmp_path: Path, **kw) -> btckpt.Checkpointer:
    opts = dict(dir=tmp_path / "d", local_every_steps=2, local_tier_dir=tmp_path / "ram", every_steps=6,
                keep_last=None, handle_sigterm=False)
    opts.update(kw)
    return btckpt.Checkpointer(**opts)


def test_close_replaces_a_damaged_dir_copy_of_the_step_instead_of_dropping_the_tier(tmp_path: Path) -> None:
    """The dir holds ``checkpoint-8`` with the right sizes but damaged bytes, the tier a verified 8: close()
    used to say the dir "already holds step 8" and delete the tier (the only good copy). Now the tier's copy
    replaces the damaged one (committed first, the damaged one retired after), then the tier goes."""
    d, ram = tmp_path / "d", tmp_path / "ram"
    state = _state()
    ck = _tier_ck(tmp_path)
    _train(ck, state, range(1, 9))
    ck.wait()
    assert _steps(d) == [6] and _steps(ram) == [8]
    shutil.copytree(ram / "checkpoint-8", d / "checkpoint-8")
    _flip(d / "checkpoint-8")
    assert inspect(d / "checkpoint-8").complete and verify(inspect(d / "checkpoint-8")) != []
    ck.close()
    assert verify(inspect(d / "checkpoint-8")) == []
    assert not ram.exists()
    assert not [p.name for p in d.iterdir() if p.name.startswith(".checkpoint-")]  # nothing set aside is left
    fresh = _state(seed=3)
    with btckpt.Checkpointer(dir=d, handle_sigterm=False) as again:
        assert again.restore(fresh) == 8
    assert torch.equal(fresh["model"].weight, state["model"].weight)


def test_promote_copies_nothing_over_a_verified_copy(tmp_path: Path) -> None:
    """The other side of the rule: a verified copy in the dir is kept as it is (same inode, not re-copied)."""
    from btckpt.tiers import promote

    src = tmp_path / "ram" / "checkpoint-4"
    btckpt.save(src, _state())
    dest = tmp_path / "d"
    first = promote(src, dest, tag="t1")
    ino = (first / "model.safetensors").stat().st_ino
    assert promote(src, dest, tag="t2") == first and (first / "model.safetensors").stat().st_ino == ino
    _flip(first)
    again = promote(src, dest, tag="t3")
    assert verify(inspect(again)) == [] and (again / "model.safetensors").stat().st_ino != ino
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-4"]


# -- one-rank selection: the next copy of the same step before an older step ----------------------------------
def test_a_damaged_own_copy_falls_back_to_the_load_dirs_copy_of_the_same_step(tmp_path: Path) -> None:
    """The own dir's step 8 is damaged, its 4 is sound, the load dir holds a verified copy of 8: the resume
    takes the load dir's 8 (the same step, the next copy) before the own dir's older 4."""
    own, prev = tmp_path / "own", tmp_path / "prev"
    s8 = _state(seed=8)
    btckpt.save(own / "checkpoint-4", _state(seed=4))
    btckpt.save(own / "checkpoint-8", s8)
    shutil.copytree(own / "checkpoint-8", prev / "checkpoint-8")
    _flip(own / "checkpoint-8")
    got = _state(seed=0)
    with btckpt.Checkpointer(dir=own, load_dir=prev, handle_sigterm=False) as ck:
        assert ck.restore(got) == 8
    assert torch.equal(got["model"].weight, s8["model"].weight)


def test_a_damaged_local_copy_falls_back_to_the_published_copy_of_the_same_step(s3: str, tmp_path: Path) -> None:  # noqa: F811
    """``dir=URL``: the local staging copy of step 8 is damaged (sizes right), the published copy of 8 is sound:
    the resume downloads and loads the published 8 (it used to list published copies only of steps not
    complete locally, so it fell back to the local 4)."""
    import fsspec
    from btckpt.restore.policy import ResumePolicy
    from btckpt.restore.resume import restore_from
    from test_upload import make_ckpts

    local = tmp_path / "ck"
    states = make_ckpts(local, [4, 8])
    remote = f"{s3}/run"
    fsspec.filesystem("s3").put(str(local) + "/", f"{remote[5:]}/", recursive=True)
    _flip(local / "checkpoint-8")
    policy = ResumePolicy.for_job(dir=local, load_dir=None, remote=remote)
    state = {"model": {"w": torch.zeros(1000), "b": torch.zeros(7, dtype=torch.int64)}, "extra": {"step": 0}}
    info = restore_from(policy, state, rank=0, want_rng=False, strict=True)
    assert info is not None and info.step == 8 and state["extra"]["step"] == 8
    assert torch.equal(state["model"]["w"], states[8]["model"]["w"])


# -- readers of a running job's tier ------------------------------------------------------------------------------
LOOP = str(SCRIPTS / "tier_loop.py")


@pytest.mark.slow
def test_readers_of_a_running_tier_never_report_a_retired_step_as_damaged_or_missing(tmp_path: Path) -> None:
    """A job saves into its tier every other step (retention keeps one step) while this process loops
    ``btckpt.load(<tier>)`` and ``btckpt verify <tier>``: a pick retired between listing and reading (or between
    verify's passes) is looked for again, never a failure: zero NoCheckpointFound, zero FAILED / missing."""
    d, ram = tmp_path / "d", tmp_path / "ram"
    proc = subprocess.Popen([PY, LOOP, str(d), str(ram), "--steps", "0", "--ready-at", "3"], env=env_with(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    failures: list[str] = []
    reads = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "READY":
                break
        deadline = time.monotonic() + 60
        while not _steps(ram):  # READY comes after the first tier save was queued, not committed
            assert time.monotonic() < deadline, "no tier save committed within 60 s"
            time.sleep(0.01)
        deadline = time.monotonic() + 90
        while reads < 600 and time.monotonic() < deadline:
            state = _state(seed=1)
            try:
                step = btckpt.load(ram, state)
                if state["extra"]["step"] != step:
                    failures.append(f"load: step {step} but the state says {state['extra']['step']}")
            except btckpt.CheckpointError as exc:
                failures.append(f"load: {type(exc).__name__}: {exc}")
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                rc = cli_main(["verify", str(ram)])
            failed = re.search(r"^FAILED|[1-9][0-9]* FAILED", out.getvalue(), re.M)  # a FAILED line, or a count > 0
            if rc != 0 or failed or "missing" in out.getvalue() + err.getvalue():
                failures.append(f"verify: rc {rc}: {out.getvalue()[-300:]} {err.getvalue()[-300:]}")
            reads += 2
        proc.send_signal(signal.SIGTERM)
        rc, out = finish(proc, timeout=120)
    finally:
        kill_session(proc)
    assert rc == 0, out[-3000:]
    assert reads >= 40, reads  # enough reads to have met retirements
    assert not failures, f"{len(failures)} false failures in {reads} reads: {failures[:5]}"


# -- saving: a damaged folder of the step is no reason to skip the save ------------------------------------------
def test_a_save_over_a_damaged_folder_of_its_step_saves_it_again(tmp_path: Path) -> None:
    """The dir's step 8 is damaged (sizes right): the restart resumes from 6, trains to 8 and saves it. The save
    used to find the name taken and skip ("already exists; not saving step 8 again"), keeping the damaged copy
    as the newest step; now the new copy supersedes it (retired once the new one committed)."""
    d = tmp_path / "d"
    state = _state()
    with btckpt.Checkpointer(dir=d, every_steps=2, keep_last=None, handle_sigterm=False) as ck:
        _train(ck, state, range(1, 9))
    _flip(d / "checkpoint-8")
    again = _state(seed=5)
    with btckpt.Checkpointer(dir=d, every_steps=2, keep_last=None, handle_sigterm=False) as ck:
        assert ck.restore(again) == 6
        _train(ck, again, range(7, 9))
    assert verify(inspect(d / "checkpoint-8")) == []
    assert not [p.name for p in d.iterdir() if p.name.startswith(".checkpoint-")]
    got = _state(seed=6)
    assert btckpt.load(d, got) == 8 and torch.equal(got["model"].weight, again["model"].weight)


def test_a_fresh_start_drops_the_tiers_damaged_newer_steps_and_keeps_its_own_saves(tmp_path: Path) -> None:
    """A crashed run left tier steps 3 and 4 (or 4 alone), all damaged (sizes right): the restart resumes
    nothing, and its own tier saves (steps 1 and 2) are what the tier then holds (the damaged newer steps used
    to stay, retention dropped the new saves in their favour, and close() failed promoting a damaged step,
    keeping the tier)."""
    ram, d = tmp_path / "ram", tmp_path / "d"
    ck = _tier_ck(tmp_path, every_steps=100)
    state = _state()
    for s in (3, 4):
        ck.save_local(s, state)
    ck.wait()
    ck._crashed = True  # as the at-exit close after an uncaught exception: the tier stays for the restart
    ck.close()
    left = _steps(ram)
    assert left and min(left) >= 3, left
    for s in left:
        _flip(ram / f"checkpoint-{s}")
    with _tier_ck(tmp_path, every_steps=100) as again:
        assert again.restore(_state(seed=1)) is None
        for s in (1, 2):
            again.save_local(s, state)
        again.wait()
        assert _steps(ram) and max(_steps(ram)) == 2, _steps(ram)  # this run's saves; none of the damaged ones
    assert _steps(d) == [2] and verify(inspect(d / "checkpoint-2")) == [] and not ram.exists()
