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
from .errors import CorruptCheckpoint, IncompleteCheckpoint
from .layout import ST_TO_DTYPE
from .manifest import (
    Manifest,
    check_relative_name,
    member_path,
    open_member,
    read_error,
    read_member,
    read_upto,
    verify_files,
)
from .sthead import Header, read_header
from .storage import CHECKSUM, new_hasher

__all__ = ["CheckpointReader", "safe_file", "read_safetensors", "read_verified_bytes"]

READ_CHUNK = 64 << 20
MAX_INDEX = 256 * 1024 * 1024


safe_file = member_path  # ``folder/name``, refusing names and links that leave the folder


def read_safetensors(folder: Path, name: str, *, expect: dict[str, Any] | None
                     ) -> tuple[Header, dict[str, torch.Tensor]]:
    """Read the whole safetensors file ``folder/name`` (a regular file inside the folder: see
    :func:`btckpt.manifest.open_member`); check its size and checksum against ``expect`` (its manifest entry)
    if given. Every failure is a CheckpointError naming the file."""
    path = folder / name
    where = str(path)
    with open_member(folder, name) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if expect is not None and size != expect["size"]:
                raise CorruptCheckpoint(f"{path}: size is {size} bytes, the manifest says {expect['size']}; "
                                        "the file was truncated or replaced")
            header = read_header(f, size, where=where)
            f.seek(0)
            h = new_hasher()
            h.update(read_upto(f, header.data_start, where=path))
            buf = torch.empty(header.data_size, dtype=torch.uint8)
            mv = memoryview(buf.numpy()) if header.data_size else memoryview(b"")  # type: ignore[arg-type]
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
            pos = 0
            with ThreadPoolExecutor(1, thread_name_prefix="btckpt-hash") as pool:
                hashed: list[Future[None]] = []
                while pos < len(mv):
                    n = f.readinto(mv[pos:pos + READ_CHUNK])  # type: ignore[attr-defined]
                    if not n:
                        raise CorruptCheckpoint(f"{path}: file ended early at byte {header.data_start + pos}")
                    # hash this chunk on a second thread (in order) while the next one is read
                    hashed.append(pool.submit(h.update, mv[pos:pos + n]))
                    pos += n
                for fut in hashed:
                    fut.result()
        except OSError as exc:
            raise read_error(path, exc) from None
    if expect is not None and h.hexdigest() != expect[CHECKSUM]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch ({CHECKSUM} {h.hexdigest()} != {expect[CHECKSUM]}); "
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
            _, self._files[name] = read_safetensors(self.folder, name, expect=expect)
        return self._files[name]

    def _hf_weight_files(self) -> list[str]:
        index = self.folder / "model.safetensors.index.json"
        if os.path.lexists(index):
            try:
                wm = json.loads(read_member(self.folder, index.name, limit=MAX_INDEX))["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError):
                wm = None
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
                raise CorruptCheckpoint(f"{index}: not a valid safetensors index (needs 'weight_map': an object "
                                        "mapping tensor names to file names)")
            return sorted({check_relative_name(v, where=str(index)) for v in wm.values()})
        weights = self.folder / "model.safetensors"
        return ["model.safetensors"] if os.path.lexists(weights) else []

    def tensor(self, file: str, key: str) -> torch.Tensor:
        """The tensor ``key`` of the listed file ``file`` (the file read and verified once)."""
        tensors = self._file(file)
        if key not in tensors:
            raise CorruptCheckpoint(f"{self.folder}/{file}: tensor {key!r} is missing")
        return tensors[key]

    def _chunk(self, node: int, file: str, key: str) -> torch.Tensor:
        here = self.manifest.node_rank if self.manifest is not None else 0
        if node != here:
            raise IncompleteCheckpoint(f"{self.folder}: a shard lives in node {node}'s part of this checkpoint; "
                                       "read it with btckpt.dcp_bridge (every node's part side by side)")
        return self.tensor(file, key)

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

        def load(ref: Any) -> torch.Tensor:  # references were checked when the manifest was parsed
            if "sharded" in ref:  # saved by every rank (FSDP2)
                from .sharded import assemble

                return assemble(ref["sharded"], self._chunk, where=str(self.folder))
            return self.tensor(ref["file"], ref["key"])

        return decode_tree(self.manifest.state[group], load)

    def verify_all(self) -> list[str]:
        """Check every listed file's kind, size and checksum; return problems (empty when sound)."""
        if self.manifest is None:
            return ["no manifest (a plain model folder cannot be verified)"]
        return verify_files(self.folder, self.manifest)


def read_verified_bytes(folder: Path, manifest: Manifest, name: str) -> bytes:
    """Read a small listed file (JSON state, index) and check it against the manifest."""
    info = manifest.files.get(name)
    if info is None:
        raise IncompleteCheckpoint(f"{folder}: the manifest does not list {name!r}")
    data = read_member(folder, name, limit=info["size"])
    h = new_hasher()
    h.update(data)
    if len(data) != info["size"] or h.hexdigest() != info[CHECKSUM]:
        raise CorruptCheckpoint(f"{folder / name}: size or checksum does not match the manifest; the file is corrupt")
    return data
