"""The restore's read path (issue 13, restart time): a single-rank restore reads each byte of the checkpoint
once (counted by the kernel: ``/proc/self/io`` ``rchar``), a flipped byte in any file fails verification
before anything reaches the live model, and a restore from ``s3://`` (moto server) still verifies.

Internals used: btckpt.format.manifest, btckpt.restore.reader, btckpt.storage.discovery (the reader's byte counters
(what the restore read, staged or verified) and its vouch for a copy this process checked as it wrote it or verified
whole; the manifest read to know which files to vouch for, and discovery's inspect of the folder to verify).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt import CheckpointError, NoCheckpointFound
from btckpt.restore import reader
from test_upload import s3  # noqa: F401 - fixtures

NUMEL = 1 << 18  # 1 MiB per float32 tensor: the tensor bytes dominate the checkpoint


def make_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512), torch.nn.Linear(512, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "ema": torch.randn(NUMEL), "extra": {"seed": seed}}


def snapshot(state: dict) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in state["model"].state_dict().items()}
    for i, st in state["optimizer"].state_dict()["state"].items():
        out |= {f"opt.{i}.{k}": v.clone() for k, v in st.items()}
    out["ema"] = state["ema"].clone()
    return out


def assert_unchanged(state: dict, before: dict[str, torch.Tensor]) -> None:
    now = snapshot(state)
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(now[k], v), f"{k} changed although the restore failed"
    assert state["extra"] == {"seed": 99}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One committed checkpoint (step 5), the model and optimizer sharded into several files."""
    root = tmp_path_factory.mktemp("read_path") / "ckpts"
    btckpt.save(root / "checkpoint-5", make_state(5), max_shard_size=400_000,
                extra_files={"config.json": b'{"hidden": 512}'})
    return root


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_single_rank_restore_reads_each_byte_once(saved: Path, tmp_path: Path):
    """With an older checkpoint to fall back on, the newest is read in one pass straight into the live tensors:
    each byte read once, nothing staged (issue 24)."""
    root = tmp_path / "ckpts"
    shutil.copytree(saved, root)
    btckpt.save(root / "checkpoint-3", make_state(3), max_shard_size=400_000)
    folder = root / "checkpoint-5"
    files = [p for p in folder.iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    tensor_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert len([p for p in files if p.suffix == ".safetensors"]) >= 4 and tensor_bytes > 0.9 * total
    state = make_state(99)
    counts = dict(reader.READS)
    with btckpt.Checkpointer(dir=root, async_save=False, handle_sigterm=False) as ck:
        before = rchar()
        step = ck.restore(state)
        read = rchar() - before
    assert step == 5
    assert_equal_to_saved(state)
    # every byte at least once (the checksums cover them all), and no file read a second time: a second pass
    # over the tensor files would add tensor_bytes (> 0.9x the total); the small JSON files may be read twice
    assert total <= read <= total + (total - tensor_bytes) + 256 * 1024, (read, total, tensor_bytes)
    assert reader.READS["staged_bytes"] == counts["staged_bytes"] and reader.READS["verify_bytes"] == \
        counts["verify_bytes"]


def test_the_only_checkpoint_is_hashed_first_then_read_into_the_state_without_staging(saved: Path):
    """Nothing to fall back on: every file is hashed first through a small ring (nothing applied until all
    verified), then read into the live tensors: the disk is read once, the second read comes from the page cache
    (rchar: about twice the tensor bytes), and no staging buffer holds a file."""
    folder = saved / "checkpoint-5"
    files = [p for p in folder.iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    tensor_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    state = make_state(99)
    counts = dict(reader.READS)
    with btckpt.Checkpointer(dir=saved, async_save=False, handle_sigterm=False) as ck:
        before = rchar()
        step = ck.restore(state)
        read = rchar() - before
    assert step == 5
    assert_equal_to_saved(state)
    assert total + tensor_bytes <= read <= total + tensor_bytes + 2 * (total - tensor_bytes) + 256 * 1024, \
        (read, total, tensor_bytes)
    assert reader.READS["verify_bytes"] - counts["verify_bytes"] == tensor_bytes
    assert reader.READS["staged_bytes"] == counts["staged_bytes"]


def assert_equal_to_saved(state: dict) -> None:
    want = snapshot(make_state(5))
    got = snapshot(state)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("how", ["as_written", "verified_whole"])
def test_a_copy_this_process_checked_as_it_wrote_it_is_read_once_with_its_checksums(saved: Path, tmp_path: Path,
                                                                                     how: str):
    """A part fetched from a peer's replica (every file checked against the manifest as it landed) is vouched for
    (:func:`reader.vouch`), and so is a copy this process verified whole (:func:`reader.verify_and_vouch`: the
    node serving a peer's fetch checks its own only copy meanwhile): restoring it, the only candidate, skips the
    hash-only pass (each file read once, into the state, its checksum still checked as it lands) and resumes
    exactly."""
    from btckpt.format.manifest import read_manifest
    from btckpt.storage.discovery import inspect

    root = tmp_path / "ckpts"
    shutil.copytree(saved, root)
    folder = root / "checkpoint-5"
    tensor_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    if how == "as_written":
        reader.vouch(folder, read_manifest(folder))
    else:
        assert reader.verify_and_vouch(inspect(folder)) == []
    state = make_state(99)
    counts = dict(reader.READS)
    with btckpt.Checkpointer(dir=root, async_save=False, handle_sigterm=False) as ck:
        assert ck.restore(state) == 5
    assert_equal_to_saved(state)
    assert reader.READS["verify_bytes"] == counts["verify_bytes"]
    assert reader.READS["vouched_bytes"] - counts["vouched_bytes"] == tensor_bytes
    assert reader.READS["direct_bytes"] > counts["direct_bytes"]  # read into the live tensors


def test_a_copy_changed_during_its_check_or_damaged_is_not_vouched_for(saved: Path, tmp_path: Path):
    """:func:`reader.verify_and_vouch` vouches only for what it checked: a file rewritten between the stat taken
    before the check and the vouch (the same bytes, in place: its ctime moves) is not vouched for while the others
    are; a damaged copy is reported, naming the file, and none of its files is vouched for."""
    import os

    from btckpt.format.manifest import read_manifest
    from btckpt.storage.discovery import inspect

    folder = saved / "checkpoint-5"
    other = tmp_path / "other" / "checkpoint-5"  # a fresh copy (new inodes: nothing vouched for yet)
    shutil.copytree(folder, other)
    man = read_manifest(other)
    before = reader.file_stats(other, man)
    victim = other / "ema.safetensors"
    data = victim.read_bytes()
    with open(victim, "r+b") as f:  # the same bytes written again in place during the "check": ctime moves
        f.write(data)
    os.utime(victim, ns=(before[victim.name].st_atime_ns, before[victim.name].st_mtime_ns))
    reader.vouch(other, man, before=before)
    with open(victim, "rb") as f:
        assert not reader.vouched(f, man.files[victim.name])
    with open(other / "model-00001-of-00004.safetensors", "rb") as f:  # unchanged since the stat: vouched for
        assert reader.vouched(f, man.files["model-00001-of-00004.safetensors"])

    damaged = tmp_path / "damaged" / "checkpoint-5"
    shutil.copytree(folder, damaged)
    raw = bytearray((damaged / "ema.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (damaged / "ema.safetensors").write_bytes(bytes(raw))
    problems = reader.verify_and_vouch(inspect(damaged))
    assert problems and "ema.safetensors" in problems[0], problems
    for name in ("ema.safetensors", "model-00001-of-00004.safetensors"):
        with open(damaged / name, "rb") as f:
            assert not reader.vouched(f, read_manifest(damaged).files[name])


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_vouched_file_changed_since_is_verified_again_and_refused(saved: Path, tmp_path: Path,
                                                                     keep_mtime: bool):
    """A vouched file rewritten afterwards (a flipped byte; ``keep_mtime``: its mtime set back, which still moves
    its ctime) is no longer trusted: the hash-only pass runs again, finds the damage, and nothing is applied."""
    import os

    from btckpt.format.manifest import read_manifest

    root = tmp_path / "ckpts"
    shutil.copytree(saved, root)
    folder = root / "checkpoint-5"
    reader.vouch(folder, read_manifest(folder))
    victim = folder / "ema.safetensors"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    with open(victim, "r+b") as f:  # in place: the same inode
        f.write(bytes(data))
    if keep_mtime:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_ino == st.st_ino and (victim.stat().st_mtime_ns == st.st_mtime_ns or not keep_mtime)
    state = make_state(99)
    before = snapshot(state)
    counts = dict(reader.READS)
    with btckpt.Checkpointer(dir=root, handle_sigterm=False) as ck:  # the only checkpoint is damaged
        assert ck.restore(state) is None
    assert_unchanged(state, before)
    assert reader.READS["verify_bytes"] > counts["verify_bytes"]


def test_a_flipped_byte_in_any_file_fails_before_anything_is_applied(saved: Path, tmp_path: Path):
    names = sorted(p.name for p in (saved / "checkpoint-5").iterdir())
    assert "btckpt.json" in names and "config.json" in names and "ema.safetensors" in names
    for name in names:
        root = tmp_path / name
        shutil.copytree(saved, root)
        path = root / "checkpoint-5" / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        state = make_state(99)
        before = snapshot(state)
        rng = torch.get_rng_state()
        with btckpt.Checkpointer(dir=root, handle_sigterm=False) as ck:  # the only checkpoint is damaged
            assert ck.restore(state) is None, name
        assert_unchanged(state, before)
        assert torch.equal(torch.get_rng_state(), rng), name
        with pytest.raises(CheckpointError):  # the one-shot load names the damage instead of loading part
            btckpt.load(root / "checkpoint-5", state)
        assert_unchanged(state, before)


def test_a_restore_from_s3_verifies_what_it_downloaded(s3: str, saved: Path, tmp_path: Path):  # noqa: F811
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(saved) + "/", f"{s3[5:]}/good/", recursive=True)
    state = make_state(99)
    with btckpt.Checkpointer(dir=tmp_path / "own-good", load_dir=f"{s3}/good", handle_sigterm=False) as ck:
        assert ck.restore(state) == 5
    assert_equal_to_saved(state)

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    shard = sorted((bad / "checkpoint-5").glob("optimizer*.safetensors"))[-1]  # the last file a restore reads
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    fs.put(str(bad) + "/", f"{s3[5:]}/bad/", recursive=True)
    fs.invalidate_cache()
    state = make_state(99)
    before = snapshot(state)
    with btckpt.Checkpointer(dir=tmp_path / "own-bad", load_dir=f"{s3}/bad", handle_sigterm=False) as ck:
        with pytest.raises(NoCheckpointFound):
            ck.restore(state)
    assert_unchanged(state, before)


RANK_PROGRAM = '''
import sys
from pathlib import Path

import btckpt
import torch
import torch.distributed as dist


def rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512), torch.nn.Linear(512, 256))


dist.init_process_group("gloo")
rank, root, mode = dist.get_rank(), Path(sys.argv[1]), sys.argv[2]
with btckpt.Checkpointer(dir=root, async_save=False, keep_last=None, barrier_timeout=60,
                         handle_sigterm=False) as ck:
    if mode == "save":
        for step in (2, 4):
            ck.save(step, {"model": model(step)})
    else:
        m = model(99)
        before = rchar()
        step = ck.restore({"model": m})
        read = rchar() - before
        same = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model(step).state_dict().values()))
        print(f"RANK {rank} STEP {step} READ {read} SAME {same}", flush=True)
dist.destroy_process_group()
'''


def _two_ranks(tmp_path: Path, *args: str) -> list[str]:
    from dist_launch import env_with, finish, raw_ranks

    script = tmp_path / "rank_program.py"
    script.write_text(RANK_PROGRAM)
    outs = []
    for proc in raw_ranks(str(script), [str(tmp_path / "ck"), *args], world=2, env=env_with()):
        rc, out = finish(proc, timeout=180)
        assert rc == 0, out[-4000:]
        outs.append(out)
    return outs


def _report(outs: list[str]) -> dict[int, tuple[int, int, bool]]:
    found = [re.search(r"RANK (\d) STEP (-?\d+|None) READ (\d+) SAME (True|False)", o) for o in outs]
    assert all(found), outs
    return {int(m[1]): (int(m[2]), int(m[3]), m[4] == "True") for m in found if m}


def test_multi_rank_restore_verifies_each_byte_once_and_every_rank_falls_back_together(tmp_path: Path):
    """The ranks agree on a step that every rank read and verified; the read that verified it is the one loaded
    (before, the agreement hashed the checkpoint and the load read and hashed it again: twice the bytes)."""
    _two_ranks(tmp_path, "save")
    folder = tmp_path / "ck" / "checkpoint-4"
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    tensor_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    assert tensor_bytes > 0.9 * total
    report = _report(_two_ranks(tmp_path, "restore"))
    for rank in (0, 1):
        step, read, same = report[rank]
        assert (step, same) == (4, True), report
        assert total <= read <= total + (total - tensor_bytes) + 256 * 1024, (rank, read, total)
    # step 4 damaged (same size: only the checksum can tell): both ranks drop it together and load step 2
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    report = _report(_two_ranks(tmp_path, "restore"))
    assert {r: (s, same) for r, (s, _, same) in report.items()} == {0: (2, True), 1: (2, True)}
