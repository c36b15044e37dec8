"""Find checkpoints and choose the one to resume: every supported layout, completeness, verification.

Torch-free. Layouts searched under a root (PLATFORM.md): the root itself being a checkpoint;
``root/checkpoint-<step>/``; ``root/rank-<node>/checkpoint-<step>/``; and
``root/<job_id>/rank-<node>/checkpoint-<step>/`` (the node rank from ``$BT_NODE_RANK``, default 0).
A folder with ``checkpoint-<N>`` children in any of these layouts is a folder of checkpoints, whatever
else lies at its top; a plain HF model folder at the top counts (as a weights-only warm start) only
when there is none. A writer's *own* checkpoints are the ``checkpoint-<N>`` folders directly under its dir.
A checkpoint is complete when its manifest parses and every file it lists is a regular file of its size;
checksums are checked when a checkpoint is loaded or verified (:func:`verify`).

Selection, the one rule every entry point follows (the Checkpointer, ``btckpt.load``/``latest``, HF's
``resume_checkpoint``, Lightning's ``resume_path``, the CLI): :func:`resume_candidates` orders the own dir's
checkpoints, newest first, then the load dir's; :func:`select` takes the first that is complete and passes
a check (checksums, or a verified read), skipping each damaged one with a warning that names it;
:func:`nothing_to_resume` raises :class:`NoCheckpointFound` when a load dir was set and nothing was chosen.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import (
    CheckpointError,
    ConfigError,
    CoordinationError,
    CorruptCheckpoint,
    NoCheckpointFound,
    StateMismatch,
)
from .manifest import MANIFEST, Manifest, file_kind, read_manifest, verify_files

__all__ = ["CheckpointInfo", "inspect", "scan", "latest", "node_rank", "STEP_DIR", "resume_candidates", "select",
           "verify", "verified", "nothing_to_resume", "choose"]

log = logging.getLogger("btckpt")
T = TypeVar("T")

STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def node_rank() -> int:
    """This node's rank: ``$BT_NODE_RANK``, else 0."""
    raw = os.environ.get("BT_NODE_RANK", "0").strip() or "0"
    if not raw.isdigit():
        raise ConfigError(f"BT_NODE_RANK={raw!r} is not a non-negative integer; unset it or fix the value")
    return int(raw)


@dataclass
class CheckpointInfo:
    """A checkpoint folder found on disk and what state it is in.

    ``status``: ``complete`` (manifest and all files present), ``incomplete`` (never committed or files
    missing) or ``corrupt`` (manifest malformed or unsafe). ``kind``: ``btckpt`` or ``hf`` (a plain HF
    model folder without a manifest, usable as a weights-only warm start).
    """

    path: Path
    step: int
    status: str
    kind: str
    manifest: Manifest | None
    size: int
    created: str
    reason: str = ""

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def _step_of(path: Path, manifest: Manifest | None) -> int:
    m = STEP_DIR.match(path.name)
    if m:
        return int(m.group(1))
    return manifest.step if manifest else 0


def inspect(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Classify one folder (does not read data, only the manifest and file sizes)."""
    p = Path(path)
    if not (p / MANIFEST).exists() and not (p / MANIFEST).is_symlink():
        traces = _btckpt_traces(p)
        if traces:  # written by btckpt, so not a plain HF folder: its manifest is gone
            return CheckpointInfo(p, _step_of(p, None), "incomplete", "btckpt", None, 0, "",
                                  f"no {MANIFEST} (deleted, or never written) although btckpt wrote "
                                  f"{', '.join(traces[:3])}; not loading it")
        hf = any((p / n).is_file() for n in HF_WEIGHTS) and (p / "config.json").is_file()
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else 0
        created = ""
        if hf:
            import datetime as dt

            created = dt.datetime.fromtimestamp(p.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return CheckpointInfo(p, _step_of(p, None), "complete" if hf else "incomplete", "hf" if hf else "btckpt",
                              None, size, created, "" if hf else f"no {MANIFEST}: never committed")
    try:
        man = read_manifest(p)
    except CheckpointError as exc:
        return CheckpointInfo(p, _step_of(p, None), "corrupt", "btckpt", None, 0, "", str(exc))
    root = p.resolve()
    for name, info in man.files.items():
        f = p / name
        try:
            st = f.lstat()
            if f.is_symlink():
                real = f.resolve()
                if root not in real.parents:
                    return CheckpointInfo(p, _step_of(p, man), "corrupt", "btckpt", man, man.total_bytes, man.created,
                                          f"{name} links outside the folder")
                st = real.stat()
        except FileNotFoundError:
            return CheckpointInfo(p, _step_of(p, man), "incomplete", "btckpt", man, man.total_bytes, man.created,
                                  f"{name} is missing")
        except (OSError, RuntimeError) as exc:  # a link loop, EIO, EACCES: damaged, never a crash
            return CheckpointInfo(p, _step_of(p, man), "corrupt", "btckpt", man, man.total_bytes, man.created,
                                  f"{name} cannot be examined ({exc})")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or lie: never opened
            return CheckpointInfo(p, _step_of(p, man), "corrupt", "btckpt", man, man.total_bytes, man.created,
                                  f"{name} is not a regular file but {file_kind(st.st_mode)}")
        if st.st_size != info["size"]:
            return CheckpointInfo(p, _step_of(p, man), "incomplete", "btckpt", man, man.total_bytes, man.created,
                                  f"{name} is {st.st_size} bytes, the manifest says {info['size']}")
    if STEP_DIR.match(p.name) and int(STEP_DIR.match(p.name).group(1)) != man.step:  # type: ignore[union-attr]
        return CheckpointInfo(p, _step_of(p, man), "corrupt", "btckpt", man, man.total_bytes, man.created,
                              f"folder name says step {p.name[11:]}, manifest says {man.step}")
    return CheckpointInfo(p, man.step, "complete", "btckpt", man, man.total_bytes, man.created)


_BTCKPT_ONLY = re.compile(r"^(rng_state_\d+\.json|(?!model|adapter_model)[A-Za-z0-9_][A-Za-z0-9_.-]*"
                          r"\.safetensors(\.index\.json)?)$")


def _btckpt_traces(p: Path) -> list[str]:
    """Files only btckpt writes (per-rank RNG JSON, tensor groups other than the model's)."""
    try:
        return sorted(f.name for f in p.iterdir() if _BTCKPT_ONLY.match(f.name))
    except OSError:
        return []


def _step_dirs(d: Path) -> list[Path]:
    try:
        return [c for c in d.iterdir() if STEP_DIR.match(c.name) and c.is_dir()]
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        return []


def _candidates(root: Path, rank: int) -> list[Path]:
    found = _step_dirs(root) + _step_dirs(root / f"rank-{rank}")
    try:
        jobs = [j for j in root.iterdir() if j.is_dir() and not j.name.startswith((".", "checkpoint-", "rank-"))]
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        jobs = []
    for job in jobs:
        found += _step_dirs(job / f"rank-{rank}")
    return found


def _holds_checkpoints(root: Path) -> bool:
    """Whether ``root`` has a ``checkpoint-<N>`` folder in any supported layout, for any node rank."""
    return any(STEP_DIR.match(c.name) and c.is_dir() for pattern in ("*", "rank-*/*", "*/rank-*/*")
               for c in root.glob(pattern))


def scan(path: str | os.PathLike[str], *, rank: int | None = None, own: bool = False) -> list[CheckpointInfo]:
    """All checkpoint folders under ``path`` in every supported layout, newest first (complete or not).

    ``own``: only this writer's own checkpoints, the ``checkpoint-<N>`` folders directly under ``path``
    (or ``path`` itself when it is a checkpoint or a plain model folder without checkpoints under it).
    ``path`` may be an fsspec URL (``s3://...``): then :func:`btckpt.remote.scan_url` does the work.
    """
    if _is_url(path):
        from .remote import scan_url
        from .storage import remote_fs

        found = list(scan_url(os.fspath(path), rank=rank))
        if own:
            base = remote_fs(os.fspath(path))[1].rstrip("/")
            found = [i for i in found if str(i.path) == base or str(i.path.parent) == base]
        return found  # type: ignore[return-value]
    root = Path(os.fspath(path).removeprefix("file://"))
    if not root.is_dir():
        return []
    if (root / MANIFEST).exists() or STEP_DIR.match(root.name):
        return [inspect(root)]
    paths = _candidates(root, node_rank() if rank is None else rank)
    if not paths and any((root / n).is_file() for n in HF_WEIGHTS) and not _holds_checkpoints(root):
        return [inspect(root)]  # a plain model folder with no checkpoint under it (any layout, any rank)
    if own:
        paths = [c for c in paths if c.parent == root]
    infos = [inspect(c) for c in paths]
    infos.sort(key=lambda i: (i.step, i.kind == "btckpt", i.created), reverse=True)
    return infos


# -- verification and selection ------------------------------------------------------------------------------
def verify(info: CheckpointInfo) -> list[str]:
    """Check every listed file's size and xxh3-64 against the manifest; the problems (empty when sound).

    What ``btckpt verify`` reports, and the check :func:`verified` applies when a resume is chosen.
    """
    if info.manifest is None:
        if info.kind == "hf" and info.status != "corrupt":
            return ["no manifest: a plain model folder has no checksums to verify"]
        return [f"{info.status}: {info.reason}"]
    if hasattr(info, "url"):
        from .remote import verify_url

        return verify_url(info)  # type: ignore[arg-type]
    problems = verify_files(info.path, info.manifest)  # each problem names its file
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
        where = getattr(info, "url", "") or str(info.path)
        raise CorruptCheckpoint(f"{where}: " + "; ".join(problems))
    return info


def resume_candidates(dir: str | os.PathLike[str] | None, load_dir: str | os.PathLike[str] | None, *,
                      rank: int | None = None) -> list[CheckpointInfo]:
    """Every checkpoint a (re)started job may resume from, in order of preference, damaged ones included:
    its own (``checkpoint-<N>`` directly under ``dir``) newest first, then ``load_dir``'s (any layout)."""
    own = scan(dir, rank=rank, own=True) if dir is not None else []
    return own + (scan(load_dir, rank=rank) if load_dir else [])


def select(candidates: Iterable[CheckpointInfo], attempt: Callable[[CheckpointInfo], T]
           ) -> tuple[CheckpointInfo, T] | None:
    """The first candidate that is complete and for which ``attempt`` (a check, or a verified read) succeeds,
    with what ``attempt`` returned; None when there is none.

    Incomplete or corrupt candidates, and those ``attempt`` rejects with a :class:`CheckpointError`, are
    skipped with a warning naming the folder and the file, and the next (older) one is tried. A candidate the
    caller's state does not fit (:class:`StateMismatch`) is skipped too (a re-signed checkpoint may lie about
    shapes), but if no candidate is chosen the first such mismatch is raised: the state, not the checkpoints,
    is then the likely problem, and returning None would silently start from scratch. Errors about the
    caller's setup (:class:`ConfigError`, :class:`CoordinationError`) propagate at once.
    """
    mismatch: StateMismatch | None = None
    for info in candidates:
        if not info.complete:
            log.warning("btckpt: skipping %s (%s%s)", getattr(info, "url", "") or info.path, info.status,
                        f": {info.reason}" if info.reason else "")
            continue
        try:
            return info, attempt(info)
        except (ConfigError, CoordinationError):
            raise
        except StateMismatch as exc:
            mismatch = mismatch or exc
            log.warning("btckpt: %s does not fit the state, trying an older checkpoint: %s",
                        getattr(info, "url", "") or info.path, exc)
        except CheckpointError as exc:
            log.warning("btckpt: %s is damaged, falling back to an older checkpoint: %s",
                        getattr(info, "url", "") or info.path, exc)
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
        raise NoCheckpointFound(
            f"$BT_LOAD_CHECKPOINT_DIR / load_dir {os.fspath(load_dir)!r} holds no complete, verified checkpoint "
            f"and {os.fspath(dir) if dir is not None else 'the checkpoint dir'} has none either (damaged ones "
            "are named in the warnings above), so this run would silently start from scratch. Check the "
            "load-checkpoint config, or pass on_missing='start_fresh' to train from scratch")
    log.warning("btckpt: load_dir %s holds no complete checkpoint; starting fresh (on_missing='start_fresh')",
                os.fspath(load_dir))


def choose(dir: str | os.PathLike[str] | None, load_dir: str | os.PathLike[str] | None, *,
           on_missing: str = "raise", accept: Callable[[CheckpointInfo], bool] | None = None,
           rank: int | None = None) -> CheckpointInfo | None:
    """The checkpoint to resume from, checksums verified: :func:`resume_candidates` (the complete ones only
    if ``accept`` takes them; the others are named as skipped), through :func:`select` with :func:`verified`;
    None, or :class:`NoCheckpointFound` (see :func:`nothing_to_resume`), when there is none."""
    cands = [i for i in resume_candidates(dir, load_dir, rank=rank)
             if accept is None or not i.complete or accept(i)]
    found = select(cands, verified)
    if found is None:
        nothing_to_resume(dir, load_dir, on_missing)
        return None
    return found[0]


def latest(path: str | os.PathLike[str], *, rank: int | None = None) -> Path | str | None:
    """The newest complete and verified checkpoint at or under ``path`` (any supported layout), or None.

    Damaged ones are skipped with a warning (:func:`select`); checksums are checked, so this reads the
    files of the checkpoints it tries. For an fsspec URL the answer is the checkpoint's URL (a ``str``).
    """
    found = select(scan(path, rank=rank), verified)
    if found is None:
        return None
    info = found[0]
    return getattr(info, "url", "") or info.path


def _is_url(path: str | os.PathLike[str]) -> bool:
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")
