"""Helpers for the distributed tests: launch torchrun / raw ranks as real subprocesses, kill them cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def repo_pythonpath(old: str | None = None) -> str:
    """``$PYTHONPATH`` for child processes: this checkout's ``integrations`` (the package) and ``tests/scripts``
    (the scripts' shared modules) first, then ``old`` (default: this process's), without repeats. The test
    session exports it once (tests/conftest.py), so every subprocess and torchrun rank inherits it."""
    old = os.environ.get("PYTHONPATH", "") if old is None else old
    ours = [str(REPO / "integrations"), str(SCRIPTS)]
    return os.pathsep.join(ours + [p for p in old.split(os.pathsep) if p and p not in ours])


def torch_extensions_dir() -> str:
    """A JIT extension folder of this venv's own, for a torch/DeepSpeed op a test run builds (the ZeRO tests
    build none: tests/scripts/hf_train.py ``zero_config``; test_hf_zero.py checks it). torch's default,
    ``~/.cache/torch_extensions/py311_cpu``, is one folder for every venv, and the build command names the
    venv's path (``-isystem <venv>/.../torch/include``): a run from another checkout (a worktree, a CI clone)
    changes the command, so ninja rebuilds (DeepSpeed's fused_adam and shm_comm took 1.5-2.5 minutes on 2
    cores) and the next run from this checkout rebuilds back. Keyed by the
    site-packages path and the Python version, each venv builds once."""
    import hashlib
    import sysconfig

    key = f"{sysconfig.get_paths()['purelib']}|{sys.version}"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    return str(base / f"btckpt-tests-{hashlib.sha1(key.encode()).hexdigest()[:12]}")


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a rank killed by a signal (SIGABRT at exit) prints every thread's stack
    env.pop("BTCKPT_FAULT", None)
    env.update(extra)
    return env


def torchrun(script: str, args: list[str], *, nproc: int = 2, env: dict[str, str], port: int | None = None,
             nnodes: int = 1, node_rank: int = 0, rdzv: bool = False) -> subprocess.Popen[str]:
    """Start ``torchrun`` in its own session (so the whole job can be SIGKILLed at once).

    A single-node job runs ``--standalone``: the agent binds a free port itself, so nothing can take the
    port between choosing and binding it. Several launches forming one job (``rdzv``) share ``port``.
    """
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--max-restarts=0"]
    if rdzv:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port or free_port()}", "--rdzv-id=btckpt-test"]
    elif port is not None:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    else:
        cmd += ["--standalone"]
    cmd += [str(SCRIPTS / script), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def raw_ranks(script: str, args: list[str], *, world: int, env: dict[str, str]) -> list[subprocess.Popen[str]]:
    """Start ``world`` ranks directly (no elastic agent, so survivors of a dead rank keep running)."""
    port = free_port()
    return [raw_rank(script, args, rank=r, world=world, local_world=world, port=port, env=env) for r in range(world)]


def raw_rank(script: str, args: list[str], *, rank: int, world: int, local_world: int, port: int,
             env: dict[str, str]) -> subprocess.Popen[str]:
    """Start one rank directly, in its own session, with the variables torchrun would give it (no elastic agent):
    ``local_world=1`` makes each rank a node of its own (a multi-node job on this machine; the agent's part in
    it, the rendezvous and the teardown of survivors, is what such a launch leaves out)."""
    e = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
             LOCAL_RANK=str(rank % local_world), LOCAL_WORLD_SIZE=str(local_world),
             GROUP_RANK=str(rank // local_world))
    return subprocess.Popen([PY, str(SCRIPTS / script), *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` (killing its whole session on timeout); return (returncode, output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks(proc.pid)
        kill_session(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-12000:]}") from None
    kill_session(proc)  # stray grandchildren, if any
    return proc.returncode, out


# torch elastic's agent logs this once a worker has failed and it stops the others: its report (the failed rank's
# exit code, the root cause) is settled by then
AGENT_STOPS_WORKERS = "closing signal SIGTERM"


def kill_workers(agent_pid: int) -> list[Any]:
    """SIGKILL every descendant of torchrun's agent ``agent_pid`` (its ranks), not the agent: it reports them.
    A rank SIGTERMed after a peer died sits in a collective or a barrier waiting for that peer (gloo's and
    btckpt's timeouts are minutes), so the agent waits its full 30 s before it SIGKILLs it itself (torch 2.13's
    agent ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT there); killing it now ends the job the same way, earlier.
    Returns the ``psutil.Process`` objects signalled (for a wait)."""
    import psutil

    try:
        kids = psutil.Process(agent_pid).children(recursive=True)
    except psutil.Error:
        return []
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    return kids


def finish_after_rank_death(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """:func:`finish` for a job one of whose ranks is meant to die (a ``BTCKPT_FAULT`` kill): once the agent
    stops the other ranks (:data:`AGENT_STOPS_WORKERS`), SIGKILL them (:func:`kill_workers`) so the agent
    reports at once. Returns (returncode, output) as :func:`finish` does."""
    import threading

    lines: list[str] = []
    stop_seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if AGENT_STOPS_WORKERS in line:
                stop_seen.set()

    reader = threading.Thread(target=read, name="torchrun-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    reaped = False
    while proc.poll() is None and time.monotonic() < deadline:
        if stop_seen.is_set() and not reaped:
            kill_workers(proc.pid)
            reaped = True
        time.sleep(0.05)
    timed_out = proc.poll() is None
    if timed_out:
        dump_stacks(proc.pid)
        kill_session(proc)
    proc.wait()
    reader.join(60)
    kill_session(proc)  # stray grandchildren, if any
    out = "".join(lines)
    if timed_out:
        raise AssertionError(f"timed out after {timeout}s:\n{out[-12000:]}")
    return proc.returncode, out


def dump_stacks(root_pid: int, *, grace: float = 5.0) -> None:
    """A hung job's last words: SIGABRT ``root_pid`` and every descendant, so each Python process started with
    ``PYTHONFAULTHANDLER=1`` (:func:`env_with`, the crash harness's ``child_env``) prints every thread's stack to
    its stderr (torchrun's ranks: into the agent's), one after another, waiting up to ``grace`` s for each to end.
    Call it on a timeout, before the kill, so the failure says where each rank waited."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:  # one at a time (their stacks do not interleave); the ranks last (the end of the output)
        try:
            p.rlimit(psutil.RLIMIT_CORE, (0, 0))  # the abort leaves no core file, whatever the machine's limit
            p.send_signal(signal.SIGABRT)
            p.wait(timeout=grace)
        except (psutil.Error, psutil.TimeoutExpired):
            pass


def kill_session(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the job at once: the launcher's process group and every descendant (torchrun starts each
    rank in a session of its own, so killing the group alone would leave the ranks running)."""
    import psutil

    kids = kill_workers(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(kids, timeout=30)


def wait_for_line(path: Path, prefix: str, *, count: int, timeout: float, proc: subprocess.Popen[str]) -> None:
    """Wait until ``path`` holds ``count`` lines starting with ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and sum(ln.startswith(prefix) for ln in path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"job ended early (rc={proc.returncode}):\n{out[-4000:]}")
        time.sleep(0.05)
    kill_session(proc)
    raise AssertionError(f"{path} never reached {count} x {prefix!r}")


def kill_when_paused(job: subprocess.Popen[str], progress: Path, *, timeout: float = 180) -> None:
    """Wait until a rank wrote ``PAUSED`` to ``progress`` (it holds after a known commit), then SIGKILL the whole
    job (agent and every rank at once)."""
    try:
        wait_for_line(progress, "PAUSED", count=1, timeout=timeout, proc=job)
    finally:
        kill_session(job)
        job.communicate(timeout=60)


def only_sharded_checkpoint(run: Path, step: int) -> dict:
    """Assert ``run`` holds exactly ``checkpoint-<step>``, written as two ranks' own shards (nobody gathered the
    model); its manifest."""
    ck = run / f"checkpoint-{step}"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [ck.name]
    man = json.loads((ck / "btckpt.json").read_text())
    assert {"model-rank00000.safetensors", "model-rank00001.safetensors", "optimizer-rank00000.safetensors",
            "optimizer-rank00001.safetensors", "rng_state_0.json", "rng_state_1.json"} <= set(man["files"])
    assert "model.safetensors" not in man["files"]
    return man


def load_st(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same(a: Path, b: Path) -> None:
    import torch

    ta, tb = load_st(a), load_st(b)
    assert sorted(ta) == sorted(tb), (sorted(ta), sorted(tb))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{k} differs"


def run_job(tmp: Path, ckdir: str, out: str, *extra: str, mode: str = "ddp", nproc: int = 2) -> str:
    env = env_with(BT_CHECKPOINT_DIR=str(tmp / ckdir))
    rc, text = finish(torchrun("dist_train.py", ["--mode", mode, "--out", str(tmp / out), *extra], nproc=nproc,
                               env=env), timeout=300)
    assert rc == 0, text[-4000:]
    return text


def kill_and_resume(tmp: Path, mode: str, nproc: int = 2) -> None:
    run_job(tmp, "ref", "ref.st", mode=mode, nproc=nproc)
    env = env_with(BT_CHECKPOINT_DIR=str(tmp / "run"), PROGRESS=str(tmp / "progress"))
    job = torchrun("dist_train.py", ["--mode", mode, "--sleep", "0.15"], nproc=nproc, env=env)
    try:
        wait_for_line(tmp / "progress", "STEP", count=8, timeout=150, proc=job)
    finally:
        kill_session(job)  # SIGKILL the agent and every rank at once
        job.communicate(timeout=60)
    assert not (tmp / "run" / "checkpoint-12").exists()
    text = run_job(tmp, "run", "resumed.st", mode=mode, nproc=nproc)
    # ranks share torchrun's stdout pipe, so two ranks' lines can land on one line: match, don't split
    resumed = dict(re.findall(r"rank (\d+): resumed from (None|\d+)", text))
    assert sorted(resumed) == [str(r) for r in range(nproc)], text[-3000:]
    assert "None" not in resumed.values(), text[-3000:]
    assert_same(tmp / "ref.st", tmp / "resumed.st")
    assert not [p for p in (tmp / "run").iterdir() if p.name.startswith(".checkpoint-")]
