"""Kill-and-resume of a real training script: bit-identical to an uninterrupted run, both restart paths."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.manifest import read_manifest
from btckpt.reader import CheckpointReader

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_torch.py"
STEPS = 60


def _run(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--steps", str(STEPS), "--save-every", "5", *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def _kill_mid_run(env: dict[str, str], ckdir: Path, *args: str) -> int:
    """Start the script, SIGKILL it at a random step after a few checkpoints committed; return that step."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--steps", str(STEPS), "--save-every", "5",
                             "--sleep", "0.03", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = random.Random().randint(17, 45)
    last = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
                if last >= target:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return last


def _final_state(path: Path) -> dict:
    man = read_manifest(path)
    r = CheckpointReader(path, man)
    return {g: r.load_group(g) for g in ("model", "optimizer", "scheduler", "extra")}


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("ref")
    res = _run({"BT_CHECKPOINT_DIR": str(d / "ck")}, "--final", str(d / "final"))
    assert res.returncode == 0, res.stderr
    return _final_state(d / "final")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_kill_and_resume_from_own_dir_is_bit_identical(tmp_path: Path, reference: dict, mode: str) -> None:
    env = {"BT_CHECKPOINT_DIR": str(tmp_path / "ck")}
    extra = ("--sync",) if mode == "sync" else ()
    killed_at = _kill_mid_run(env, tmp_path / "ck", *extra)
    newest = btckpt.latest(tmp_path / "ck")
    assert newest is not None and int(newest.name.split("-")[1]) <= killed_at
    res = _run(env, "--final", str(tmp_path / "final"), *extra)
    assert res.returncode == 0, res.stderr
    assert f"starting at step {newest.name.split('-')[1]}" in res.stdout
    _assert_same(reference, _final_state(tmp_path / "final"))
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".checkpoint-")]


def test_kill_and_resume_from_nested_load_dir_is_bit_identical(tmp_path: Path, reference: dict) -> None:
    first = tmp_path / "job1"
    _kill_mid_run({"BT_CHECKPOINT_DIR": str(first)}, first)
    newest = btckpt.latest(first)
    assert newest is not None
    for tmp in first.glob(".checkpoint-*.tmp-*"):  # a save the kill interrupted: a restart in this dir would
        shutil.rmtree(tmp)                         # remove it; this test restarts elsewhere (copy skips it)
    # The platform uploads the node's folder and downloads it for the next job as <job>/rank-<node>/...
    load = tmp_path / "loaded"
    shutil.copytree(first, load / "4q9g403" / "rank-0", ignore=shutil.ignore_patterns(".*"))
    env = {"BT_CHECKPOINT_DIR": str(tmp_path / "job2"), "BT_LOAD_CHECKPOINT_DIR": str(load)}
    res = _run(env, "--final", str(tmp_path / "final"))
    assert res.returncode == 0, res.stderr
    assert f"starting at step {newest.name.split('-')[1]}\n" in res.stdout  # the newest, not 0
    _assert_same(reference, _final_state(tmp_path / "final"))


def test_resume_asked_for_but_nothing_there_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    env = {"BT_CHECKPOINT_DIR": str(tmp_path / "ck"), "BT_LOAD_CHECKPOINT_DIR": str(tmp_path / "empty")}
    res = _run(env)
    assert res.returncode != 0
    assert "NoCheckpointFound" in res.stderr and "on_missing='start_fresh'" in res.stderr
    ck = tmp_path / "ck"
    assert not ck.exists() or not any(p.name.startswith("checkpoint-") for p in ck.iterdir())


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path: Path, reference: dict) -> None:
    env = {"BT_CHECKPOINT_DIR": str(tmp_path / "ck")}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--steps", str(STEPS), "--save-every", "1000",
                             "--sleep", "0.03"], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
                if last >= 23:
                    proc.send_signal(signal.SIGTERM)
                    break
        rest = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == 0, rest
    printed = max([int(ln.split()[1]) for ln in rest.splitlines() if ln.startswith("step ")] + [last])
    newest = btckpt.latest(tmp_path / "ck")
    # the step in progress when SIGTERM arrived completes, is saved, and nothing runs after it
    assert newest is not None and int(newest.name.split("-")[1]) == printed + 1 < STEPS
    assert "preemption checkpoint for step" in rest
    res = _run(env, "--final", str(tmp_path / "final"))
    assert res.returncode == 0, res.stderr
    assert f"starting at step {printed + 1}\n" in res.stdout  # from the preemption checkpoint
    _assert_same(reference, _final_state(tmp_path / "final"))
