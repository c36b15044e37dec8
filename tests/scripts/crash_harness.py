"""Shared machinery of the reliability suite: save paths, a small training state, and the invariants.

A *save path* is a way of producing checkpoints that the crash harness can kill and resume: a training
script (following the contract in ``crash_train.py``'s docstring) plus the injected phases it reaches.
They are registered in crash_paths.py (:data:`SAVE_PATHS`: sync, async, oneshot, hf, lightning, torchrun,
torchrun-fsdp1, torchrun-zero3, tier, upload); a new one plugs in there, with its own extra invariants if it
has any. Every run starts in a session of its own and a kill takes its whole process tree at once (the
uploader; torchrun's agent and its ranks, which torchrun starts in sessions of their own).

Internals used: btckpt.format.manifest, btckpt.restore.policy, btckpt.storage.discovery, btckpt.tiers (the
invariants: manifests compared with the uninterrupted run's, and the resume choice recomputed over the dir and the
tier with discovery's scan/verify, the resume policy and the tier's search).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from crash_paths import LOCAL_PHASES, SAVE_PATHS, UPLOAD_PHASES, SavePath
from dist_launch import AGENT_STOPS_WORKERS, dump_stacks, kill_workers, repo_pythonpath

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = sys.executable

__all__ = ["LOCAL_PHASES", "Reference", "SAVE_PATHS", "UPLOAD_PHASES", "Run", "SavePath", "Trial",
           "check_restart_invariants", "child_env", "history", "kill_once", "reference_run", "run_chain",
           "same_as_reference", "temp_folders"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BT_", "BTCKPT_"))}
    env["PYTHONPATH"] = repo_pythonpath(env.get("PYTHONPATH"))  # also run outside pytest (benchmarks/crash_soak)
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung run's stacks, on SIGABRT (Run.kill(dump=True))
    env.update(extra or {})
    return env


def temp_folders(root: Path) -> list[str]:
    """Names of in-flight/stale temp folders directly under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".checkpoint-"))


def same_as_reference(root: Path, ref: Path, steps: list[int], path: SavePath | None = None, *,
                      resumed_from: int | None = None) -> None:
    """Each complete checkpoint is bit-identical to the uninterrupted run's checkpoint of that step
    (same files with the same checksums, same plain-data state): no checkpoint holds a torn snapshot.
    ``path.compare`` picks the files compared (paths that write run-specific files: absolute paths in
    Lightning's callback state, HF's training_args.json). With ``path.resumed_close``, a step after
    ``resumed_from`` (the earliest step a run of the chain resumed from) may differ in its tensors' last bits
    only (:func:`_close_tensors`); its other files stay bit-identical."""
    from btckpt.format.manifest import read_manifest

    keep = path.compare if path is not None and path.compare is not None else (lambda name: True)
    for step in steps:
        got, want = read_manifest(root / f"checkpoint-{step}"), read_manifest(ref / f"checkpoint-{step}")
        gf = {n: v for n, v in got.files.items() if keep(n)}
        wf = {n: v for n, v in want.files.items() if keep(n)}
        differ = [n for n in sorted(set(gf) | set(wf)) if gf.get(n) != wf.get(n)]
        if differ and path is not None and path.resumed_close and resumed_from is not None and step > resumed_from:
            differ = [n for n in differ if not (n in gf and n in wf and n.endswith(".safetensors")
                                                and _close_tensors(root / f"checkpoint-{step}" / n,
                                                                   ref / f"checkpoint-{step}" / n))]
        assert not differ, f"checkpoint-{step} differs from the uninterrupted run's: " + ", ".join(differ)
        if path is None or path.compare_state:
            assert got.state == want.state, f"checkpoint-{step}: plain-data state differs from the uninterrupted run's"


def check_restart_invariants(root: Path, tier: Path | None = None) -> list[int]:
    """What every restart must see: returns the steps of the complete checkpoints, newest first.

    Starts a Checkpointer on ``root`` (the restart), then asserts: no temp folder survives it; every
    ``checkpoint-*`` folder listed is complete (never incomplete or corrupt) and verifies byte for byte;
    the resume policy offers exactly those, newest first. ``tier``: the run's local tier folder, whose
    checkpoints count too (a restart resumes from the newest step of either).
    """
    import btckpt
    from btckpt.restore.policy import ResumePolicy
    from btckpt.storage.discovery import scan, verify
    from btckpt.tiers import resumable_tier

    ck = btckpt.Checkpointer(dir=str(root), async_save=False, handle_sigterm=False)
    try:
        left = temp_folders(root)
        assert not left, f"temp folders survived a restart: {left}"
        infos = scan(root)
        if tier is not None:
            infos = sorted(infos + scan(tier, own=True), key=lambda i: i.step, reverse=True)
        bad = [(i.path.name, i.status, i.reason) for i in infos if not i.complete]
        assert not bad, f"incomplete/corrupt checkpoint listed after a crash: {bad}"
        for i in infos:
            problems = verify(i)
            assert not problems, f"{i.path} does not verify after a crash: {problems}"
        if tier is None:
            cands = [c.step for c in ck.candidates()]
        else:
            policy = ResumePolicy.for_job(dir=root, load_dir=None, local=resumable_tier(root, tier))
            cands = [c.step for c in policy.candidates() if c.complete]
        assert cands == [i.step for i in infos], (cands, [i.step for i in infos])
    finally:
        ck.close()
    return cands


@dataclass
class Trial:
    """One kill: what was asked for and what happened."""

    kind: str  # "phase:<name>" or "random"
    rc: int | None = None
    restored: str | None = None
    complete_after: list[int] = field(default_factory=list)
    killed: bool = False
    seconds: float = 0.0
    fault: str = ""  # the BTCKPT_FAULT value of an injected kill


class Run:
    """One start of a save path: in a session of its own, output to files, its process tree tracked so that
    a kill reaches every process at once (torchrun starts its ranks in sessions of their own)."""

    _count = 0

    def __init__(self, path: SavePath, root: Path, out: Path, env: dict[str, str], logdir: Path) -> None:
        Run._count += 1
        logdir.mkdir(parents=True, exist_ok=True)
        self.out_file, self.err_file = logdir / f"run-{Run._count}.out", logdir / f"run-{Run._count}.err"
        self.tree: dict[int, float] = {}
        with open(self.out_file, "wb") as fo, open(self.err_file, "wb") as fe:
            self.proc = subprocess.Popen([PY, *path.argv(root, out)], env=child_env({**path.env, **env}),
                                         stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=str(root.parent),
                                         start_new_session=True)

    def track(self) -> None:
        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.tree.setdefault(c.pid, c.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        return self.out_file.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_file.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float) -> None:
        """Until ``marker`` is printed or the run ends."""
        deadline = time.monotonic() + timeout
        while self.alive() and marker not in self.stdout():
            self.track()
            if time.monotonic() > deadline:
                self.kill(dump=True)
                raise AssertionError(f"no {marker!r} within {timeout}s:\n{self.stderr()[-3000:]}")
            time.sleep(0.01)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.alive() and time.monotonic() < deadline:
            self.track()
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def kill(self, *, dump: bool = False) -> None:
        """SIGKILL the whole tree at once: the session's process group, then every other descendant. ``dump``
        (a timeout): every process prints its threads' stacks first (:func:`dist_launch.dump_stacks`)."""
        self.track()
        if dump:
            dump_stacks(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._kill_strays()

    def _kill_strays(self) -> None:
        for pid, created in self.tree.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.Error:
                pass

    def wait(self, timeout: float, *, rank_death: bool = False) -> int:
        """Until the run ends. ``rank_death``: a fault kills one rank of a torchrun job; once the agent stops the
        others (its log line :data:`dist_launch.AGENT_STOPS_WORKERS`), they are SIGKILLed (its report stands)."""
        deadline = time.monotonic() + timeout
        seen, reaped = 0, not rank_death
        while self.alive():
            self.track()
            if not reaped:
                with open(self.err_file, "rb") as f:  # only what was added since the last look
                    start = max(0, seen - len(AGENT_STOPS_WORKERS))
                    f.seek(start)
                    new = f.read()
                seen = start + len(new)
                if AGENT_STOPS_WORKERS.encode() in new:
                    kill_workers(self.proc.pid)
                    reaped = True
            if time.monotonic() > deadline:
                self.kill(dump=True)
                self.proc.wait()
                raise AssertionError(f"still running after {timeout}s:\n{self.stderr()[-12000:]}")
            time.sleep(0.02)
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        """No process of this run outlives it (a rank whose agent died, an uploader...)."""
        if self.alive():
            self.kill()
        self.proc.wait()
        self._kill_strays()
        for pid, created in self.tree.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.wait(timeout=30)
            except psutil.Error:
                pass


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run of a save path: its final ``digest``, its checkpoints (every step kept) and the
    ``seconds`` from TRAINING to its end (random kills of auto_delay paths land within that window, so they
    fall during training and saving however loaded the machine is)."""

    digest: str
    ckpts: Path
    seconds: float


def _restored(text: str) -> str | None:
    m = re.search(r"RESTORED (none|\d+)", text)  # ranks share stdout: match, never split lines
    return m.group(1) if m else None


def kill_once(path: SavePath, root: Path, out: Path, *, phase: str | None, rng: random.Random,
              max_delay: float, logdir: Path | None = None, ref_seconds: float | None = None) -> Trial:
    """Run the save path once: let a fault kill it at ``phase`` or SIGKILL its tree after a random delay
    (for auto_delay paths when ``ref_seconds`` is given: within the reference run's training time, scaled to the
    steps this run has left after its resume)."""
    t0 = time.monotonic()
    trial = Trial(kind=f"phase:{phase}" if phase else "random")
    trial.fault = path.fault(phase, rng) if phase else ""
    env = {"BTCKPT_FAULT": trial.fault} if phase else {}
    bound = path.max_delay if path.max_delay is not None else max_delay
    share = rng.uniform(0, 1)  # of the window the kill lands in
    run = Run(path, root, out, env, logdir or root.parent / "logs")
    try:
        run.wait_for("TRAINING", timeout=300)
        if path.auto_delay and ref_seconds is not None:  # the reference trained all steps: this run trains the rest
            resumed = _restored(run.stdout())
            done = int(resumed) if resumed is not None and resumed.isdigit() else 0
            # three quarters of it: the reference may have trained on a busier machine than this run does (a
            # shared box whose load drops), and a kill after the run's end lands nowhere
            bound = 0.75 * ref_seconds * max(0.0, path.final_step - done) / path.final_step
        delay = share * bound
        if phase is None and run.alive():
            run.sleep(delay)
            if run.alive():
                run.kill()
                trial.killed = True
        rc = run.wait(timeout=300, rank_death=phase is not None)
    finally:
        run.cleanup()
    trial.rc = rc
    trial.restored = _restored(run.stdout())
    err = run.stderr()
    if phase is not None:
        if rc == 0:
            raise AssertionError(f"{path.name}: the injected fault point {trial.fault!r} was never reached")
        trial.killed = path.phase_killed(rc, err)
        if not trial.killed:
            raise AssertionError(f"{path.name} crashed with rc={rc} at {trial.fault}:\n{err[-3000:]}")
    elif not trial.killed and rc != 0:
        raise AssertionError(f"{path.name} failed with rc={rc}:\n{err[-3000:]}")
    trial.seconds = time.monotonic() - t0
    for f in (run.out_file, run.err_file):
        f.unlink(missing_ok=True)
    return trial


def _finish(path: SavePath, root: Path, out: Path, env: dict[str, str], logdir: Path) -> float:
    """Run to the end; returns the seconds from TRAINING to the end."""
    run = Run(path, root, out, env, logdir)
    try:
        run.wait_for("TRAINING", timeout=600)
        t0 = time.monotonic()
        rc = run.wait(timeout=600)
    finally:
        run.cleanup()
    assert rc == 0, f"{path.name}: an uninterrupted run failed (rc={rc}):\n{run.stderr()[-3000:]}"
    return time.monotonic() - t0


def reference_run(path: SavePath, workdir: Path) -> Reference:
    """Run ``path`` uninterrupted (its checkpoints, every step kept, in ``workdir/ref-ckpt``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    root, out = workdir / "ref-ckpt", workdir / "ref.json"
    seconds = _finish(path, root, out, {"CRASH_KEEP_ALL": "1"}, workdir / "logs")
    return Reference(digest=str(json.loads(out.read_text())["digest"]), ckpts=root, seconds=seconds)


def _reset(root: Path) -> None:
    """The run is over: later trials start from nothing (its folder and siblings: remote, HF output)."""
    for p in root.parent.glob(root.name + "*"):
        shutil.rmtree(p, ignore_errors=True)


def run_chain(path: SavePath, workdir: Path, *, phases: list[str | None], seed: int, max_delay: float = 0.5,
              reference: Reference | None = None) -> list[Trial]:
    """Kill the run once per entry of ``phases`` (None: a random instant), checking the restart invariants
    after every kill; then let it finish and compare its final digest with ``reference``'s (an uninterrupted
    run, whose checkpoints the resumed ones must also equal)."""
    expect_digest = reference.digest if reference is not None else None
    ref_dir = reference.ckpts if reference is not None else None
    ref_seconds = reference.seconds if reference is not None else None
    rng = random.Random(seed)
    root, out, logdir = workdir / "ckpt", workdir / "final.json", workdir / "logs"
    trials: list[Trial] = []
    newest: int | None = None
    resumed: list[int] = []  # the steps the runs since the folder's last reset resumed from
    for phase in phases:
        trial = kill_once(path, root, out, phase=phase, rng=rng, max_delay=max_delay, logdir=logdir,
                          ref_seconds=ref_seconds)
        trials.append(trial)
        if newest is not None:
            resumed.append(newest)
        try:
            # the run resumed from the newest complete checkpoint the previous restart check saw
            expect = str(newest) if newest is not None else "none"
            assert trial.restored == expect, f"resumed from {trial.restored}, newest complete was {expect}"
            if out.exists():  # the run finished before the kill: start over from a fresh folder
                out.unlink()
            trial.complete_after = check_restart_invariants(root, path.tier_of(root))
            if ref_dir is not None:
                _same_as_reference_everywhere(root, ref_dir, path, resumed)
            if path.check is not None:
                path.check(root, ref_dir, False)
        except AssertionError as exc:
            raise AssertionError(f"{path.name}: {exc}\ntrials so far: {history(trials)}") from None
        newest = trial.complete_after[0] if trial.complete_after else None
        if (not trial.killed and trial.rc == 0) or newest == path.final_step:
            _reset(root)
            newest, resumed = None, []
    _finish(path, root, out, {}, logdir)
    if newest is not None:
        resumed.append(newest)
    try:
        check_restart_invariants(root, path.tier_of(root))
        if ref_dir is not None:
            _same_as_reference_everywhere(root, ref_dir, path, resumed)
        if path.check is not None:
            path.check(root, ref_dir, True)
        # resumed_close: the final state after a resume is checked in its checkpoint (to tolerance) above
        if expect_digest is not None and not (path.resumed_close and resumed):
            got = json.loads(out.read_text())["digest"]
            assert got == expect_digest, f"the resumed run's final state differs from an uninterrupted run's " \
                                         f"(resumed from {newest})"
    except AssertionError as exc:
        raise AssertionError(f"{path.name}: {exc}\ntrials: {history(trials)}") from None
    return trials


def _close_tensors(a: Path, b: Path) -> bool:
    """The same tensors (names, dtypes, shapes) with values equal to float tolerance (rtol 1e-5, atol 1e-7)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and (torch.equal(x[k], y[k]) or (x[k].is_floating_point() and torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-7)))
        for k in x)


def _same_as_reference_everywhere(root: Path, ref: Path, path: SavePath, resumed: list[int] | None = None) -> None:
    """:func:`same_as_reference` for the complete checkpoints of ``root`` and of the path's local tier
    (``resumed``: the steps the runs writing into ``root`` resumed from; the earliest bounds the bit-identical
    ones of ``path.resumed_close``)."""
    from btckpt.storage.discovery import scan

    for folder in filter(None, (root, path.tier_of(root))):
        if folder.is_dir():
            own = folder != root
            same_as_reference(folder, ref, [i.step for i in scan(folder, own=own) if i.complete], path,
                              resumed_from=min(resumed or [], default=None))


def history(trials: list[Trial]) -> str:
    return "; ".join(f"{t.fault or t.kind} rc={t.rc} restored={t.restored} complete={t.complete_after}"
                     for t in trials)
