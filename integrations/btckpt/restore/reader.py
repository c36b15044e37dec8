"""Read a committed checkpoint: verify checksums, parse safetensors safely, build tensors.

Never unpickles: tensors come from safetensors data sections, everything else from JSON. Every file
is read once, straight into one fresh buffer (:func:`staging_buffer`: huge pages; a few threads ``pread``
successive spans), and checksummed in file order as the spans land; tensors are views of that buffer (no second
copy before ``load_state_dict``).

Why not read straight into the live parameters (one pass instead of read + ``load_state_dict``'s copy): the
restore's contract is that every byte is verified before anything is applied, so a damaged file must leave the
state untouched and fall back to an older checkpoint. Reading into the parameters would need a copy of their
old values first: the same fresh memory and the same pass over it as this buffer, which is what costs (its
page faults; the copy into the parameters is ~0.1 s per GiB, see ``benchmarks/bench_read_path.py``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..distributed.shards import assemble
from ..errors import CorruptCheckpoint, IncompleteCheckpoint
from ..format.checksum import CHECKSUM, new_hasher
from ..format.header import MAX_HEADER, Header, parse_header
from ..format.layout import ST_TO_DTYPE
from ..format.manifest import (
    Manifest,
    check_relative_name,
    member_path,
    open_member,
    read_error,
    read_manifest,
    read_member,
    read_upto,
)
from ..format.tree import decode_tree

__all__ = ["CheckpointReader", "NodeParts", "part_folder", "safe_file", "read_header", "read_safetensors",
           "read_verified_bytes"]

READ_CHUNK = 16 << 20  # one pread per span
READ_THREADS = 4  # spans in flight at once
MAX_INDEX = 256 * 1024 * 1024
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and arm64 (4 KiB base pages)


safe_file = member_path  # ``folder/name``, refusing names and links that leave the folder


def staging_buffer(n: int) -> torch.Tensor:
    """A fresh ``uint8`` tensor of ``n`` bytes to read a file into: for ``n`` of a huge page or more, an anonymous
    mapping advised ``MADV_HUGEPAGE``, so the first touch of each 2 MiB costs one page fault instead of 512.

    The read's main cost on a VM: a fresh 1 GiB buffer of 4 KiB pages took 0.2-1.3 s to fault in, far more than
    the read from tmpfs (0.14 s), the checksum (0.04 s) or the copy into the parameters (0.07 s; see
    ``benchmarks/bench_read_path.py``). The tensor holds the mapping; it is unmapped with the last view.
    Falls back to ``torch.empty`` where the advice is unknown (not Linux) or refused."""
    if n < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, dtype=torch.uint8)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP disabled in this kernel: plain pages, as torch.empty would give
        pass
    return torch.frombuffer(m, dtype=torch.uint8)  # keeps ``m`` alive (and mapped) while any view lives


def _read_hashed(fd: int, mv: memoryview, base: int, h: Any, path: Path) -> None:
    """Fill ``mv`` with the file's bytes from offset ``base`` on, each byte read once, and feed them to ``h`` in
    file order. ``READ_THREADS`` threads ``pread`` successive ``READ_CHUNK`` spans into their final place
    (no staging copy; several requests in flight keep a fast disk busy, and the page faults of the fresh
    buffer are spread over cores: at 4 GiB from disk, page cache dropped, one thread took 6.8 s, four 4.6 s
    with 4 KiB pages and 2.7 s with huge pages, dd 1.8 s) while this thread hashes each span as soon as it
    and those before it landed.
    A file shorter than its header says is a CorruptCheckpoint; OSErrors propagate to the caller."""
    n = len(mv)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, base, n, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window

    def fill(pos: int, end: int) -> None:
        while pos < end:
            got = os.preadv(fd, [mv[pos:end]], base + pos)
            if not got:
                raise CorruptCheckpoint(f"{path}: file ended early at byte {base + pos}")
            pos += got

    spans = [(pos, min(pos + READ_CHUNK, n)) for pos in range(0, n, READ_CHUNK)]
    if len(spans) == 1:
        fill(0, n)
        h.update(mv)
        return
    with ThreadPoolExecutor(min(READ_THREADS, len(spans)), thread_name_prefix="btckpt-read") as pool:
        filled = [pool.submit(fill, pos, end) for pos, end in spans]
        try:
            for (pos, end), fut in zip(spans, filled, strict=True):
                fut.result()
                h.update(mv[pos:end])
        finally:
            for fut in filled:  # on an error, the spans not started yet are not read
                fut.cancel()


def read_safetensors(folder: Path, name: str, *, expect: dict[str, Any] | None
                     ) -> tuple[Header, dict[str, torch.Tensor]]:
    """Read the whole safetensors file ``folder/name`` (a regular file inside the folder: see
    :func:`btckpt.format.manifest.open_member`); check its size and checksum against ``expect`` (its manifest entry)
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
            buf = staging_buffer(header.data_size)
            if header.data_size:
                _read_hashed(f.fileno(), memoryview(buf.numpy()), header.data_start, h, path)  # type: ignore[arg-type]
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
                                       "read it with btckpt.restore.dcp (every node's part side by side)")
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
                return assemble(ref["sharded"], self._chunk, where=str(self.folder))
            return self.tensor(ref["file"], ref["key"])

        return decode_tree(self.manifest.state[group], load)


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


def read_header(f: BinaryIO, file_size: int, *, where: str) -> Header:
    """Read and parse the safetensors header from an open binary file, positioned anywhere; every failure is a
    CheckpointError naming ``where``."""
    try:
        f.seek(0)
    except OSError as exc:
        raise read_error(where, exc) from None
    head = read_upto(f, 8, where=where)
    if len(head) < 8:
        raise CorruptCheckpoint(f"{where}: file is {len(head)} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > file_size:
        return parse_header(head, file_size, where=where)  # raises with the right message
    return parse_header(head + read_upto(f, n, where=where), file_size, where=where)


def part_folder(folder: Path, manifest: Manifest, node: int) -> Path:
    """Where node ``node``'s part of this checkpoint lives, seen from this node's part ``folder``.

    Same node: ``folder``. Else the sibling of the platform's nested layout:
    ``.../rank-<this>/checkpoint-<step>`` -> ``.../rank-<node>/checkpoint-<step>``.
    """
    here = manifest.node_rank
    if node == here:
        return folder
    rank_dir = folder.parent
    if rank_dir.name != f"rank-{here}":
        raise IncompleteCheckpoint(f"{folder}: node {node}'s part of this multi-node checkpoint is needed to "
                                   "reshard, but this part is not in a rank-<node>/ layout; put every node's "
                                   "part side by side as <dir>/rank-<node>/checkpoint-<step>/")
    return rank_dir.parent / f"rank-{node}" / folder.name


class NodeParts:
    """Readers of a checkpoint's parts (one per node, see :func:`part_folder`), opened lazily, checksums
    verified: where :func:`assemble` (consolidation) and the DCP bridge read saved chunks from."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest = folder, manifest
        self._readers: dict[int, CheckpointReader] = {}

    def tensor(self, node: int, file: str, key: str, *, sizes: list[int] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """A saved tensor (a chunk: checked against its ``sizes`` and ``dtype`` from the manifest when given)."""
        rd = self._readers.get(node)
        if rd is None:
            folder = part_folder(self.folder, self.manifest, node)
            man = self.manifest if folder == self.folder else read_manifest(folder)
            if man.step != self.manifest.step:
                raise IncompleteCheckpoint(f"{folder}: part of step {man.step}, expected {self.manifest.step}")
            rd = self._readers[node] = CheckpointReader(folder, man)
        t = rd.tensor(file, key)
        if (sizes is not None and list(t.shape) != list(sizes)) or (dtype is not None and t.dtype != dtype):
            raise CorruptCheckpoint(f"{rd.folder}/{file}: chunk {key!r} is {t.dtype}{list(t.shape)}, the manifest "
                                    f"says {dtype}{list(sizes or t.shape)}")
        return t
