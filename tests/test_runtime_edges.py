"""Save-side and runtime edges (issue 11, items 3, 10, 11, 12, 15): unique temp names, the writer lock's
errors and stale temp folders, a save still writing when the script ends, a rebuilt optimizer's step gate,
saves from several threads and a restore behind a save in flight.

Internals used: btckpt.restore.reader, btckpt.saving.commit, btckpt.saving.job, btckpt.saving.snapshot,
btckpt.storage.discovery (the local commit, the save job's writer, the snapshot copy and ``fcntl`` patched to force
edge cases, the reader, discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import threading
import time
from pathlib import Path

import btckpt
import btckpt.saving.commit as commit_mod
import btckpt.saving.job as saving_mod
import btckpt.saving.snapshot as snapshot_mod
import pytest
import torch
from btckpt import CheckpointError, ConfigError
from btckpt.restore.reader import CheckpointReader
from btckpt.saving.commit import LocalCommit
from btckpt.storage.discovery import inspect, scan, verify
from crash_harness import PY, child_env


def _verified(path: Path) -> CheckpointReader:
    info = inspect(path)
    assert info.complete, (path, info.reason)
    reader = CheckpointReader(path, info.manifest)
    assert verify(info) == []
    return reader


def _temps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# -- 11: a save still writing when the script ends -----------------------------------------------------------
EXIT_SCRIPT = """
import sys, time, torch, btckpt, btckpt.saving.job as saving
real = saving.write_arena_file
def slow(*a, **k):  # a slow disk: the save is still writing when the script ends
    time.sleep(0.5)
    return real(*a, **k)
saving.write_arena_file = slow
torch.manual_seed(0)
m = torch.nn.Linear(2048, 2048)  # 16 MiB: above the size the writer hashes on a second thread
c = btckpt.Checkpointer(dir=sys.argv[1])
c.save(5, {"model": m})
print("IN FLIGHT", not c._pending.done(), flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)
"""


@pytest.mark.parametrize("how", ["end", "exit"])
def test_script_ending_with_a_large_save_in_flight_commits_it(tmp_path: Path, how: str) -> None:
    script = tmp_path / "s.py"
    script.write_text(EXIT_SCRIPT)
    ck = tmp_path / "ck"
    res = subprocess.run([PY, str(script), str(ck), how], capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IN FLIGHT True" in res.stdout
    reader = _verified(ck / "checkpoint-5")
    torch.manual_seed(0)
    want = torch.nn.Linear(2048, 2048).state_dict()
    got = reader.load_group("model")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_save_failing_at_exit_makes_the_exit_status_non_zero(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(EXIT_SCRIPT)
    env = child_env()
    env["BTCKPT_FAULT"] = "before_fsync:raise"
    res = subprocess.run([PY, str(script), str(tmp_path / "ck"), "exit"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "its checkpoint is lost" in res.stderr
    assert not (tmp_path / "ck" / "checkpoint-5").exists()


# -- 15: restore behind a save in flight; saves from several threads -----------------------------------------
@pytest.fixture
def slow_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = saving_mod.write_arena_file

    def slow(*a, **k):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(saving_mod, "write_arena_file", slow)


def test_restore_waits_for_the_save_in_flight(tmp_path: Path, slow_writes: None) -> None:
    model = torch.nn.Linear(64, 64)
    with btckpt.Checkpointer(dir=str(tmp_path), keep_last=None) as ck:
        ck.save(1, {"model": model})
        ck.wait()
        with torch.no_grad():
            model.weight.add_(1.0)
        at_save = {k: v.clone() for k, v in model.state_dict().items()}
        ck.save(2, {"model": model})
        fresh = torch.nn.Linear(64, 64)
        assert ck.restore({"model": fresh}) == 2
    assert all(torch.equal(fresh.state_dict()[k], at_save[k]) for k in at_save)
    saved = _verified(tmp_path / "checkpoint-2").load_group("model")
    assert all(torch.equal(saved[k], at_save[k]) for k in at_save)


def test_saves_from_two_threads_each_hold_their_own_state(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with btckpt.Checkpointer(dir=str(tmp_path), keep_last=None) as ck:
        start = threading.Barrier(2)

        def run(base: int) -> None:
            try:
                start.wait()
                for s in range(base, base + 8):
                    ck.save(s, {"model": {"w": torch.full((1 << 20,), float(s))}})  # 4 MiB each
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=run, args=(b,)) for b in (1, 100)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ck.wait()
    assert not errors, errors
    infos = scan(tmp_path)
    assert sorted(i.step for i in infos) == [*range(1, 9), *range(100, 108)]
    for i in infos:
        w = _verified(i.path).load_group("model")["w"]
        assert torch.equal(w, torch.full((1 << 20,), float(i.step))), i.path


# -- 3: temp names unique across threads, processes and hosts; abort removes only its own ------------------
def test_two_oneshot_saves_of_the_same_step_never_share_a_temp_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A starts writing, B saves the same step into the same parent meanwhile, then A goes on: one of
    them succeeds with a complete checkpoint, the other fails cleanly; neither removes the other's files."""
    target = tmp_path / "checkpoint-0"
    real = saving_mod.write_arena_file
    a_writing, b_done = threading.Event(), threading.Event()

    def paused(*a, **k):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "A":
            a_writing.set()
            b_done.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(saving_mod, "write_arena_file", paused)
    results: dict[str, object] = {}
    states = {name: {"model": {"w": torch.full((64,), float(i))}} for i, name in enumerate("AB")}

    def run(name: str) -> None:
        try:
            results[name] = btckpt.save(target, states[name])
        except BaseException as exc:  # noqa: BLE001
            results[name] = exc
        finally:
            if name == "B":
                b_done.set()

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_writing.wait(30)
    run("B")
    a.join()
    ok = [n for n, r in results.items() if r == target]
    assert len(ok) >= 1, results
    for n, r in results.items():
        assert r == target or isinstance(r, CheckpointError), (n, r)
    w = _verified(target).load_group("model")["w"]
    assert any(torch.equal(w, states[n]["model"]["w"]) for n in ok)
    assert _temps(tmp_path) == []


ONESHOT_SCRIPT = """
import os, sys, time, torch, btckpt
from btckpt import CheckpointError
os.getpid = lambda: 4242  # containers on two hosts: the same pid
target, go, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
state = {"model": {"w": torch.full((1 << 18,), value)}}
while not os.path.exists(go):
    time.sleep(0.001)
try:
    btckpt.save(target, state)
    print("SAVED")
except CheckpointError as exc:
    print("REFUSED", exc)
"""


def test_oneshot_saves_from_two_processes_with_the_same_pid(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(ONESHOT_SCRIPT)
    for rnd in range(3):
        target, go = tmp_path / f"r{rnd}" / "checkpoint-0", tmp_path / f"go{rnd}"
        target.parent.mkdir()
        procs = [subprocess.Popen([PY, str(script), str(target), str(go), str(v)], env=child_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for v in (1.0, 2.0)]
        time.sleep(0.5)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        saved = [o for o, _ in outs if o.startswith("SAVED")]
        assert saved, outs
        w = _verified(target).load_group("model")["w"]
        assert float(w[0]) in (1.0, 2.0) and torch.equal(w, torch.full_like(w, float(w[0])))
        assert _temps(target.parent) == []


def test_same_pid_commits_get_their_own_temp_folders_and_abort_only_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: 4242)
        a, b = LocalCommit(tmp_path, 0), LocalCommit(tmp_path, 0)
    assert a.tag.startswith("4242-") and b.tag.startswith("4242-")
    assert a.tmp != b.tmp
    a.begin()
    (a.tmp / "x").write_bytes(b"a's file")
    b.abort()  # b never began: it created nothing and removes nothing
    clash = LocalCommit(tmp_path, 0, tag=a.tag)
    with pytest.raises(CheckpointError, match="share the tag"):
        clash.begin()
    clash.abort()
    assert (a.tmp / "x").read_bytes() == b"a's file"
    a.abort()
    assert _temps(tmp_path) == []


# -- 12: a rebuilt optimizer that reuses a dead one's id is still gated --------------------------------------
def test_rebuilt_optimizer_with_a_reused_id_is_gated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = snapshot_mod._copy_all

    def slow(pairs, *, non_blocking):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # the background copy is still running when training steps
        real(pairs, non_blocking=non_blocking)

    monkeypatch.setattr(snapshot_mod, "_copy_all", slow)
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 512)  # 2 MiB weight: copied in the background behind the gate
    params = list(model.parameters())

    def step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        model(torch.randn(4, 1024)).pow(2).mean().backward()
        opt.step()

    with btckpt.Checkpointer(dir=str(tmp_path), keep_last=None, save_rng=False) as ck:
        opt = torch.optim.SGD(params, lr=0.5)
        step(opt)
        ck.save(1, {"model": model, "optimizer": opt})
        step(opt)
        old = id(opt)
        del opt
        gc.collect()
        blanks = []  # take free slots until the dead optimizer's memory comes back: the new one gets its id
        while True:
            o = torch.optim.SGD.__new__(torch.optim.SGD)
            if id(o) == old:
                break
            blanks.append(o)
            assert len(blanks) < 1_000_000
        del blanks
        o.__init__(params, lr=0.5)
        opt = o
        at_save = {}
        for s in (2, 3):
            at_save[s] = {k: v.clone() for k, v in model.state_dict().items()}
            ck.save(s, {"model": model, "optimizer": opt})
            step(opt)  # must wait for the copy: the checkpoint is the state at save()
        ck.wait()
    for s, want in at_save.items():
        got = _verified(tmp_path / f"checkpoint-{s}").load_group("model")
        assert all(torch.equal(got[k], want[k]) for k in want), s


# -- 10: the writer lock's errors, stale temp folders ---------------------------------------------------------
def test_a_start_removes_every_temp_folder_even_one_naming_a_live_pid(tmp_path: Path) -> None:
    stale = tmp_path / f".checkpoint-3.tmp-{os.getppid()}-0123456789abcdef"  # pid reused by a live process
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    with btckpt.Checkpointer(dir=str(tmp_path)) as ck:
        assert not stale.exists()
        ck.save(4, {"model": torch.nn.Linear(2, 2)})
    assert _temps(tmp_path) == [".btckpt.lock"]


def test_a_start_removes_a_killed_writers_temp_files_but_not_a_live_ones_or_a_link(tmp_path: Path) -> None:
    """A kill inside an atomic small-file write (a Lightning link, a tier record) leaves ``.<name>.tmp-<tag>``;
    the dir's next writer removes it when its pid is gone; a live pid's file, a link of that name and a user's
    file stay."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / f".last.ckpt.tmp-{dead.pid}-0123456789abcdef"
    killed.write_bytes(b'{"format": "btck')
    live = tmp_path / f".best.ckpt.tmp-{os.getppid()}-0123456789abcdef"
    live.write_bytes(b"in flight")
    target = tmp_path / "mine.txt"
    target.write_text("user's")
    link = tmp_path / f".x.ckpt.tmp-{dead.pid}-fedcba9876543210"
    link.symlink_to(target)
    user = tmp_path / ".notes.tmp-1-short"  # not a tag of new_tag()'s form
    user.write_text("kept")
    with btckpt.Checkpointer(dir=str(tmp_path)) as ck:
        assert not killed.exists()
        assert live.read_bytes() == b"in flight" and link.is_symlink() and user.read_text() == "kept"
        ck.save(1, {"model": torch.nn.Linear(2, 2)})
    assert target.read_text() == "user's"


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_filesystem_without_flock_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, err: int) -> None:
    (tmp_path / ".btckpt.lock").write_text("pid 999999 on deadhost")  # a dead writer's record

    def no_flock(fd: int, op: int) -> None:  # what Lustre mounted -o noflock answers
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(commit_mod.fcntl, "flock", no_flock)
    with pytest.raises(ConfigError) as ei:
        btckpt.Checkpointer(dir=str(tmp_path))
    msg = str(ei.value)
    assert "does not support flock" in msg and "BTCKPT_NO_LOCK=1" in msg and str(tmp_path) in msg
    assert "999999" not in msg and "another process" not in msg
    monkeypatch.setenv("BTCKPT_NO_LOCK", "1")
    with btckpt.Checkpointer(dir=str(tmp_path)) as ck:
        ck.save(1, {"model": torch.nn.Linear(2, 2)})
    assert "WITHOUT the writer lock" in caplog.text
    _verified(tmp_path / "checkpoint-1")


def test_a_held_lock_still_names_its_holder(tmp_path: Path) -> None:
    with btckpt.Checkpointer(dir=str(tmp_path)):
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            btckpt.Checkpointer(dir=str(tmp_path))
