"""Concurrent writers: two processes with Checkpointers on the same folder (a multi-node job on shared
storage without per-node dirs). The folder's writer lock (flock on .btckpt.lock) lets one in; the other
gets a clear CheckpointError naming the holder and the folder, and writes nothing. Neither ever corrupts
the other's checkpoints; the lock dies with its process.

Internals used: btckpt.format.manifest, btckpt.saving.commit, btckpt.storage.discovery (the local commit driven
directly to race a second writer, manifests forged, discovery to judge the folders on disk (complete, verified),
which no public name reports).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt import CheckpointError
from btckpt.saving.commit import LocalCommit
from btckpt.storage.discovery import scan, verify
from crash_harness import PY, child_env, temp_folders

WRITER = str(Path(__file__).parent / "scripts" / "crash_writer.py")


def start(root: Path, *, first: int, seed: int, hold: bool = True, saves: int = 3) -> subprocess.Popen[str]:
    args = [PY, WRITER, "--dir", str(root), "--first", str(first), "--seed", str(seed), "--saves", str(saves)]
    return subprocess.Popen(args + (["--hold"] if hold else []), env=child_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith((prefix, "REFUSED")):
            return line.strip()
    raise AssertionError(f"process ended without {prefix!r}: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(input="\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def assert_all_verify(root: Path, steps: list[int]) -> None:
    infos = scan(root)
    assert sorted(i.step for i in infos) == sorted(steps), [(i.path.name, i.status) for i in infos]
    for i in infos:
        assert i.complete and verify(i) == [], (i.path, i.reason)


def test_second_process_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    a = start(root, first=1, seed=1)
    try:
        assert read_until(a, "SAVED 3") == "SAVED 3"
        b = start(root, first=100, seed=2, hold=False)
        rc, out, err = finish(b)
        assert rc == 3, (rc, out, err)
        msg = out.strip()
        assert msg.startswith("REFUSED") and str(root) in msg and f"pid {a.pid}" in msg, msg
        assert "own checkpoint dir" in msg, msg
    finally:
        rc_a, _, err_a = finish(a)
    assert rc_a == 0, err_a
    assert_all_verify(root, [1, 2, 3])  # nothing from the refused writer, nothing damaged
    assert temp_folders(root) == []


def test_lock_dies_with_its_process_and_the_next_start_cleans_up(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    a = start(root, first=1, seed=1)
    try:
        read_until(a, "SAVED 2")
        (root / f".checkpoint-9.tmp-{a.pid}-deadbeef").mkdir()  # as if A died mid-save
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        finish(a)
    b = start(root, first=10, seed=2, hold=False, saves=2)
    rc, out, err = finish(b)
    assert rc == 0 and "LOCKED" in out, (rc, out, err)
    assert temp_folders(root) == []
    done = sorted(i.step for i in scan(root))
    assert {10, 11} <= set(done) and set(done) <= {1, 2, 3, 10, 11}, done
    assert_all_verify(root, done)


def test_two_checkpointers_in_one_process(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    with btckpt.Checkpointer(dir=str(root)) as first:
        with pytest.raises(CheckpointError, match="already saving checkpoints into"):
            btckpt.Checkpointer(dir=str(root))
        first.save(1, {"model": torch.nn.Linear(2, 2)})
    with btckpt.Checkpointer(dir=str(root)) as again:  # released by close()
        assert again.latest() == root / "checkpoint-1"


def test_simultaneous_starts_exactly_one_wins(tmp_path: Path) -> None:
    for trial in range(2):
        root = tmp_path / f"race{trial}"
        procs = [start(root, first=1 + 100 * k, seed=k, hold=False, saves=2) for k in range(3)]
        results = [finish(p) for p in procs]
        winners = [k for k, (rc, out, _) in enumerate(results) if rc == 0 and "LOCKED" in out]
        losers = [k for k, (rc, out, _) in enumerate(results) if rc == 3 and "REFUSED" in out]
        # a loser may start after the winner finished and closed: then it wins too, sequentially
        assert winners and len(winners) + len(losers) == 3, results
        steps = [s for k in winners for s in (1 + 100 * k, 2 + 100 * k)]
        assert_all_verify(root, steps)
        assert temp_folders(root) == []


def test_same_step_from_an_unlocked_writer_is_never_overwritten(tmp_path: Path) -> None:
    """btckpt.save (one-shot, no lock) racing a Checkpointer for the same step: the loser's rename fails,
    the winner's checkpoint stays intact, the loser's temp folder is removed."""
    root = tmp_path / "shared"
    state = {"model": torch.nn.Linear(8, 8)}
    with btckpt.Checkpointer(dir=str(root), async_save=False) as ck:
        loser = LocalCommit(root, 5)  # begun after the start (a start removes every temp folder it finds)
        loser.begin()
        (loser.tmp / "model.safetensors").write_bytes(b"not this one")
        loser.record("model.safetensors", 12, "0" * 16)
        ck.save(5, state)
    from btckpt.format.manifest import Manifest

    with pytest.raises(CheckpointError, match="another writer") as ei:
        loser.commit(Manifest(step=5, files={}, state={}))
    assert str(root / "checkpoint-5") in str(ei.value)
    loser.abort()
    assert_all_verify(root, [5])
    assert temp_folders(root) == []


def test_threads_saving_through_one_checkpointer(tmp_path: Path) -> None:
    """Not a supported pattern, but it must not corrupt anything: saves are serialized by the writer."""
    root = tmp_path / "shared"
    errors: list[BaseException] = []
    with btckpt.Checkpointer(dir=str(root), async_save=False, keep_last=None) as ck:
        lock = threading.Lock()

        def run(base: int) -> None:
            try:
                for s in range(base, base + 3):
                    with lock:
                        ck.save(s, {"model": torch.nn.Linear(4, 4)})
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=run, args=(b,)) for b in (1, 10)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    assert_all_verify(root, [1, 2, 3, 10, 11, 12])
