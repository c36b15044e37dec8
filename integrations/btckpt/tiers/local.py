"""The node-local tier: frequent checkpoints into node-local memory, promoted to the durable dir in the background.

With ``local_every_steps=K`` a Checkpointer's :meth:`~btckpt.Checkpointer.maybe_save` saves every K steps into
the *local tier*, a folder on node-local memory (``/dev/shm/btckpt-<uid>/<job>`` by default, a tmpfs), through the
same save path as any checkpoint (same files, same manifest, same commit), so every reader, ``btckpt
verify``/``ls`` and the resume policy read it unchanged. The durable cadence (``every_steps`` /
``every_seconds``, SIGTERM, ``close()``) *promotes* a local checkpoint: the background promoter copies its
files into the durable dir through the commit protocol (temp folder, fsync, manifest last, atomic rename),
checking every byte against the manifest on the way, without touching the device or the snapshot arena,
so the next local save never waits for it. ``upload_to`` then publishes the durable copy as usual.

Limits, kept honestly:

- **memory**: the tier holds at most :data:`COPIES` steps (one complete, one being written; a step being
  promoted is kept until its copy committed: one more), so it needs ``COPIES x state bytes per node`` (the bytes of
  the node's checkpoint folder) on its filesystem; :func:`check_fits` refuses a tier that cannot hold that
  (:class:`~btckpt.errors.TierTooSmall`, with the numbers and the fix) before the first local save;
- **identity**: the folder records the durable dir it belongs to and that dir's incarnation (:data:`IDENTITY`,
  :func:`incarnation`); a folder recording another dir is refused (:class:`~btckpt.errors.TierMismatch`) and
  never resumed from, one of an earlier incarnation (the dir deleted and re-created) is discarded, and one
  writer per folder is enforced by the same lock as the durable dir (:class:`~btckpt.saving.commit.DirLock`);
- **privacy** (DESIGN.md "Shared places"): the folder and all in it are the user's alone (0700/0600) under a
  per-user base (:func:`default_base`); a path another uid holds is never written through or resumed from
  (:func:`place`: a fresh private folder for the default path, an error for a chosen one);
- **queue**: at most one promotion waits behind the one copying (with several nodes, one more that another
  node started already); a newer one supersedes it (its step is
  released to retention), so a durable interval shorter than the copy time never makes the tier grow;
- **lifetime**: a clean ``close()`` promotes what is newer than the durable dir, then removes the folder
  (the log says when and why it keeps it: a promotion that failed and was not made good, a crash, time
  running out after SIGTERM); after a crash it stays, and the restarted job resumes from it when it holds
  the newest step (:class:`btckpt.restore.policy.ResumePolicy` searches it with the own dir).

Torch-free (the framework adapters import it for their resume search).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed.world import World
from ..errors import CheckpointError, TierMismatch, TierTooSmall
from ..format.manifest import Manifest, entry_problem
from ..saving.commit import LOCK, DirLock, LocalCommit, checkpoint_name, remove_stale_temps
from ..saving.destination import LocalDir, commit_in_order
from ..saving.priority import background_thread, leave, urgent
from ..saving.retention import apply_retention
from ..saving.writer import write_arena_file
from ..storage.atomic import replace_file
from ..storage.discovery import inspect, scan, verify
from ..storage.local import (
    free_bytes,
    is_private,
    make_dirs,
    open_nofollow,
    owner_name,
    private_dir,
    space_error,
    unsafe_dir,
)
from ..testing import faults

__all__ = ["SHARED_BASE", "IDENTITY", "DIR_ID", "COPIES", "REPLICAS", "ARENA", "copy_verified", "file_pieces",
           "default_base", "default_tier_dir", "tier_dir", "incarnation", "resumable_tier", "stale_tier",
           "sweep_orphans", "place", "claim", "tier_bytes", "check_fits", "promote", "LocalTier"]

log = logging.getLogger("btckpt")

SHARED_BASE = Path("/dev/shm")  # shared with every local user: each one's tiers live in btckpt-<euid>/ (0700)
IDENTITY = ".btckpt-tier.json"  # {"format": ..., "dir": <the durable dir, resolved>, "incarnation": <its id>}
FORMAT = "btckpt-tier/1"
DIR_ID = ".btckpt-dir.json"  # in the durable dir: {"format": DIR_FORMAT, "id": <random>}, written at first claim
DIR_FORMAT = "btckpt-dir/1"
COPIES = 2  # steps the tier holds at most: one complete, one being written
REPLICAS = ".replicas"  # <tier>/.replicas/node-<i>/: the tier checkpoints this node holds for node i (tiers.replicas)
ARENA = ".arena-"  # <tier>/.arena-<session>-<rank>-<k>/: a rank's staging files (btckpt.saving.arena), one per turn
_CHUNK = 8 << 20


# -- where, and whose ------------------------------------------------------------------------------------------
def _identity(durable: Path) -> str:
    return str(Path(durable).resolve())


def default_base() -> Path:
    """``/dev/shm/btckpt-<euid>``: the folder of this user's default tiers (0700, checked before each use)."""
    return SHARED_BASE / f"btckpt-{os.geteuid()}"


def default_tier_dir(durable: str | os.PathLike[str]) -> Path:
    """``/dev/shm/btckpt-<euid>/<name>-<hash>``: ``<hash>`` of the resolved durable dir, so each job (each node's
    dir) gets a folder of its own and a restarted job finds its own again; under a base private to the user."""
    ident = _identity(Path(durable))
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(ident).name)[:40] or "root"
    return default_base() / f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def tier_dir(durable: str | os.PathLike[str], option: str | os.PathLike[str] | None) -> Path:
    """The local tier folder of the job whose durable dir is ``durable``: ``option`` (``local_tier_dir``) or
    the default (:func:`default_tier_dir`)."""
    return Path(os.fspath(option)) if option is not None else default_tier_dir(durable)


def _read_json(path: Path) -> Any:
    """The JSON object in the small regular file ``path`` (never through a link); None when unreadable."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict[str, Any], *, replace: bool) -> bool:
    """Write ``obj`` to ``path`` atomically (:func:`~btckpt.storage.atomic.replace_file`)."""
    return replace_file(path, json.dumps(obj).encode(), replace=replace)


def incarnation(durable: str | os.PathLike[str], *, create: bool = False) -> str | None:
    """The random id of this incarnation of the durable dir (``<dir>/.btckpt-dir.json``); ``create``: written at
    the first claim of a tier (atomically: concurrent claimers agree). None when there is none (a dir deleted
    and re-created, or never given a tier): no tier recording an id is then resumed from it."""
    path = Path(durable) / DIR_ID
    obj = _read_json(path)
    if isinstance(obj, dict) and obj.get("format") == DIR_FORMAT and isinstance(obj.get("id"), str):
        return str(obj["id"])
    if not create:
        return None
    if os.path.lexists(path):
        raise CheckpointError(f"{path} is not a btckpt dir id record (unreadable, a link, or damaged); remove it "
                              "(a local tier of this dir, if any, is then not resumed from)")
    if not _write_json(path, {"format": DIR_FORMAT, "id": secrets.token_hex(16)}, replace=False):
        return incarnation(durable, create=False)  # another node's leader wrote it first
    return incarnation(durable, create=False)


def _recorded(root: Path) -> tuple[str, str | None] | None:
    """``(durable dir, its incarnation id)`` the identity record of ``root`` names; None without a readable
    record (read without following links)."""
    obj = _read_json(root / IDENTITY)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    inc = obj.get("incarnation")
    return str(obj.get("dir")), (inc if isinstance(inc, str) else None)


def _unsafe(root: Path, *, default: bool) -> str | None:
    """Why the tier folder ``root`` (and, for the default path, its per-user base) must not be trusted:
    a link, another uid's, writable by others (:func:`~btckpt.storage.local.unsafe_dir`)."""
    for folder in (root.parent, root) if default else (root,):
        problem = unsafe_dir(folder, private=False)
        if problem is not None:
            return problem
    return None


def resumable_tier(durable: str | os.PathLike[str], option: str | os.PathLike[str] | None) -> Path | None:
    """The local tier folder a (re)started job may resume from: the one of :func:`tier_dir` when it exists, is
    this user's (not a link, nobody else can write into it) and records ``durable`` as its job, with the dir's
    current incarnation (:func:`incarnation`); None otherwise (a folder recording another job or an earlier
    incarnation of the dir, or held by another user, is named in a warning and ignored)."""
    root = tier_dir(durable, option)
    problem = _unsafe(root, default=option is None)
    if problem is not None:
        log.warning("btckpt: not resuming from the local tier %s: %s", root, problem)
        return None
    if not root.is_dir():
        return None
    rec = _recorded(root)
    if rec is None:
        return None
    if rec[0] != _identity(Path(durable)):
        log.warning("btckpt: local tier %s belongs to the job saving into %s, not %s; not resuming from it",
                    root, rec[0], durable)
        return None
    if rec[1] is None or rec[1] != incarnation(durable):
        log.warning("btckpt: local tier %s was left by an earlier incarnation of %s (the dir was deleted or "
                    "re-created since); not resuming from it", root, durable)
        return None
    return root


def stale_tier(durable: str | os.PathLike[str], option: str | os.PathLike[str] | None) -> Path | None:
    """The local tier folder of ``durable``'s job left by an earlier incarnation of that dir (deleted or
    re-created since): this user's own and safe, never resumed from (:func:`resumable_tier`); a session without a
    tier of its own claims it, which discards it (:func:`claim`), and removes it at its clean close. None when
    there is no such folder."""
    root = tier_dir(durable, option)
    if _unsafe(root, default=option is None) is not None or not root.is_dir():
        return None
    rec = _recorded(root)
    if rec is None or rec[0] != _identity(Path(durable)):
        return None
    return root if rec[1] is None or rec[1] != incarnation(durable) else None


def sweep_orphans(root: Path) -> None:
    """Remove the fresh private folders (:func:`place`) earlier sessions of this job made when the default tier
    path ``root`` was taken, once no process holds them (a crashed session's: nothing finds them again, and a
    tmpfs is RAM). Only this user's own private folders (checked with lstat, no link followed), each under its
    writer lock; one a live session holds is left. Called by the node's leader at start (one writer per dir:
    the durable dir's lock is held)."""
    base, prefix = root.parent.parent, f"btckpt-{os.geteuid()}-{root.name}-"
    try:
        found = [Path(e.path) for e in os.scandir(base) if e.name.startswith(prefix)]
    except OSError:
        return
    for path in found:
        if unsafe_dir(path, private=True) is not None:
            continue
        try:
            lock = DirLock(path)
        except CheckpointError:  # held: a live session's tier
            continue
        try:
            _remove_checkpoints(path)  # each un-committed before its files go, then the rest: scratch
            _remove_scratch(path)
        finally:
            lock.release()
        log.info("btckpt: removed %s, the private local tier a crashed session of this job used", path)


def place(root: Path, *, default: bool) -> Path:
    """Make ``root`` (from :func:`tier_dir`) a private folder of this user (0700) and return the folder the tier
    uses. The default path under a base another user holds (or a link, or one others can write) is never used:
    a fresh private folder is, named in one log line with the owner. A chosen ``local_tier_dir`` in that state
    is refused (:class:`TierMismatch`: the path, the owner, the fix); nothing is written into it."""
    if default:
        sweep_orphans(root)
        problem = None
        try:
            problem = private_dir(root.parent) or private_dir(root, tighten=False)
        except FileNotFoundError:  # no /dev/shm (not Linux): made as it would be there
            make_dirs(root.parent.parent)
            problem = private_dir(root.parent) or private_dir(root, tighten=False)
        if problem is None:
            return root
        fresh = Path(tempfile.mkdtemp(prefix=f"btckpt-{os.geteuid()}-{root.name}-", dir=root.parent.parent))
        log.warning("btckpt: %s, so the default local tier %s is not used: this run's tier is the fresh private "
                    "folder %s (a restart cannot resume from it; to get the default back, have that folder "
                    "removed, or pass local_tier_dir=)", problem, root, fresh)
        return fresh
    parent = root.parent
    make_dirs(parent)
    st = os.stat(parent)
    problem = None
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        problem = f"its folder {parent} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}, not sticky)"
    elif st.st_uid not in (0, os.geteuid()):
        problem = f"its folder {parent} is owned by {owner_name(st.st_uid)}"
    problem = problem or private_dir(root, tighten=False)  # claim() makes it 0700 once it accepted it
    if problem is not None:
        raise TierMismatch(f"local_tier_dir {root}: {problem}; btckpt never writes into (or resumes from) a folder "
                           "another user controls. Point local_tier_dir at a new folder of your own (e.g. under "
                           f"{default_base()}), or have that one removed")
    return root


def _arenas(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{ARENA}*") if p.is_dir() and not p.is_symlink()) if root.is_dir() else []


def _remove_checkpoints(root: Path) -> None:
    """Remove every checkpoint in the tier folder ``root`` (its lock held) and in the replica folders it holds,
    complete or not, through :meth:`LocalDir.remove` (each renamed away before its files go: never a
    ``checkpoint-<N>`` with files missing), then their unfinished temp folders."""
    for folder in [*_replica_folders(root), root]:
        dest = LocalDir(folder)
        for info in scan(folder, own=True):
            dest.remove(info.path.name, retired=False)
        remove_stale_temps(folder, locked=True)


def _remove_scratch(path: Path) -> None:
    """Remove a folder that holds no checkpoint (any there went first: :func:`_remove_checkpoints`): a rank's
    staging arena, an emptied replica folder, a tier folder emptied of its checkpoints. As a whole (``rmtree``,
    which never follows a link inside), and only when it is a real folder of this user's (checked with lstat:
    never a link, never another uid's; /dev/shm is shared, and these live in a private tier folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)


def _discard(root: Path) -> None:
    """Empty the tier folder ``root`` (its lock held) but its lock: checkpoints un-committed first, the identity
    record last, so a kill meanwhile leaves a folder the next start discards again."""
    _remove_checkpoints(root)
    for entry in os.scandir(root):
        if entry.name in (LOCK, IDENTITY):
            continue
        if entry.is_dir(follow_symlinks=False):
            _remove_scratch(Path(entry.path))  # no checkpoint left in it: arenas, replica folders
        else:
            os.unlink(entry.path)
    (root / IDENTITY).unlink(missing_ok=True)


def claim(root: Path, durable: Path, *, session: str) -> DirLock:
    """Make ``root`` (a private folder: :func:`place`) this job's local tier (the node's leader, at start):
    refuse a folder of another job (:class:`TierMismatch`), take its writer lock (which removes unfinished
    temp folders and the staging files of earlier sessions), discard one of an earlier incarnation of the dir
    (with a warning), record the job and the dir's incarnation (:func:`incarnation`, created if new)."""
    rec, mine = _recorded(root), _identity(durable)
    if rec is not None and rec[0] != mine:
        raise TierMismatch(f"local tier {root} belongs to the job saving into {rec[0]}, not {mine}; give this job "
                           "its own local_tier_dir (or remove that folder once its job is gone)")
    ours = (LOCK, f".{IDENTITY}.tmp-")  # what a start killed before its record was written leaves
    if rec is None and root.is_dir() and any(not e.name.startswith(ours) for e in root.iterdir()):
        raise TierMismatch(f"local tier {root} holds files but no {IDENTITY} (it is not a btckpt local tier); "
                           "point local_tier_dir at an empty or new folder")
    problem = private_dir(root)  # accepted: 0700 from now on (a folder of ours others could only read)
    if problem is not None:
        raise TierMismatch(f"local tier {root}: {problem}; point local_tier_dir at a new folder of your own")
    lock = DirLock(root)
    try:
        inc = incarnation(durable, create=True)
        if rec is not None and rec[1] != inc:
            log.warning("btckpt: local tier %s was left by an earlier incarnation of %s (the dir was deleted or "
                        "re-created since); discarding it, never resuming from it", root, durable)
            _discard(root)
            rec = None
        for left in root.glob(f".{IDENTITY}.tmp-*"):  # the lock is ours: nobody else is writing one
            left.unlink(missing_ok=True)
        for arena in _arenas(root):  # a crashed run's staging files; this session's ranks may have begun theirs
            if not arena.name.startswith(f"{ARENA}{session}-"):
                _remove_scratch(arena)
        if rec is None:
            _write_json(root / IDENTITY, {"format": FORMAT, "dir": mine, "incarnation": inc}, replace=True)
    except BaseException:
        lock.release()
        raise
    return lock


# -- memory ----------------------------------------------------------------------------------------------------
def tier_bytes(state_bytes: int, *, copies: int = COPIES) -> int:
    """What the local tier holds at most: ``copies x state bytes per node`` (the node's checkpoint folder)."""
    return copies * state_bytes


def _held_bytes(root: Path) -> int:
    """Bytes of the complete checkpoints in the tier folder and its peer replicas (retention frees them)."""
    if not root.is_dir():
        return 0
    folders = [root, *((root / REPLICAS).iterdir() if (root / REPLICAS).is_dir() else [])]
    staging = 0
    for arena in _arenas(root):  # a rank may be replacing its arena right now: what vanished counts as nothing
        try:
            staging += sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(arena) if e.is_file())
        except FileNotFoundError:
            pass
    return staging + sum(i.size for f in folders for i in scan(f, own=True) if i.complete)


def check_fits(root: Path, state_bytes: int, *, margin: int, copies: int = COPIES) -> None:
    """Refuse (:class:`TierTooSmall`, with the numbers and the fix) a local tier whose filesystem cannot hold
    :func:`tier_bytes` of ``state_bytes`` (``copies`` of it: :data:`COPIES`, twice that with peer replicas) plus
    ``margin``; the tier's own checkpoints and replicas count as free (retention frees them). Nothing is
    written."""
    held = _held_bytes(root)
    free = free_bytes(root)
    need = tier_bytes(state_bytes, copies=copies) + margin
    if free + held < need:
        raise TierTooSmall(
            f"local tier {root}: it keeps {copies} copies of this node's state ({state_bytes / 1e6:.1f} MB each), "
            f"{need / 1e6:.1f} MB with the {margin / 1e6:.0f} MB margin, but its filesystem has {free / 1e6:.1f} MB "
            f"free (+{held / 1e6:.1f} MB of this tier's own checkpoints). Enlarge it (docker run --shm-size=..., "
            "or mount -o remount,size=... /dev/shm), point local_tier_dir at a larger node-local folder, or set "
            "local_every_steps=None. Nothing was written")


# -- promotion -------------------------------------------------------------------------------------------------
def _pieces(fd: int) -> Iterator[memoryview]:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            return
        yield view[:n]  # consumed (written and hashed) before the next read refills the buffer


def file_pieces(path: Path) -> Iterator[memoryview]:
    """The bytes of the file ``path`` in chunks (one reused buffer: consume each before asking for the next)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield from _pieces(fd)
    finally:
        os.close(fd)


def copy_verified(man: Manifest, commit: LocalCommit, pieces_of: Callable[[str], Iterable[memoryview]], *,
                  where: str) -> None:
    """Write every file ``man`` lists into ``commit``'s temp folder from ``pieces_of(name)`` (fsync'ed), checking
    each against its manifest entry as it is written; a :class:`~btckpt.errors.CheckpointError` naming ``where``
    on the first mismatch (then nothing is committed: the caller aborts). The caller commits ``man`` after."""
    for name, entry in man.files.items():
        target = commit.tmp / name
        make_dirs(target.parent, private=is_private(commit.tmp))
        size, digest = write_arena_file(target, b"", pieces_of(name))
        problem = entry_problem(name, size, digest, entry)
        if problem:
            raise CheckpointError(f"{where}: {problem}; not copied (the source changed or is damaged)")
        commit.record(name, size, digest)


def promote(src: Path, dest_root: Path, *, tag: str, world: World | None = None, timeout: float = 600.0) -> Path:
    """Copy the committed checkpoint ``src`` into ``dest_root`` through the commit protocol; the new folder.

    Every file is written with fsync and checked against ``src``'s manifest as it is copied (a damaged source
    raises :class:`~btckpt.errors.CorruptCheckpoint` and commits nothing); the same manifest is written last,
    then the temp folder is renamed into place. A step whose copy in ``dest_root`` verifies is left as it is; a
    copy of it there that is complete but damaged (its bytes do not match) is replaced, and retired only once
    the new copy committed; anything else of that name is refused (never overwritten).
    With several nodes (``world``), each node's leader promotes its part and node 0 commits last, after every
    other node committed, as in a save; a node whose ``dest_root`` holds the step already (a restart after a
    promotion that committed on some nodes only) copies nothing but still joins, so no node waits for it.
    A node whose ``src`` is gone (its tier was wiped) but whose ``dest_root`` holds that step verified joins the same
    way. Any failure removes the temp folder; older checkpoints are untouched.
    """
    info = inspect(src)
    w = world or World()
    if not info.complete or info.manifest is None:
        there = inspect(dest_root / src.name) if (dest_root / src.name).is_dir() else None
        if there is None or not there.complete or there.manifest is None or verify(there):
            raise CheckpointError(f"{src}: cannot promote it ({info.status}: {info.reason})")
        # this node's tier lacks the step (wiped) but its dir holds a verified copy: nothing to copy; it joins the
        # nodes that do copy theirs, so node 0 commits last as in a save
        commit_in_order(w, lambda: None, key=f"{tag}/promoted/{there.step}", timeout=timeout, ranks=w.nodes,
                        commits=False)
        log.info("btckpt: %s already holds step %d (verified); nothing to promote", dest_root, there.step)
        return there.path
    man = info.manifest
    final = dest_root / checkpoint_name(man.step)
    there = inspect(final) if final.is_dir() else None
    problems = verify(there) if there is not None else []  # "already there" only when its bytes verify
    have = there is not None and not problems
    damaged = there is not None and there.complete and there.kind == "btckpt" and not have
    if have:
        log.info("btckpt: %s already holds step %d (verified); nothing to promote", dest_root, man.step)
    elif damaged:
        log.warning("btckpt: %s holds a damaged copy of step %d (%s); promoting %s over it", dest_root, man.step,
                    problems[0], src)
    key = f"{tag}/promoted/{man.step}"  # nodes promoting different steps never pass each other's barrier
    # a damaged copy of the step is retired only once the verified one committed (LocalCommit's supersede)
    dest = LocalDir(dest_root)
    commit = dest.part(man.step, tag=tag, supersede=damaged)
    try:
        try:
            if not have:
                dest.begin(commit)
                copy_verified(man, commit, lambda name: file_pieces(src / name), where=str(src))
                faults.point("promote")
            commit_in_order(w, lambda: dest.commit(commit, man), key=key, timeout=timeout, ranks=w.nodes,
                            commits=not have)
        except OSError as exc:
            raise space_error(exc, commit.tmp) from exc
    except BaseException:
        w.fail(key)
        dest.abort(commit)
        raise
    if not have:
        log.info("btckpt: promoted %s -> %s", src, commit.final)
    return commit.final


def settled(futures: Iterable[Future[Any]], timeout: float | None) -> bool:
    """Wait for each of ``futures`` (up to ``timeout`` s each) without raising its error; False when one is
    still running then."""
    for f in futures:
        try:
            f.exception(timeout=timeout)
        except TimeoutError:
            return False
    return True


@dataclass(eq=False)
class _Promotion:
    """One scheduled promotion: its tier step, the save it waits for, its store tag, its outcome."""

    step: int
    src: Path
    after: Future[Any] | None
    tag: str
    timeout: float
    on_commit: Callable[[Path], None]
    future: Future[Path | None] = field(default_factory=Future)


def _replica_folders(root: Path) -> list[Path]:
    held = root / REPLICAS
    return sorted(p for p in held.iterdir() if p.is_dir() and not p.is_symlink()) if held.is_dir() else []


class LocalTier:
    """One Checkpointer's local tier (see the module doc): its folder, lock, memory check, retention, promoter.

    Every rank has one (all know the folder); the node's leader claims it and runs the promoter thread.
    """

    def __init__(self, root: Path, durable: Path, *, world: World, margin: int, session: str, default: bool = False,
                 timeout: float = 600.0) -> None:
        # the node's leader makes the folder private (default: or uses a fresh one) and tells the node's ranks
        root = self._placed(root, world, default=default, key=f"tier/{session}/{world.node_rank}", timeout=timeout)
        self.root, self.durable, self.world, self.margin, self.session = root, durable, world, margin, session
        self.copies = COPIES  # state copies the folder must hold (twice as many with peer replicas)
        self.last_step: int | None = None  # the newest step saved into the tier by this Checkpointer
        self.scheduled: int | None = None  # the newest step whose promotion was scheduled
        self._fits: int | None = None  # the state size check_fits last passed
        # the tier is a LocalDir on node-local memory: its writer lock (the leader's claim), its checkpoints, and
        # beside them the ranks' file arenas (:meth:`arena`) that tier saves stage into
        self.dir = LocalDir(root, lock=claim(root, durable, session=session) if world.is_local_leader else None)
        # set by the Checkpointer: takes a retired step's staged files back into its Stager (saving.arena)
        self.salvage: Callable[[Path], object] | None = None
        self._busy: dict[Path, int] = {}  # folders queued or being promoted -> how many times
        self._settled: Path | None = None  # the newest tier save committed on every node
        self._mutex = threading.Lock()
        self._retaining = threading.Lock()
        # the step of a promotion that failed and no later promotion made good (cleared when one does): close()
        # then keeps the folder, whose newest step may be only here
        self.failed: int | None = None
        self._futures: list[Future[Path | None]] = []  # outcomes not reported yet (take_error)
        self._queue: deque[_Promotion] = deque()  # waiting for the promoter: at most one supersedable (schedule)
        self._running: _Promotion | None = None
        self._wake = threading.Condition(self._mutex)
        self._stopping = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _placed(root: Path, world: World, *, default: bool, key: str, timeout: float) -> Path:
        shared = world.store is not None and world.local_size > 1
        if not world.is_local_leader:
            got = world.collect(key, timeout=timeout) if shared else {"root": str(root)}
            if "error" in got:
                raise TierMismatch(got["error"])
            return Path(got["root"])
        try:
            placed = place(root, default=default)
        except BaseException as exc:  # the node's ranks fail with it, not at their timeout
            if shared:
                world.publish(key, {"error": str(exc)})
            raise
        if shared:
            world.publish(key, {"root": str(placed)})
        return placed

    @classmethod
    def create(cls, config: Any, world: World, durable: Path, *, session: str,
               resumed: bool = False) -> LocalTier | None:
        """The Checkpointer's tier (None when ``local_every_steps`` is None, unless ``resumed``: the session
        resumed from the tier and owns it, :meth:`btckpt.Checkpointer.restore`)."""
        if config.local_every_steps is None and not resumed:
            return None
        return cls(tier_dir(durable, config.local_tier_dir), durable, world=world, margin=config.space_margin,
                   session=session, default=config.local_tier_dir is None, timeout=config.barrier_timeout)

    def arena(self, rank: int) -> Path:
        """The prefix of rank ``rank``'s staging folders in the tier (``Stager.stage(..., into=)``): the snapshot
        of a tier save is staged into files there and renamed into the checkpoint (:mod:`btckpt.saving.arena`)."""
        return self.root / f"{ARENA}{self.session}-{rank}"

    # -- saving into it ------------------------------------------------------------------------------------
    def check(self, state_bytes: int) -> None:
        """:func:`check_fits` for this state size (once per size)."""
        if self._fits != state_bytes:
            check_fits(self.root, state_bytes, margin=self.margin, copies=self.copies)
            self._fits = state_bytes

    def steps(self) -> list[int]:
        """The complete steps in the tier."""
        return [i.step for i in scan(self.root, own=True) if i.complete]

    @property
    def busy(self) -> set[Path]:
        """Tier checkpoints queued or being promoted or replicated (retention keeps them)."""
        with self._mutex:
            return set(self._busy)

    def hold(self, path: Path) -> None:
        """Keep the tier checkpoint ``path`` from retention until as many :meth:`release` calls (a promotion or a
        peer replication queued or reading it)."""
        with self._mutex:
            self._busy[path] = self._busy.get(path, 0) + 1

    def release(self, path: Path) -> None:
        """Undo one :meth:`hold`; retention may delete ``path`` at its next pass (:meth:`retain`)."""
        with self._mutex:
            self._busy[path] -= 1
            if not self._busy[path]:
                del self._busy[path]

    def retain(self, committed: Path | None = None) -> None:
        """After a tier save committed on every node (``committed``: its save passed the commit barrier), or a
        promotion or replica exchange finished: delete the tier's steps older than the newest one committed
        everywhere, except those being promoted or sent. A step newer than that (complete on this node only: a
        peer died mid-save) never makes an older one go, or the nodes could be left without a common step."""
        with self._retaining:  # the writer, the promoter and the replicator call it
            if committed is not None:
                self._settled = committed
            settled = self._settled
            if settled is None:  # nothing known to be complete on every node yet (e.g. just resumed): keep all
                return
            step = int(settled.name.rsplit("-", 1)[1])
            newer = {i.path for i in scan(self.root, own=True) if i.step > step}
            apply_retention(self.root, keep_last=1, protected={settled} | newer | self.busy, salvage=self.salvage)

    # -- promotion ----------------------------------------------------------------------------------------
    def schedule(self, step: int, *, after: Future[Any] | None, tag: str, timeout: float,
                 on_commit: Callable[[Path], None]) -> None:
        """Promote tier step ``step`` into the durable dir in the background, once ``after`` (the tier save
        of that step) finished; ``on_commit(folder)`` runs on the promoter after the durable commit. Promotions
        run in order, one at a time, only the node's leader copies; one that has not started when a newer one
        is scheduled is superseded (dropped, its step released to retention), so at most one waits behind the
        one copying and the tier never holds more than its documented copies. With several nodes, whether a
        queued promotion is dropped or run is agreed through the store (every node promotes the same steps)."""
        self.scheduled = step
        if not self.world.is_local_leader:
            return
        job = _Promotion(step=step, src=self.root / checkpoint_name(step), after=after, tag=tag, timeout=timeout,
                         on_commit=on_commit)
        self.hold(job.src)
        with self._wake:
            dropped = [old for old in self._queue if self._decide(old, "skip") == "skip"]
            for old in dropped:
                self._queue.remove(old)
                self._futures.remove(old.future)
            if self._running is not None or self._queue:
                log.warning("btckpt: promotion of step %d queued behind step %d still copying; the durable interval "
                            "is shorter than the copy time", step, (self._running or self._queue[0]).step)
            self._queue.append(job)
            self._futures.append(job.future)
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._serve, name="btckpt-promote", daemon=True)
                self._thread.start()
            self._wake.notify()
        for old in dropped:
            log.info("btckpt: promotion of step %d superseded by step %d before it started; not copied", old.step,
                     step)
            old.future.set_result(None)
            self._finished(old)

    def _decide(self, job: _Promotion, choice: str) -> str:
        """Whether ``job`` runs or is skipped (``choice``: what this node proposes): its own choice on one node,
        else the first node's proposal (every node then does the same); "run" when the store is gone."""
        if self.world.nodes == 1:
            return choice
        try:
            return str(self.world.propose(f"{job.tag}/go", choice))
        except CheckpointError:
            return "run"

    def _serve(self) -> None:
        """The promoter thread: runs the queued promotions one at a time until :meth:`close`."""
        background_thread()
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._stopping:
                        self._wake.wait()
                    if not self._queue:
                        return
                    job = self._running = self._queue.popleft()
                try:
                    if self._decide(job, "run") == "run":
                        job.future.set_result(self._promote(job))
                    else:  # another node dropped it before it started here (a newer one supersedes it)
                        self._finished(job)
                        job.future.set_result(None)
                except BaseException as exc:  # noqa: BLE001 - reported through the future (take_error)
                    job.future.set_exception(exc)
                finally:
                    with self._wake:
                        self._running = None
                        self._wake.notify_all()
        finally:
            leave()

    def _finished(self, job: _Promotion) -> None:
        self.release(job.src)
        self.retain()  # what the writer's retention kept for this promotion may go now

    def _promote(self, job: _Promotion) -> Path | None:
        src = job.src
        try:
            if job.after is not None and job.after.exception() is not None:
                log.warning("btckpt: %s was not saved (its error is raised by the Checkpointer); not promoted", src)
                return None
            path = promote(src, self.durable, tag=job.tag, world=self.world, timeout=job.timeout)
            job.on_commit(path)
            with self._mutex:
                if self.failed is not None and job.step >= self.failed:
                    log.info("btckpt: step %d promoted; the failed promotion of step %d is made good", job.step,
                             self.failed)
                    self.failed = None
            return path
        except BaseException as exc:
            with self._mutex:
                self.failed = max(job.step, self.failed if self.failed is not None else job.step)
            log.error("btckpt: promotion of %s failed: %s", src, exc)
            raise
        finally:
            self._finished(job)

    def take_error(self) -> BaseException | None:
        """The first error of a finished promotion not reported yet (each is reported once)."""
        with self._mutex:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            exc = f.exception()
            if exc is not None:
                return exc
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every promotion so far (up to ``timeout`` s in all); False when some is still running then."""
        with self._mutex:
            futures = list(self._futures)
        with urgent():  # the caller waits for the promoter: it gets the CPU (btckpt.saving.priority)
            if timeout is None:
                return settled(futures, None)
            deadline = time.monotonic() + timeout
            return all(settled([f], max(0.0, deadline - time.monotonic())) for f in futures)

    # -- end ------------------------------------------------------------------------------------------------
    def close(self, *, remove: bool, timeout: float | None = None, kept: str | None = None) -> bool:
        """Stop the promoter (after the promotions queued, up to ``timeout`` s), release the lock and, when
        ``remove`` (a clean close whose newest step reached the durable dir) and no promotion failed without
        a later one making it good, delete the tier's checkpoints and its folder. A kept folder is named in
        the log with the reason (``kept``: the caller's, e.g. a crash). False when the promoter was still
        copying at ``timeout``: then the folder and its lock stay as they are (the process is on its way out;
        a restart resumes from the folder)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify_all()
            with urgent():
                thread.join(timeout)
            if thread.is_alive():
                log.warning("btckpt: local tier %s kept as it is: a promotion was still copying when time ran out "
                            "(a restart resumes from the tier)", self.root)
                return False
        if self.dir.lock is None:
            return True
        removing = remove and self.failed is None
        if not removing and self.steps():
            why = (f"the promotion of step {self.failed} failed and no later step was promoted"
                   if self.failed is not None else kept or "not every step reached the durable dir")
            log.warning("btckpt: local tier %s kept (%s); a restart on this node resumes from it, a later clean "
                        "close() removes it", self.root, why)
        try:
            if removing:
                # a kill at any instant leaves a tier a restart accepts: each checkpoint is renamed away before
                # its files go (never a checkpoint-<N> with files missing), and the identity record goes last
                _remove_checkpoints(self.root)
                for folder in [*_replica_folders(self.root), *_arenas(self.root), self.root / REPLICAS]:
                    _remove_scratch(folder)
        finally:
            self.dir.release()
        if removing:
            for name in (".btckpt.lock", IDENTITY):
                try:
                    (self.root / name).unlink()
                except FileNotFoundError:
                    pass
            try:
                self.root.rmdir()
            except OSError as exc:  # something else lives there: leave it
                log.warning("btckpt: local tier %s not removed (%s)", self.root, exc.strerror)
        return True

