"""The manifest ``btckpt.json``: the commit marker inside a checkpoint folder.

Torch-free. Written last; its presence (with every file's size matching) makes a checkpoint complete.
File names it lists are validated: relative, no ``..``, no links out of the folder.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpoint, IncompleteCheckpoint, UnsafeCheckpoint, UnsupportedFormat
from .checksum import CHECKSUM, file_checksum, new_hasher
from .header import DTYPE_SIZES
from .members import (  # re-exported: the manifest's readers open files through these
    check_relative_name,
    file_kind,
    member_path,
    open_member,
    open_regular,
    read_error,
    read_member,
    read_upto,
)
from .members import short_repr as _short
from .tree import decode_tree

__all__ = ["FORMAT", "MANIFEST", "DEFAULT_MAX_SHARD_SIZE", "Manifest", "check_relative_name", "entry_problem",
           "read_manifest", "utc_now",
           "open_regular", "file_kind", "open_member",
           "member_path", "read_member", "read_upto", "read_error",
           "check_member",
           "tiling_problem", "SHARDED_META", "RUN_META"]

FORMAT = "btckpt/1"
MANIFEST = "btckpt.json"
MAX_MANIFEST = 256 * 1024 * 1024
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file before a group is split (HF's "5GB")


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a ``Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _member_problem(folder: str | os.PathLike[str], manifest: Manifest, name: str) -> str | None:
    try:
        size, digest = file_checksum(name, opener=lambda n: open_member(folder, n))
    except OSError as exc:
        raise read_error(Path(folder) / name, exc) from None
    return entry_problem(name, size, digest, manifest.files[name])


def check_member(folder: str | os.PathLike[str], manifest: Manifest, name: str) -> None:
    """Check the listed file ``name`` (kind, size, checksum; read once, in chunks); a CheckpointError
    naming the file if it differs from the manifest."""
    problem = _member_problem(folder, manifest, name)
    if problem:
        raise CorruptCheckpoint(f"{Path(folder) / problem}; the file is damaged: use an older checkpoint")


def _newer_format(fmt: Any) -> str | None:
    """``fmt`` when it names a btckpt format newer than :data:`FORMAT` (``btckpt/2``...), else None."""
    if not isinstance(fmt, str) or not fmt.startswith("btckpt/") or not (fmt[7:].isascii() and fmt[7:].isdigit()) \
            or len(fmt) > 20:
        return None
    return fmt if int(fmt[7:]) > int(FORMAT[7:]) else None


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
        # no indent: json.dumps uses its C encoder only then (10^5 tensor references: seconds vs tens of ms)
        raw = json.dumps(obj, allow_nan=False).encode()
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
        newer = _newer_format(obj.get("format"))
        if newer:  # before the fields and the checksum: a newer format may have changed either
            raise UnsupportedFormat(f"{where}: written by a newer btckpt (format {newer!r}; this btckpt reads "
                                    f"{FORMAT!r}): upgrade btckpt to load it")
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise CorruptCheckpoint(f"{where}: manifest has unknown fields {unknown}; the file is damaged or "
                                    "was written by a newer btckpt")
        if "checksum" in obj:  # absent only in manifests written by hand; then there is nothing to check
            _check_digest(raw, obj["checksum"], where=where)
        if obj.get("format") != FORMAT:
            raise CorruptCheckpoint(f"{where}: manifest format {_short(obj.get('format'))} is not {FORMAT!r}")
        step = obj.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CorruptCheckpoint(f"{where}: manifest step {_short(step)} is not a non-negative integer")
        files = obj.get("files")
        if not isinstance(files, dict):
            raise CorruptCheckpoint(f"{where}: manifest 'files' is not an object")
        for name, info in files.items():
            check_relative_name(name, where=where)
            if name == MANIFEST:
                raise UnsafeCheckpoint(f"{where}: manifest lists itself as a data file")
            if (not isinstance(info, dict) or not _is_int(info.get("size")) or info["size"] < 0
                    or not _is_digest(info.get(CHECKSUM))):
                raise CorruptCheckpoint(f"{where}: manifest entry for {name!r} lacks a size (integer) or an "
                                        f"{CHECKSUM} checksum (16 hex digits)")
        state = obj.get("state")
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"{where}: manifest 'state' is not an object")
        world = obj.get("world") or {}
        if not isinstance(world, dict) or not all(_is_int(world.get(k, lo)) and world.get(k, lo) >= lo
                                                   for k, lo in (("size", 1), ("nodes", 1), ("node_rank", 0))) \
                or world.get("node_rank", 0) >= world.get("nodes", 1):
            raise CorruptCheckpoint(f"{where}: manifest 'world' {_short(world)} is not an object of non-negative "
                                    "integers size, nodes, node_rank")
        created = obj.get("created", "")
        if not isinstance(created, str):
            raise CorruptCheckpoint(f"{where}: manifest 'created' {_short(created)} is not a string")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise CorruptCheckpoint(f"{where}: manifest 'meta' {_short(meta)} is not an object")
        sharded = meta.get(SHARDED_META, {})
        if not isinstance(sharded, dict) or not all(isinstance(v, str) and v in ("model", "optimizer")
                                                    and k in state for k, v in sharded.items()):
            raise CorruptCheckpoint(f"{where}: manifest meta {SHARDED_META!r} {_short(sharded)} must map groups of "
                                    "the state to 'model' or 'optimizer'")
        run = meta.get(RUN_META)
        if run is not None and not (isinstance(run, str) and 0 < len(run) <= 256):
            raise CorruptCheckpoint(f"{where}: manifest meta {RUN_META!r} {_short(run)} is not a run identity (a "
                                    "non-empty string)")
        man = cls(step=step, files=files, state=state, world=world, created=created, meta=meta)
        for group, tree in state.items():
            try:
                decode_tree(tree, man._check_ref)
            except CorruptCheckpoint as exc:
                raise type(exc)(f"{where}: state group {group!r}: {exc}") from None
        return man

    @property
    def run(self) -> str | None:
        """The run identity the writer recorded (``meta["btckpt.run"]``), or None (written without one, or
        by a btckpt before run identities: such a checkpoint belongs to any run)."""
        value = self.meta.get(RUN_META)
        return value if isinstance(value, str) else None

    @property
    def node_rank(self) -> int:
        """The node whose part of the checkpoint this manifest describes (0 on one node)."""
        return int(self.world.get("node_rank", 0))

    def _check_ref(self, ref: Any) -> None:
        """Raise CorruptCheckpoint unless ``ref`` is a well-formed tensor reference: ``{file, key}`` naming a
        listed file, or ``{sharded: {key, shape, dtype, chunks}}`` whose chunks tile ``shape`` exactly."""
        if isinstance(ref, dict) and "sharded" in ref:
            s = ref["sharded"]
            if not (isinstance(s, dict) and isinstance(s.get("key"), str) and isinstance(s.get("dtype"), str)
                    and s["dtype"] in DTYPE_SIZES and _is_shape(s.get("shape")) and isinstance(s.get("chunks"), list)):
                raise CorruptCheckpoint(f"bad sharded tensor reference {_short(ref)} (needs key, dtype, shape, chunks)")
            nodes = int(self.world.get("nodes", 1))
            for c in s["chunks"]:
                if not (isinstance(c, dict) and isinstance(c.get("key"), str) and _is_int(c.get("node"))
                        and 0 <= c["node"] < nodes):
                    raise CorruptCheckpoint(f"tensor {s['key']!r}: bad chunk {_short(c)} (needs offsets, sizes, file, "
                                            f"key, node < {nodes})")
                self._check_file(c.get("file"), listed=c["node"] == self.node_rank)
            problem = tiling_problem(s["shape"], s["chunks"])
            if problem:
                raise CorruptCheckpoint(f"tensor {s['key']!r}: {problem}")
            return
        if not (isinstance(ref, dict) and isinstance(ref.get("key"), str)):
            raise CorruptCheckpoint(f"bad tensor reference {_short(ref)} (needs a file and a key, both strings)")
        self._check_file(ref.get("file"), listed=True)

    def _check_file(self, name: Any, *, listed: bool) -> None:
        if not isinstance(name, str):
            raise CorruptCheckpoint(f"tensor reference names the file {_short(name)}, not a string")
        check_relative_name(name, where="tensor reference")
        if listed and name not in self.files:
            raise CorruptCheckpoint(f"the state references {name!r}, which the manifest does not list")


SHARDED_META = "btckpt.sharded"
# the run identity (optional, inside ``meta``: older readers take it as they take any meta key, so the format
# stays btckpt/1): a fingerprint of what makes a run the same run, computed by the integration
RUN_META = "btckpt.run"
MAX_TILING_CELLS = 1 << 22


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_digest(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 16 and all(c in "0123456789abcdef" for c in x)


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and len(x) <= 64 and all(_is_int(v) and 0 <= v < 2**62 for v in x)


def tiling_problem(shape: list[int], chunks: list[Any]) -> str | None:
    """Why ``chunks`` (dicts with ``offsets`` and ``sizes``) do not tile ``shape`` exactly, or None.

    Exact: every chunk lies inside the shape, no element is covered twice and none is left out. The
    volumes are compared first; when they match, no overlap is the same as no hole, which is checked on
    the grid of the chunks' boundaries (one cell per chunk for the grid layouts DTensor placements make).
    """
    nd = len(shape)
    boxes: list[tuple[list[int], list[int]]] = []
    for i, c in enumerate(chunks):
        off: Any = c.get("offsets") if isinstance(c, dict) else None
        size: Any = c.get("sizes") if isinstance(c, dict) else None
        if not (_is_shape(off) and _is_shape(size) and len(off) == len(size) == nd):
            return f"chunk {i} has offsets {_short(off)} / sizes {_short(size)}, not {nd} non-negative integers each"
        if any(o + n > d for o, n, d in zip(off, size, shape, strict=True)):
            return f"chunk {i} (offsets {off}, sizes {size}) lies outside the shape {shape}"
        if math.prod(size):
            boxes.append((off, size))
    total, covered = math.prod(shape), sum(math.prod(n) for _, n in boxes)
    if covered != total:
        return (f"the chunks cover {covered} elements, the shape {shape} has {total}: they overlap or leave holes; "
                "the checkpoint is damaged (or was saved by a btckpt that misread its DTensor placements)")
    cuts = [sorted({0, shape[d]} | {o[d] for o, _ in boxes} | {o[d] + n[d] for o, n in boxes}) for d in range(nd)]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > MAX_TILING_CELLS:
        return f"the {len(boxes)} chunks form a layout too irregular to check ({cells} cells)"
    pos = [{v: i for i, v in enumerate(c)} for c in cuts]
    strides = [math.prod(len(c) - 1 for c in cuts[d + 1:]) for d in range(nd)]
    seen = bytearray(cells)
    for off, size in boxes:
        ranges = [range(pos[d][off[d]], pos[d][off[d] + size[d]]) for d in range(nd)]
        for cell in itertools.product(*ranges):
            k = sum(i * st for i, st in zip(cell, strides, strict=True))
            if seen[k]:
                at = [cuts[d][i] for d, i in enumerate(cell)]
                return (f"chunks overlap at offsets {at} (and so leave holes elsewhere); the checkpoint is damaged")
            seen[k] = 1
    return None


_ZERO = "0" * 16
_FIELDS = {"format", "step", "created", "world", "files", "state", "meta", "checksum"}


def _needle(digest: str) -> bytes:
    return b'"checksum": "' + digest.encode() + b'"'


def _digest(raw: bytes) -> str:
    h = new_hasher()
    h.update(raw)
    return str(h.hexdigest()).rjust(16, "0")


def _check_digest(raw: bytes, digest: Any, *, where: str) -> None:
    if not _is_digest(digest):
        raise CorruptCheckpoint(f"{where}: manifest checksum {_short(digest)} is malformed; the file is damaged")
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
    if digest != entry[CHECKSUM]:
        return f"{name}: checksum mismatch ({CHECKSUM} {digest} != {entry[CHECKSUM]})"
    return None


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/btckpt.json`` (local). Raises IncompleteCheckpoint when it is absent, and
    a CheckpointError naming the file for anything else (a link, a FIFO, a read error, a malformed field)."""
    path = Path(folder) / MANIFEST
    try:
        f = open_regular(path)
    except IncompleteCheckpoint:
        raise IncompleteCheckpoint(f"{folder}: no {MANIFEST}; the checkpoint never committed") from None
    with f:
        raw = read_upto(f, MAX_MANIFEST + 1, where=path)
    if len(raw) > MAX_MANIFEST:
        raise CorruptCheckpoint(f"{path}: manifest is larger than {MAX_MANIFEST} bytes")
    return Manifest.from_json(raw, where=str(path))
