"""Disk full: a small tmpfs fills up mid-save (real ENOSPC from the kernel, not an injected one).

Each case: a clear InsufficientSpace, nothing half-written visible (no checkpoint-<step>, no temp folder),
older checkpoints intact and verifying, the space given back, and the training run going on or stopping
according to ``on_error``. The preflight check refuses a save that cannot fit before writing anything.
Needs root for ``mount -t tmpfs`` (skipped with that reason otherwise).

Internals used: btckpt.storage.discovery, btckpt.storage.local (``storage.local.free_bytes`` patched so the
preflight lets a save run into a real ENOSPC, discovery to judge the folders on disk (complete, verified), which no
public name reports).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt import InsufficientSpace
from btckpt.storage import local as storage_mod
from btckpt.storage.discovery import scan, verify

MiB = 1 << 20


def make_state(mib: float = 2.0, seed: int = 0) -> dict:
    """A model whose checkpoint is about ``mib`` MiB (weights only, SGD without momentum state)."""
    torch.manual_seed(seed)
    n = int(mib * MiB / 4 / 256)
    model = torch.nn.Linear(256, n, bias=False)
    return {"model": model, "extra": {"seed": seed}}


def used(fs: Path) -> int:
    st = os.statvfs(fs)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".btckpt.lock") if root.exists() else []


def assert_only(root: Path, steps: list[int]) -> None:
    assert visible(root) == sorted(f"checkpoint-{s}" for s in steps), visible(root)
    for info in scan(root):
        assert info.complete, (info.path, info.reason)
        assert verify(info) == []


def lie_about_free_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the preflight pass, as if another process filled the disk right after it checked."""
    monkeypatch.setattr(storage_mod, "free_bytes", lambda _p: 1 << 50)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_fills_mid_save_raise(tmpfs, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    fs = tmpfs(3 * MiB + MiB // 2)
    root = fs / "ckpts"
    state = make_state(2.0)
    lie_about_free_space(monkeypatch)
    with btckpt.Checkpointer(dir=str(root), async_save=mode == "async", keep_last=None, space_margin=0) as ck:
        ck.save(1, state)
        ck.wait()
        before = used(fs)
        with pytest.raises(InsufficientSpace) as ei:
            ck.save(2, state)  # 2 MiB more does not fit in what is left
            ck.wait()
        msg = str(ei.value)
        assert str(root) in msg and "ran out of space" in msg and "Nothing was committed" in msg, msg
        ck.wait()  # raised once
        assert_only(root, [1])
        assert used(fs) <= before + 64 * 1024, "the failed save's bytes were not given back"
        import shutil

        shutil.rmtree(root / "checkpoint-1")  # make room: the same run can save again
        ck.save(4, state)
        ck.wait()
    assert_only(root, [4])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_fills_mid_save_warn_goes_on(tmpfs, monkeypatch: pytest.MonkeyPatch, mode: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    fs = tmpfs(3 * MiB + MiB // 2)
    root = fs / "ckpts"
    state = make_state(2.0)
    lie_about_free_space(monkeypatch)
    opt = torch.optim.SGD(state["model"].parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        with btckpt.Checkpointer(dir=str(root), async_save=mode == "async", keep_last=None, space_margin=0,
                                 on_error="warn") as ck:
            for step in range(1, 5):  # training goes on through the failed saves
                state["model"](torch.randn(2, 256)).sum().backward()
                opt.step()
                ck.save(step, state)
            ck.wait()
    assert any("on_error='warn'" in r.getMessage() and "ran out of space" in r.getMessage() for r in caplog.records)
    assert_only(root, [1])


def test_preflight_refuses_before_writing(tmpfs) -> None:
    fs = tmpfs(3 * MiB)
    root = fs / "ckpts"
    with btckpt.Checkpointer(dir=str(root), async_save=True, space_margin=0) as ck:
        before = used(fs)
        with pytest.raises(InsufficientSpace) as ei:
            ck.save(1, make_state(4.0))
        msg = str(ei.value)
        assert str(root) in msg and "Nothing was written" in msg and "MB" in msg, msg
        assert used(fs) == before and visible(root) == []


def test_preflight_counts_the_margin_and_the_old_checkpoint(tmpfs) -> None:
    """keep_last=1 still needs room for two checkpoints (the old one goes only after the new commit)."""
    fs = tmpfs(6 * MiB)
    root = fs / "ckpts"
    state = make_state(2.0)
    with btckpt.Checkpointer(dir=str(root), async_save=False, keep_last=1, space_margin=2 * MiB) as ck:
        ck.save(1, state)
        with pytest.raises(InsufficientSpace, match="margin"):
            ck.save(2, state)
        assert_only(root, [1])


def test_preflight_warn_skips_the_save(tmpfs, caplog: pytest.LogCaptureFixture) -> None:
    fs = tmpfs(3 * MiB)
    root = fs / "ckpts"
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        with btckpt.Checkpointer(dir=str(root), on_error="warn", space_margin=0) as ck:
            ck.save(1, make_state(4.0))
            ck.wait()
    assert any("step 1 not saved" in r.getMessage() for r in caplog.records)
    assert visible(root) == []


def test_oneshot_save_preflight_and_mid_save(tmpfs, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = tmpfs(3 * MiB)
    with pytest.raises(InsufficientSpace, match="Nothing was written"):
        btckpt.save(fs / "checkpoint-1", make_state(4.0))
    assert list(fs.iterdir()) == []
    monkeypatch.setattr(storage_mod, "free_bytes", lambda _p: 1 << 50)
    with pytest.raises(InsufficientSpace, match="ran out of space"):
        btckpt.save(fs / "checkpoint-1", make_state(4.0))
    assert list(fs.iterdir()) == []


def test_rng_and_manifest_writes_hit_enospc(tmpfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors fit but the small files after them (RNG state, manifest) do not."""
    fs = tmpfs(2 * MiB + 8192)
    root = fs / "ckpts"
    lie_about_free_space(monkeypatch)
    # fill the disk to within a few KiB of a 2 MiB tensor file: the RNG JSON / manifest then fails
    state = {"model": torch.nn.Linear(256, 2040, bias=False), "extra": {"blob": "x" * 20000}}
    with btckpt.Checkpointer(dir=str(root), async_save=False, space_margin=0) as ck:
        with pytest.raises(InsufficientSpace):
            ck.save(1, state)
    assert visible(root) == []
