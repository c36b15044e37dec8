"""The Lightning plugin alone is enough on the platform: with ``$BT_CHECKPOINT_DIR`` set, whichever
``ModelCheckpoint`` chose the path (Lightning's own, the default one, one pointed elsewhere), every checkpoint
lands in that folder and a job killed with SIGKILL resumes from it, at the right step, bit-identical.

Each run is tests/scripts/lightning_platform.py in a real subprocess (its cwd a fresh folder, Lightning's
default root), stopped after a known step, killed once the expected checkpoint committed, and restarted.

Internals used: btckpt.lightning.state, btckpt.storage.discovery (the plugin's link files read back, discovery to
judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from btckpt.lightning import SafetensorsCheckpointIO, resume_path  # noqa: E402
from btckpt.lightning.state import read_link  # noqa: E402
from btckpt.storage.discovery import inspect  # noqa: E402

SCRIPT = str(Path(__file__).parent / "scripts" / "lightning_platform.py")
WARNING = "is not $BT_CHECKPOINT_DIR"


def _env(bt: Path) -> dict[str, str]:
    return {**os.environ, "BT_CHECKPOINT_DIR": str(bt)}


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _finish(args: list[str], *, bt: Path, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-u", SCRIPT, *args], env=_env(bt), cwd=cwd, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _kill_after(args: list[str], *, bt: Path, cwd: Path, hang_at: int, expect: int, link: str) -> str:
    """Run until step ``hang_at``; once ``checkpoint-<expect>`` committed and Lightning's name ``link`` names it,
    SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-u", SCRIPT, *args, "--hang-at", str(hang_at)], env=_env(bt), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "HANG":
                break
        else:
            raise AssertionError("the run ended before stopping:\n" + "".join(lines[-40:]))

        def committed() -> bool:
            folder = bt / f"checkpoint-{expect}"
            if not inspect(folder).complete:
                return False
            return (bt / link).is_file() and read_link(bt / link) == folder

        deadline = time.monotonic() + 60  # the background writer may still be committing on a loaded machine
        while not committed():
            assert time.monotonic() < deadline, f"checkpoint-{expect} not committed in {bt}: " + \
                f"{sorted(p.name for p in bt.iterdir()) if bt.is_dir() else 'no folder'}\n" + "".join(lines[-40:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    return "".join(lines)


def _start_step(out: str) -> int:
    starts = re.findall(r"^START (\d+)$", out, re.M)
    assert len(starts) == 1, out[-3000:]
    return int(starts[0])


def _assert_same(a: Path, b: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
    assert sorted(ta) == sorted(tb)
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"differs from the uninterrupted run: {bad}"


def _nothing_outside(root: Path, bt: Path) -> None:
    """No checkpoint folder or .ckpt name anywhere under ``root`` except in ``bt``."""
    stray = [p for p in root.rglob("*") if (p.name.endswith(".ckpt") or p.name.startswith("checkpoint-"))
             and bt not in p.parents]
    assert not stray, stray


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run's final parameters, optimizer moments, RNG, step and learning rate."""
    d = tmp_path_factory.mktemp("ref")
    _finish(["--callback", "none", "--dump", str(d / "full.st")], bt=d / "bt", cwd=_fresh(d / "work"))
    return d / "full.st"


def test_lightnings_own_model_checkpoint_saves_in_bt_dir_and_resumes(tmp_path: Path, reference: Path) -> None:
    """(a) ``lightning.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=3)``, no dirpath: Lightning would
    write ``<cwd>/checkpoints``; the plugin stores them in ``$BT_CHECKPOINT_DIR`` under Lightning's names."""
    bt, work = tmp_path / "bt", _fresh(tmp_path / "work")
    out = _kill_after(["--callback", "steps", "--every", "3"], bt=bt, cwd=work, hang_at=7, expect=6,
                      link="epoch=1-step=6.ckpt")
    assert _start_step(out) == 0
    assert WARNING not in out  # Lightning's default folder is redirected silently
    assert not (work / "checkpoints").exists()
    _nothing_outside(work, bt)
    assert resume_path(dir=bt) == str(bt / "checkpoint-6")

    out = _finish(["--callback", "steps", "--every", "3", "--ckpt-path", "resume", "--dump", str(tmp_path / "res.st")],
                  bt=bt, cwd=work)
    assert f"resume from {bt / 'checkpoint-6'}" in out
    assert _start_step(out) == 6
    _assert_same(reference, tmp_path / "res.st")
    _nothing_outside(work, bt)
    assert sorted(p.name for p in bt.glob("*.ckpt")) == ["epoch=3-step=15.ckpt"]  # Lightning's top-1 retention


def test_default_checkpoint_callback_saves_in_bt_dir_and_resumes(tmp_path: Path, reference: Path) -> None:
    """(b) No checkpoint callback: Lightning's default one (epoch ends, top-1) with its default logger would
    write ``lightning_logs/version_0/checkpoints``; the plugin stores them in ``$BT_CHECKPOINT_DIR``."""
    bt, work = tmp_path / "bt", _fresh(tmp_path / "work")
    out = _kill_after(["--callback", "none"], bt=bt, cwd=work, hang_at=10, expect=8, link="epoch=1-step=8.ckpt")
    assert _start_step(out) == 0 and WARNING not in out
    assert (work / "lightning_logs").is_dir()  # the logger still logs where it did: only checkpoints move
    _nothing_outside(work, bt)
    assert sorted(p.name for p in bt.glob("*.ckpt")) == ["epoch=1-step=8.ckpt"]

    out = _finish(["--callback", "none", "--ckpt-path", "resume", "--dump", str(tmp_path / "res.st")], bt=bt, cwd=work)
    assert f"resume from {bt / 'checkpoint-8'}" in out
    assert _start_step(out) == 8
    _assert_same(reference, tmp_path / "res.st")
    _nothing_outside(work, bt)


def test_dirpath_outside_bt_dir_is_redirected_with_one_warning_and_last_resumes(tmp_path: Path,
                                                                               reference: Path) -> None:
    """(c) ``ModelCheckpoint(dirpath=<elsewhere>, every_n_train_steps=5, save_last=True)``: stored in
    ``$BT_CHECKPOINT_DIR`` anyway (nothing written elsewhere), one warning naming both folders and why;
    ``ckpt_path="last"`` finds ``last.ckpt`` there after the restart."""
    bt, work, elsewhere = tmp_path / "bt", _fresh(tmp_path / "work"), tmp_path / "elsewhere"
    args = ["--callback", "steps", "--every", "5", "--dirpath", str(elsewhere), "--save-last"]
    out = _kill_after(args, bt=bt, cwd=work, hang_at=11, expect=10, link="last.ckpt")
    assert _start_step(out) == 0
    resumed = _finish([*args, "--ckpt-path", "last", "--dump", str(tmp_path / "res.st")], bt=bt, cwd=work)
    assert "resume from last" in resumed and _start_step(resumed) == 10
    for run in (out, resumed):
        assert run.count(WARNING) == 1, run[-3000:]
        line = next(ln for ln in run.splitlines() if WARNING in ln)
        assert f"ModelCheckpoint(dirpath='{elsewhere}')" in line and f"stores these checkpoints in {bt} " in line
        assert "backs up" in line and 'ckpt_path="last"' in line and f"nothing is written to {elsewhere}" in line
    _assert_same(reference, tmp_path / "res.st")
    assert not elsewhere.exists() or not any(elsewhere.iterdir())
    _nothing_outside(tmp_path, bt)
    assert read_link(bt / "last.ckpt") == bt / "checkpoint-15"


def test_any_saved_path_lands_in_bt_dir_and_is_found_by_that_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """``trainer.save_checkpoint("<elsewhere>/final.ckpt")`` and the like: stored as ``$BT/final.ckpt``;
    loading and removing ``<elsewhere>/final.ckpt`` find it there. Unset, the path is used as given."""
    bt, elsewhere = tmp_path / "bt", tmp_path / "elsewhere"
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(bt))
    io = SafetensorsCheckpointIO(async_save=False)
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        for step in (3, 4):
            io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((2,), float(step))}},
                               elsewhere / "final.ckpt")
    assert len([r for r in caplog.records if WARNING in r.getMessage()]) == 1
    assert not elsewhere.exists()
    assert read_link(bt / "final.ckpt") == bt / "checkpoint-4" and not (bt / "checkpoint-3").exists()
    assert torch.equal(io.load_checkpoint(elsewhere / "final.ckpt")["state_dict"]["w"], torch.full((2,), 4.0))
    io.remove_checkpoint(elsewhere / "final.ckpt")
    assert not (bt / "final.ckpt").exists() and not (bt / "checkpoint-4").exists()
    io.teardown()

    monkeypatch.delenv("BT_CHECKPOINT_DIR")
    io = SafetensorsCheckpointIO(async_save=False)
    io.save_checkpoint({"global_step": 5, "state_dict": {"w": torch.ones(2)}}, elsewhere / "final.ckpt")
    assert read_link(elsewhere / "final.ckpt") == elsewhere / "checkpoint-5"
    io.teardown()


@pytest.mark.compat
def test_folder_choice_routed_for_this_plugins_trainers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ModelCheckpoint subclass's folder (setup and ckpt_path="last") is $BT_CHECKPOINT_DIR on a trainer with
    the plugin; a trainer without it, or with the variable unset, keeps Lightning's choice."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Mine(ModelCheckpoint):
        pass

    def folder(plugins: list[SafetensorsCheckpointIO]) -> str:
        cb = Mine(every_n_train_steps=2)
        trainer = L.Trainer(accelerator="cpu", plugins=plugins, callbacks=[cb], logger=False)
        assert not cb._find_last_checkpoints(trainer)
        cb.setup(trainer, trainer.lightning_module, "fit")
        return str(cb.dirpath)

    bt = tmp_path / "bt"
    monkeypatch.setenv("BT_CHECKPOINT_DIR", str(bt))
    assert folder([SafetensorsCheckpointIO()]) == str(bt)
    assert folder([]) == str(Path.cwd() / "checkpoints")
    monkeypatch.delenv("BT_CHECKPOINT_DIR")
    assert folder([SafetensorsCheckpointIO()]) == str(Path.cwd() / "checkpoints")
