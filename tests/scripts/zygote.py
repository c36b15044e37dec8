"""A preloaded fork server (zygote) for the test suite's Python children.

Most of the suite's time went into child processes importing torch, transformers and Lightning (4-5 s of CPU
each, hundreds of children: torchrun ranks, training scripts, the CLI). The zygote imports those libraries
once; a child is then a fork of it that runs its script as ``python`` would. Children stay real processes: a
real pid, a real child of the process that started it (``subprocess.Popen`` waits for it, kills it, reads its
pipes as usual), its own session when asked, killed by real signals. The zygote only imports: it never imports
btckpt nor the test scripts' modules, and it never runs torch code, so every child starts from a clean state
(its own environment, working directory, ``sys.argv``, ``sys.path``, signal handlers and stdio).

How a child becomes the caller's child: the zygote forks an intermediate process, which forks the child and
exits at once; the orphaned child is re-parented to the nearest "child subreaper" among its ancestors, which is
the caller (it sets ``PR_SET_CHILD_SUBREAPER`` only while it waits for the answer, so orphans of other
processes still go where they went before). A caller that itself runs in the zygote and starts Python
children (the torchrun agent, a crash harness) gets its own sub-zygote, forked before its code runs.

Only plain invocations go through it: ``[sys.executable, (-u), script | -m module | -c code, ...]`` with no
``preexec_fn``, user, group, umask or process-group change. Anything else, a child whose environment sets
``BTCKPT_TEST_ZYGOTE=0`` (a test of a fresh interpreter's start-up), or a zygote that does not answer, falls
back to ``fork`` + ``exec`` as before. ``BTCKPT_TEST_ZYGOTE=0`` in the test session's environment turns it off.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

PRELOAD = (
    "numpy", "psutil", "fsspec", "safetensors.torch", "torch", "torch.distributed", "torch.distributed.launcher.api",
    "torch.distributed.checkpoint", "torch.distributed.fsdp", "torch.distributed.tensor", "torch.nn.parallel",
    "transformers", "transformers.trainer", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama", "lightning", "lightning.pytorch",
)
SPAWNS_CHILDREN = (b"subprocess", b"Popen", b"dist_launch", b"torchrun")  # a script that starts children
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
_base_path: list[str] = []  # sys.path without $PYTHONPATH's entries and the zygote's own folder
_client: _Client | None = None
_original_execute_child: Any = None


def enabled(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    return (os.environ if env is None else env).get("BTCKPT_TEST_ZYGOTE", "1") != "0"


# -- the caller's side ------------------------------------------------------------------------------------------
class _Client:
    """One connection to a zygote; spawns are serialised (one request, one answer)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock, self.proc, self.lock = sock, proc, threading.Lock()

    def spawn(self, request: dict[str, Any], fds: list[int]) -> int | None:
        with self.lock:
            if self.sock.fileno() < 0:
                return None
            _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            try:
                socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
                self.sock.settimeout(60)
                answer = self.sock.recv(64)
            except OSError:
                return None
            finally:
                _libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        return int(answer) if answer.strip().isdigit() else None

    def close(self) -> None:
        with self.lock:
            self.sock.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _request(args: Any, executable: Any, preexec_fn: Any, shell: bool, env: Any, cwd: Any, gid: Any, gids: Any,
             uid: Any, umask: int, process_group: Any, start_new_session: bool,
             pass_fds: tuple[int, ...]) -> dict[str, Any] | None:
    """What the zygote needs to run ``args`` as ``python`` would, or None to fork + exec instead."""
    if shell or preexec_fn is not None or gid is not None or gids is not None or uid is not None or umask >= 0:
        return None
    if process_group not in (None, -1) or isinstance(args, (str, bytes, os.PathLike)):
        return None
    argv = [os.fsdecode(a) for a in args]
    if not argv or argv[0] != sys.executable or (executable is not None and os.fsdecode(executable) != argv[0]):
        return None
    env = dict(os.environ) if env is None else {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}
    if not enabled(env):
        return None
    rest, unbuffered = argv[1:], False
    while rest and rest[0] == "-u":
        rest, unbuffered = rest[1:], True
    if not rest:
        return None
    if rest[0] in ("-m", "-c"):
        if len(rest) < 2:
            return None
        mode, target, script_args = rest[0], rest[1], rest[2:]
    elif rest[0].startswith("-") or not os.path.isfile(os.path.join(os.fsdecode(cwd or os.getcwd()), rest[0])):
        return None
    else:
        mode, target, script_args = "script", rest[0], rest[1:]
    return {"mode": mode, "target": target, "args": script_args, "env": env, "unbuffered": unbuffered,
            "cwd": os.fsdecode(cwd) if cwd is not None else os.getcwd(), "setsid": bool(start_new_session),
            "pass_fds": list(pass_fds)}


def _execute_child(self: subprocess.Popen[Any], args: Any, executable: Any, preexec_fn: Any, close_fds: bool,
                   pass_fds: tuple[int, ...], cwd: Any, env: Any, startupinfo: Any, creationflags: int, shell: bool,
                   p2cread: int, p2cwrite: int, c2pread: int, c2pwrite: int, errread: int, errwrite: int,
                   restore_signals: bool, gid: Any, gids: Any, uid: Any, umask: int, start_new_session: bool,
                   process_group: Any) -> None:
    client = _client
    if client is not None:
        request = _request(args, executable, preexec_fn, shell, env, cwd, gid, gids, uid, umask, process_group,
                           start_new_session, pass_fds)
        if request is not None:
            fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2, *pass_fds]
            pid = client.spawn(request, fds)
            if pid is not None:
                self.pid = pid
                self._child_created = True
                self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]
                return
    _original_execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                            creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                            restore_signals, gid, gids, uid, umask, start_new_session, process_group)


def _install(client: _Client) -> None:
    global _client, _original_execute_child
    if _original_execute_child is None:
        _original_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        subprocess.Popen._execute_child = _execute_child  # type: ignore[attr-defined]
    _client = client


def start(log_path: str) -> _Client | None:
    """Start the zygote (it imports PRELOAD, a few seconds) and route this process's plain Python children
    through it. Returns the client (``stop(client)`` at the end) or None when disabled."""
    if not enabled():
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    theirs.close()
    ours.settimeout(120)
    try:
        ready = ours.recv(16)
    except OSError:
        ready = b""
    if ready != b"ready":
        proc.kill()
        proc.wait()
        ours.close()
        return None
    client = _Client(ours, proc)
    _install(client)
    return client


def stop(client: _Client | None) -> None:
    global _client
    if client is not None:
        _client = None
        client.close()


# -- the zygote's side ------------------------------------------------------------------------------------------
def _serve(sock: socket.socket) -> None:
    """Answer spawn requests until the caller closes its end."""
    sock.settimeout(None)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 64)
        except OSError:
            return
        if not msg:
            return
        request = json.loads(msg)
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:  # the intermediate: fork the child, say its pid, exit (the child is re-parented)
            code = 0
            try:
                os.close(r)
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _child(request, fds, report=w)  # never returns; it says its pid once it shows its own argv
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        answer = b""
        while True:
            part = os.read(r, 64)
            if not part:
                break
            answer += part
        os.close(r)
        os.waitpid(middle, 0)  # the child now belongs to the caller
        for fd in fds:
            os.close(fd)
        try:
            sock.send(answer or b"-")
        except OSError:
            return


def _place_fds(fds: list[int], targets: list[int]) -> None:
    """dup2 the received ``fds`` onto ``targets`` (stdin, stdout, stderr, then pass_fds at their numbers)."""
    import fcntl

    high = max([*targets, *fds, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, high) for fd in fds]
    for fd in fds:
        os.close(fd)
    for fd, target in zip(moved, targets, strict=True):
        os.dup2(fd, target)
    for fd in moved:
        os.close(fd)


def _child(request: dict[str, Any], fds: list[int], *, report: int) -> None:
    """Become the requested program. Its pid goes to ``report`` (then closed) only once ``/proc`` shows its own
    argv and environment, so the caller's ``Popen`` never returns a pid that ``ps`` still shows as the zygote."""
    code: int = 1
    try:
        import fcntl

        moved = fcntl.fcntl(report, fcntl.F_DUPFD, max([*request["pass_fds"], *fds, report, 2]) + 1)
        os.close(report)  # above every fd _place_fds targets: none overwrites it
        report = moved
        if request["setsid"]:
            os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _place_fds(fds, [0, 1, 2, *request["pass_fds"]])
        env = request["env"]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(env)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if env.get("PYTHONFAULTHANDLER"):
            import faulthandler

            faulthandler.enable()
        if request["unbuffered"] or env.get("PYTHONUNBUFFERED"):
            import io

            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=sys.stdout.encoding,
                                          errors=sys.stdout.errors, write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=sys.stderr.encoding,
                                          errors="backslashreplace", write_through=True)
        _fresh_library_state(env)
        mode, target, args = request["mode"], request["target"], request["args"]
        _show_as([sys.executable, *(["-u"] if request["unbuffered"] else []),
                  *([mode, target] if mode != "script" else [target]), *args], env)
        os.write(report, str(os.getpid()).encode())
        os.close(report)
        if mode == "script":
            path = os.path.abspath(target)
            first = os.path.dirname(os.path.realpath(path))
        elif mode == "-m":
            first = os.getcwd()
        else:
            first = ""
        sys.path[:] = [first, *extra, *_base_path]
        sys.path_importer_cache.clear()
        import importlib

        importlib.invalidate_caches()
        if mode == "script":
            _maybe_sub_zygote(open(path, "rb").read())
            sys.argv = [target, *args]
            import runpy

            runpy.run_path(path, run_name="__main__")
        elif mode == "-m":
            _maybe_sub_zygote(b"subprocess" if target == "torch.distributed.run" else b"")
            sys.argv = [target, *args]  # runpy puts the module's file in argv[0]
            import runpy

            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            import types

            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            tb = tb.tb_next  # the traceback starts in the child's code, as python's does
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        code = 1
    os._exit(_shutdown(code))


_PR_SET_MM, _PR_SET_MM_MAP = 35, 14
_identity: list[Any] = []  # the buffers /proc/<pid>/cmdline and environ now point at (kept alive)


class _MMMap(ctypes.Structure):  # struct prctl_mm_map (linux/prctl.h)
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack", "arg_start",
        "arg_end", "env_start", "env_end")] + [("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32),
                                               ("exe_fd", ctypes.c_uint32)]


def _show_as(argv: list[str], env: dict[str, str]) -> bool:
    """Point the kernel's view of this process (``/proc/<pid>/cmdline`` and ``environ``, what ``ps`` and
    ``psutil`` read) at the child's own argv and environment, as an exec would have (PR_SET_MM_MAP: root or
    CAP_CHECKPOINT_RESTORE)."""
    args = ctypes.create_string_buffer(b"".join(a.encode() + b"\0" for a in argv))
    envs = ctypes.create_string_buffer(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    _identity[:] = [args, envs]
    with open("/proc/self/stat") as f:
        fields = [0, 0, 0, *f.read().rsplit(")", 1)[1].split()]  # fields[n] is stat's field n (1-based)
    _libc.sbrk.restype = ctypes.c_void_p
    mm = _MMMap(int(fields[26]), int(fields[27]), int(fields[45]), int(fields[46]), int(fields[47]),
                _libc.sbrk(0), int(fields[28]), ctypes.addressof(args), ctypes.addressof(args) + len(args) - 1,
                ctypes.addressof(envs), ctypes.addressof(envs) + len(envs) - 1, None, 0, 0xFFFFFFFF)
    return _libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) == 0


def can_show_as() -> bool:
    """Whether a forked child can show its own argv and environment (the zygote serves only if it can)."""
    pid = os.fork()
    if pid == 0:
        env = {"BTCKPT_ZYGOTE_PROBE": "1"}
        good = _show_as(["probe", "x"], env) and open("/proc/self/environ", "rb").read() == b"BTCKPT_ZYGOTE_PROBE=1\0"
        good = good and open("/proc/self/cmdline", "rb").read() == b"probe\0x\0"
        os._exit(0 if good else 1)
    return os.waitpid(pid, 0)[1] == 0


def _shutdown(code: int) -> int:
    """What the interpreter does at exit: join non-daemon threads, run atexit callbacks, flush stdio."""
    import atexit

    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException:
        pass
    try:
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    return code & 0xFF


def _fresh_library_state(env: dict[str, str]) -> None:
    """What the preloaded libraries read from the environment at import, read again from the child's."""
    import random

    random.seed()
    try:
        import numpy as np

        np.random.seed(int.from_bytes(os.urandom(4), "little"))
    except ImportError:
        pass
    fsspec_config = sys.modules.get("fsspec.config")
    if fsspec_config is not None:  # FSSPEC_* (e.g. the test S3 server's endpoint) are read at import
        fsspec_config.conf.clear()
        fsspec_config.conf_dir = env.get("FSSPEC_CONFIG_DIR", fsspec_config.default_conf_dir)
        fsspec_config.set_conf_files(fsspec_config.conf_dir, fsspec_config.conf)
        fsspec_config.set_conf_env(fsspec_config.conf, os.environ)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "rank_zero_only") and hasattr(module, "_get_rank"):
            rank = module._get_rank()
            module.rank_zero_only.rank = rank if rank is not None else 0


def _maybe_sub_zygote(source: bytes) -> None:
    """A child that starts Python children of its own gets a zygote of its own, forked now (clean)."""
    global _client
    _client = None
    if not any(word in source for word in SPAWNS_CHILDREN):
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        ours.close()
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:
            os._exit(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _show_as([sys.executable, __file__, "(sub-zygote)"], {})  # not mistaken for its parent by ps or psutil
        _serve(theirs)
        os._exit(0)
    theirs.close()
    _install(_Client(ours))


def _zygote_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    here = os.path.dirname(os.path.realpath(__file__))
    pythonpath = {p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    _base_path[:] = [p for p in sys.path[1:] if p not in pythonpath and p != here]
    sys.path[:] = list(_base_path)  # the preloads come from site-packages, never from the checkout
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # a library missing in this venv: its children import it themselves
            print(f"zygote: not preloaded: {name}: {e}", file=sys.stderr, flush=True)
    leaked = [m for m in sys.modules if m == "btckpt" or m.startswith("btckpt.")]
    if leaked:
        print(f"zygote: refusing to serve: the preloads imported {leaked}", file=sys.stderr, flush=True)
        return
    if not can_show_as():
        print("zygote: refusing to serve: a fork cannot show its own argv and environment here (PR_SET_MM_MAP "
              "needs CAP_CHECKPOINT_RESTORE), and tests read them", file=sys.stderr, flush=True)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in the test session is the session's business
    sock.send(b"ready")
    _serve(sock)


if __name__ == "__main__":  # run under its own module name: a child's ``__main__`` is its own
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_btckpt_test_zygote", os.path.abspath(__file__))
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
    _module._zygote_main(int(sys.argv[1]))
