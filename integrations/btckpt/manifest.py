"""The manifest ``btckpt.json``: the commit marker inside a checkpoint folder.

Torch-free. Written last; its presence (with every file's size matching) makes a checkpoint complete.
File names it lists are validated: relative, no ``..``, no links out of the folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CorruptCheckpoint, IncompleteCheckpoint, UnsafeCheckpoint

__all__ = ["FORMAT", "MANIFEST", "Manifest", "check_relative_name", "entry_problem", "read_manifest", "utc_now"]

FORMAT = "btckpt/1"
MANIFEST = "btckpt.json"
MAX_MANIFEST = 256 * 1024 * 1024


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a ``Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_relative_name(name: Any, *, where: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside the folder, else raise UnsafeCheckpoint."""
    if not isinstance(name, str) or not name:
        raise UnsafeCheckpoint(f"{where}: file name {name!r} is not a non-empty string")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ":" in p.parts[0] and len(p.parts[0]) == 2:
        raise UnsafeCheckpoint(f"{where}: file name {name!r} is absolute; manifests may only name files "
                               "inside the checkpoint folder")
    if any(part in ("..", "") for part in p.parts) or "\\" in name or "\x00" in name:
        raise UnsafeCheckpoint(f"{where}: file name {name!r} leaves the checkpoint folder")
    return name


@dataclass
class Manifest:
    """The parsed manifest. ``files`` maps relative names to ``{"size": int, "xxh3_64": hex}``."""

    step: int
    files: dict[str, dict[str, Any]]
    state: dict[str, Any]
    world: dict[str, int] = field(default_factory=lambda: {"size": 1, "nodes": 1, "node_rank": 0})
    created: str = field(default_factory=utc_now)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The manifest's bytes; the last field, ``checksum``, is the xxh3-64 of these bytes with the
        checksum's own 16 hex digits zeroed, so any change to the manifest is detected."""
        obj = {"format": FORMAT, "step": self.step, "created": self.created, "world": self.world,
               "files": self.files, "state": self.state, "meta": self.meta, "checksum": _ZERO}
        raw = json.dumps(obj, indent=1, allow_nan=False).encode()
        pos = raw.rfind(_needle(_ZERO))
        digest = _digest(raw)
        return raw[:pos] + _needle(digest) + raw[pos + len(_needle(digest)):]

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpoint(f"{where}: manifest is not valid JSON ({exc}); the checkpoint is damaged, "
                                    "use an older one or delete this folder") from None
        if not isinstance(obj, dict):
            raise CorruptCheckpoint(f"{where}: manifest is not a JSON object")
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise CorruptCheckpoint(f"{where}: manifest has unknown fields {unknown}; the file is damaged or "
                                    "was written by a newer btckpt")
        if "checksum" in obj:  # absent only in manifests written by hand; then there is nothing to check
            _check_digest(raw, obj["checksum"], where=where)
        if obj.get("format") != FORMAT:
            raise CorruptCheckpoint(f"{where}: manifest format {obj.get('format')!r} is not {FORMAT!r}")
        step = obj.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CorruptCheckpoint(f"{where}: manifest step {step!r} is not a non-negative integer")
        files = obj.get("files")
        if not isinstance(files, dict):
            raise CorruptCheckpoint(f"{where}: manifest 'files' is not an object")
        for name, info in files.items():
            check_relative_name(name, where=where)
            if name == MANIFEST:
                raise UnsafeCheckpoint(f"{where}: manifest lists itself as a data file")
            if (not isinstance(info, dict) or not isinstance(info.get("size"), int) or info["size"] < 0
                    or not isinstance(info.get("xxh3_64"), str)):
                raise CorruptCheckpoint(f"{where}: manifest entry for {name!r} lacks a size or checksum")
        state = obj.get("state")
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"{where}: manifest 'state' is not an object")
        world = obj.get("world") or {}
        if not isinstance(world, dict):
            raise CorruptCheckpoint(f"{where}: manifest 'world' is not an object")
        return cls(step=step, files=files, state=state, world=world, created=str(obj.get("created", "")),
                   meta=obj.get("meta") or {})


_ZERO = "0" * 16
_FIELDS = {"format", "step", "created", "world", "files", "state", "meta", "checksum"}


def _needle(digest: str) -> bytes:
    return b'"checksum": "' + digest.encode() + b'"'


def _digest(raw: bytes) -> str:
    import xxhash

    return xxhash.xxh3_64(raw).hexdigest().rjust(16, "0")


def _check_digest(raw: bytes, digest: Any, *, where: str) -> None:
    if not isinstance(digest, str) or len(digest) != 16 or any(c not in "0123456789abcdef" for c in digest):
        raise CorruptCheckpoint(f"{where}: manifest checksum {digest!r} is malformed; the file is damaged")
    pos = raw.rfind(_needle(digest))
    if pos < 0:
        raise CorruptCheckpoint(f"{where}: manifest checksum field is not where btckpt writes it; the file "
                                "was damaged or rewritten")
    zeroed = raw[:pos] + _needle(_ZERO) + raw[pos + len(_needle(_ZERO)):]
    if _digest(zeroed) != digest:
        raise CorruptCheckpoint(f"{where}: manifest checksum mismatch; the manifest was damaged or edited. "
                                "Use an older checkpoint or delete this folder")


def entry_problem(name: str, size: int, digest: str, entry: dict[str, Any]) -> str | None:
    """How a file read back (``size``, xxh3-64 ``digest``) differs from its manifest ``entry``, or None."""
    if size != entry["size"]:
        return f"{name}: size {size} != {entry['size']} (truncated or replaced)"
    if digest != entry["xxh3_64"]:
        return f"{name}: checksum mismatch (xxh3_64 {digest} != {entry['xxh3_64']})"
    return None


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/btckpt.json`` (local). Raises IncompleteCheckpoint when it is absent."""
    path = Path(folder) / MANIFEST
    try:
        if path.is_symlink():
            raise UnsafeCheckpoint(f"{path}: the manifest is a symbolic link; refusing to follow it")
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{folder}: no {MANIFEST}; the checkpoint never committed") from None
    except IsADirectoryError:
        raise CorruptCheckpoint(f"{path}: is a directory, not a manifest") from None
    if len(raw) > MAX_MANIFEST:
        raise CorruptCheckpoint(f"{path}: manifest is larger than {MAX_MANIFEST} bytes")
    return Manifest.from_json(raw, where=str(path))
