"""Shared machinery of the reliability suite: save paths, a small training state, and the invariants.

A *save path* is a way of producing checkpoints that the crash harness can kill and resume: a training
script (following the contract in ``crash_train.py``'s docstring) plus the injected phases it reaches.
Other save paths (HF Trainer, Lightning, torchrun, upload) plug in by adding a :class:`SavePath` to
:data:`SAVE_PATHS` (or passing one to :func:`run_chain`); nothing else in the harness changes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = sys.executable

# Phases every local save reaches (upload_* belong to the upload path; retention needs old checkpoints).
LOCAL_PHASES = ("stage", "write_data", "before_fsync", "after_fsync", "before_manifest", "after_manifest",
                "before_rename", "after_rename", "retention")


@dataclass(frozen=True)
class SavePath:
    """A training script the harness can run, kill, and resume (by running the same command again)."""

    name: str
    argv: Callable[[Path, Path], list[str]]  # (checkpoint dir, digest output file) -> argv after python
    final_step: int = 60  # the step at which the run ends (a run resumed there has nothing left to do)
    phases: tuple[str, ...] = LOCAL_PHASES
    env: dict[str, str] = field(default_factory=dict)


def _crash_train(mode: str, steps: int = 60, every: int = 3) -> Callable[[Path, Path], list[str]]:
    def argv(root: Path, out: Path) -> list[str]:
        return [str(HERE / "crash_train.py"), "--dir", str(root), "--out", str(out), "--mode", mode,
                "--steps", str(steps), "--every", str(every), "--keep-last", "2"]
    return argv


SAVE_PATHS: dict[str, SavePath] = {
    "sync": SavePath("sync", _crash_train("sync")),
    "async": SavePath("async", _crash_train("async")),
    "oneshot": SavePath("oneshot", _crash_train("oneshot"), phases=tuple(p for p in LOCAL_PHASES if p != "retention")),
}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BT_", "BTCKPT_"))}
    env["PYTHONPATH"] = str(REPO / "integrations") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra or {})
    return env


def temp_folders(root: Path) -> list[str]:
    """Names of in-flight/stale temp folders directly under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".checkpoint-"))


def same_as_reference(root: Path, ref: Path, steps: list[int]) -> None:
    """Each complete checkpoint is bit-identical to the uninterrupted run's checkpoint of that step
    (same files with the same checksums, same plain-data state): no checkpoint holds a torn snapshot."""
    from btckpt.manifest import read_manifest

    for step in steps:
        got, want = read_manifest(root / f"checkpoint-{step}"), read_manifest(ref / f"checkpoint-{step}")
        assert got.files == want.files, f"checkpoint-{step} differs from the uninterrupted run's: " + ", ".join(
            n for n in sorted(set(got.files) | set(want.files)) if got.files.get(n) != want.files.get(n))
        assert got.state == want.state, f"checkpoint-{step}: plain-data state differs from the uninterrupted run's"


def check_restart_invariants(root: Path) -> list[int]:
    """What every restart must see: returns the steps of the complete checkpoints, newest first.

    Starts a Checkpointer on ``root`` (the restart), then asserts: no temp folder survives it; every
    ``checkpoint-*`` folder listed is complete (never incomplete or corrupt) and verifies byte for byte.
    """
    import btckpt
    from btckpt.discovery import scan
    from btckpt.reader import CheckpointReader

    ck = btckpt.Checkpointer(dir=str(root), async_save=False, handle_sigterm=False)
    try:
        left = temp_folders(root)
        assert not left, f"temp folders survived a restart: {left}"
        infos = scan(root)
        bad = [(i.path.name, i.status, i.reason) for i in infos if not i.complete]
        assert not bad, f"incomplete/corrupt checkpoint listed after a crash: {bad}"
        for i in infos:
            problems = CheckpointReader(i.path, i.manifest).verify_all()
            assert not problems, f"{i.path} does not verify after a crash: {problems}"
        cands = [c.step for c in ck.candidates()]
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


def _start(path: SavePath, root: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, *path.argv(root, out)], env=child_env({**path.env, **env}), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(root.parent))


def _stop(proc: subprocess.Popen[str], *, kill: bool = True) -> tuple[str, str]:
    """Reap ``proc`` (killing it first unless ``kill`` is False: then wait for it to finish)."""
    if kill and proc.poll() is None:
        proc.kill()
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        out, err = proc.communicate()
    return out, err


def kill_once(path: SavePath, root: Path, out: Path, *, phase: str | None, rng: random.Random,
              max_delay: float) -> Trial:
    """Run the save path once: let it kill itself at ``phase`` or SIGKILL it after a random delay."""
    t0 = time.monotonic()
    trial = Trial(kind=f"phase:{phase}" if phase else "random")
    env = {"BTCKPT_FAULT": f"{phase}:kill"} if phase else {}
    proc = _start(path, root, out, env)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # RESTORED ..., then TRAINING
            lines.append(line.strip())
            if line.startswith("RESTORED"):
                trial.restored = line.split()[1]
            if line.startswith("TRAINING"):
                break
        if phase is not None:
            _, err = _stop(proc, kill=False)
        elif proc.poll() is None:
            time.sleep(rng.uniform(0, max_delay))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                trial.killed = True
            _, err = _stop(proc, kill=False)
        else:
            _, err = _stop(proc, kill=False)
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait()
    trial.rc = proc.returncode
    if phase is not None:
        trial.killed = proc.returncode == -signal.SIGKILL
        if proc.returncode == 0:
            raise AssertionError(f"{path.name}: the injected fault point {phase!r} was never reached")
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"{path.name} crashed with rc={proc.returncode} at {phase}:\n{err[-3000:]}")
    elif proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{path.name} failed with rc={proc.returncode}:\n{err[-3000:]}")
    trial.seconds = time.monotonic() - t0
    return trial


def reference_digest(path: SavePath, workdir: Path) -> str:
    """The final digest of an uninterrupted run (its checkpoints, every step kept, in ``workdir/ref-ckpt``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    root, out = workdir / "ref-ckpt", workdir / "ref.json"
    proc = _start(path, root, out, {"CRASH_KEEP_ALL": "1"})
    _, err = _stop(proc, kill=False)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.read_text())["digest"]


def run_chain(path: SavePath, workdir: Path, *, phases: list[str | None], seed: int, max_delay: float = 0.5,
              expect_digest: str | None = None, ref_dir: Path | None = None) -> list[Trial]:
    """Kill the run once per entry of ``phases`` (None: a random instant), checking the restart invariants
    after every kill; then let it finish and compare its final digest with an uninterrupted run's."""
    rng = random.Random(seed)
    root, out = workdir / "ckpt", workdir / "final.json"
    trials: list[Trial] = []
    newest: int | None = None
    for phase in phases:
        trial = kill_once(path, root, out, phase=phase, rng=rng, max_delay=max_delay)
        # the run resumed from the newest complete checkpoint the previous restart check saw
        expect = str(newest) if newest is not None else "none"
        assert trial.restored == expect, f"resumed from {trial.restored}, newest complete was {expect}"
        if out.exists():  # the run finished before the kill: start over from a fresh folder
            out.unlink()
        trial.complete_after = check_restart_invariants(root)
        trials.append(trial)
        if ref_dir is not None:
            try:
                same_as_reference(root, ref_dir, trial.complete_after)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\ntrials so far: {history(trials)}") from None
        newest = trial.complete_after[0] if trial.complete_after else None
        if (not trial.killed and trial.rc == 0) or newest == path.final_step:
            import shutil  # the run is over: start the next trials from an empty folder

            shutil.rmtree(root)
            newest = None
    proc = _start(path, root, out, {})
    _, err = _stop(proc, kill=False)
    assert proc.returncode == 0, err[-3000:]
    final = check_restart_invariants(root)
    if ref_dir is not None:
        same_as_reference(root, ref_dir, final)
    if expect_digest is not None:
        got = json.loads(out.read_text())["digest"]
        assert got == expect_digest, (f"the resumed run's final state differs from an uninterrupted run's "
                                      f"(resumed from {newest}); trials: {history(trials)}")
    return trials


def history(trials: list[Trial]) -> str:
    return "; ".join(f"{t.kind} rc={t.rc} restored={t.restored} complete={t.complete_after}" for t in trials)
