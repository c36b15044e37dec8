"""Find checkpoints and choose the one to resume: every supported layout, completeness, verification.

Torch-free. Local folders and fsspec URLs are searched by the same code, through a
:class:`btckpt.storage.store.Store` (each :class:`CheckpointInfo` carries its store). Layouts searched under a root
(PLATFORM.md): the root itself being a checkpoint;
``root/checkpoint-<step>/``; ``root/rank-<node>/checkpoint-<step>/``; and
``root/<job_id>/rank-<node>/checkpoint-<step>/`` (the node rank from ``$BT_NODE_RANK``, default 0).
A folder with ``checkpoint-<N>`` children in any of these layouts is a folder of checkpoints, whatever
else lies at its top; a plain HF model folder at the top counts (as a weights-only warm start) only
when there is none. A writer's *own* checkpoints are the ``checkpoint-<N>`` folders directly under its dir.
A checkpoint is complete when its manifest parses and every file it lists is a regular file of its size;
checksums are checked when a checkpoint is loaded or verified (:func:`verify`: what ``btckpt verify``,
a resume's :func:`verified` and the test suites run).

Selection, the one rule every entry point follows (the Checkpointer, ``btckpt.load``/``latest``, HF's
``resume_checkpoint``, Lightning's ``resume_path``, the CLI): :func:`resume_candidates` orders the own dir's
checkpoints, newest first, then the load dir's; :func:`select` takes the first that is complete and passes
a check (checksums, or a verified read), skipping each damaged one with a warning that names it;
:func:`nothing_to_resume` raises :class:`NoCheckpointFound` when a load dir was set and nothing was chosen.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..errors import (
    CheckpointError,
    ConfigError,
    CoordinationError,
    CorruptCheckpoint,
    IncompleteCheckpoint,
    NoCheckpointFound,
    StateMismatch,
    UnsupportedFormat,
)
from ..format.checksum import file_checksum
from ..format.manifest import MANIFEST, MAX_MANIFEST, Manifest, entry_problem, read_error
from .local import is_url
from .nodes import node_rank
from .store import LOCAL, Entry, Store, open_store

__all__ = ["CheckpointInfo", "inspect", "scan", "node_rank", "STEP_DIR", "resume_candidates", "select",
           "verify", "verified", "retired", "check", "RESCANS", "nothing_to_resume", "unreadable", "same_run"]

log = logging.getLogger("btckpt")
T = TypeVar("T")

STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
RESCANS = 10  # how many times a reader whose pick was retired under it looks again before it gives up
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_is_url = is_url  # the name api.py imports


@dataclass
class CheckpointInfo:
    """A checkpoint folder found on disk or behind a URL, and what state it is in.

    ``status``: ``complete`` (manifest and all files present), ``incomplete`` (never committed or files
    missing, or the folder cannot be read), ``corrupt`` (manifest malformed or unsafe) or ``newer`` (written
    by a newer btckpt: not damaged, upgrade btckpt to read it). ``kind``: ``btckpt`` or ``hf`` (a plain HF
    model folder without a manifest, usable as a weights-only warm start). ``store`` reads its files
    (``path`` is the folder in it: a local path, or the fsspec path of a URL); ``where`` is the printable
    location (the path, or the URL).
    """

    path: Path
    step: int
    status: str
    kind: str
    manifest: Manifest | None
    size: int
    created: str
    reason: str = ""
    store: Store = field(default=LOCAL, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def where(self) -> str:
        """The folder as the user would write it: a local path, or the URL."""
        return self.store.where(self.path)


def _step_of(name: str, manifest: Manifest | None) -> int:
    m = STEP_DIR.match(name)
    if m:
        return int(m.group(1))
    return manifest.step if manifest else 0


def inspect(path: str | os.PathLike[str], *, store: Store | None = None, named: bool = False) -> CheckpointInfo:
    """Classify one folder, local or behind a URL (reads the manifest and file sizes, no data).

    ``store``: the Store ``path`` lives in (default: the one :func:`btckpt.storage.store.open_store` picks). A folder
    without a manifest is a plain HF model folder (weights only) when it holds the weights and
    ``config.json``: locally always; on an object store, where an upload's files appear one by one, only
    when ``named`` (the folder a user named itself, not a ``checkpoint-<N>`` found by a scan).
    """
    if store is None:
        store, folder = open_store(path)
    else:
        folder = os.fspath(path)
    p = Path(folder)

    def info(status: str, kind: str = "btckpt", man: Manifest | None = None, reason: str = "", *, size: int = 0,
             created: str = "") -> CheckpointInfo:
        if man is not None:
            size, created = man.total_bytes, man.created
        return CheckpointInfo(p, _step_of(p.name, man), status, kind, man, size, created, reason, store)

    listed = store.list(folder)
    why = unreadable(folder) if listed is None and store.local else None
    if why:
        return info("incomplete", reason=f"cannot read the folder: {why}")
    top = {e.name: e for e in listed or []}
    if MANIFEST not in top:
        return _without_manifest(store, top, info, hf_ok=store.local or named)
    try:
        man = Manifest.from_json(store.get(folder, MANIFEST, limit=MAX_MANIFEST),
                                 where=store.where(folder, MANIFEST))
    except UnsupportedFormat as exc:
        return info("newer", reason=str(exc))
    except CheckpointError as exc:
        return info("corrupt", reason=str(exc))
    found = store.stat(folder, man.files)
    for name, want in man.files.items():
        e = found.get(name)
        if e is None:
            return info("incomplete", man=man, reason=f"{name} is missing")
        if e.problem:
            return info("corrupt", man=man, reason=f"{name} {e.problem}")
        if e.kind != "file":  # a FIFO or device would block or lie: never opened
            return info("corrupt", man=man, reason=f"{name} is not a regular file but {e.kind}")
        if e.size != want["size"]:
            return info("incomplete", man=man, reason=f"{name} is {e.size} bytes, the manifest says {want['size']}")
    named_step = STEP_DIR.match(p.name)
    if named_step and int(named_step.group(1)) != man.step:
        return info("corrupt", man=man, reason=f"folder name says step {named_step.group(1)}, manifest says {man.step}")
    return info("complete", man=man)


_BTCKPT_ONLY = re.compile(r"^(rng_state_\d+\.json|(?!model|adapter_model)[A-Za-z0-9_][A-Za-z0-9_.-]*"
                          r"\.safetensors(\.index\.json)?)$")


def _without_manifest(store: Store, top: dict[str, Entry], info: Callable[..., CheckpointInfo], *,
                      hf_ok: bool) -> CheckpointInfo:
    """A folder without a manifest: btckpt's own (never committed, or its manifest deleted), or a plain
    HF model folder."""
    unfinished = "" if store.local else " (or upload unfinished)"
    traces = sorted(n for n in top if _BTCKPT_ONLY.match(n))  # files only btckpt writes
    if traces:  # written by btckpt, so not a plain HF folder: its manifest is gone
        return info("incomplete", reason=f"no {MANIFEST} (deleted, or never written{unfinished}) although btckpt "
                                         f"wrote {', '.join(traces[:3])}; not loading it")
    files = [e for e in top.values() if e.is_file]
    size = sum(e.size for e in files)
    names = {e.name for e in files}
    if hf_ok and "config.json" in names and any(n in names for n in HF_WEIGHTS):
        newest = max((e.mtime for e in files if e.mtime is not None), default=None)
        created = "" if newest is None else \
            dt.datetime.fromtimestamp(newest, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return info("complete", "hf", size=size, created=created)
    return info("incomplete", reason=f"no {MANIFEST}: never committed{unfinished}", size=size)


def _step_dirs(store: Store, folder: str, entries: list[Entry] | None = None) -> list[str]:
    if entries is None:
        entries = store.list(folder) or []
    return [posixpath.join(folder, e.name) for e in entries if e.kind == "dir" and STEP_DIR.match(e.name)]


def _is_job(e: Entry) -> bool:
    return e.kind == "dir" and not e.name.startswith((".", "checkpoint-", "rank-"))


def _candidates(store: Store, root: str, top: list[Entry], rank: int) -> list[str]:
    """``root/checkpoint-<N>``, ``root/rank-<rank>/checkpoint-<N>`` and ``root/<job>/rank-<rank>/checkpoint-<N>``."""
    found = _step_dirs(store, root, top) + _step_dirs(store, posixpath.join(root, f"rank-{rank}"))
    for job in filter(_is_job, top):
        found += _step_dirs(store, posixpath.join(root, job.name, f"rank-{rank}"))
    return found


def _subdirs(store: Store, folder: str, prefix: str = "") -> list[str]:
    return [posixpath.join(folder, e.name) for e in store.list(folder) or []
            if e.kind == "dir" and e.name.startswith(prefix) and not e.name.startswith(".")]


def _holds_checkpoints(store: Store, root: str, top: list[Entry]) -> bool:
    """Whether ``root`` has a ``checkpoint-<N>`` folder in any supported layout, for any node rank."""
    if _step_dirs(store, root, top):
        return True
    for d in top:
        if d.kind != "dir" or d.name.startswith("."):
            continue
        sub = posixpath.join(root, d.name)
        ranks = [sub] if d.name.startswith("rank-") else _subdirs(store, sub, "rank-")
        if any(_step_dirs(store, r) for r in ranks):
            return True
    return False


def unreadable(path: str | os.PathLike[str]) -> str | None:
    """Why the local folder ``path`` cannot be listed (``"Permission denied"``...), or None when it can, or
    when it does not exist or is no folder (nothing to tell)."""
    try:
        with os.scandir(path):
            return None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def scan(path: str | os.PathLike[str], *, rank: int | None = None, own: bool = False) -> list[CheckpointInfo]:
    """All checkpoint folders under ``path`` (a local path or an fsspec URL such as ``s3://...``) in every
    supported layout, newest first (complete or not).

    ``own``: only this writer's own checkpoints, the ``checkpoint-<N>`` folders directly under ``path``
    (or ``path`` itself when it is a checkpoint or a plain model folder without checkpoints under it).
    """
    store, root = open_store(path)
    top = store.list(root)
    if top is None:
        why = unreadable(root) if store.local else None
        if why:
            log.warning("btckpt: cannot read %s (%s): its checkpoints, if any, are not considered", root, why)
        return []
    if any(e.name == MANIFEST for e in top) or STEP_DIR.match(posixpath.basename(root)):
        return [inspect(root, store=store)]
    paths = _candidates(store, root, top, node_rank() if rank is None else rank)
    if not paths and any(e.name in HF_WEIGHTS and e.is_file for e in top) and not _holds_checkpoints(store, root, top):
        return [inspect(root, store=store, named=True)]  # a plain model folder with no checkpoint under it
    if own:
        paths = [c for c in paths if posixpath.dirname(c) == root]
    infos = [inspect(c, store=store) for c in paths]
    infos.sort(key=lambda i: (i.step, i.kind == "btckpt", i.created), reverse=True)
    return infos


# -- verification and selection ------------------------------------------------------------------------------
def _checksum(info: CheckpointInfo, name: str) -> tuple[int, str]:
    """``(size, xxh3-64)`` of the listed file ``name``, read once in chunks; a CheckpointError naming it."""
    try:
        return file_checksum(name, opener=lambda n: info.store.open(info.path, n))
    except OSError as exc:
        raise read_error(info.store.where(info.path, name), exc) from None


def verify(info: CheckpointInfo) -> list[str]:
    """Check every listed file's kind, size and xxh3-64 against the manifest; the problems, each naming its
    file (empty when sound). Local folders and URLs alike.

    What ``btckpt verify`` reports, the check :func:`verified` applies when a resume is chosen, and what the
    test suites call.
    """
    if info.manifest is None:
        if info.kind == "hf" and info.status != "corrupt":
            return ["no manifest: a plain model folder has no checksums to verify"]
        return [f"{info.status}: {info.reason}"]
    problems = []
    for name, entry in info.manifest.files.items():
        try:
            size, digest = _checksum(info, name)
        except IncompleteCheckpoint:
            problem: str | None = f"{name}: missing"
        except CheckpointError as exc:
            problem = f"{name}: {exc}"
        else:
            problem = entry_problem(name, size, digest, entry)
        if problem:
            problems.append(problem)
    if not problems and not info.complete:  # e.g. the folder's name and the manifest disagree on the step
        problems = [f"{info.status}: {info.reason}"]
    return problems


def verified(info: CheckpointInfo) -> CheckpointInfo:
    """``info`` when its files match the manifest (a plain model folder has nothing to check), else raises
    :class:`CorruptCheckpoint` naming each bad file. The check :func:`select` applies for entry points that
    hand a path on (HF, Lightning, ``latest``, the CLI) rather than reading the checkpoint themselves."""
    if info.kind == "hf" and info.manifest is None:
        return info
    problems = verify(info)
    if problems:
        raise CorruptCheckpoint(f"{info.where}: " + "; ".join(problems))
    return info


def retired(info: CheckpointInfo) -> bool:
    """Whether ``info``'s folder no longer holds the checkpoint ``info`` describes: renamed away (retention and
    every deletion rename a checkpoint away before its files go) or replaced by another checkpoint of that name.
    A read of it that failed then says nothing about its bytes: the reader looks again (re-scans); it reports
    no damage. A folder still there with the same manifest was not retired (its failure is damage)."""
    if info.store.list(info.path) is None:
        return True
    if info.manifest is None:
        return False
    try:
        now = Manifest.from_json(info.store.get(info.path, MANIFEST, limit=MAX_MANIFEST),
                                 where=info.store.where(info.path, MANIFEST))
    except CheckpointError:
        return info.store.list(info.path) is None  # gone meanwhile, or a damaged manifest (not retired)
    return now != info.manifest


def check(info: CheckpointInfo) -> list[str] | None:
    """:func:`verify`'s problems, or None when ``info`` was retired while it was read (:func:`retired`): then
    there is nothing to report about it, and a reader of a running job's folder looks again. What ``btckpt
    verify`` reports for each checkpoint it checks."""
    problems = verify(info)
    return None if problems and retired(info) else problems


def resume_candidates(dir: str | os.PathLike[str] | None, load_dir: str | os.PathLike[str] | None, *,
                      rank: int | None = None) -> list[CheckpointInfo]:
    """Every checkpoint a (re)started job may resume from, in order of preference, damaged ones included:
    its own (``checkpoint-<N>`` directly under ``dir``) newest first, then ``load_dir``'s (any layout)."""
    own = scan(dir, rank=rank, own=True) if dir is not None else []
    return own + (scan(load_dir, rank=rank) if load_dir else [])


def select(candidates: Iterable[CheckpointInfo], attempt: Callable[[CheckpointInfo], T], *,
           rescan: Callable[[], Iterable[CheckpointInfo]] | None = None) -> tuple[CheckpointInfo, T] | None:
    """The first candidate that is complete and for which ``attempt`` (a check, or a verified read) succeeds,
    with what ``attempt`` returned; None when there is none.

    Incomplete or corrupt candidates, and those ``attempt`` rejects with a :class:`CheckpointError`, are
    skipped with a warning naming the folder and the file, and the next one (the next copy of the same step,
    else an older step: the order is the caller's) is tried. A candidate the caller's state does not fit
    (:class:`StateMismatch`) is skipped too (a re-signed checkpoint may lie about shapes), but if no candidate
    is chosen the first such mismatch is raised: the state, not the checkpoints, is then the likely problem,
    and returning None would silently start from scratch. Errors about the caller's setup
    (:class:`ConfigError`, :class:`CoordinationError`) propagate at once.

    ``rescan`` (the caller's listing, e.g. :meth:`btckpt.restore.policy.ResumePolicy.candidates`): a candidate
    retired while it was being read or listed (:func:`retired`: a running job's retention) is not damage; the
    candidates are listed again and tried from the newest (at most :data:`RESCANS` times).
    """
    mismatch: StateMismatch | None = None
    for _ in range(RESCANS + 1):
        gone: CheckpointInfo | None = None
        for info in candidates:
            if info.status == "newer":
                log.warning("btckpt: skipping %s, falling back to an older checkpoint: %s", info.where, info.reason)
                continue
            if not info.complete:
                if rescan is not None and retired(info):
                    gone = info
                    break
                log.warning("btckpt: skipping %s (%s%s)", info.where, info.status,
                            f": {info.reason}" if info.reason else "")
                continue
            try:
                return info, attempt(info)
            except (ConfigError, CoordinationError):
                raise
            except StateMismatch as exc:
                mismatch = mismatch or exc
                log.warning("btckpt: %s does not fit the state, trying the next copy or an older checkpoint: %s",
                            info.where, exc)
            except CheckpointError as exc:
                if rescan is not None and retired(info):
                    gone = info
                    break
                log.warning("btckpt: %s is damaged, trying the next copy or an older checkpoint: %s",
                            info.where, exc)
        if gone is None or rescan is None:
            break
        log.info("btckpt: %s was retired while being read; looking again", gone.where)
        candidates = rescan()
    if mismatch is not None:
        raise mismatch
    return None


def nothing_to_resume(dir: str | os.PathLike[str] | None, load_dir: str | os.PathLike[str] | None,
                      on_missing: str) -> None:
    """Called when no checkpoint was chosen: raises :class:`NoCheckpointFound` if ``load_dir`` is set (a
    resume was asked for) and ``on_missing`` is ``"raise"``; returns (start fresh) otherwise."""
    if on_missing not in ("raise", "start_fresh"):
        raise ConfigError(f"on_missing={on_missing!r}: use 'raise' or 'start_fresh'")
    if not load_dir:
        return
    if on_missing == "raise":
        why = None if is_url(os.fspath(load_dir)) else unreadable(os.fspath(load_dir))
        if why:
            raise NoCheckpointFound(
                f"$BT_LOAD_CHECKPOINT_DIR / load_dir {os.fspath(load_dir)!r} cannot be read ({why}), and "
                f"{os.fspath(dir) if dir is not None else 'the checkpoint dir'} has no checkpoint either. Give this "
                f"job (uid {os.geteuid()}) read access to it, or point load_dir at a readable copy")
        raise NoCheckpointFound(
            f"$BT_LOAD_CHECKPOINT_DIR / load_dir {os.fspath(load_dir)!r} holds no complete, verified checkpoint "
            f"and {os.fspath(dir) if dir is not None else 'the checkpoint dir'} has none either (damaged ones "
            "are named in the warnings above), so this run would silently start from scratch. Check the "
            "load-checkpoint config, or pass on_missing='start_fresh' to train from scratch")
    log.warning("btckpt: load_dir %s holds no complete checkpoint; starting fresh (on_missing='start_fresh')",
                os.fspath(load_dir))


def same_run(info: CheckpointInfo, run: str | None) -> bool:
    """Whether ``info`` may belong to the run ``run``: no identity on either side, or the same one."""
    theirs = info.manifest.run if info.manifest is not None else None
    return run is None or theirs is None or theirs == run
