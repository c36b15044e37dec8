"""Lightning integration: real Trainer runs on CPU (in-process and as killed subprocesses).

Internals used: btckpt.adapters, btckpt.format.checksum, btckpt.policies, btckpt.saving.snapshot,
btckpt.storage.discovery (the stager spied on to see what the plugin copies in the background, a checksum to forge
a manifest entry, discovery to judge the folders on disk (complete, verified), which no public name reports; the
plugin's retention checked to be a ``Retention``).
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
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from btckpt import CheckpointError, NoCheckpointFound, UnsafeCheckpoint, UnsupportedValue
from btckpt.lightning import LINK_FORMAT, SafetensorsCheckpointIO, resume_path
from conftest import run_py

SCRIPT = str(Path(__file__).parent / "scripts" / "lightning_train.py")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    r = run_py([SCRIPT, *args], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _load_dump(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _assert_same(a: Path, b: Path) -> None:
    ta, ma = _load_dump(a)
    tb, mb = _load_dump(b)
    assert ma == mb
    assert sorted(ta) == sorted(tb)
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"differs after resume: {bad}"


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-u", SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_step(proc: subprocess.Popen[str], step: int) -> list[str]:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == f"step {step}":
            return lines
    proc.wait()
    tail = "".join(lines[-30:])
    raise AssertionError(f"child ended before step {step}:\n{tail}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 30-step run's final parameters, optimizer moments and RNG."""
    d = tmp_path_factory.mktemp("ref")
    _run(["--dir", str(d / "ck"), "--steps", "30", "--dump", str(d / "full.st")])
    return d / "full.st"


def _link_target(p: Path) -> str:
    obj = json.loads(p.read_text())
    assert obj["format"] == LINK_FORMAT
    return obj["checkpoint"]


@pytest.mark.compat
def test_sigkill_at_random_step_then_resume_is_bit_identical(tmp_path: Path, reference: Path) -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    kill_at = rnd.randrange(4, 26)
    ck = tmp_path / "ck"
    proc = _start(["--dir", str(ck), "--steps", "30", "--sleep", "0.03"])
    try:
        _wait_step(proc, kill_at)
        deadline = time.monotonic() + 60  # on a loaded machine the first save may still be in flight
        while resume_path(dir=ck) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0, 0.03))  # anywhere in the next step, saves included
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    chosen = resume_path(dir=ck)
    assert chosen is not None, f"seed={seed} kill_at={kill_at}"
    r = _run(["--dir", str(ck), "--steps", "30", "--resume", "--dump", str(tmp_path / "res.st")])
    assert f"resume from {chosen}" in r.stdout
    assert f"START {int(Path(chosen).name.split('-')[1])}\n" in r.stdout  # resumed there, not from 0
    _assert_same(reference, tmp_path / "res.st")
    # no orphans: every folder is named by a link, every link names a complete folder
    folders = {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")}
    links = {_link_target(p) for p in ck.glob("*.ckpt")}
    assert folders == links, (folders, links)
    assert not [p for p in ck.iterdir() if ".tmp-" in p.name]


def test_local_tier_kill_resumes_from_the_tier_step_and_teardown_promotes(tmp_path: Path, reference: Path) -> None:
    """local_every_steps=2, ModelCheckpoint every 6 steps: SIGKILLed after the tier save of step 10 (durable: 6).
    The restart resumes from the tier's step 10, bit-identical; its clean end leaves step 30 in the dir and
    removes the tier."""
    from btckpt.storage.discovery import inspect

    ck, ram = tmp_path / "ck", tmp_path / "ram"
    tier = ["--dir", str(ck), "--steps", "30", "--every", "6", "--local-every", "2", "--tier", str(ram)]
    r = run_py([SCRIPT, *tier, "--kill-at", "10"], timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert "killing itself at step 10" in r.stdout
    assert inspect(ram / "checkpoint-10").complete
    durable = sorted(p.name for p in ck.glob("checkpoint-*"))
    assert durable == ["checkpoint-6"], durable  # ModelCheckpoint's save of step 6 went through the tier
    assert _link_target(ck / "last.ckpt") == "checkpoint-6"
    assert resume_path(dir=ck, local_tier_dir=ram) == str(ram / "checkpoint-10")
    r = _run([*tier, "--resume", "--dump", str(tmp_path / "res.st")])
    assert f"resume from {ram / 'checkpoint-10'}\n" in r.stdout
    assert "START 10\n" in r.stdout  # resumed at the tier's step, not the durable 6
    _assert_same(reference, tmp_path / "res.st")
    assert not ram.exists()  # clean end: the newest step is in the dir, the tier removed
    assert _link_target(ck / "last.ckpt") == "checkpoint-30" and inspect(ck / "checkpoint-30").complete
    links = {_link_target(p) for p in ck.glob("*.ckpt")}
    assert all(inspect(ck / name).complete for name in links)


@pytest.mark.compat
def test_sigterm_saves_at_next_batch_end_exits_zero_and_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    ck = tmp_path / "ck"
    proc = _start(["--dir", str(ck), "--steps", "30", "--sleep", "0.05", "--every", "100"])
    try:
        _wait_step(proc, 11)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0, out
    assert "done" not in out.splitlines()[-1:]  # stopped early, not finished
    target = _link_target(ck / "last.ckpt")
    step = int(target.split("-")[1])
    assert 11 <= step < 30
    assert (ck / target / "btckpt.json").is_file()
    r = _run(["--dir", str(ck), "--steps", "30", "--every", "100", "--ckpt-path", "last", "--dump",
              str(tmp_path / "res.st")])
    assert f"START {step}\n" in r.stdout  # resumed from the preemption checkpoint, not from 0
    _assert_same(reference, tmp_path / "res.st")


def _names(d: Path) -> set[str]:
    return {p.name for p in d.glob("*.ckpt")}


@pytest.mark.compat
@pytest.mark.parametrize("args", [
    ["--steps", "12", "--every", "3", "--top-k", "2"],
    ["--steps", "10", "--every", "4", "--top-k", "-1", "--no-last"],
    ["--steps", "9", "--every", "2", "--top-k", "1", "--monitor", "", "--filename", "m-{step}"],
])
def test_topk_last_every_n_match_lightnings_own_io(tmp_path: Path, args: list[str]) -> None:
    for io in ("torch", "safetensors"):
        _run(["--dir", str(tmp_path / io), "--io", io, *args])
    ours = tmp_path / "safetensors"
    assert _names(ours) == _names(tmp_path / "torch")
    folders = {p.name for p in ours.iterdir() if p.is_dir()}
    assert folders == {_link_target(p) for p in ours.glob("*.ckpt")}
    for p in ours.glob("*.ckpt"):
        step = int(_link_target(p).split("-")[1])
        if "step=" in p.name:
            assert p.name.split("step=")[1].split(".")[0].split("-")[0] == str(step)
    torch_last = tmp_path / "torch" / "last.ckpt"
    if torch_last.exists():  # last.ckpt names the same global step in both
        step = torch.load(torch_last, weights_only=True)["global_step"]
        assert _link_target(ours / "last.ckpt") == f"checkpoint-{step}"


@pytest.mark.compat
def test_train_time_interval_saves_as_lightnings_own_io(tmp_path: Path) -> None:
    """ModelCheckpoint(train_time_interval=4 s) against a clock advancing 1 s per step (patched in the child):
    the same checkpoints as TorchCheckpointIO, at the same steps, each named folder complete."""
    args = ["--steps", "14", "--every", "0", "--time-interval", "4", "--fake-clock", "--top-k", "-1",
            "--monitor", ""]
    for io in ("torch", "safetensors"):
        _run(["--dir", str(tmp_path / io), "--io", io, *args])
    ours = tmp_path / "safetensors"
    assert _names(ours) == _names(tmp_path / "torch")
    steps = {int(_link_target(p).split("-")[1]) for p in ours.glob("*.ckpt")}
    assert steps == {4, 8, 12}, steps  # every 4 fake seconds = every 4 steps
    for p in ours.glob("*.ckpt"):
        if "step=" in p.name:
            assert _link_target(p) == f"checkpoint-{p.name.split('step=')[1].split('.')[0]}"
        assert (ours / _link_target(p) / "btckpt.json").is_file()
    step = torch.load(tmp_path / "torch" / "last.ckpt", weights_only=True)["global_step"]
    assert _link_target(ours / "last.ckpt") == f"checkpoint-{step}"


def _payload_file(path: Path, marker: Path) -> None:
    class Boom:
        def __reduce__(self):  # noqa: D105
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "x": Boom()}, path)


def test_loading_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bait = tmp_path / "bait.ckpt"
    _payload_file(bait, marker)
    # sanity: torch.load(weights_only=False) would run it
    torch.load(bait, weights_only=False)
    assert marker.exists()
    marker.unlink()

    io = SafetensorsCheckpointIO()
    ck = tmp_path / "ck"
    ck.mkdir()
    # 1. a pickle planted where a link is expected (last.ckpt): refused, not executed
    (ck / "last.ckpt").write_bytes(bait.read_bytes())
    with pytest.raises(UnsafeCheckpoint, match="never unpickles"):
        io.load_checkpoint(ck / "last.ckpt")
    # 2. a pickle planted as a tensor file inside a committed folder: checksum refuses it
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(4)}, "loops": {}}, ck / "a.ckpt")
    io.teardown()
    folder = ck / "checkpoint-3"
    st = folder / "model.safetensors"
    st.write_bytes(bait.read_bytes())
    with pytest.raises(CheckpointError):
        io.load_checkpoint(ck / "a.ckpt")
    # 3. the same with the manifest's size/checksum forged to match: the safetensors parser refuses it
    from btckpt.format.checksum import file_checksum

    man = json.loads((folder / "btckpt.json").read_text())
    size, digest = file_checksum(st)
    man["files"]["model.safetensors"] = {"size": size, "xxh3_64": digest}
    (folder / "btckpt.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError):
        io.load_checkpoint(ck / "a.ckpt")
    # 4. a link that points out of the folder
    (ck / "evil.ckpt").write_text(json.dumps({"format": LINK_FORMAT, "checkpoint": "../../etc"}))
    with pytest.raises(UnsafeCheckpoint):
        io.load_checkpoint(ck / "evil.ckpt")
    io.teardown()
    assert not marker.exists()


def test_dict_roundtrip_hparams_conversion_and_clear_errors(tmp_path: Path) -> None:
    import enum

    class Mode(enum.Enum):
        A = "a"

    io = SafetensorsCheckpointIO(async_save=False)
    sd = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    ckpt = {
        "epoch": 1, "global_step": 7, "pytorch-lightning_version": "2.6.6", "state_dict": sd,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(2, 3)}},
                              "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}]}],
        "lr_schedulers": [{"last_epoch": 7, "_last_lr": [0.1]}],
        "loops": {"fit_loop": {"x": 1}}, "callbacks": {"ModelCheckpoint{'a': 1}": {"best_model_score": None}},
        "hyper_parameters": {"path": Path("/data"), "dtype": torch.float16, "mode": Mode.A},
        "model": "a user key that collides with a group name",
    }
    io.save_checkpoint(ckpt, tmp_path / "x.ckpt")
    got = io.load_checkpoint(tmp_path / "x.ckpt")
    assert set(got) == set(ckpt)
    assert torch.equal(got["state_dict"]["w"], sd["w"]) and got["state_dict"]["b"].dtype == torch.bfloat16
    opt = got["optimizer_states"][0]
    assert torch.equal(opt["state"][0]["exp_avg"], torch.ones(2, 3)) and opt["param_groups"][0]["betas"] == (0.9, 0.99)
    assert got["hyper_parameters"] == {"path": "/data", "dtype": "torch.float16", "mode": "a"}
    assert got["model"] == ckpt["model"] and got["pytorch-lightning_version"] == "2.6.6"
    # the weights load with plain safetensors under the module's own keys
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "checkpoint-7" / "model.safetensors")) == {"w", "b"}
    # folder path and the dir itself load too
    assert io.load_checkpoint(tmp_path / "checkpoint-7")["global_step"] == 7
    assert io.load_checkpoint(tmp_path)["global_step"] == 7

    class Opaque:
        pass

    with pytest.raises(UnsupportedValue, match="'callbacks'.*Opaque"):
        io.save_checkpoint({"global_step": 8, "state_dict": sd, "callbacks": {"cb": {"obj": Opaque()}}},
                           tmp_path / "y.ckpt")
    assert not (tmp_path / "checkpoint-8").exists() and not (tmp_path / "y.ckpt").exists()
    # removing the name removes the folder (rename, then delete)
    io.remove_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "checkpoint-7").exists()
    io.teardown()


def test_background_copy_behind_the_step_gate_saves_the_pre_step_values(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """gate_with(): parameters and moments (plain tensors in Lightning's dict) copy in the background; the
    next optimizer.step() waits, so the checkpoint holds the values at the save, not after the step."""
    from btckpt.saving.snapshot import Stager

    seen: list[set[tuple[str, str]]] = []
    stage = Stager.stage

    def spy(self: Stager, flat: Any, layout: Any, *, async_keys: set[tuple[str, str]], sync: bool) -> Any:
        seen.append(set(async_keys))
        return stage(self, flat, layout, async_keys=async_keys, sync=sync)

    monkeypatch.setattr(Stager, "stage", spy)
    lin = torch.nn.Linear(1024, 512)  # 2 MB weight: above the inline-copy threshold
    lin.register_buffer("count", torch.zeros(300_000))  # a big buffer: never deferred (not the optimizer's)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)

    def step() -> None:
        lin(torch.randn(4, 1024)).pow(2).sum().backward()
        opt.step()
        lin.count += 1

    step()
    io = SafetensorsCheckpointIO()
    for n in (1, 2):
        ckpt = {"global_step": n, "state_dict": lin.state_dict(), "optimizer_states": [opt.state_dict()],
                "loops": {}}
        want = {k: v.clone() for k, v in lin.state_dict().items()}
        want_m = opt.state[lin.weight]["exp_avg"].clone()
        if n == 1:
            io.gate_with(ckpt, [opt])
        io.save_checkpoint(ckpt, tmp_path / f"s{n}.ckpt")
        step()  # optimizer.step() waits for the background copy
        io.wait()
        got = io.load_checkpoint(tmp_path / f"s{n}.ckpt")
        assert all(torch.equal(got["state_dict"][k], want[k]) for k in want)
        assert torch.equal(got["optimizer_states"][0]["state"][0]["exp_avg"], want_m)
    assert {("model", "weight"), ("model", "bias")} <= seen[0] and ("model", "count") not in seen[0]
    assert any(k[0] == "optimizer" and k[1].endswith("exp_avg") for k in seen[0])
    assert seen[1] == set()  # no gate_with(): everything copied before save_checkpoint returned
    io.teardown()


def test_shared_folder_survives_until_last_name_removed(tmp_path: Path) -> None:
    io = SafetensorsCheckpointIO()
    ckpt = {"global_step": 5, "state_dict": {"w": torch.ones(3)}}
    io.save_checkpoint(ckpt, tmp_path / "epoch=0-step=5.ckpt")
    io.save_checkpoint(ckpt, tmp_path / "last.ckpt")  # same step: shares the folder
    io.wait()
    assert _link_target(tmp_path / "last.ckpt") == "checkpoint-5"
    io.remove_checkpoint(tmp_path / "epoch=0-step=5.ckpt")
    assert (tmp_path / "checkpoint-5" / "btckpt.json").is_file()
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "checkpoint-5").exists()
    io.teardown()


def test_the_link_refcount_is_a_retention_and_keeps_a_protected_folder_nameless(tmp_path: Path) -> None:
    """The plugin's deletions are a :class:`btckpt.adapters.LinkRefcount`, the second ``Retention``: a protected
    folder stays when its last name goes (the name still does); unprotected, the next one's removal takes it."""
    from btckpt.adapters import LinkRefcount
    from btckpt.policies import Retention
    io = SafetensorsCheckpointIO()
    assert isinstance(io._retention, LinkRefcount) and isinstance(io._retention, Retention)
    io.save_checkpoint({"global_step": 5, "state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.zeros(3)}}, tmp_path / "b.ckpt")
    io.wait()
    io._retention.protect(tmp_path / "checkpoint-5")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists() and (tmp_path / "checkpoint-5" / "btckpt.json").is_file()
    assert not list(tmp_path.glob(".btckpt-retire-*"))  # no marker: a later start must not delete it either
    io._retention.unprotect(tmp_path / "checkpoint-5")
    io.remove_checkpoint(tmp_path / "b.ckpt")
    assert not (tmp_path / "checkpoint-6").exists() and (tmp_path / "checkpoint-5").is_dir()
    io.teardown()


def test_kill_between_removing_the_last_name_and_deleting_its_folder(tmp_path: Path) -> None:
    """A process dying inside remove_checkpoint (here: a fault at the retention point, after the name is
    gone) leaves no complete folder that nothing names: the next start finishes the deletion."""
    from btckpt.testing import faults
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"global_step": 5, "state_dict": {"w": torch.ones(3)}}, tmp_path / "epoch=0-step=5.ckpt")
    io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.zeros(3)}}, tmp_path / "last.ckpt")
    io.wait()
    faults.arm("retention", "raise")
    try:
        with pytest.raises(OSError, match="injected"):
            io.remove_checkpoint(tmp_path / "epoch=0-step=5.ckpt")
    finally:
        faults.disarm()
    io.teardown()
    assert not (tmp_path / "epoch=0-step=5.ckpt").exists() and (tmp_path / "checkpoint-5").is_dir()  # unnamed
    io2 = SafetensorsCheckpointIO()
    io2.save_checkpoint({"global_step": 7, "state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")
    io2.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == [
        ".btckpt.lock", "checkpoint-7", "last.ckpt"]  # 5 deleted and its marker gone; 6 retired when last moved
    io2.teardown()


def test_resume_path_prefers_own_dir_then_nested_load_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own, load = tmp_path / "own", tmp_path / "loaded"
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(load))
    with pytest.raises(NoCheckpointFound):  # a resume was asked for (load dir set) and nothing is there
        resume_path()
    assert resume_path(on_missing="start_fresh") is None
    io = SafetensorsCheckpointIO(async_save=False)  # (with $BT_CHECKPOINT_DIR set, it would write only there)
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(1)}}, load / "job1" / "rank-0" / "x.ckpt")
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(own))
    assert resume_path() == str(load / "job1" / "rank-0" / "checkpoint-4")
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(1)}}, own / "y.ckpt")
    (own / ".checkpoint-9.tmp-1-x").mkdir()  # an unfinished save is never picked
    assert resume_path() == str(own / "checkpoint-2")
    io.teardown()
    (own / ".checkpoint-9.tmp-1-x").rmdir()  # (the next Checkpointer start would remove it)


@pytest.mark.compat
def test_model_checkpoint_default_dir_is_bt_checkpoint_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from btckpt.lightning import ModelCheckpoint

    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(tmp_path / "bt"))
    assert ModelCheckpoint().dirpath == str(tmp_path / "bt")
    monkeypatch.delenv("BT_CHECKPOINT_DIR")
    assert ModelCheckpoint().dirpath is None  # off the platform: Lightning's own choice, made at setup
    assert ModelCheckpoint(dirpath=tmp_path / "x").dirpath == str(tmp_path / "x")


# -- DDP, 2 processes (real torchrun, gloo) ------------------------------------------------------------------
DDP = ["--strategy", "ddp", "--devices", "2", "--steps", "30", "--every", "3", "--top-k", "2"]


def _ddp_run(args: list[str]) -> str:
    from dist_launch import env_with, finish, torchrun

    rc, out = finish(torchrun("lightning_train.py", [*DDP, *args], env=env_with()), timeout=300)
    assert rc == 0, out[-4000:]
    return out


def _steps_done(progress: Path) -> int:
    if not progress.exists():
        return 0
    return max((int(x) for x in re.findall(r"STEP (\d+)", progress.read_text())), default=0)


@pytest.mark.compat
@pytest.mark.slow
def test_ddp_two_ranks_sigkill_then_resume_is_exact_with_every_ranks_rng(tmp_path: Path) -> None:
    """SIGKILL a 2-process DDP job (agent and both ranks) after a commit, resume with resume_path():
    parameters, optimizer moments and *each rank's* RNG match an uninterrupted run bit for bit. Each rank
    draws its own dropout masks, so restoring only rank 0's RNG (the control) gives different weights."""
    from dist_launch import env_with, kill_session, torchrun

    _ddp_run(["--dir", str(tmp_path / "ref"), "--dump", str(tmp_path / "ref.{rank}.st")])
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randrange(5, 22)
    ck, progress = tmp_path / "ck", tmp_path / "progress"
    job = torchrun("lightning_train.py", [*DDP, "--dir", str(ck), "--sleep", "0.1", "--progress", str(progress)],
                   env=env_with())
    try:
        deadline = time.monotonic() + 240
        while not (_steps_done(Path(f"{progress}.0")) >= kill_at and resume_path(dir=ck) is not None):
            assert job.poll() is None, f"job ended before the kill (seed={seed}):\n{job.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, f"no commit / step {kill_at} within 240 s (seed={seed})"
            time.sleep(0.02)
    finally:
        kill_session(job)  # SIGKILL torchrun's agent and both ranks at once
        job.communicate(timeout=60)
    killed_at = _steps_done(Path(f"{progress}.0"))
    assert killed_at < 30, f"the job finished before the kill (seed={seed})"
    start = Path(resume_path(dir=ck) or "")
    assert {"rng_state_0.json", "rng_state_1.json"} <= {p.name for p in start.iterdir()}, start
    rng = [json.loads((start / f"rng_state_{r}.json").read_text())["torch"] for r in (0, 1)]
    assert rng[0] != rng[1]  # the ranks' RNGs differ, so rank 1's own state must come back
    control = tmp_path / "control"
    shutil.copytree(ck, control)

    out = _ddp_run(["--dir", str(ck), "--resume", "--dump", str(tmp_path / "res.{rank}.st")])
    resumed = re.findall(r"resume from (\S+)", out)  # both ranks' lines may share one line: match, don't split
    assert resumed == [str(start)] * 2, (resumed, seed)
    for r in (0, 1):
        _assert_same(tmp_path / f"ref.{r}.st", tmp_path / f"res.{r}.st")
    assert not [p for p in ck.iterdir() if p.name.startswith(".checkpoint-")]  # the killed save's temp is gone
    folders = {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")}
    assert folders == {_link_target(p) for p in ck.glob("*.ckpt")}

    # control: the same resume with only rank 0 restoring its RNG (what saving rank 0's alone amounts to)
    _ddp_run(["--dir", str(control), "--resume", "--restore-rng-ranks", "0", "--dump",
              str(tmp_path / "ctl.{rank}.st")])
    ref, ctl = _load_dump(tmp_path / "ref.0.st")[0], _load_dump(tmp_path / "ctl.0.st")[0]
    assert any(not torch.equal(ref[k], ctl[k]) for k in ref if k.startswith("param.net")), \
        "rank 1's RNG made no difference: the test would not catch a missing rng_state_1.json"


# -- an HF model inside the LightningModule: the folder is servable with from_pretrained ------------------------
@pytest.fixture
def no_tqdm_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_pretrained's progress bar would start tqdm's monitor thread (the leak check flags it)."""
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_embd=32, n_head=2))


def _gpt_module(seed: int) -> Any:
    import lightning as L

    class GPT(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_gpt2()  # dropout on: an exact resume needs the RNG back
            self.scale = torch.nn.Parameter(torch.ones(1))  # the LightningModule's own key, kept as is

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            ids = batch[0]
            return self.model(input_ids=ids, labels=ids).loss * self.scale[0]

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    torch.manual_seed(seed)
    return GPT()


def _tokens() -> Any:
    from lightning_train import Batches

    data = Batches(n=32, bs=4)  # 8 batches an epoch; resumable mid-epoch
    data.x = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(3))
    data.y = data.x
    return data


def _fit_gpt(module: Any, ck: Path, *, steps: int, ckpt_path: str | None = None) -> None:
    import lightning as L
    from btckpt.lightning import ModelCheckpoint

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        plugins=[SafetensorsCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=ck, every_n_train_steps=3, save_top_k=-1)])
    trainer.fit(module, train_dataloaders=_tokens(), ckpt_path=ckpt_path)


def test_hf_model_folder_loads_with_from_pretrained_and_resumes_exactly(tmp_path: Path, no_tqdm_monitor: None) -> None:
    """A LightningModule holding a GPT-2 (tied lm_head/wte): every checkpoint folder loads with
    AutoModelForCausalLM.from_pretrained (config.json + HF-keyed model.safetensors), and resuming the fit
    from it restores the LightningModule's own keys and ends bit-identical to an uninterrupted run."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref = _gpt_module(0)
    _fit_gpt(ref, tmp_path / "ref", steps=9)
    folder = tmp_path / "ref" / "checkpoint-9"
    assert resume_path(dir=tmp_path / "ref") == str(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "btckpt.json"} <= names, names
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "transformer.wte.weight" in stored and "scale" in stored
    assert not [k for k in stored if k.startswith("model.")]
    assert "lm_head.weight" not in stored  # tied: stored once
    hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) <= {"scale"}, info
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    want = ref.model.state_dict()
    got = hf.state_dict()
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, bad

    # the Lightning side sees the LightningModule's exact keys and values
    io = SafetensorsCheckpointIO()
    loaded = io.load_checkpoint(folder)["state_dict"]
    io.teardown()
    full = ref.state_dict()
    assert list(loaded) == list(full)
    assert all(torch.equal(loaded[k], full[k]) for k in full)

    # resume mid-epoch from step 3 (dropout + AdamW): bit-identical to the uninterrupted run
    res = _gpt_module(1)
    ck = tmp_path / "res"
    shutil.copytree(tmp_path / "ref" / "checkpoint-3", ck / "checkpoint-3")
    _fit_gpt(res, ck, steps=9, ckpt_path=str(ck / "checkpoint-3"))
    bad = [k for k, v in ref.state_dict().items() if not torch.equal(v, res.state_dict()[k])]
    assert not bad, f"differs after resume: {bad}"
    hf2 = AutoModelForCausalLM.from_pretrained(ck / "checkpoint-9")
    assert all(torch.equal(hf2.state_dict()[k], v) for k, v in want.items())


def test_hf_model_choice_collision_and_several_models(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     no_tqdm_monitor: None) -> None:
    """Explicit hf_model=, a key collision refused with a clear error, several models: none, one warning."""
    from btckpt import ConfigError

    module = torch.nn.Module()
    module.model = _tiny_gpt2()
    module.lm_head = torch.nn.Linear(2, 2, bias=False)  # "lm_head.weight" would collide with model.lm_head.weight
    io = SafetensorsCheckpointIO(async_save=False)
    io.attach(module)
    with pytest.raises(ConfigError, match="lm_head.weight.*hf_model=False"):
        io.save_checkpoint({"global_step": 1, "state_dict": module.state_dict()}, tmp_path / "a" / "x.ckpt")
    io.teardown()
    off = SafetensorsCheckpointIO(async_save=False, hf_model=False)
    off.attach(module)
    off.save_checkpoint({"global_step": 1, "state_dict": module.state_dict()}, tmp_path / "b" / "x.ckpt")
    assert not (tmp_path / "b" / "checkpoint-1" / "config.json").exists()
    off.teardown()

    two = torch.nn.Module()
    two.a, two.b = _tiny_gpt2(), _tiny_gpt2()
    io = SafetensorsCheckpointIO(async_save=False)
    io.attach(two)
    with caplog.at_level("WARNING", logger="btckpt"):
        for step in (1, 2):
            io.save_checkpoint({"global_step": step, "state_dict": two.state_dict()}, tmp_path / "c" / "x.ckpt")
    assert len([r for r in caplog.records if "several transformers models" in r.getMessage()]) == 1
    assert not (tmp_path / "c" / "checkpoint-2" / "config.json").exists()
    io.teardown()
    chosen = SafetensorsCheckpointIO(async_save=False, hf_model="b", max_shard_size=100_000)  # sharded + index
    chosen.attach(two)
    chosen.save_checkpoint({"global_step": 3, "state_dict": two.state_dict()}, tmp_path / "d" / "x.ckpt")
    chosen.teardown()
    index = json.loads((tmp_path / "d" / "checkpoint-3" / "model.safetensors.index.json").read_text())
    assert "transformer.wte.weight" in index["weight_map"] and "a.transformer.wte.weight" in index["weight_map"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "d" / "checkpoint-3")
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in two.b.state_dict().items())
    back = SafetensorsCheckpointIO().load_checkpoint(tmp_path / "d" / "checkpoint-3")["state_dict"]
    assert list(back) == list(two.state_dict())
