"""The frameworks' own deletions, names and features under btckpt (issue 23 sections 2 and 4): real
Lightning / transformers runs on CPU, killed with real signals where the claim is about a kill."""

from __future__ import annotations

import json
import signal
from pathlib import Path

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
