"""Find checkpoints: every supported layout, completeness checks, newest complete first.

Torch-free. Layouts searched under a root (PLATFORM.md): the root itself being a checkpoint;
``root/checkpoint-<step>/``; ``root/rank-<node>/checkpoint-<step>/``; and
``root/<job_id>/rank-<node>/checkpoint-<step>/`` (the node rank from ``$BT_NODE_RANK``, default 0).
A checkpoint is complete when its manifest parses and every file it lists exists with its size;
checksums are checked when a checkpoint is loaded or verified.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .manifest import MANIFEST, Manifest, read_manifest

__all__ = ["CheckpointInfo", "inspect", "scan", "latest", "node_rank", "STEP_DIR"]

STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def node_rank() -> int:
    """This node's rank: ``$BT_NODE_RANK``, else 0."""
    raw = os.environ.get("BT_NODE_RANK", "0").strip() or "0"
    if not raw.isdigit():
        from .errors import ConfigError

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


def _candidates(root: Path, rank: int) -> list[Path]:
    found: list[Path] = []

    def step_dirs(d: Path) -> list[Path]:
        try:
            return [c for c in d.iterdir() if STEP_DIR.match(c.name) and c.is_dir()]
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            return []

    found += step_dirs(root)
    found += step_dirs(root / f"rank-{rank}")
    try:
        jobs = [j for j in root.iterdir() if j.is_dir() and not j.name.startswith((".", "checkpoint-", "rank-"))]
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        jobs = []
    for job in jobs:
        found += step_dirs(job / f"rank-{rank}")
    return found


def scan(path: str | os.PathLike[str], *, rank: int | None = None) -> list[CheckpointInfo]:
    """All checkpoint folders under ``path`` in every supported layout, newest first (complete or not).

    ``path`` may be an fsspec URL (``s3://...``): then :func:`btckpt.remote.scan_url` does the work.
    """
    if _is_url(path):
        from .remote import scan_url

        return list(scan_url(os.fspath(path), rank=rank))
    root = Path(os.fspath(path).removeprefix("file://"))
    if not root.is_dir():
        return []
    if (root / MANIFEST).exists() or STEP_DIR.match(root.name) or any((root / n).is_file() for n in HF_WEIGHTS):
        return [inspect(root)]
    infos = [inspect(c) for c in _candidates(root, node_rank() if rank is None else rank)]
    infos.sort(key=lambda i: (i.step, i.kind == "btckpt", i.created), reverse=True)
    return infos


def latest(path: str | os.PathLike[str], *, rank: int | None = None) -> Path | str | None:
    """The newest complete checkpoint under ``path`` (any supported layout), or None.

    For an fsspec URL the answer is the checkpoint's URL (a ``str``).
    """
    if _is_url(path):
        from .remote import latest_url

        return latest_url(os.fspath(path), rank=rank)
    path = os.fspath(path).removeprefix("file://")
    for info in scan(path, rank=rank):
        if info.complete:
            return info.path
    return None


def _is_url(path: str | os.PathLike[str]) -> bool:
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")
