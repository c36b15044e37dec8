"""Fault points per phase: an injected failure (EIO or ENOSPC) at every phase of a save, for the sync and
async Checkpointer and the one-shot ``btckpt.save``. Each must give a clear CheckpointError (InsufficientSpace
for ENOSPC), raised once; commit nothing; leave no temp folder after the next start; leave the older
checkpoints intact and verifying; and leave the Checkpointer usable. An upload phase (mid-file, the remote
manifest) fails one upload pass: nothing shows complete remotely, the next pass finishes the upload.
A configured point that is never reached fails the test.

Internals used: btckpt.format.manifest, btckpt.storage.discovery, btckpt.upload (the uploader object run pass by
pass (``python -m btckpt.upload`` is a command), the manifest's name, discovery to judge the folders on disk
(complete, verified), which no public name reports).
"""

from __future__ import annotations

import logging
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt import CheckpointError, InsufficientSpace
from btckpt.storage.discovery import scan, verify
from btckpt.testing import faults
from crash_harness import LOCAL_PHASES, temp_folders

COMMIT_PHASES = [p for p in LOCAL_PHASES if p != "retention"]
UPLOAD_PHASES = [p for p in faults.PHASES if p.startswith("upload_")]


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "extra": {"seed": seed, "tag": "x"}}


def assert_intact(root: Path, steps: list[int], state_seed: int = 0) -> None:
    """Exactly ``steps`` are committed; each verifies; the newest loads back into a fresh state."""
    infos = scan(root)
    assert [i.step for i in infos] == sorted(steps, reverse=True), [(i.path.name, i.status) for i in infos]
    for i in infos:
        assert i.complete, (i.path, i.status, i.reason)
        assert verify(i) == []
    want = make_state(state_seed)
    got = make_state(99)
    btckpt.load(infos[-1].path, got)
    for k, v in want["model"].state_dict().items():
        assert torch.equal(got["model"].state_dict()[k], v), k


def expected_error(action: str) -> type[CheckpointError]:
    return InsufficientSpace if action == "enospc" else CheckpointError


def check_error(exc: BaseException, action: str, root: Path) -> None:
    assert isinstance(exc, expected_error(action)), repr(exc)
    if action != "enospc":
        assert not isinstance(exc, InsufficientSpace), repr(exc)
    assert str(root) in str(exc), f"message does not name the folder: {exc}"
    assert "Nothing was committed" in str(exc) or "Nothing was written" in str(exc), str(exc)


@pytest.mark.parametrize("action", ["raise", "enospc"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("phase", COMMIT_PHASES)
def test_fault_in_checkpointer_save(tmp_path: Path, phase: str, mode: str, action: str) -> None:
    root = tmp_path / "ckpts"
    state = make_state()
    with btckpt.Checkpointer(dir=str(root), async_save=mode == "async", keep_last=None) as ck:
        ck.save(1, state)
        ck.wait()
        faults.disarm()
        faults.arm(phase, action)
        with pytest.raises(CheckpointError) as ei:
            ck.save(2, state)
            ck.wait()  # async: the background error surfaces here
        check_error(ei.value, action, root)
        assert phase in faults.reached(), f"fault point {phase!r} was never reached"
        faults.disarm()
        ck.wait()  # raised exactly once
        assert not (root / "checkpoint-2").exists()
        assert temp_folders(root) == [], "the failed save left its temp folder behind"
        assert_intact(root, [1])
        ck.save(3, state)  # the Checkpointer is still usable
        ck.wait()
    with btckpt.Checkpointer(dir=str(root)) as ck2:  # the next start
        assert temp_folders(root) == []
        assert ck2.latest() == root / "checkpoint-3"
    assert_intact(root, [1, 3])


@pytest.mark.parametrize("action", ["raise", "enospc"])
@pytest.mark.parametrize("phase", COMMIT_PHASES)
def test_fault_in_oneshot_save(tmp_path: Path, phase: str, action: str) -> None:
    root = tmp_path / "ckpts"
    state = make_state()
    btckpt.save(root / "checkpoint-1", state)
    faults.disarm()
    faults.arm(phase, action)
    with pytest.raises(CheckpointError) as ei:
        btckpt.save(root / "checkpoint-2", state)
    check_error(ei.value, action, root)
    assert phase in faults.reached(), f"fault point {phase!r} was never reached"
    faults.disarm()
    assert not (root / "checkpoint-2").exists()
    assert temp_folders(root) == []
    assert_intact(root, [1])
    btckpt.save(root / "checkpoint-2", state)
    assert_intact(root, [1, 2])


@pytest.mark.parametrize("action", ["raise", "enospc"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fault_in_retention(tmp_path: Path, mode: str, action: str, caplog: pytest.LogCaptureFixture) -> None:
    """Retention runs after the commit: a failure there keeps the new checkpoint, warns, and deletes the
    old one at the next save; no checkpoint is ever half-deleted."""
    root = tmp_path / "ckpts"
    state = make_state()
    with btckpt.Checkpointer(dir=str(root), async_save=mode == "async", keep_last=1) as ck:
        ck.save(1, state)
        ck.wait()
        faults.disarm()
        faults.arm("retention", action)
        with caplog.at_level(logging.WARNING, logger="btckpt"):
            ck.save(2, state)
            ck.wait()
        assert "retention" in faults.reached()
        assert any("could not remove" in r.getMessage() and "checkpoint-1" in r.getMessage() for r in caplog.records)
        assert_intact(root, [1, 2])
        faults.disarm()
        ck.save(3, state)
        ck.wait()
    assert temp_folders(root) == []
    assert_intact(root, [3])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_async_error_raised_once_from_next_save(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "ckpts"
    state = make_state()
    with btckpt.Checkpointer(dir=str(root), async_save=mode == "async") as ck:
        faults.arm("before_rename", "raise")
        if mode == "async":
            ck.save(1, state)  # returns: the failure happens in the background
            with pytest.raises(CheckpointError, match="before_rename"):
                ck.save(2, state)  # the next save raises it (before starting its own) ...
            faults.disarm()
            ck.save(2, state)  # ... once
            ck.wait()
        else:
            with pytest.raises(CheckpointError, match="before_rename"):
                ck.save(1, state)
            faults.disarm()
            ck.save(2, state)
    assert_intact(root, [2])


def test_error_raised_from_close(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    ck = btckpt.Checkpointer(dir=str(root), async_save=True)
    faults.arm("write_data", "enospc")
    ck.save(5, make_state())
    with pytest.raises(InsufficientSpace):
        ck.close()
    ck.close()  # idempotent, nothing raised twice
    assert scan(root) == [] and temp_folders(root) == []


@pytest.mark.parametrize("action", ["raise", "enospc"])
@pytest.mark.parametrize("phase", UPLOAD_PHASES)
def test_fault_in_upload(tmp_path: Path, phase: str, action: str) -> None:
    """A failure mid-file or at the remote manifest: the pass reports the checkpoint failed, the remote side
    never shows it complete (no manifest; the older upload intact), the local checkpoints are untouched, and
    the next pass finishes the upload (verified). A local save never reaches an upload phase."""
    from btckpt.format.manifest import MANIFEST
    from btckpt.upload import Uploader

    src, remote = tmp_path / "ck", tmp_path / "remote"
    big = {"model": {"w": torch.arange(3 * 2**20, dtype=torch.float32)}, "extra": {"n": 1}}  # 12 MiB: > 1 chunk
    with btckpt.Checkpointer(dir=str(src), async_save=False, keep_last=None) as ck:
        ck.save(1, big)
        assert "after_rename" in faults.reached() and not faults.reached() & set(UPLOAD_PHASES)
        up = Uploader(src, f"file://{remote}", retries=1, backoff=0.01)
        assert up.run_pass().uploaded == [str(remote / "checkpoint-1")]
        ck.save(2, big)
    faults.disarm()
    faults.arm(phase, action)
    res = Uploader(src, f"file://{remote}", retries=1, backoff=0.01).run_pass()
    assert phase in faults.reached(), f"fault point {phase!r} was never reached"
    faults.disarm()
    assert res.failed == [str(remote / "checkpoint-2")] and not res.uploaded, res
    assert not (remote / "checkpoint-2" / MANIFEST).exists()
    assert [(i.step, i.status) for i in scan(remote) if i.complete] == [(1, "complete")]
    assert [i.step for i in scan(src) if i.complete] == [2, 1]
    res = Uploader(src, f"file://{remote}", retries=0).run_pass()
    assert res.uploaded == [str(remote / "checkpoint-2")] and not res.failed, res
    for i in scan(remote):
        assert i.complete and verify(i) == [], i.path
        assert (i.path / MANIFEST).read_bytes() == (src / i.path.name / MANIFEST).read_bytes()


def test_arm_rejects_unknown_phase() -> None:
    with pytest.raises(ValueError, match="unknown fault phase"):
        faults.arm("no_such_phase")


def test_every_point_in_the_package_is_armable_and_the_env_reads_the_same_table(monkeypatch) -> None:
    """The phases production code marks are exactly the table arm() and $BTCKPT_FAULT accept ("replicate" was
    used but missing, so arm("replicate") raised)."""
    import re

    src = Path(faults.__file__).resolve().parents[1]
    used = {m for f in src.rglob("*.py") for m in re.findall(r'faults\.point\("([a-z_]+)"\)', f.read_text())}
    assert used == set(faults.PHASES)
    for phase in used:
        faults.arm(phase)
    faults.disarm()
    monkeypatch.setenv("BTCKPT_FAULT", "no_such_phase:kill")
    monkeypatch.setattr(faults, "_env_loaded", False)
    with pytest.raises(ValueError, match="BTCKPT_FAULT names unknown fault phase 'no_such_phase'"):
        faults.point("stage")
    monkeypatch.setattr(faults, "_env_loaded", True)


def test_leak_check_sees_stale_temp_folders(tmp_path: Path) -> None:
    """The autouse leak fixture (conftest) fails a test that leaves a checkpoint temp folder behind."""
    from conftest import _stale_temps

    stale = tmp_path / "a" / "b" / ".checkpoint-4.tmp-123-abcdef01"
    stale.mkdir(parents=True)
    scratch = tmp_path / "_tmp" / "btckpt-scratch"
    scratch.mkdir(parents=True)
    assert _stale_temps(tmp_path) == ["_tmp/btckpt-scratch", "a/b/.checkpoint-4.tmp-123-abcdef01"]
    stale.rmdir()
    scratch.rmdir()
    assert _stale_temps(tmp_path) == []
