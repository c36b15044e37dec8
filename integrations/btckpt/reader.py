"""Read a committed checkpoint: verify checksums, parse safetensors safely, build tensors.

Never unpickles: tensors come from safetensors data sections, everything else from JSON. Every file
is read in one sequential pass into one buffer while a second thread checksums what was read; tensors are views of
that buffer (no second copy before ``load_state_dict``).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ._tree import decode_tree
from .errors import CorruptCheckpoint, IncompleteCheckpoint, UnsafeCheckpoint
from .layout import ST_TO_DTYPE
from .manifest import Manifest, check_relative_name, entry_problem
from .sthead import Header, read_header
from .storage import new_hasher

__all__ = ["CheckpointReader", "safe_file", "read_safetensors", "read_verified_bytes"]

READ_CHUNK = 64 << 20


def safe_file(folder: Path, name: str) -> Path:
    """Resolve ``folder/name`` and refuse anything that leaves the folder (links included)."""
    check_relative_name(name, where=str(folder))
    root = folder.resolve()
    path = (folder / name)
    real = path.resolve()
    if root != real and root not in real.parents:
        raise UnsafeCheckpoint(f"{path}: resolves to {real}, outside the checkpoint folder {root}; refusing "
                               "to read it (a link out of the folder)")
    return path


def read_safetensors(path: Path, *, expect: dict[str, Any] | None) -> tuple[Header, dict[str, torch.Tensor]]:
    """Read a whole safetensors file; check size and checksum against ``expect`` (manifest entry) if given."""
    where = str(path)
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{path}: file is missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if expect is not None and size != expect["size"]:
            raise CorruptCheckpoint(f"{path}: size is {size} bytes, the manifest says {expect['size']}; "
                                    "the file was truncated or replaced")
        header = read_header(f, size, where=where)
        f.seek(0)
        h = new_hasher()
        head = f.read(header.data_start)
        h.update(head)
        buf = torch.empty(header.data_size, dtype=torch.uint8)
        mv = memoryview(buf.numpy()) if header.data_size else memoryview(b"")  # type: ignore[arg-type]
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
        pos = 0
        with ThreadPoolExecutor(1, thread_name_prefix="btckpt-hash") as pool:
            hashed: list[Future[None]] = []
            while pos < len(mv):
                n = f.readinto(mv[pos:pos + READ_CHUNK])
                if not n:
                    raise CorruptCheckpoint(f"{path}: file ended early at byte {header.data_start + pos}")
                # hash this chunk on a second thread (in order) while the next one is read
                hashed.append(pool.submit(h.update, mv[pos:pos + n]))
                pos += n
            for fut in hashed:
                fut.result()
    if expect is not None and h.hexdigest() != expect["xxh3_64"]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (xxh3_64 {h.hexdigest()} != {expect['xxh3_64']}); "
                                "the file is corrupt")
    tensors = {}
    for e in header.entries:
        dtype = ST_TO_DTYPE.get(e.dtype)
        if dtype is None:
            raise CorruptCheckpoint(f"{path}: tensor {e.name!r} has dtype {e.dtype}, unknown to this torch build")
        raw = buf[e.begin:e.end]
        isz = torch.empty((), dtype=dtype).element_size()
        if e.begin % isz:
            raw = raw.clone()  # foreign file with unaligned data: copy to an aligned buffer
        tensors[e.name] = raw.view(dtype).view(e.shape)
    return header, tensors


class CheckpointReader:
    """Reads one checkpoint folder. ``manifest`` is None for a plain HF model folder (weights only)."""

    def __init__(self, folder: str | os.PathLike[str], manifest: Manifest | None) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self._files: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def groups(self) -> list[str]:
        if self.manifest is None:
            return ["model"] if self._hf_weight_files() else []
        return list(self.manifest.state)

    def _file(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._files:
            expect = None
            if self.manifest is not None:
                expect = self.manifest.files.get(name)
                if expect is None:
                    raise CorruptCheckpoint(f"{self.folder}: the state references {name!r}, which the manifest "
                                            "does not list")
            _, self._files[name] = read_safetensors(safe_file(self.folder, name), expect=expect)
        return self._files[name]

    def _hf_weight_files(self) -> list[str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CorruptCheckpoint(f"{index}: not a valid safetensors index (needs 'weight_map')") from None
            return sorted({check_relative_name(v, where=str(index)) for v in wm.values()})
        return ["model.safetensors"] if (self.folder / "model.safetensors").is_file() else []

    def _chunk(self, node: int, file: str, key: str) -> torch.Tensor:
        here = int(self.manifest.world.get("node_rank", 0)) if self.manifest is not None else 0
        if node != here:
            raise IncompleteCheckpoint(f"{self.folder}: a shard lives in node {node}'s part of this checkpoint; "
                                       "read it with btckpt.dcp_bridge (every node's part side by side)")
        tensors = self._file(file)
        if key not in tensors:
            raise CorruptCheckpoint(f"{self.folder}/{file}: tensor {key!r} is missing")
        return tensors[key]

    def load_group(self, group: str) -> Any:
        """The group's value as saved: JSON data with tensors (checksums verified as files are read)."""
        if self.manifest is None:
            if group != "model":
                raise IncompleteCheckpoint(f"{self.folder}: a plain model folder holds only 'model' weights, "
                                           f"not {group!r}")
            out: dict[str, torch.Tensor] = {}
            for name in self._hf_weight_files():
                out.update(self._file(name))
            return out
        if group not in self.manifest.state:
            raise IncompleteCheckpoint(f"{self.folder}: the checkpoint has no group {group!r} "
                                       f"(it has {sorted(self.manifest.state)})")

        def load(ref: Any) -> torch.Tensor:
            if isinstance(ref, dict) and isinstance(ref.get("sharded"), dict):  # saved by every rank (FSDP2)
                from .sharded import assemble

                return assemble(ref["sharded"], self._chunk)
            if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or "key" not in ref:
                raise CorruptCheckpoint(f"{self.folder}: bad tensor reference {ref!r} in group {group!r}")
            tensors = self._file(ref["file"])
            if ref["key"] not in tensors:
                raise CorruptCheckpoint(f"{self.folder}/{ref['file']}: tensor {ref['key']!r} is missing")
            return tensors[ref["key"]]

        return decode_tree(self.manifest.state[group], load)

    def verify_all(self) -> list[str]:
        """Check every listed file's size and checksum; return problems (empty when sound)."""
        from .storage import file_checksum

        if self.manifest is None:
            return ["no manifest (a plain model folder cannot be verified)"]
        problems = []
        for name, info in self.manifest.files.items():
            try:
                path = safe_file(self.folder, name)
                size, digest = file_checksum(path)
            except FileNotFoundError:
                problems.append(f"{name}: missing")
                continue
            except (UnsafeCheckpoint, OSError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            problem = entry_problem(name, size, digest, info)
            if problem:
                problems.append(problem)
        return problems


def read_verified_bytes(folder: Path, manifest: Manifest, name: str) -> bytes:
    """Read a small listed file (JSON state, index) and check it against the manifest."""
    info = manifest.files.get(name)
    if info is None:
        raise IncompleteCheckpoint(f"{folder}: the manifest does not list {name!r}")
    path = safe_file(folder, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{path}: file is missing") from None
    h = new_hasher()
    h.update(data)
    if len(data) != info["size"] or h.hexdigest() != info["xxh3_64"]:
        raise CorruptCheckpoint(f"{path}: size or checksum does not match the manifest; the file is corrupt")
    return data
