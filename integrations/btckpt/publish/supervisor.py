"""The uploader beside training (``Checkpointer(upload_to=URL)``): one ``python -m btckpt.upload --watch``
process per node, started, poked after each commit, restarted if it dies, and stopped with a final pass.

Runs in the training process (the node's local leader); training never waits on it except in ``close()``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["UploadSupervisor", "URL_ENV"]

URL_ENV = "BTCKPT_UPLOAD_URL"  # the supervisor passes the URL here: credentials never on a command line

log = logging.getLogger("btckpt.upload")


class UploadSupervisor:
    """Runs ``python -m btckpt.upload SRC URL --watch --supervised`` beside training (``upload_to=URL``).

    The uploader reads its stdin: a line starts a pass at once (:meth:`poke`, after each commit), end of
    input (:meth:`stop`, or this process dying) makes it do a final pass and exit: no signal races at
    start-up, no orphan uploader after a crash. :meth:`check` restarts a dead uploader (up to
    ``max_restarts`` times).
    """

    def __init__(self, src: str | os.PathLike[str], dest: str, *, extra_args: list[str] | None = None,
                 max_restarts: int = 5) -> None:
        self.src, self.dest = os.fspath(src), dest
        self.extra_args = list(extra_args or [])
        self.max_restarts = max_restarts
        self.restarts = 0
        self.proc: Any = None

    def start(self) -> None:
        """Start the uploader process (its logs go to this process's stderr)."""
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])  # the folder holding btckpt/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        env[URL_ENV] = self.dest
        self.proc = subprocess.Popen([sys.executable, "-m", "btckpt.upload", self.src, f"env:{URL_ENV}", "--watch",
                                      "--supervised", "--progress", "off", *self.extra_args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        log.info("started uploader pid %d: %s -> %s", self.proc.pid, self.src, self.dest)

    def check(self) -> None:
        """Restart the uploader if it died (training never waits on it)."""
        if self.proc is None or self.proc.poll() is None:
            return
        if self.restarts >= self.max_restarts:
            return
        self.restarts += 1
        log.warning("uploader pid %d exited with status %s; restarting it (%d/%d)", self.proc.pid,
                    self.proc.returncode, self.restarts, self.max_restarts)
        self.start()

    def poke(self) -> None:
        """Ask the uploader for a pass now (a checkpoint just committed)."""
        self.check()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):  # it died just now: check() restarts it next time
                pass

    def stop(self, *, timeout: float | None = 3600.0) -> int | None:
        """End of input: the uploader makes a final pass and exits; wait for it (killed after ``timeout`` s, an
        hour when None; its journal lets the next uploader finish the pass)."""
        if timeout is None:
            timeout = 3600.0
        if self.proc is None:
            return None
        self.check()
        try:
            self.proc.stdin.close()  # end of input: final pass, then exit
        except OSError:  # pragma: no cover
            pass
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("uploader pid %d did not finish its final pass within %.0fs; killing it (re-run "
                      "`btckpt upload %s %s` to finish)", self.proc.pid, timeout, self.src, self.dest)
            self.proc.kill()
            rc = self.proc.wait()
        if rc:
            log.warning("uploader exited with status %s: not everything was uploaded; re-run `btckpt upload "
                        "%s %s`", rc, self.src, self.dest)
        self.proc = None
        return int(rc)
