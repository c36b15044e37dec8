"""The node-local tier (btckpt.tiers): options, memory preflight, retention, promotion, identity, resume,
crash mid-promotion, and a real torchrun job whose worker is SIGKILLed and resumes from the tier.

Internals used: btckpt.adapters, btckpt.cli, btckpt.format.layout, btckpt.format.members, btckpt.saving.commit,
btckpt.saving.priority, btckpt.saving.snapshot, btckpt.saving.writer, btckpt.storage.discovery, btckpt.tiers,
btckpt.tiers.local (the tier's internals (promotion, identity, copy bounds, the promoter's scheduling), a file arena
written and mapped (layout, stager, arena writer), the members' lock patched, the dir lock held, the adapters' resume
search, the command's ``main``, discovery to judge the folders on disk (complete, verified), which no public name
reports).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.adapters import resume_folder
from btckpt.cli import main as cli_main
from btckpt.storage.discovery import inspect, scan, verify
from btckpt.testing import faults
from btckpt.tiers import IDENTITY, default_tier_dir, resumable_tier
from conftest import PY, run_py
from dist_launch import SCRIPTS, env_with, finish, free_port, kill_session, raw_rank, torchrun


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(64, 64), "extra": {"step": 0}}


def _train(ck: btckpt.Checkpointer, state: dict, steps: range) -> None:
    for s in steps:
        ck.fence()  # an in-place edit outside optimizer.step(): wait for the snapshot's copy first
        with torch.no_grad():
            state["model"].weight.add_(1.0)
        state["extra"]["step"] = s
        ck.maybe_save(s, state)


def _steps(folder: Path) -> list[int]:
    return sorted(i.step for i in scan(folder, own=True) if i.complete)


def _tier_ck(tmp_path: Path, **kw) -> btckpt.Checkpointer:
    opts = dict(dir=tmp_path / "d", local_every_steps=2, local_tier_dir=tmp_path / "ram", every_steps=6,
                keep_last=None, handle_sigterm=False)
    opts.update(kw)
    return btckpt.Checkpointer(**opts)


# -- options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "3"])
def test_local_every_steps_is_validated(tmp_path: Path, bad) -> None:
    with pytest.raises(btckpt.ConfigError, match="local_every_steps"):
        btckpt.CheckpointConfig(dir=str(tmp_path / "d"), local_every_steps=bad)


def test_local_tier_dir_is_validated(tmp_path: Path) -> None:
    d = tmp_path / "d"
    with pytest.raises(btckpt.ConfigError, match="local_every_steps is None"):
        btckpt.CheckpointConfig(dir=str(d), local_tier_dir=str(tmp_path / "ram"))
    with pytest.raises(btckpt.ConfigError, match="not a URL"):
        btckpt.CheckpointConfig(dir=str(d), local_every_steps=2, local_tier_dir="s3://b/x")
    with pytest.raises(btckpt.ConfigError, match="overlap"):
        btckpt.CheckpointConfig(dir=str(d), local_every_steps=2, local_tier_dir=str(d / "ram"))
    with pytest.raises(btckpt.ConfigError, match="overlap"):
        btckpt.CheckpointConfig(dir=str(d), local_every_steps=2, local_tier_dir=str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(btckpt.ConfigError, match="is a file"):
        btckpt.CheckpointConfig(dir=str(d), local_every_steps=2, local_tier_dir=str(tmp_path / "file"))
    cfg = btckpt.CheckpointConfig(dir=str(d), local_every_steps=2, local_tier_dir=tmp_path / "ram")
    assert cfg.local_tier_dir == str(tmp_path / "ram")


def test_save_local_without_a_tier_is_refused(tmp_path: Path) -> None:
    with btckpt.Checkpointer(dir=tmp_path / "d", handle_sigterm=False) as ck:
        with pytest.raises(btckpt.ConfigError, match="local_every_steps"):
            ck.save_local(1, _state())
    assert _steps(tmp_path / "d") == []


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_peer_replicas_is_validated(tmp_path: Path, bad) -> None:
    with pytest.raises(btckpt.ConfigError, match="peer_replicas"):
        btckpt.CheckpointConfig(dir=str(tmp_path / "d"), local_every_steps=2, peer_replicas=bad)


def test_one_node_keeps_no_replicas(tmp_path: Path) -> None:
    ck = _tier_ck(tmp_path)  # peer_replicas=True by default: nothing to do on one node
    _train(ck, _state(), range(1, 5))
    ck.wait()
    assert not (tmp_path / "ram" / ".replicas").exists()
    ck.close()


def test_default_tier_dir_is_one_per_job(tmp_path: Path) -> None:
    a, b = default_tier_dir(tmp_path / "job-a"), default_tier_dir(tmp_path / "job-b")
    assert a.parent == b.parent == Path(f"/dev/shm/btckpt-{os.geteuid()}")  # a base of this user's (DESIGN.md)
    assert a != b and a.name.startswith("job-a-")
    assert default_tier_dir(tmp_path / "x" / ".." / "job-a") == a  # the same dir, however it is spelled


# -- saving into the tier, promotion, clean close -------------------------------------------------------------
def test_tier_saves_retention_promotion_and_clean_close(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state()
    ram, d = tmp_path / "ram", tmp_path / "d"
    ck = _tier_ck(tmp_path)
    _train(ck, state, range(1, 6))
    ck.wait()
    assert _steps(ram) == [4] and _steps(d) == []  # at most one complete step kept there (retention)
    _train(ck, state, range(6, 9))
    ck.wait()
    assert _steps(ram) == [8]
    assert _steps(d) == [6]  # step 6 was due durably: saved into the tier, then promoted
    promoted = inspect(d / "checkpoint-6")
    assert promoted.complete and verify(promoted) == []
    # the tier checkpoint is an ordinary checkpoint: the CLI verifies it unchanged
    assert cli_main(["verify", str(ram / "checkpoint-8")]) == 0
    assert (ram / IDENTITY).is_file()
    assert ck.latest() == ram / "checkpoint-8"  # what restore would load: the tier's newer step
    ck.close()
    assert not ram.exists()  # clean close: the newest step was promoted, then the tier removed
    assert _steps(d) == [6, 8]
    assert verify(inspect(d / "checkpoint-8")) == []
    fresh = _state(seed=1)
    with btckpt.Checkpointer(dir=d, handle_sigterm=False) as plain:
        assert plain.restore(fresh) == 8
    assert torch.equal(fresh["model"].weight, state["model"].weight) and fresh["extra"]["step"] == 8


def test_save_with_a_tier_promotes_and_on_commit_gets_the_durable_folder(tmp_path: Path) -> None:
    state = _state()
    ram, d = tmp_path / "ram", tmp_path / "d"
    ck = _tier_ck(tmp_path, every_steps=None)
    seen: list[tuple[Path, bool]] = []

    def on_commit(folder: Path) -> None:
        seen.append((folder, inspect(folder).complete))

    ck.save(3, state, extra_files={"notes.txt": b"three"}, meta={"who": "test"}, on_commit=on_commit)
    ck.wait()  # the tier save of step 3, then its promotion
    assert seen == [(d / "checkpoint-3", True)]  # the durable folder, committed, never the tier's
    assert _steps(d) == [3] and _steps(ram) == [3]  # one tier save, promoted
    durable = inspect(d / "checkpoint-3")
    assert verify(durable) == [] and (d / "checkpoint-3" / "notes.txt").read_bytes() == b"three"
    assert durable.manifest is not None and durable.manifest.meta["who"] == "test"
    # save_local: the tier only, with the same keywords; on_commit gets the tier folder
    assert ck.save_local(4, state, extra_files={"notes.txt": b"four"}, on_commit=on_commit) is True
    assert ck.save_local(4, state) is False  # the tier holds it already
    ck.wait()
    assert seen[1] == (ram / "checkpoint-4", True) and (ram / "checkpoint-4" / "notes.txt").read_bytes() == b"four"
    assert _steps(d) == [3] and _steps(ram) == [4]
    ck.save(4, state, on_commit=on_commit)  # the tier holds step 4: promoted as it is, no second snapshot
    ck.close()
    assert seen[2] == (d / "checkpoint-4", True) and len(seen) == 3
    assert (d / "checkpoint-4" / "notes.txt").read_bytes() == b"four"
    assert _steps(d) == [3, 4] and not ram.exists()


def test_on_commit_error_of_a_promoted_save_is_raised_once(tmp_path: Path) -> None:
    ck = _tier_ck(tmp_path, every_steps=None)

    def boom(folder: Path) -> None:
        raise RuntimeError(f"publish {folder.name} failed")

    ck.save(2, _state(), on_commit=boom)
    with pytest.raises(RuntimeError, match="publish checkpoint-2 failed"):
        ck.wait()
    ck.wait()  # reported once
    ck.close()
    assert _steps(tmp_path / "d") == [2]  # the commit itself stands
    shutil.rmtree(tmp_path / "ram", ignore_errors=True)  # a failed promotion leaves the tier (for a restart)


def test_promoted_checkpoints_are_uploaded(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    state = _state()
    ck = _tier_ck(tmp_path, upload_to=f"file://{remote}")
    _train(ck, state, range(1, 9))
    ck.close()  # waits for the uploader's last pass
    assert _steps(tmp_path / "d") == [6, 8]
    assert _steps(remote) == [6, 8]  # what reached the durable dir was published, nothing from the tier itself
    for step in (6, 8):
        assert verify(inspect(remote / f"checkpoint-{step}")) == []
    assert not (tmp_path / "ram").exists()


def test_promotion_keeps_the_tier_manifest_and_files(tmp_path: Path) -> None:
    state = _state()
    ck = _tier_ck(tmp_path)
    _train(ck, state, range(1, 8))
    ck.wait()
    tier = (tmp_path / "ram" / "checkpoint-6")
    if tier.exists():  # still there only when retention kept it; compare byte for byte then
        assert (tier / "btckpt.json").read_bytes() == (tmp_path / "d" / "checkpoint-6" / "btckpt.json").read_bytes()
    man = json.loads((tmp_path / "d" / "checkpoint-6" / "btckpt.json").read_text())
    assert man["step"] == 6 and "model.safetensors" in man["files"]
    ck.close()


# -- the arena is the tier: one host copy ---------------------------------------------------------------------
def _ino(folder: Path, name: str = "model.safetensors") -> int:
    return (folder / name).stat().st_ino


def test_tier_saves_stage_into_the_tier_files_and_reuse_them(tmp_path: Path) -> None:
    """A tier save's snapshot is copied straight into files in the tier, which become the checkpoint's files (no
    second host copy); the two file arenas alternate and a retired step's files come back for the step after
    next (same inodes: no page faulted in again), each step still a complete checkpoint of its own weights."""
    state = _state()
    ram = tmp_path / "ram"
    ck = _tier_ck(tmp_path, every_steps=None)
    inodes, weights = {}, {}
    for s in range(1, 13):
        _train(ck, state, range(s, s + 1))
        if s % 2 == 0:
            ck.wait()
            assert _steps(ram) == [s]  # the older step retired
            inodes[s] = _ino(ram / f"checkpoint-{s}")
            weights[s] = state["model"].weight.detach().clone()
            info = inspect(ram / f"checkpoint-{s}")
            assert info.complete and verify(info) == []
            loaded = _state(seed=9)
            btckpt.load(ram / f"checkpoint-{s}", loaded)
            assert torch.equal(loaded["model"].weight, weights[s]) and loaded["extra"]["step"] == s
    assert inodes[2] == inodes[6] == inodes[10] and inodes[4] == inodes[8] == inodes[12] != inodes[2]
    st = ck.stats
    assert st.arena_allocations == 2  # the two file arenas, made once; no anonymous arena
    assert st.arena_bytes == 2 * (ram / "checkpoint-12" / "model.safetensors").stat().st_size
    assert len(list(ram.glob(".arena-*"))) == 2
    ck.close()
    assert not ram.exists()  # the staging folders go with the tier at a clean close
    assert _steps(tmp_path / "d") == [12]


def test_a_step_still_being_promoted_keeps_its_files_and_the_arena_is_made_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step whose files an arena would take back is still being copied to the dir: the next snapshot goes
    into fresh files, never into that step's, and the promoted copy holds that step's bytes."""
    import btckpt.tiers.local as local_mod

    real, go = local_mod.promote, threading.Event()

    def slow(*a, **kw):
        assert go.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(local_mod, "promote", slow)
    state, d = _state(), tmp_path / "d"
    ck = _tier_ck(tmp_path, every_steps=4)
    _train(ck, state, range(1, 5))  # 2: arena A; 4: arena B, promotion of 4 held
    ck.fence()
    at4 = state["model"].weight.detach().clone()
    _train(ck, state, range(5, 9))  # 6: arena A again; 8: B's files are still checkpoint-4's, being promoted
    ck.fence()
    at8 = state["model"].weight.detach().clone()
    go.set()
    ck.wait()
    assert ck.stats.arena_allocations == 3
    assert _steps(d) == [4, 8]  # 8's promotion was queued behind 4's; wait() waited for both
    for step, want in ((4, at4), (8, at8)):
        info = inspect(d / f"checkpoint-{step}")
        assert info.complete and verify(info) == []
        loaded = _state(seed=9)
        btckpt.load(d / f"checkpoint-{step}", loaded)
        assert torch.equal(loaded["model"].weight, want) and loaded["extra"]["step"] == step
    ck.close()


def test_a_failed_landing_keeps_the_older_tier_step_and_the_next_save_reuses_the_arena(tmp_path: Path) -> None:
    state, ram = _state(), tmp_path / "ram"
    ck = _tier_ck(tmp_path, every_steps=None)
    _train(ck, state, range(1, 5))
    ck.wait()
    before = (ram / "checkpoint-4" / "model.safetensors").read_bytes()
    faults.arm("write_data", "raise")  # step 6, staged into the files step 2 gave back: fails before its rename
    _train(ck, state, range(5, 7))
    with pytest.raises(btckpt.CheckpointError):
        ck.wait()
    assert "write_data" in faults.reached()
    faults.disarm()
    assert _steps(ram) == [4] and (ram / "checkpoint-4" / "model.safetensors").read_bytes() == before
    assert verify(inspect(ram / "checkpoint-4")) == []
    assert not list(ram.glob(".checkpoint-*"))  # the aborted temp folder went
    _train(ck, state, range(7, 11))
    ck.wait()
    assert _steps(ram) == [10]
    loaded = _state(seed=9)
    btckpt.load(ram / "checkpoint-10", loaded)
    assert torch.equal(loaded["model"].weight, state["model"].weight) and loaded["extra"]["step"] == 10
    assert ck.stats.arena_allocations == 2  # the arena of the failed step kept its files and took step 10
    ck.close()


def test_a_retired_step_being_read_keeps_its_bytes_and_the_arena_takes_fresh_files(tmp_path: Path) -> None:
    """A btckpt reader (restore, verify) holding a tier file when its step is retired: the file is not taken back
    for a new snapshot (the reader keeps its bytes); that arena gets fresh files, and reuse resumes after."""
    from btckpt.format.members import open_regular

    state, ram = _state(), tmp_path / "ram"
    ck = _tier_ck(tmp_path, every_steps=None)
    _train(ck, state, range(1, 3))
    ck.wait()
    before = (ram / "checkpoint-2" / "model.safetensors").read_bytes()
    with open_regular(ram / "checkpoint-2" / "model.safetensors") as f:
        _train(ck, state, range(3, 7))  # 4 retires 2 (being read: deleted, not taken back); 6 needs new files
        ck.wait()
        assert _steps(ram) == [6]
        assert f.read() == before
    assert ck.stats.arena_allocations == 3
    ino6 = _ino(ram / "checkpoint-6")
    _train(ck, state, range(7, 11))
    ck.wait()
    assert ck.stats.arena_allocations == 3 and _ino(ram / "checkpoint-10") == ino6  # reused again
    loaded = _state(seed=9)
    btckpt.load(ram / "checkpoint-10", loaded)
    assert torch.equal(loaded["model"].weight, state["model"].weight) and loaded["extra"]["step"] == 10
    ck.close()


def test_a_file_taken_back_while_a_reader_opens_it_is_found_missing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's side of the handover: a file whose step is retired (folder renamed away, files taken back)
    between the reader's open and its shared lock is refused as missing, never read as the old step."""
    import btckpt.format.members as members

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 64)
    real = members.fcntl.flock

    def retired_meanwhile(fd: int, op: int) -> None:
        (tmp_path / ".checkpoint-2.tmp-1-x-del").mkdir()
        folder.rename(tmp_path / ".checkpoint-2.tmp-1-x-del" / "moved")
        real(fd, op)

    monkeypatch.setattr(members.fcntl, "flock", retired_meanwhile)
    with pytest.raises(btckpt.IncompleteCheckpoint, match="missing"):
        members.open_regular(folder / "model.safetensors")
    shutil.rmtree(tmp_path / ".checkpoint-2.tmp-1-x-del")  # what the retention would remove next


def test_a_file_arena_lands_the_bytes_of_a_written_file_and_pins_each_mapping(tmp_path: Path) -> None:
    from btckpt.format.layout import flatten_group, plan_layout
    from btckpt.saving.snapshot import Stager
    from btckpt.saving.writer import write_arena_file
    from safetensors.torch import load_file

    torch.manual_seed(0)
    tensors = {"w": torch.randn(300, 7), "b": torch.arange(5), "h": torch.ones(3, dtype=torch.float16),
               "v": torch.randn(900)}
    flat = [flatten_group("model", tensors)]
    layout = plan_layout(flat, max_shard_size=4096)
    assert len(layout.files) > 1  # sharded: several files, several mappings
    pinned: list[tuple[int, int]] = []
    unpinned: list[int] = []

    def pin(address: int, nbytes: int):
        pinned.append((address, nbytes))
        return lambda: unpinned.append(address)

    files, plain = Stager(pin=pin), Stager()
    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir()
    ref.mkdir()
    try:
        staged = files.stage(flat, layout, async_keys=set(), sync=False, into=tmp_path / "tier" / ".arena-x-0")
        anon = plain.stage(flat, layout, async_keys=set(), sync=False)
        assert staged.files is not None and anon.files is None
        for fp in layout.files:
            got = staged.land(fp, out / fp.name)
            want = write_arena_file(ref / fp.name, fp.header, anon.pieces(fp.begin, fp.size))
            assert got == want and (out / fp.name).read_bytes() == (ref / fp.name).read_bytes()
        assert not any((tmp_path / "tier" / ".arena-x-0-0").iterdir())  # every file moved out
        loaded = {k: v for fp in layout.files for k, v in load_file(out / fp.name).items()}
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        assert sorted(n for _, n in pinned) == sorted(fp.file_size for fp in layout.files)
        assert files.arena_pinned
    finally:
        files.close()
        plain.close()
    assert sorted(unpinned) == sorted(a for a, _ in pinned)  # every mapping unpinned at close


def test_a_file_arena_that_cannot_be_pinned_falls_back_to_memory(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from btckpt.format.layout import flatten_group, plan_layout
    from btckpt.saving.snapshot import Stager

    def refuse(address: int, nbytes: int):
        raise OSError("cudaHostRegister of 1 bytes failed (cudaError 1)")

    flat = [flatten_group("model", {"w": torch.randn(64, 64)})]
    layout = plan_layout(flat, max_shard_size=1 << 30)
    st = Stager(pin=refuse)
    try:
        staged = st.stage(flat, layout, async_keys=set(), sync=False, into=tmp_path / "tier" / ".arena-x-0")
        assert staged.files is None and "staging into memory" in caplog.text
        assert not (tmp_path / "tier" / ".arena-x-0-0").exists()  # nothing left of the attempt
        data = b"".join(bytes(p) for p in staged.pieces(layout.files[0].begin, layout.files[0].size))
        assert data == flat[0].tensors["w"].numpy().tobytes()
    finally:
        st.close()


# -- honest limits --------------------------------------------------------------------------------------------
def test_preflight_refuses_a_tier_too_small(tmp_path: Path, tmpfs) -> None:
    shm = tmpfs(4 << 20, name="shm")  # 4 MiB, like a too-small /dev/shm
    state = {"model": torch.nn.Linear(1024, 768)}  # 3.2 MB: two copies do not fit in 4 MiB
    ck = btckpt.Checkpointer(dir=tmp_path / "d", local_every_steps=1, local_tier_dir=shm / "tier", on_error="warn",
                             space_margin=1 << 20, handle_sigterm=False)
    try:
        with pytest.raises(btckpt.TierTooSmall) as err:
            ck.maybe_save(1, state)
        msg = str(err.value)
        assert str(shm / "tier") in msg and "2 copies" in msg and "(3.2 MB each)" in msg and "4.2 MB free" in msg
        assert "--shm-size" in msg and "local_tier_dir" in msg
        assert isinstance(err.value, btckpt.InsufficientSpace)
        assert _steps(shm / "tier") == [] and not [p for p in (shm / "tier").iterdir() if p.name.startswith(".check")]
    finally:
        ck.close()


def test_preflight_passes_when_two_copies_fit(tmp_path: Path, tmpfs) -> None:
    shm = tmpfs(12 << 20, name="shm")
    state = {"model": torch.nn.Linear(1024, 768)}
    ck = btckpt.Checkpointer(dir=tmp_path / "d", local_every_steps=1, local_tier_dir=shm / "tier",
                             space_margin=1 << 20, handle_sigterm=False)
    for s in range(1, 5):
        ck.maybe_save(s, state)
    ck.wait()
    assert _steps(shm / "tier") == [4]
    ck.close()
    assert _steps(tmp_path / "d") == [4]


def test_a_tier_of_another_job_is_refused_and_never_resumed(tmp_path: Path) -> None:
    state = _state()
    ck = _tier_ck(tmp_path, dir=tmp_path / "other")
    _train(ck, state, range(1, 5))
    ck.wait()
    ck._tier.close(remove=False)  # the other job "crashed": its tier stays  # noqa: SLF001
    ck._tier = None  # noqa: SLF001
    ck.close()
    assert _steps(tmp_path / "ram") == [4]
    with pytest.raises(btckpt.TierMismatch, match="belongs to the job saving into"):
        _tier_ck(tmp_path)  # same tier folder, another durable dir
    assert resumable_tier(tmp_path / "d", tmp_path / "ram") is None
    with btckpt.Checkpointer(dir=tmp_path / "d", local_every_steps=2, local_tier_dir=tmp_path / "ram2",
                             handle_sigterm=False) as other:
        assert other.restore(_state()) is None
    fresh = tmp_path / "fresh"  # a start killed while writing its identity record leaves its temp file
    fresh.mkdir()
    (fresh / f".{IDENTITY}.tmp-123").write_text("{")
    _tier_ck(tmp_path, local_tier_dir=fresh).close()
    assert not fresh.exists()  # taken over, then removed at the clean close
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(btckpt.TierMismatch, match="not a btckpt local tier"):
        _tier_ck(tmp_path, local_tier_dir=junk)
    assert (junk / "notes.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "ram")


# -- crashes: resume from the newest tier; a failed promotion leaves older checkpoints alone --------------------
LOOP = str(SCRIPTS / "tier_loop.py")


def test_restart_resumes_from_the_newest_tier(tmp_path: Path) -> None:
    d, ram = tmp_path / "d", tmp_path / "ram"
    r = run_py([LOOP, str(d), str(ram), "--weights-at", "8", "--weights", str(tmp_path / "w8.pt"), "--crash"],
               timeout=120)
    assert r.returncode == 9, r.stderr[-3000:]
    assert _steps(d) == [6] and _steps(ram) == [8]
    stale = list(ram.glob(".arena-*"))
    assert stale  # the crashed run's staging folders (one of them holds no step)
    # every entry point asks the one resume policy: the frameworks' folder search picks the tier's step too
    assert resume_folder(dir=d, load_dir=None, on_missing="raise", accept=None, helper="t",
                         local_tier_dir=ram) == str(ram / "checkpoint-8")
    state = _state(seed=3)
    ck = _tier_ck(tmp_path)
    assert not any(p.exists() for p in stale)  # a new session removed them when it claimed the tier
    assert ck.restore(state) == 8  # the tier's step 8 beats the durable step 6
    assert torch.equal(state["model"].weight, torch.load(tmp_path / "w8.pt"))
    assert state["extra"]["step"] == 8
    ck.close()  # nothing saved since: step 8 is promoted at close, and the tier removed
    assert _steps(d) == [6, 8] and not ram.exists()


def test_a_lost_tier_falls_back_to_disk(tmp_path: Path) -> None:
    d, ram = tmp_path / "d", tmp_path / "ram"
    r = run_py([LOOP, str(d), str(ram), "--crash"], timeout=120)
    assert r.returncode == 9, r.stderr[-3000:]
    shutil.rmtree(ram)  # the node rebooted
    state = _state(seed=3)
    ck = _tier_ck(tmp_path)
    assert ck.restore(state) == 6
    assert state["extra"]["step"] == 6
    ck.close()


def test_failed_promotion_leaves_older_checkpoints_and_the_tier(tmp_path: Path) -> None:
    d, ram = tmp_path / "d", tmp_path / "ram"
    state = _state()
    ck = _tier_ck(tmp_path)
    _train(ck, state, range(1, 7))
    ck.wait()
    assert _steps(d) == [6]
    before = (d / "checkpoint-6" / "model.safetensors").read_bytes()
    faults.arm("promote", "raise")
    _train(ck, state, range(7, 13))
    with pytest.raises(btckpt.CheckpointError):
        ck.wait()  # the promotion's error, raised once
    assert "promote" in faults.reached()
    faults.disarm()
    assert _steps(d) == [6] and (d / "checkpoint-6" / "model.safetensors").read_bytes() == before
    assert verify(inspect(d / "checkpoint-6")) == []
    assert not [p.name for p in d.iterdir() if p.name.startswith(".checkpoint-")]  # the temp folder went
    assert _steps(ram) == [12]
    ck.close()
    assert _steps(ram) == [12]  # kept: a promotion failed, its step may be only there
    restarted = _tier_ck(tmp_path)
    assert restarted.restore(_state(seed=5)) == 12
    restarted.close()
    assert _steps(d) == [6, 12] and not ram.exists()


def test_close_never_drops_the_tier_when_the_dir_holds_a_broken_folder_of_its_step(tmp_path: Path) -> None:
    """A damaged ``checkpoint-<N>`` in the dir (no manifest) must not pass for the tier's step N at close: the
    promotion is refused, close() raises, and the tier keeps N (the only complete copy)."""
    d, ram = tmp_path / "d", tmp_path / "ram"
    state = _state()
    ck = _tier_ck(tmp_path)
    _train(ck, state, range(1, 9))
    ck.wait()
    assert _steps(d) == [6] and _steps(ram) == [8]
    (d / "checkpoint-8").mkdir()  # a careless colleague's folder: the name of the tier's newest step, no manifest
    (d / "checkpoint-8" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(btckpt.CheckpointError, match="checkpoint-8"):
        ck.close()
    assert _steps(ram) == [8] and verify(inspect(ram / "checkpoint-8")) == []  # kept for the restart
    assert (d / "checkpoint-8" / "model.safetensors").read_bytes() == b"junk"  # never overwritten
    fresh = _state(seed=2)
    with _tier_ck(tmp_path) as again:
        assert again.restore(fresh) == 8 and fresh["extra"]["step"] == 8
        assert torch.equal(fresh["model"].weight, state["model"].weight)
        shutil.rmtree(d / "checkpoint-8")
    assert _steps(d) == [6, 8] and not ram.exists()


def test_crash_mid_promotion_keeps_durable_dir_sound(tmp_path: Path) -> None:
    d, ram = tmp_path / "d", tmp_path / "ram"
    env = env_with(BTCKPT_FAULT="promote:kill")
    r = subprocess.run([PY, LOOP, str(d), str(ram), "--crash"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-3000:]
    assert _steps(d) == [] and [p for p in d.iterdir() if p.name.startswith(".checkpoint-6.tmp")]
    assert btckpt.latest(d) is None  # the half-copied folder is never listed
    newest = _steps(ram)[-1]  # 6 (kept while it was being promoted), or 8 if its save committed before the kill
    assert newest in (6, 8)
    state = _state(seed=3)
    ck = _tier_ck(tmp_path)  # the start removes the dead promotion's temp folder
    assert not [p for p in d.iterdir() if p.name.startswith(".checkpoint-")]
    assert ck.restore(state) == newest and state["extra"]["step"] == newest
    ck.close()
    assert _steps(d) == [newest] and verify(inspect(d / f"checkpoint-{newest}")) == []




def test_sigterm_promotes_the_stop_step(tmp_path: Path) -> None:
    d, ram = tmp_path / "d", tmp_path / "ram"
    proc = subprocess.Popen([PY, LOOP, str(d), str(ram), "--steps", "0", "--ready-at", "5"], env=env_with(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # log lines may come first
            if line.strip() == "READY":
                break
        proc.send_signal(signal.SIGTERM)
        rc, out = finish(proc, timeout=120)
    finally:
        kill_session(proc)
    assert rc == 0, out[-3000:]
    assert "preemption checkpoint for step" in out
    steps = _steps(d)
    assert len(steps) == 1 and steps[0] >= 5, (steps, out[-3000:])  # the step every rank stopped at, durable
    assert verify(inspect(d / f"checkpoint-{steps[0]}")) == []
    assert not ram.exists()  # a clean exit: the tier went once its newest step was durable
    state = _state(seed=4)
    with btckpt.Checkpointer(dir=d, handle_sigterm=False) as ck:
        assert ck.restore(state) == steps[0]
    assert state["extra"]["step"] == steps[0]


# -- a real torchrun job: a worker SIGKILLed after a tier save resumes from the tier, bit-identical ------------
def _torchrun(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           str(SCRIPTS / "tier_train.py"), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        return finish(proc, timeout=300)
    finally:
        kill_session(proc)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_worker_killed_resumes_from_tier_bit_identical(tmp_path: Path, mode: str) -> None:
    """fsdp: every rank saves its own shards, so each stages into file arenas of its own in the node's tier."""
    rc, out = _torchrun(["--tier", str(tmp_path / "ram-ref"), "--out", str(tmp_path / "ref.safetensors"),
                         "--mode", mode], env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ref")))
    assert rc == 0, out[-4000:]
    marker = tmp_path / "killed"
    rc, out = _torchrun(["--tier", str(tmp_path / "ram"), "--out", str(tmp_path / "got.safetensors"),
                         "--kill-at", "8", "--kill-marker", str(marker), "--mode", mode],
                        env_with(BT_CHECKPOINT_DIR=str(tmp_path / "run")))
    assert rc == 0, out[-4000:]
    assert marker.exists() and "rank 1: killing itself at step 8" in out
    lines = out.splitlines()
    assert sum("resumed from None" in ln for ln in lines) == 2, out[-4000:]
    tier = f"resumed from 8 in {tmp_path / 'ram'}"
    assert sum(ln.endswith(tier) for ln in lines) == 2, out[-4000:]  # both ranks, from the tier's step 8
    from safetensors.torch import load_file

    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "got.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert 12 in _steps(tmp_path / "run") and verify(inspect(tmp_path / "run" / "checkpoint-12")) == []
    assert not (tmp_path / "ram").exists() and not (tmp_path / "ram-ref").exists()  # clean close removed them


def _two_nodes(tmp: Path, tag: str, args: list[str], *, agent: bool = False,
               **extra_env: str) -> list[tuple[int, str]]:
    """A 2-node job on this machine, one rank each, each node with its own dir and tier: two raw ranks
    (``LOCAL_WORLD_SIZE=1``: what btckpt sees is the same, and a killed node's survivor runs on as it would),
    or with ``agent`` two ``torchrun --nnodes=2`` launches (c10d rendezvous), as on a real cluster."""
    port = free_port()
    jobs = []
    try:
        for node in (0, 1):
            env = env_with(BT_CHECKPOINT_DIR=str(tmp / tag / f"node{node}"), BT_NODE_RANK=str(node), **extra_env)
            argv = ["--tier", str(tmp / f"ram-{tag}-{{node}}"), *args]
            jobs.append(torchrun("tier_train.py", argv, nproc=1, env=env, port=port, nnodes=2, node_rank=node,
                                 rdzv=True) if agent else
                        raw_rank("tier_train.py", argv, rank=node, world=2, local_world=1, port=port, env=env))
        return [finish(j, timeout=240) for j in jobs]
    finally:
        for j in jobs:
            kill_session(j)


@pytest.mark.slow
def test_two_nodes_promote_their_parts_and_resume_from_their_tiers(tmp_path: Path) -> None:
    """The one two-node tier test under real ``torchrun --nnodes=2`` agents (the others launch raw ranks)."""
    for rc, out in _two_nodes(tmp_path, "ref", ["--out", str(tmp_path / "ref.safetensors")], agent=True):
        assert rc == 0, out[-4000:]
    for node in (0, 1):
        durable = tmp_path / "ref" / f"node{node}"
        assert _steps(durable) == [6, 12]  # every node's part promoted (node 0's last)
        man = json.loads((durable / "checkpoint-12" / "btckpt.json").read_text())
        assert man["world"] == {"size": 2, "nodes": 2, "node_rank": node}
        assert verify(inspect(durable / "checkpoint-12")) == []
        assert not (tmp_path / f"ram-ref-{node}").exists()
    # node 1's worker dies after its tier save of step 8 (no restarts): both tiers keep step 8
    results = _two_nodes(tmp_path, "run", ["--kill-at", "8", "--kill-marker", str(tmp_path / "killed")], agent=True)
    assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
    for node in (0, 1):
        assert _steps(tmp_path / f"ram-run-{node}") == [8], results[node][1][-3000:]
        assert _steps(tmp_path / "run" / f"node{node}") == [6]
    # the job is started again: both nodes resume from their own tier's step 8, and end bit-identical
    results = _two_nodes(tmp_path, "run", ["--out", str(tmp_path / "got.safetensors")], agent=True)
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"resumed from 8 in {tmp_path / f'ram-run-{node}'}" in out, out[-3000:]
    from safetensors.torch import load_file

    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "got.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_a_promotion_committed_on_one_node_only_is_finished_at_close(tmp_path: Path) -> None:
    """Node 1's part of step 8 reached its dir, node 0's did not (node 0 commits last): the restarted job's close
    promotes node 0's part while node 1, which holds it already, copies nothing but joins (node 0 used to wait
    for it until barrier_timeout, then fail the close and keep the tier)."""
    results = _two_nodes(tmp_path, "run", ["--kill-at", "8", "--kill-marker", str(tmp_path / "killed")])
    assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
    for node in (0, 1):
        assert _steps(tmp_path / f"ram-run-{node}") == [8], results[node][1][-3000:]
    shutil.copytree(tmp_path / "ram-run-1" / "checkpoint-8", tmp_path / "run" / "node1" / "checkpoint-8")
    results = _two_nodes(tmp_path, "run", ["--steps", "8"])  # resumes from 8, trains nothing, closes
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"rank {node}: resumed from 8" in out, out[-3000:]
    for node in (0, 1):
        durable = tmp_path / "run" / f"node{node}"
        assert _steps(durable) == [6, 8]
        assert verify(inspect(durable / "checkpoint-8")) == []
        assert not (tmp_path / f"ram-run-{node}").exists()  # a clean close: the step is durable, the tier went


@pytest.mark.slow
def test_a_node_whose_tier_is_gone_closes_without_waiting_for_a_promotion(tmp_path: Path) -> None:
    """Both nodes resume step 6 from their dirs; node 0's tier still holds 6, node 1's is gone (and no replica
    of it is left). The close's promotion is agreed (no step every tier holds: none): node 0 used to promote 6
    and wait for node 1 at the barrier until barrier_timeout, failing the close."""
    results = _two_nodes(tmp_path, "run", ["--kill-at", "6", "--kill-marker", str(tmp_path / "killed")])
    assert results[1][0] != 0 and "rank 1: killing itself at step 6" in results[1][1]
    for node in (0, 1):
        assert _steps(tmp_path / f"ram-run-{node}") == [6] and _steps(tmp_path / "run" / f"node{node}") == [6]
    shutil.rmtree(tmp_path / "ram-run-1")
    shutil.rmtree(tmp_path / "ram-run-0" / ".replicas", ignore_errors=True)
    results = _two_nodes(tmp_path, "run", ["--steps", "6"])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"rank {node}: resumed from 6" in out, out[-3000:]
        assert _steps(tmp_path / "run" / f"node{node}") == [6]
        assert not (tmp_path / f"ram-run-{node}").exists()


@pytest.mark.slow
def test_a_node_that_lost_its_memory_restores_its_part_from_the_peer(tmp_path: Path) -> None:
    """Node 1's processes are killed after the tier save of step 8 and its RAM folder wiped (a replacement
    node): at restart it fetches its part of step 8 from node 0's memory (the peer replica) instead of falling
    back to the disk's step 6; both nodes resume from 8, bit-identical to an uninterrupted run. The model is
    wide enough that its files span several of the link's messages."""
    wide = ["--width", "500000"]  # files of 20 and 40 MB: more than one 16 MiB message each, the last one partial
    for rc, out in _two_nodes(tmp_path, "ref", ["--out", str(tmp_path / "ref.safetensors"), *wide]):
        assert rc == 0, out[-4000:]
        assert "not exchanged" not in out, out[-3000:]  # no exchange failed (a waiting one may be superseded)
    results = _two_nodes(tmp_path, "run", ["--kill-at", "8", "--kill-marker", str(tmp_path / "killed"), *wide])
    assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
    held = tmp_path / "ram-run-0" / ".replicas" / "node-1"
    assert _steps(held) == [8] and verify(inspect(held / "checkpoint-8")) == []  # node 1's part, in node 0's RAM
    assert json.loads((held / "checkpoint-8" / "btckpt.json").read_text())["world"]["node_rank"] == 1
    assert _steps(tmp_path / "ram-run-1") == [8] and _steps(tmp_path / "run" / "node1") == [6]
    assert max(p.stat().st_size for p in (held / "checkpoint-8").iterdir()) > 32 << 20
    shutil.rmtree(tmp_path / "ram-run-1")  # node 1's memory is gone
    results = _two_nodes(tmp_path, "run", ["--out", str(tmp_path / "got.safetensors"), *wide])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"resumed from 8 in {tmp_path / f'ram-run-{node}'}" in out, out[-3000:]
    assert "node 1: fetched its part of step 8 from node 0's memory" in results[1][1], results[1][1][-3000:]
    assert "fetched its part" not in results[0][1]  # node 0 had its own
    from safetensors.torch import load_file

    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "got.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    for node in (0, 1):  # a clean end: every node's newest step durable, tiers (and the replicas in them) removed
        assert _steps(tmp_path / "run" / f"node{node}")[-1] == 12
        assert not (tmp_path / f"ram-run-{node}").exists()



@pytest.mark.slow
def test_a_replacement_node_with_nothing_of_its_own_resumes_exactly_from_the_peer_reading_each_byte_once(
        tmp_path: Path) -> None:
    """Node 1 lost its memory and its dir (a replacement node): the part fetched from node 0's replica is its only
    candidate (verify-first), and since every file was checked as it landed (vouched for), the restore reads each
    byte once, into the state, instead of hashing the files first again; both nodes resume from 8, bit-identical
    to an uninterrupted run."""
    wide = ["--width", "500000"]
    for rc, out in _two_nodes(tmp_path, "ref", ["--out", str(tmp_path / "ref.safetensors"), *wide]):
        assert rc == 0, out[-4000:]
    results = _two_nodes(tmp_path, "run", ["--kill-at", "8", "--kill-marker", str(tmp_path / "killed"), *wide])
    assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
    shutil.rmtree(tmp_path / "ram-run-1")  # node 1's memory is gone, and so is its dir
    shutil.rmtree(tmp_path / "run" / "node1")
    results = _two_nodes(tmp_path, "run", ["--out", str(tmp_path / "got.safetensors"), *wide])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"resumed from 8 in {tmp_path / f'ram-run-{node}'}" in out, out[-3000:]
    out1 = results[1][1]
    assert "node 1: fetched its part of step 8 from node 0's memory" in out1, out1[-3000:]
    hashed, vouched = re.search(r"rank 1: restore hashed (\d+) bytes first, vouched for (\d+)", out1).groups()
    assert int(hashed) == 0 and int(vouched) > 32 << 20, out1[-3000:]
    assert re.search(r"rank 0: restore hashed \d+ bytes first, vouched for 0\b", results[0][1])  # its own tier
    from safetensors.torch import load_file

    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "got.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    for node in (0, 1):
        assert _steps(tmp_path / "run" / f"node{node}")[-1] == 12
        assert not (tmp_path / f"ram-run-{node}").exists()


@pytest.mark.slow
def test_a_damaged_peer_replica_is_refused_and_the_node_falls_back_to_disk(tmp_path: Path) -> None:
    """The replica node 0 holds for node 1 has a flipped byte: node 1's fetch fails its checksum, nothing of it
    is kept, the link stays usable, and every rank resumes from the newest step all nodes have (disk's 6)."""
    results = _two_nodes(tmp_path, "run", ["--kill-at", "8", "--kill-marker", str(tmp_path / "killed")])
    assert results[1][0] != 0 and "rank 1: killing itself at step 8" in results[1][1]
    held = tmp_path / "ram-run-0" / ".replicas" / "node-1" / "checkpoint-8"
    victim = max((p for p in held.iterdir() if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    shutil.rmtree(tmp_path / "ram-run-1")
    results = _two_nodes(tmp_path, "run", [])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        # nothing of the damaged replica was taken ("fetched its part" is the fetch's success line; a replica
        # exchange of a later step superseded under load is another line and says nothing of the restore)
        assert f"rank {node}: resumed from 6 in" in out and "fetched its part" not in out, out[-3000:]
    assert "fetching its part of step 8 from node 0 failed" in results[1][1], results[1][1][-3000:]
    assert "checksum mismatch" in results[1][1]
    assert "removed" in results[0][1] and "ram-run-0/checkpoint-8: newer than the step every rank resumed from (6)" \
        in results[0][1]  # node 0's abandoned step 8 (it would have collided with the new save of step 8)
    assert _steps(tmp_path / "run" / "node1")[-1] == 12
    assert not [p for p in (tmp_path / "run" / "node1").iterdir() if p.name.startswith(".checkpoint-")]


@pytest.mark.slow
def test_a_step_damaged_on_one_node_is_saved_again_by_every_node(tmp_path: Path) -> None:
    """Node 1's part of the durable step 12 is damaged: the restart resumes every rank from 6, each node removes
    its own (abandoned) step 12, and the run saves step 12 again on both nodes instead of one node finding the
    name taken and skipping while the other waits for it."""
    for rc, out in _two_nodes(tmp_path, "run", ["--local-every", "100"]):
        assert rc == 0, out[-4000:]
    for node in (0, 1):
        assert _steps(tmp_path / "run" / f"node{node}") == [6, 12]
    part = tmp_path / "run" / "node1" / "checkpoint-12"
    victim = max((p for p in part.iterdir() if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    results = _two_nodes(tmp_path, "run", ["--local-every", "100"])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"rank {node}: resumed from 6" in out, out[-3000:]
        assert f"node{node}/checkpoint-12: newer than the step every rank resumed from (6)" in out, out[-3000:]
        durable = tmp_path / "run" / f"node{node}"
        assert _steps(durable) == [6, 12] and verify(inspect(durable / "checkpoint-12")) == []


@pytest.mark.slow
def test_a_kill_while_a_replica_arrives_leaves_no_half_copy(tmp_path: Path) -> None:
    """Node 0 is SIGKILLed after writing node 1's replica of step 2 and before committing it: the job dies, the
    replica area holds only a temp folder (never a checkpoint-2 that looks whole), the restart removes it,
    every rank resumes from the tiers' step 2, and the run ends with every node's step 12 durable."""
    results = _two_nodes(tmp_path, "run", [], BTCKPT_FAULT="replicate:kill@0")
    assert results[0][0] != 0, results[0][1][-3000:]
    held = tmp_path / "ram-run-0" / ".replicas" / "node-1"
    assert _steps(held) == [] and [p.name for p in held.iterdir() if p.name.startswith(".checkpoint-2.tmp-")]
    assert btckpt.latest(held) is None
    # the writers went on while the replica arrived: step 4 (on a loaded machine 6 too) may be committed on node 1
    # only (node 0 died before its commit) or on both; whatever the timing, the nodes must share a complete step
    # (a step committed on one node only never makes an older one go), and every rank resumes from the newest
    # shared one
    tiers = [set(_steps(tmp_path / f"ram-run-{node}")) for node in (0, 1)]
    assert all(t and min(t) >= 2 for t in tiers), tiers
    common = tiers[0] & tiers[1]
    assert common, tiers
    results = _two_nodes(tmp_path, "run", [])
    for node, (rc, out) in enumerate(results):
        assert rc == 0, out[-4000:]
        assert f"rank {node}: resumed from {max(common)}" in out, out[-3000:]
        durable = tmp_path / "run" / f"node{node}"
        assert _steps(durable)[-1] == 12 and verify(inspect(durable / "checkpoint-12")) == []
        assert not (tmp_path / f"ram-run-{node}").exists()  # clean end: tier and replicas removed



# -- lifetimes: a bounded promotion queue, flags cleared once their reason is gone ----------------------------
def test_promotions_slower_than_the_durable_interval_coalesce_and_the_tier_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A promotion every step, each slower than a step: a queued promotion is superseded by the newer one (its
    step released), so the tier never holds more than two steps plus the one being copied, and close() copies
    only the newest step, not the ones retention would delete at once."""
    import btckpt.tiers.local as local_mod

    real, copied = local_mod.promote, []

    def slow(src, *a, **kw):
        time.sleep(0.25)  # a slow durable dir
        copied.append(int(src.name.rsplit("-", 1)[1]))
        return real(src, *a, **kw)

    monkeypatch.setattr(local_mod, "promote", slow)
    d, ram, state = tmp_path / "d", tmp_path / "ram", _state()
    ck = _tier_ck(tmp_path, local_every_steps=1, every_steps=1, keep_last=2)
    most = 0
    with caplog.at_level("INFO", logger="btckpt"):
        for s in range(1, 21):
            _train(ck, state, range(s, s + 1))
            most = max(most, len(_steps(ram)))
            time.sleep(0.02)
        ck.fence()
        final = state["model"].weight.detach().clone()
        ck.close()
    assert most <= local_mod.COPIES + 1, most  # two steps, +1 while promoting (README's bound)
    assert copied[-1] == 20 and len(copied) < 12, copied  # the queued ones were superseded, never copied
    assert "superseded by step" in caplog.text
    assert _steps(d) == sorted(copied)[-2:] and not ram.exists()
    loaded = _state(seed=9)
    btckpt.load(d / "checkpoint-20", loaded)
    assert torch.equal(loaded["model"].weight, final) and loaded["extra"]["step"] == 20


def test_a_failed_promotion_made_good_later_no_longer_keeps_the_tier(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """on_error='warn': the promotion of step 6 fails, that of 12 commits. A clean close removes the tier (its
    newest step is durable and verified); a tier kept for a failed promotion is named in the log with why."""
    d, ram, state = tmp_path / "d", tmp_path / "ram", _state()
    ck = _tier_ck(tmp_path, on_error="warn")
    faults.arm("promote", "raise")
    _train(ck, state, range(1, 7))
    ck.wait()  # the failure is logged (warn), not raised
    faults.disarm()
    _train(ck, state, range(7, 13))
    with caplog.at_level("INFO", logger="btckpt"):
        ck.close()
    assert _steps(d) == [12] and verify(inspect(d / "checkpoint-12")) == []
    assert not ram.exists(), sorted(p.name for p in ram.iterdir())
    assert "made good" in caplog.text
    # the reason stays while it holds: 18's promotion fails and nothing later commits -> kept, and said why
    ck = _tier_ck(tmp_path, on_error="warn")
    assert ck.restore(_state(seed=1)) == 12
    faults.arm("promote", "raise")
    _train(ck, state, range(13, 19))
    caplog.clear()
    with caplog.at_level("INFO", logger="btckpt"):
        ck.close()
    faults.disarm()
    assert _steps(ram) == [18]
    assert "kept (the promotion of step 18 failed" in caplog.text
    with _tier_ck(tmp_path) as again:
        assert again.restore(_state(seed=2)) == 18
    assert _steps(d) == [12, 18] and not ram.exists()


# -- deadlines after SIGTERM: the whole exit, the at-exit close included, fits preemption_grace ---------------
@pytest.mark.parametrize("tier", [True, False], ids=["slow-promotion", "slow-save"])
def test_sigterm_with_work_slower_than_the_grace_exits_0_in_time_and_the_restart_resumes(
        tmp_path: Path, tier: bool) -> None:
    """SIGTERM while the preemption checkpoint's promotion (or, without a tier, its save) takes 20 s, with a
    2 s grace: the process exits 0 within the grace (+ slack for the interpreter's exit), the tier stays as it
    is, and the restart resumes from it (or, without a tier, from the newest committed durable step)."""
    d, ram, grace = tmp_path / "d", tmp_path / "ram", 2.0
    slow = "promote:sleep20" if tier else "write_data:sleep20"
    args = [PY, LOOP, str(d), str(ram) if tier else "-", "--steps", "0", "--ready-at", "5", "--every", "4",
            "--slow", slow, "--grace", str(grace)]
    proc = subprocess.Popen(args, env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "READY":
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc, out = finish(proc, timeout=120)
        took = time.monotonic() - t0
    finally:
        kill_session(proc)
    assert rc == 0, out[-3000:]
    assert "exiting without it" in out, out[-3000:]
    assert took < grace + 3.0, (took, out[-3000:])
    if tier:
        assert "kept as it is" in out, out[-3000:]
        stop = _steps(ram)[-1]
        assert stop >= 6 and _steps(d) == [], (_steps(ram), _steps(d))  # the preemption step, only in RAM
    else:
        stop = 4  # the preemption save never committed: the durable step before it
        assert _steps(d) == [4], _steps(d)
    state = _state(seed=4)
    opts = dict(local_every_steps=2, local_tier_dir=ram) if tier else {}
    with btckpt.Checkpointer(dir=d, handle_sigterm=False, **opts) as ck:
        assert ck.restore(state) == stop
    assert state["extra"]["step"] == stop
    assert not ram.exists()


def test_sigterm_with_a_consolidation_slower_than_the_grace_exits_0_in_time(tmp_path: Path) -> None:
    """SIGTERM while the background consolidation (servable weights) takes 20 s, with a 2 s grace: the preemption
    save commits, the process exits 0 within the grace (the at-exit close used to join the consolidation with
    no deadline), and the restart resumes from the preemption step."""
    d, serve, grace = tmp_path / "d", tmp_path / "serve", 2.0
    args = [PY, LOOP, str(d), "-", "--steps", "0", "--ready-at", "5", "--every", "4", "--slow",
            "consolidate:sleep20", "--grace", str(grace), "--consolidate", str(serve)]
    proc = subprocess.Popen(args, env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "READY":
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc, out = finish(proc, timeout=120)
        took = time.monotonic() - t0
    finally:
        kill_session(proc)
    assert rc == 0, out[-3000:]
    assert took < grace + 3.0, (took, out[-3000:])
    assert "consolidation of" in out and "still running when time ran out" in out, out[-3000:]
    stop = _steps(d)[-1]
    assert stop >= 6, _steps(d)
    state = _state(seed=4)
    with btckpt.Checkpointer(dir=d, handle_sigterm=False) as ck:
        assert ck.restore(state) == stop
    assert state["extra"]["step"] == stop


def test_discarding_a_tier_uncommits_its_checkpoints_and_never_follows_a_link(tmp_path: Path) -> None:
    """Emptying a tier (an earlier incarnation's, at claim) removes its checkpoints and its replicas' through
    the one delete (renamed away first), its scratch folders (arenas) as a whole, and nothing a link points at."""
    from btckpt.saving.commit import LOCK, DirLock
    from btckpt.tiers import local as tier_local

    root = tmp_path / "tier"
    root.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.bin").write_bytes(b"x")
    btckpt.save(root / "checkpoint-1", {"extra": {"a": 1}}, save_rng=False)
    btckpt.save(root / tier_local.REPLICAS / "node-1" / "checkpoint-2", {"extra": {"a": 2}}, save_rng=False)
    arena = root / f"{tier_local.ARENA}s-0-0"
    arena.mkdir()
    (arena / "staged.bin").write_bytes(b"y" * 10)
    (root / f"{tier_local.ARENA}t-0-0").symlink_to(victim, target_is_directory=True)
    (root / tier_local.REPLICAS / "node-2").symlink_to(victim, target_is_directory=True)
    (root / IDENTITY).write_text("{}")
    lock = DirLock(root)
    try:
        tier_local._discard(root)
    finally:
        lock.release()
    assert sorted(p.name for p in root.iterdir()) == [LOCK]
    assert (victim / "keep.bin").read_bytes() == b"x" and sorted(p.name for p in victim.iterdir()) == ["keep.bin"]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_the_promoter_yields_to_training_and_gets_the_cpu_when_training_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The promoter copies a tier step into the dir under SCHED_IDLE while training runs; once training waits
    for it (``wait()``, a preemption save's commit, ``close()``) it is scheduled normally. Before, a wait for a
    promotion left it idle: on a busy machine the preemption's promotion starved past the grace and the exit
    waited seconds for the idle thread (RESULTS.md, "A SIGTERM exit on a busy machine")."""
    import btckpt.tiers.local as local_mod

    seen: dict[str, int] = {}
    started = threading.Event()
    point = local_mod.faults.point

    def spy(phase: str) -> None:  # the promoter thread, mid-promotion
        if phase == "promote" and "running" not in seen:
            seen["running"] = os.sched_getscheduler(0)
            started.set()
            deadline = time.monotonic() + 20
            while os.sched_getscheduler(0) == os.SCHED_IDLE and time.monotonic() < deadline:
                time.sleep(0.01)  # until training waits for this promotion (wait() below)
            seen["waited"] = os.sched_getscheduler(0)
        point(phase)

    monkeypatch.setattr(local_mod.faults, "point", spy)
    state = _state()
    with _tier_ck(tmp_path, every_steps=2) as ck:
        ck.save(2, state)
        assert started.wait(20)
        ck.wait()
    assert seen == {"running": os.SCHED_IDLE, "waited": os.SCHED_OTHER}
    assert _steps(tmp_path / "d") == [2]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_abandoning_the_background_threads_schedules_them_normally_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """``exit_now`` (after SIGTERM, work still running when the grace ran out) first gives every background
    thread normal scheduling: an idle thread on a busy machine holds the process's exit up until it gets CPU."""
    from btckpt.saving import priority

    policy: list[int] = []
    go, done = threading.Event(), threading.Event()

    def worker() -> None:
        priority.background_thread()
        policy.append(os.sched_getscheduler(0))
        go.wait(20)
        policy.append(os.sched_getscheduler(0))
        priority.leave()
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not policy and time.monotonic() < deadline:
            time.sleep(0.01)
        monkeypatch.setattr(priority, "_urgent", priority._urgent)  # for good: this process's, until teardown
        priority.abandon()
        go.set()
        assert done.wait(20)
    finally:
        go.set()
        t.join(20)
    assert policy == [os.SCHED_IDLE, os.SCHED_OTHER]
