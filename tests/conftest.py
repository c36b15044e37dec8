"""Shared fixtures. Every test runs under a leak check: threads, child processes, temp checkpoint
folders under /tmp and tmpfs mounts left behind fail the test."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from dist_launch import repo_pythonpath, torch_extensions_dir

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="session", autouse=True)
def child_pythonpath():
    """Every child process (subprocess, torchrun rank, the btckpt CLI) imports this checkout's btckpt and
    tests/scripts (pytest's ``pythonpath`` covers this process only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", repo_pythonpath())
        if "TORCH_EXTENSIONS_DIR" not in os.environ:
            mp.setenv("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
        yield


@pytest.fixture(scope="session", autouse=True)
def child_zygote(child_pythonpath, tmp_path_factory: pytest.TempPathFactory):
    """Plain Python children (``[sys.executable, script | -m mod | -c code]``) start as forks of one process
    that has imported torch, transformers and Lightning (tests/scripts/zygote.py): real processes, real
    children of the test, a few seconds of imports less each. ``BTCKPT_TEST_ZYGOTE=0`` turns it off."""
    import zygote

    client = zygote.start(str(tmp_path_factory.getbasetemp() / "zygote.log"))
    yield client
    zygote.stop(client)


@pytest.fixture(scope="session")
def moto():
    """One moto S3 server for the session (per xdist worker), on a free port of 127.0.0.1; yields its endpoint
    URL; killed at teardown. Tests get a fresh bucket each (``s3`` in tests/test_upload.py)."""
    import socket
    import subprocess

    import fsspec.asyn

    fsspec.asyn.get_loop()  # s3fs's IO thread lives for the whole process: start it before the leak checks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([str(Path(PY).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait()


def _children() -> set[int]:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return set()
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def _tmpfs_mounts(root: Path) -> set[str]:
    """tmpfs mounts under ``root`` (the test's own tmp_path: another test run's mounts are not this test's)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:  # pragma: no cover
        return set()
    prefix = str(root.resolve()) + "/"
    return {ln.split()[1] for ln in lines if ln.split()[2] == "tmpfs" and ln.split()[1].startswith(prefix)}


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


def _stale_temps(root: Path, depth: int = 6) -> list[str]:
    """``.checkpoint-*.tmp-*`` folders (unfinished or half-deleted checkpoints) and ``btckpt*`` scratch
    folders under ``root`` (the test's own tmp_path, which is also its $TMPDIR)."""
    found: list[str] = []

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.name.startswith(".checkpoint-") and ".tmp-" in e.name:
                    found.append(str(Path(e.path).relative_to(root)))
                elif d == root / "_tmp" and e.name.startswith("btckpt"):
                    found.append(str(Path(e.path).relative_to(root)))
                elif level < depth:
                    walk(Path(e.path), level + 1)

    walk(root, 0)
    return sorted(found)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, tmp_path: Path):
    """Fail a test that leaves threads, child processes, tmpfs mounts or stale temp folders behind."""
    threads0, kids0, mounts0 = _threads(), _children(), _tmpfs_mounts(tmp_path)
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra_threads = [t for t in _threads() - threads0 if not t.name.startswith(("pydevd", "asyncio_"))]
        extra_kids = _children() - kids0
        if not extra_threads and not extra_kids:
            break
        time.sleep(0.05)
    extra_mounts = _tmpfs_mounts(tmp_path) - mounts0
    stale = _stale_temps(tmp_path)
    problems = []
    if extra_threads:
        problems.append(f"threads left running: {[t.name for t in extra_threads]}")
    if extra_kids:
        problems.append(f"child processes left running: {sorted(extra_kids)}")
    if extra_mounts:
        problems.append(f"tmpfs mounts left: {sorted(extra_mounts)}")
    if stale:
        problems.append(f"checkpoint temp folders left: {stale}")
    if problems and not request.node.get_closest_marker("allow_leaks"):
        pytest.fail("; ".join(problems))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Each test starts without the platform's variables, in its own working directory."""
    for var in ("BT_CHECKPOINT_DIR", "BT_LOAD_CHECKPOINT_DIR", "BT_NODE_RANK", "BTCKPT_FAULT", "BT_GROUP_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "_tmp"  # the test's $TMPDIR: the leak check looks for btckpt leftovers in it
    scratch.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from btckpt.testing import faults
    faults.disarm()
    logging.getLogger("btckpt").setLevel(logging.INFO)
    yield
    faults.disarm()


def run_py(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, **kw):
    """Run a Python script as a real subprocess with the repo's package importable."""
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([PY, *args], env=full_env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def tmpfs(request: pytest.FixtureRequest, tmp_path: Path):
    """``tmpfs(size_bytes, name="fs") -> Path``: mount a small tmpfs under the test's tmp_path (root only;
    the test is skipped with that reason otherwise). Every mount is unmounted at teardown."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: int, name: str = "fs") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (mount -t tmpfs); run the suite as root to cover disk-full")
        where = tmp_path / name
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed here ({res.stderr.strip()}); disk-full cases need it")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        res = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, text=True)
