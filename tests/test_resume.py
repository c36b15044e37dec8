"""Kill-and-resume of a real training script: bit-identical to an uninterrupted run, both restart paths.

Internals used: btckpt.cli, btckpt.format.manifest, btckpt.restore.reader (manifests and the reader to compare what
was saved, the command's ``main``).
"""

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
from btckpt.format.manifest import read_manifest
from btckpt.restore.reader import CheckpointReader

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


# -- one resume policy, five entry points -----------------------------------------------------------------
def _toy_state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def _flip(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[-2] ^= 0xFF
    f.write_bytes(bytes(raw))


def _tricky(own: Path, load: Path) -> None:
    """own: newest checkpoint-9 damaged (a flipped byte), checkpoint-8 never committed, a save in flight, a
    model file + config at the top (``trainer.save_model``), stray files. load: the platform's nested layout
    ``<job>/rank-0/checkpoint-N`` with a damaged newest (6), the other node's part (rank-1, newer), another
    job's older one, a file named like a checkpoint and a model file at the top."""
    ts = {"trainer_state.json": b"{}"}  # an HF Trainer checkpoint for resume_checkpoint()
    btckpt.save(own / "checkpoint-9", _toy_state(9), extra_files=ts)
    _flip(own / "checkpoint-9" / "model.safetensors")
    (own / "checkpoint-8").mkdir()
    (own / "checkpoint-8" / "model.safetensors").write_bytes(b"\0" * 16)
    (own / ".checkpoint-10.tmp-abc123").mkdir()
    btckpt.save(own / "exported", {"model": _toy_state(1)["model"]}, save_rng=False)
    (own / "model.safetensors").write_bytes((own / "exported" / "model.safetensors").read_bytes())
    shutil.rmtree(own / "exported")
    (own / "config.json").write_text("{}")
    (own / "notes.txt").write_text("stray")
    for step in (4, 5, 6):
        btckpt.save(load / "job1" / "rank-0" / f"checkpoint-{step}", _toy_state(step), extra_files=ts)
    _flip(load / "job1" / "rank-0" / "checkpoint-6" / "optimizer.safetensors")
    btckpt.save(load / "job1" / "rank-1" / "checkpoint-20", _toy_state(20), extra_files=ts)
    btckpt.save(load / "job0" / "rank-0" / "checkpoint-3", _toy_state(3), extra_files=ts)
    (load / "checkpoint-50").write_text("not a folder")
    (load / "model.safetensors").write_bytes((own / "model.safetensors").read_bytes())
    (load / "config.json").write_text("{}")


def test_every_entry_point_picks_the_same_checkpoint_in_a_tricky_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``Checkpointer.restore``, ``btckpt.load``, HF's ``resume_checkpoint``, Lightning's ``resume_path`` and
    its load of a folder, and ``btckpt show``/``verify`` go through one resume policy: same step chosen."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    import json

    from btckpt.cli import main as cli_main
    from btckpt.hf import resume_checkpoint
    from btckpt.lightning import SafetensorsCheckpointIO, resume_path

    own, load = tmp_path / "own", tmp_path / "load"
    _tricky(own, load)
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(own))
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(load))
    monkeypatch.delenv("BT_NODE_RANK", raising=False)

    def which(weight: torch.Tensor) -> int:
        """The step whose saved model has this weight (every step's state is distinct)."""
        return next(s for s in range(21) if torch.equal(weight, _toy_state(s)["model"].weight))

    def picked(folder: Path) -> dict[str, int]:
        """The step each entry point chooses: job-level ones from (own, load), folder-level ones in ``folder``."""
        got: dict[str, int] = {}
        state = _toy_state(0)
        with btckpt.Checkpointer(handle_sigterm=False, async_save=False) as ck:
            got["Checkpointer.restore"] = ck.restore(state)
        assert which(state["model"].weight) == got["Checkpointer.restore"]
        got["hf.resume_checkpoint"] = int(Path(resume_checkpoint()).name.split("-")[1])
        got["lightning.resume_path"] = int(Path(resume_path()).name.split("-")[1])
        state = _toy_state(0)
        got["btckpt.load"] = btckpt.load(folder, state)
        assert which(state["model"].weight) == got["btckpt.load"]
        io = SafetensorsCheckpointIO(async_save=False)  # fit(ckpt_path=<folder>)
        try:
            got["lightning load_checkpoint"] = which(io.load_checkpoint(folder)["state_dict"]["weight"])
        finally:
            io.teardown()
        capsys.readouterr()
        for cmd in ("verify", "show"):
            cli_main([cmd, str(folder), "--json"])
            d = json.loads(capsys.readouterr().out)
            got[f"btckpt {cmd}"] = d["resume"]["step"] if cmd == "verify" and "resume" in d else d["step"]
        return got

    # nothing sound in the own dir (9 damaged, 8 never committed): the load dir's newest sound one, rank 0's
    got = picked(load)
    assert got == dict.fromkeys(got, 5), got
    assert not (own / ".checkpoint-10.tmp-abc123").exists()  # the Checkpointer's start removed the save in flight
    # a restarted job's own sound checkpoint wins over the load dir's newer ones; the top-level model file of
    # the own dir does not hide the checkpoints under it
    btckpt.save(own / "checkpoint-2", _toy_state(2), extra_files={"trainer_state.json": b"{}"})
    got = picked(own)
    assert got == dict.fromkeys(got, 2), got
