"""The frameworks' own deletions, names and features under btckpt (issue 23 sections 2 and 4): real
Lightning / transformers runs on CPU, killed with real signals where the claim is about a kill."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import run_py

pytest.importorskip("lightning")

SCRIPTS = Path(__file__).parent / "scripts"
LIGHTNING = str(SCRIPTS / "lightning_train.py")


def _start_step(out: str) -> int:
    starts = [int(line.split()[1]) for line in out.splitlines() if line.startswith("START ")]
    assert starts, out
    return starts[-1]


# -- 1. a deletion Lightning asks for waits for the commit of the save that replaces it ---------------------
def test_lightning_default_checkpoint_kill_after_remove_keeps_the_older_checkpoint(tmp_path: Path) -> None:
    """Lightning's own ModelCheckpoint (save_top_k=1) every 3 steps, the writer slowed: SIGKILLed right after
    remove_checkpoint(step 3's name) returned at step 6, while step 6 is still being written. Step 3 must
    still be there, named, and the restart resumes from it (before: it was deleted; restart began at 0)."""
    from btckpt.lightning import resume_path

    ck = tmp_path / "ck"
    base = [LIGHTNING, "--dir", str(ck), "--steps", "12", "--every", "3", "--lightning-mc"]
    r = run_py([*base, "--slow-commit", "1.5", "--kill-after-remove", "6"], timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert "killed after remove_checkpoint(epoch=0-step=3.ckpt) at step 6" in r.stdout, r.stdout + r.stderr
    assert resume_path(dir=ck) == str(ck / "checkpoint-3")
    assert json.loads((ck / "epoch=0-step=3.ckpt").read_text())["checkpoint"] == "checkpoint-3"
    r = run_py([*base, "--resume"], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _start_step(r.stdout) == 3
    # the clean run carried out every removal Lightning asked for: one name, one folder (save_top_k=1)
    assert sorted(p.name for p in ck.glob("*.ckpt")) == ["epoch=0-step=12.ckpt"]
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-12"]


def test_hf_rotation_kill_while_the_newer_save_is_written_resumes_from_the_older(tmp_path: Path) -> None:
    """save_total_limit=1, a save every 2 steps, the writer slowed: SIGKILLed when step 5 begins, while step 4
    is still being written. HF's rotation (btckpt's keep_last) must not have deleted checkpoint-2: the
    restart resumes from step 2, and the clean run keeps one checkpoint."""
    ck = tmp_path / "ck"
    env = {"BT_CHECKPOINT_DIR": str(ck)}
    base = [str(SCRIPTS / "hf_train.py"), "--out", str(tmp_path / "out"), "--max-steps", "8", "--save-steps", "2",
            "--save-total-limit", "1"]
    r = run_py([*base, "--slow-commit", "2", "--kill-at", "5"], env=env, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-2"]  # step 4 never committed
    r = run_py([*base, "--resume", "line"], env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"RESUME {ck / 'checkpoint-2'}" in r.stdout
    assert _start_step(r.stdout) == 2
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-8"]


# -- 2. names of two ModelCheckpoints, and resume_path, never pick a weights-only folder to resume ----------
def _lightning_meta(folder: Path) -> dict:
    return json.loads((folder / "btckpt.json").read_text())["meta"]["lightning"]


@pytest.mark.compat
def test_lightning_weights_only_and_full_checkpoint_at_one_step_last_resumes(tmp_path: Path) -> None:
    """A weights-only ModelCheckpoint (called first) and a full one both save at steps 3 and 6: the full one's
    last.ckpt must name a full (resumable) folder and fit(ckpt_path="last") resumes at step 6 (before: it
    named the weights-only folder and the fit failed)."""
    from btckpt.lightning import resume_path

    ck = tmp_path / "ck"
    base = [LIGHTNING, "--dir", str(ck), "--every", "3", "--weights-every", "3", "--top-k", "1", "--monitor", ""]
    r = run_py([*base, "--steps", "6"], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    target = ck / json.loads((ck / "last.ckpt").read_text())["checkpoint"]
    assert target.name == "checkpoint-6"
    assert "optimizer_states" in _lightning_meta(target)["keys"].values()
    w6 = json.loads((ck / "weights-step=6.ckpt").read_text())["checkpoint"]
    assert (ck / w6 / "btckpt.json").is_file()  # the weights-only name still loads
    assert resume_path(dir=ck) == str(target)
    r = run_py([*base, "--steps", "9", "--ckpt-path", "last"], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _start_step(r.stdout) == 6


def test_resume_path_skips_a_newer_weights_only_checkpoint(tmp_path: Path) -> None:
    """Full saves at 3 and 6, weights-only ones every 2 steps (newest: 8): resume_path() must return the
    full checkpoint-6, and the restart resumes at 6 (before: checkpoint-8, and every restart crashed)."""
    from btckpt.lightning import resume_path

    ck = tmp_path / "ck"
    base = [LIGHTNING, "--dir", str(ck), "--every", "3", "--weights-every", "2", "--top-k", "1", "--monitor", ""]
    r = run_py([*base, "--steps", "8"], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "optimizer_states" not in _lightning_meta(ck / "checkpoint-8")["keys"].values()
    assert resume_path(dir=ck) == str(ck / "checkpoint-6")
    r = run_py([*base, "--steps", "12", "--resume"], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _start_step(r.stdout) == 6


# -- 4. preemption: one store agreement, no collective per step; multi-rank Lightning preempts ------------------
def _rank_pids(job: Any) -> dict[int, int]:
    """RANK -> pid of a torchrun job's worker processes."""
    import psutil

    out = {}
    for kid in psutil.Process(job.pid).children(recursive=True):
        try:
            env = kid.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "LOCAL_RANK" in env and kid.name().startswith("python"):
            out[int(env["RANK"])] = kid.pid
    return out


def _sigterm_rank_when(job: Any, reached: Any, rank: int, *, timeout: float = 240) -> None:
    """Once ``reached()`` is true, SIGTERM one rank of the torchrun job ``job`` (only that one: the others must
    learn it through the store)."""
    import os
    import time

    from dist_launch import kill_session

    try:
        deadline = time.monotonic() + timeout
        while not reached():
            assert job.poll() is None, job.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the job never reached the step to signal at"
            time.sleep(0.02)
        pids = _rank_pids(job)
        assert rank in pids, pids
        os.kill(pids[rank], signal.SIGTERM)
    except BaseException:
        kill_session(job)
        job.communicate(timeout=60)
        raise


def _steps(progress: Path) -> int:
    import re

    return max((int(x) for x in re.findall(r"(\d+)", progress.read_text())), default=0) if progress.exists() else 0


def test_hf_ddp_no_collective_per_step_when_no_signal(tmp_path: Path) -> None:
    """2-rank DDP (real torchrun, gloo): without a SIGTERM, btckpt's callback runs no all_reduce at all
    (before: one all_reduce + .item() per optimizer step, a device sync per step on GPU)."""
    from dist_launch import env_with, finish, torchrun

    job = torchrun("hf_train.py", ["--out", str(tmp_path / "out"), "--bs", "2", "--max-steps", "6", "--save-steps",
                                   "3", "--count-collectives"], env=env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck")))
    rc, out = finish(job, timeout=300)
    assert rc == 0, out[-4000:]
    import re

    counts = dict(re.findall(r"BTCKPT_ALL_REDUCE rank=(\d) n=(\d+)", out))
    assert counts == {"0": "0", "1": "0"}, (counts, out[-3000:])
    assert sorted(p.name for p in (tmp_path / "ck").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_hf_ddp_sigterm_on_one_rank_saves_the_agreed_step_exits_zero_and_resumes(tmp_path: Path) -> None:
    """2-rank DDP, SIGTERM to rank 1 only: both ranks agree on a step through the store, save it, and the job
    exits 0; the restart resumes from that step on both ranks."""
    from dist_launch import env_with, finish, torchrun

    ck, progress = tmp_path / "ck", tmp_path / "progress"
    env = env_with(BT_CHECKPOINT_DIR=str(ck))
    args = ["--out", str(tmp_path / "out"), "--bs", "2", "--save-steps", "100"]
    job = torchrun("hf_train.py", [*args, "--step-sleep", "0.2", "--progress", str(progress)], env=env)
    _sigterm_rank_when(job, lambda: _steps(progress) >= 5, rank=1)
    rc, out = finish(job, timeout=240)
    assert rc == 0, out[-4000:]
    assert "DONE" not in out
    saved = sorted(int(p.name.split("-")[1]) for p in ck.glob("checkpoint-*"))
    assert len(saved) == 1 and 5 <= saved[0] < 18, (saved, out[-3000:])  # only the preemption save
    assert {"rng_state_0.json", "rng_state_1.json"} <= {p.name for p in (ck / f"checkpoint-{saved[0]}").iterdir()}
    rc, out = finish(torchrun("hf_train.py", [*args, "--max-steps", str(saved[0] + 2)], env=env), timeout=300)
    assert rc == 0, out[-4000:]
    assert f"START {saved[0]}" in out and f"DONE {saved[0] + 2}" in out, out[-3000:]


def test_lightning_ddp_sigterm_on_one_rank_saves_last_exits_zero_and_resumes_exactly(tmp_path: Path) -> None:
    """Lightning DDP, 2 ranks (real torchrun, gloo), SIGTERM to rank 1 only (before: handled at world size 1
    only, so rank 1 ignored it): every rank stops at one agreed step, last.ckpt names it, the job exits 0,
    and resuming with ckpt_path="last" ends bit-identical to an uninterrupted run on both ranks."""
    from dist_launch import env_with, finish, torchrun
    from test_lightning import _assert_same

    ddp = ["--strategy", "ddp", "--devices", "2", "--steps", "30", "--every", "100", "--top-k", "1"]
    rc, out = finish(torchrun("lightning_train.py", [*ddp, "--dir", str(tmp_path / "ref"), "--dump",
                                                     str(tmp_path / "ref.{rank}.st")], env=env_with()), timeout=300)
    assert rc == 0, out[-4000:]
    ck, progress = tmp_path / "ck", tmp_path / "progress"
    job = torchrun("lightning_train.py", [*ddp, "--dir", str(ck), "--sleep", "0.1", "--progress", str(progress)],
                   env=env_with())
    _sigterm_rank_when(job, lambda: _steps(Path(f"{progress}.0")) >= 8, rank=1)
    rc, out = finish(job, timeout=240)
    assert rc == 0, out[-4000:]
    assert "done" not in out, out[-3000:]
    target = json.loads((ck / "last.ckpt").read_text())["checkpoint"]
    step = int(target.split("-")[1])
    assert 8 <= step < 30, (step, out[-3000:])
    assert {"rng_state_0.json", "rng_state_1.json"} <= {p.name for p in (ck / target).iterdir()}
    rc, out = finish(torchrun("lightning_train.py", [*ddp, "--dir", str(ck), "--ckpt-path", "last", "--dump",
                                                     str(tmp_path / "res.{rank}.st")], env=env_with()), timeout=300)
    assert rc == 0, out[-4000:]
    assert out.count(f"START {step}") == 2, out[-3000:]
    for r in (0, 1):
        _assert_same(tmp_path / f"ref.{r}.st", tmp_path / f"res.{r}.st")


# -- 6. HF push_to_hub: refused at start, not silently dropped ----------------------------------------------------
def test_hf_push_to_hub_is_refused_at_start_with_the_option_and_the_fix(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """push_to_hub=True (Hub client faked: no network): building the Trainer with the callback raises
    ConfigError naming push_to_hub and the fix (before: it trained, pushed nothing and warned about nothing)."""
    pytest.importorskip("transformers")
    import transformers
    from btckpt import ConfigError
    from btckpt.hf import CheckpointCallback
    from test_hf import _tiny_trainer

    hub: list[str] = []
    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", lambda self, *a, **k: hub.append("init_hf_repo"))
    monkeypatch.setattr(transformers.Trainer, "push_to_hub", lambda self, *a, **k: hub.append("push_to_hub"))

    class FakeHub:  # the client the Trainer's pushes go through (hf_api().upload_folder / create_repo)
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: hub.append(name)

    if hasattr(transformers.trainer, "hf_api"):
        monkeypatch.setattr(transformers.trainer, "hf_api", lambda *a, **k: FakeHub())
    with pytest.raises(ConfigError, match=r"push_to_hub=True.*push_to_hub=False") as err:
        _tiny_trainer(tmp_path / "out", [CheckpointCallback(dir=str(tmp_path / "ck"))], push_to_hub=True,
                      hub_model_id="someone/tiny", max_steps=2, save_steps=1)
    assert "remove the callback" in str(err.value)
    assert hub == ["init_hf_repo"]  # the Trainer's own start-up (faked); nothing was pushed
    assert not (tmp_path / "ck").exists()  # nothing written


def test_a_removal_lost_to_a_kill_after_the_commit_runs_at_the_next_start(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning removed a.ckpt (step 3) while step 6 was writing; the process died after step 6 committed but
    before the deferred removal ran (here: the removal is made to never run, and the process 'dies' without
    teardown). The next start carries the removal out: one name, one folder, as without the kill."""
    import torch
    from btckpt.lightning import SafetensorsCheckpointIO

    def full(step: int) -> dict:
        return {"global_step": step, "state_dict": {"w": torch.full((2,), float(step))}, "loops": {},
                "optimizer_states": []}

    d = tmp_path / "ck"
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(full(3), d / "a.ckpt")
    io.wait()
    monkeypatch.setattr(io._retention, "run_deferred", lambda: None)  # the kill lands before the removal runs
    io.save_checkpoint(full(6), d / "b.ckpt")
    io.remove_checkpoint(d / "a.ckpt")
    for ck in io._ckpts.values():  # the commit of step 6, then the process is gone (no teardown)
        ck.close()
    assert (d / "a.ckpt").is_file() and (d / "checkpoint-3").is_dir()
    io2 = SafetensorsCheckpointIO()
    io2.checkpointer(d)  # the next start (the first save or on_train_start creates it)
    io2.teardown()
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["b.ckpt", "checkpoint-6"]
    assert not list(d.glob(".btckpt-unname-*"))
