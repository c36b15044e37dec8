"""The test zygote (tests/scripts/zygote.py) starts children that behave as ``python`` started them would:
real processes, children of the test, their own argv, cwd, environment, exit status and session, killed by
real signals, with nothing of btckpt imported before their code runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest


@pytest.fixture(autouse=True)
def _on(child_zygote):
    if child_zygote is None:
        pytest.skip("the zygote is off (BTCKPT_TEST_ZYGOTE=0 in the test session's environment)")

REPORT = ("import json, os, sys; sys.stdin.readline(); print(json.dumps({'argv': sys.argv, 'cwd': os.getcwd(),"
          " 'foo': os.environ.get('FOO'), 'ppid': os.getppid(), 'preloaded': 'torch' in sys.modules,"
          " 'btckpt': 'btckpt' in sys.modules,"
          " 'path0': sys.path[0]}))")


def test_a_child_gets_its_argv_cwd_env_and_exit_status(tmp_path: Path):
    (tmp_path / "w").mkdir()
    argv = [sys.executable, "-c", REPORT + "; sys.exit(7)", "a", "b"]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, FOO="bar"), cwd=tmp_path / "w")
    seen = psutil.Process(p.pid)  # what ps and psutil show: the child's own command line and environment
    assert seen.ppid() == os.getpid() and seen.cmdline() == argv and seen.environ()["FOO"] == "bar"
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 7, err
    got = json.loads(out)
    assert got["argv"] == ["-c", "a", "b"] and got["cwd"] == str(tmp_path / "w") and got["foo"] == "bar"
    assert got["ppid"] == os.getpid()  # a real child of this process
    assert got["preloaded"] and not got["btckpt"]  # it came from the zygote, which never imports btckpt


def test_a_script_runs_as_main_and_its_traceback_starts_in_it(tmp_path: Path):
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\nraise ValueError('boom')\n")
    r = subprocess.run([sys.executable, "-u", str(script), "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == f"__main__ {[str(script), 'x']} {tmp_path}\n"
    assert r.stderr.startswith("Traceback (most recent call last):\n  File \"" + str(script))
    assert r.stderr.rstrip().endswith("ValueError: boom") and "zygote" not in r.stderr


def test_a_child_in_its_own_session_dies_of_a_real_sigkill():
    p = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        assert os.getpgid(p.pid) == p.pid and psutil.Process(p.pid).ppid() == os.getpid()
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
        assert p.stdout is not None
        p.stdout.close()


def test_a_child_that_starts_children_gets_them_as_its_own(tmp_path: Path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import json, os, subprocess, sys\n"
        f"r = subprocess.run([sys.executable, '-c', {REPORT!r}], capture_output=True, text=True, input='go')\n"
        "got = json.loads(r.stdout)\n"
        "print(json.dumps({'mine': got['ppid'] == os.getpid(), 'preloaded': got['preloaded']}))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"mine": True, "preloaded": True}


def test_opting_out_gives_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=60, input="go\n",
                       env=dict(os.environ, BTCKPT_TEST_ZYGOTE="0"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["preloaded"] is False
