"""Read a committed checkpoint: verify checksums, parse safetensors safely, build tensors.

Never unpickles: tensors come from safetensors data sections, everything else from JSON. Two ways to read a file:

- staged (:func:`read_safetensors` without ``into``): the file is read once into one fresh buffer
  (:func:`staging_buffer`: huge pages; a few threads ``pread`` successive spans), checksummed in file order as the
  spans land; tensors are views of that buffer, copied into the live state by ``load_state_dict`` later;
- into the destinations (``into``: key -> the live tensor): a saved tensor whose dtype and shape match its live
  CPU, contiguous destination is read straight into the destination's memory (``preadv`` of large sequential
  spans, each a list of views of the destinations' storages, hashed in file order as they land): no staging
  buffer, no copy, no fresh page faults. Other tensors (foreign, dtype/shape differ, no destination) are read
  into a fresh tensor of their own in the same pass. The caller decides when that is allowed
  (:mod:`btckpt.restore.load`: the bytes are in the live state before the file's checksum is known);
  :func:`verify_safetensors` (a hash-only pass through a small reused ring) checks a file first when it must.
  A file holding a CUDA destination (:func:`device_target`) is read through a pinned staging ring instead
  (:func:`_read_via_ring`): each span read and hashed into a slot, copied host-to-device on a side stream while
  the next span is read, the slot reused once its copies ran.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
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
from ..storage.discovery import CheckpointInfo, verify
from ..storage.store import LOCAL
from ..streams import CudaStream

__all__ = ["CheckpointReader", "NodeParts", "part_folder", "safe_file", "read_header", "read_safetensors",
           "read_verified_bytes", "verify_safetensors", "direct_target", "device_target", "tensor_bytes", "READS",
           "vouch", "vouched", "file_stats", "verify_and_vouch"]

READ_CHUNK = 16 << 20  # one pread per span
# spans in flight at once. The kernel's readahead is left at its default: POSIX_FADV_SEQUENTIAL (a doubled window)
# over 4 spans in flight made a cold 4 GiB read slower here (median of 10: 2.75 s against 2.25 s;
# benchmarks/bench_readahead.py, RESULTS.md)
READ_THREADS = 4
MAX_INDEX = 256 * 1024 * 1024
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and arm64 (4 KiB base pages)
IOV_MAX = 1024  # buffers per preadv (Linux's UIO_MAXIOV)
RING_SLOTS = 4  # pinned READ_CHUNK slots a file with device destinations is read through
MAX_KEPT = 256  # verified files a reader keeps open for the read that follows (beyond: reopened by name)
# bytes read each way in this process (tests, benchmarks): into live destinations, into fresh tensors of their own
# (one-pass reads of tensors without a fitting destination), into staging buffers, and hashed only (verify pass)
# (ring_bytes: the data sections read through the pinned ring of a file with device destinations)
# (vouched_bytes: files whose verify pass was skipped: this process checked them as it wrote them, :func:`vouch`)
READS = {"direct_bytes": 0, "fresh_bytes": 0, "staged_bytes": 0, "verify_bytes": 0, "ring_bytes": 0,
         "vouched_bytes": 0}
MAX_VOUCHED = 4096  # files :func:`vouch` remembers (the oldest forgotten first: they are verified as usual)

# (st_dev, st_ino) -> (size, mtime_ns, ctime_ns, checksum) of a file this process checked as it wrote it
_VOUCHED: OrderedDict[tuple[int, int], tuple[int, int, int, str]] = OrderedDict()
_VOUCHED_LOCK = threading.Lock()


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _same_file_unchanged(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, *_stamp(a)) == (b.st_dev, b.st_ino, *_stamp(b))


def vouch(folder: Path, manifest: Manifest, *, before: Mapping[str, os.stat_result] | None = None) -> None:
    """Record that this process checked the committed checkpoint ``folder``'s safetensors files itself against
    ``manifest`` (size, checksum) as their bytes were written (e.g. a part fetched from a peer's replica:
    :meth:`btckpt.tiers.replicas.PeerReplicas.recover`), or whole (:func:`verify_and_vouch`), so that a
    verify-first read of it soon after skips the hash-only pass (:meth:`CheckpointReader.verify`): each file is
    then read once, into the state, and its checksum still checked as it lands. A file is trusted only while it
    is the same file, unchanged: the same inode, size, mtime and ctime (any write, truncate, replacement or
    ``utime`` since changes one of them) and its manifest entry the same checksum; otherwise it is verified as
    usual. ``before``: each file's ``os.stat`` from before the check (:func:`file_stats`); a file that is not
    the same file, unchanged, since then is not recorded."""
    with _VOUCHED_LOCK:
        for name, entry in manifest.files.items():
            if not name.endswith(".safetensors"):
                continue
            st = os.stat(safe_file(folder, name), follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            _VOUCHED.pop(key, None)
            if before is not None and (name not in before or not _same_file_unchanged(before[name], st)):
                continue
            _VOUCHED[key] = (*_stamp(st), str(entry[CHECKSUM]))
            while len(_VOUCHED) > MAX_VOUCHED:
                _VOUCHED.popitem(last=False)


def file_stats(folder: Path, manifest: Manifest) -> dict[str, os.stat_result]:
    """``os.stat`` (no link followed) of each of ``manifest``'s files in ``folder`` there now (for :func:`vouch`)."""
    out = {}
    for name in manifest.files:
        with contextlib.suppress(OSError, CorruptCheckpoint):
            out[name] = os.stat(safe_file(folder, name), follow_symlinks=False)
    return out


def verify_and_vouch(info: CheckpointInfo) -> list[str]:
    """:func:`btckpt.storage.discovery.verify` of a local committed checkpoint (its problems; empty when sound)
    and, when sound, :func:`vouch` for the files that stayed the same files, unchanged, during the check: a
    verify-first restore of it soon after reads each byte once instead of hashing every file again."""
    man = info.manifest
    before = file_stats(info.path, man) if man is not None and info.store is LOCAL else None
    problems = verify(info)
    if not problems and man is not None and before is not None:
        with contextlib.suppress(OSError, CorruptCheckpoint):  # not recorded: the restore verifies it first
            vouch(info.path, man, before=before)
    return problems


def vouched(f: BinaryIO, expect: Mapping[str, Any]) -> bool:
    """Whether the open file ``f`` is one :func:`vouch` recorded, unchanged since, with ``expect``'s size and
    checksum (its manifest entry now)."""
    st = os.fstat(f.fileno())
    with _VOUCHED_LOCK:
        rec = _VOUCHED.get((st.st_dev, st.st_ino))
    return rec is not None and rec == (*_stamp(st), str(expect[CHECKSUM])) and st.st_size == int(expect["size"])


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
    file order (:func:`_read_pieces` with one piece). ``READ_THREADS`` threads ``pread`` successive
    ``READ_CHUNK`` spans into their final place (several requests in flight keep a fast disk busy, and the page
    faults of a fresh buffer are spread over cores: at 4 GiB from disk, page cache dropped, one thread took
    6.8 s, four 4.6 s with 4 KiB pages and 2.7 s with huge pages, dd 1.8 s) while this thread hashes each span
    as soon as it and those before it landed.
    A file shorter than its header says is a CorruptCheckpoint; OSErrors propagate to the caller."""
    _read_pieces(fd, [mv], base, h, path)


def _fill(fd: int, bufs: list[memoryview], off: int, path: Path) -> None:
    """``preadv`` the file from ``off`` into ``bufs`` (in order, each filled whole), :data:`IOV_MAX` at a time."""
    i = 0
    while i < len(bufs):
        got = os.preadv(fd, bufs[i:i + IOV_MAX], off)
        if not got:
            raise CorruptCheckpoint(f"{path}: file ended early at byte {off}")
        off += got
        while got:
            left = len(bufs[i])
            if got >= left:
                got -= left
                i += 1
            else:
                bufs[i] = bufs[i][got:]
                got = 0


def _spans(pieces: list[memoryview], base: int) -> list[tuple[int, list[memoryview]]]:
    """``pieces`` (consecutive in the file from ``base``) cut into spans of :data:`READ_CHUNK` bytes: each the
    file offset it starts at and the views it fills (a large piece is cut, small ones share a span)."""
    spans: list[tuple[int, list[memoryview]]] = []
    cur: list[memoryview] = []
    size, start, off = 0, base, base
    for mv in pieces:
        pos = 0
        while pos < len(mv):
            take = min(len(mv) - pos, READ_CHUNK - size)
            cur.append(mv[pos:pos + take])
            size, pos, off = size + take, pos + take, off + take
            if size == READ_CHUNK:
                spans.append((start, cur))
                cur, size, start = [], 0, off
    if cur:
        spans.append((start, cur))
    return spans


def _read_pieces(fd: int, pieces: list[memoryview], base: int, h: Any, path: Path) -> None:
    """Fill ``pieces`` (writable byte views, consecutive in the file from ``base``: e.g. the storages of the
    live tensors a data section holds, in file order) with the file's bytes, each byte read once, large spans
    (:func:`_spans`, one ``preadv`` each, :data:`READ_THREADS` in flight), and feed them to ``h`` in file order
    as they land. A short file is a CorruptCheckpoint; OSErrors propagate to the caller."""
    pieces = [p for p in pieces if len(p)]
    spans = _spans(pieces, base)  # no readahead hint (see READ_THREADS)
    if len(spans) <= 1:
        for off, bufs in spans:
            _fill(fd, list(bufs), off, path)
            for b in bufs:
                h.update(b)
        return
    with ThreadPoolExecutor(min(READ_THREADS, len(spans)), thread_name_prefix="btckpt-read") as pool:
        filled = [pool.submit(_fill, fd, list(bufs), off, path) for off, bufs in spans]
        try:
            for (_, bufs), fut in zip(spans, filled, strict=True):
                fut.result()
                for b in bufs:
                    h.update(b)
        finally:
            for fut in filled:  # on an error, the spans not started yet are not read
                fut.cancel()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a CPU, contiguous tensor's memory (see :func:`direct_target`)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def direct_target(t: Any, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> bool:
    """Whether a saved tensor of ``dtype``/``shape`` can be read straight into ``t``: a plain CPU tensor (or
    Parameter) of that dtype and shape, contiguous, with memory of its own (not empty, no conj/neg bit)."""
    return (isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, torch.nn.Parameter)
            and t.device.type == "cpu" and not is_device(t) and t.layout == torch.strided and not t.is_quantized
            and t.dtype == dtype and tuple(t.shape) == tuple(shape) and t.numel() > 0
            and t.is_contiguous() and not t.is_conj() and not t.is_neg())


# The device side of a restore, replaceable so tests drive it on CPU (a ThreadStream and ``lambda t: True``):
# the stream the H2D copies run on (per device), and which destinations are device memory.
device_stream: Callable[[torch.device], Any] = CudaStream
is_device: Callable[[torch.Tensor], bool] = lambda t: t.device.type == "cuda"  # noqa: E731


def device_target(t: Any, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> bool:
    """Whether a saved tensor of ``dtype``/``shape`` can be copied straight into the device tensor ``t``
    (contiguous, that dtype and shape) from the pinned ring (:func:`_read_via_ring`)."""
    return (isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, torch.nn.Parameter) and is_device(t)
            and t.layout == torch.strided and t.dtype == dtype and tuple(t.shape) == tuple(shape)
            and t.numel() > 0 and t.is_contiguous() and not t.is_conj() and not t.is_neg())


def _read_via_ring(fd: int, header: Header, into: Mapping[str, torch.Tensor], h: Any, path: Path
                   ) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`_read_into` for a file with device destinations: the data section read span by span into
    :data:`RING_SLOTS` pinned slots of :data:`READ_CHUNK` bytes, hashed, then scattered: host destinations
    (and fresh tensors) by a memory copy, device ones by ``copy_(non_blocking=True)`` on the
    :data:`device_stream`, overlapped with the next span's read; a slot is reused once its copies ran.
    Returns the tensors and the bytes that went straight into destinations."""
    tensors: dict[str, torch.Tensor] = {}
    segs: list[tuple[int, int, bool, Any]] = []  # (begin, end, on the device, byte view of the target)
    direct, device = 0, None
    for e in header.entries:
        dtype = ST_TO_DTYPE.get(e.dtype)
        if dtype is None:
            raise CorruptCheckpoint(f"{path}: tensor {e.name!r} has dtype {e.dtype}, unknown to this torch build")
        dest = into.get(e.name)
        if dest is not None and direct_target(dest, dtype, e.shape):
            segs.append((e.begin, e.end, False, tensor_bytes(dest)))
        elif dest is not None and device_target(dest, dtype, e.shape):
            segs.append((e.begin, e.end, True, dest.detach().reshape(-1).view(torch.uint8)))
            device = device or dest.device
        else:
            raw = torch.empty(e.end - e.begin, dtype=torch.uint8)
            segs.append((e.begin, e.end, False, memoryview(raw.numpy())))  # type: ignore[arg-type]
            tensors[e.name] = raw.view(dtype).view(e.shape)
            continue
        tensors[e.name] = dest
        direct += e.end - e.begin
    n = header.data_size
    spans = [(pos, min(pos + READ_CHUNK, n)) for pos in range(0, n, READ_CHUNK)]
    pin = torch.cuda.is_available()
    slots = [torch.empty(min(READ_CHUNK, n), dtype=torch.uint8, pin_memory=pin)
             for _ in range(min(RING_SLOTS, len(spans)))]
    stream = device_stream(device or torch.device("cuda"))
    events: list[Any] = [None] * len(slots)
    seg = 0
    try:
        for k, (pos, end) in enumerate(spans):
            i = k % len(slots)
            if events[i] is not None:
                stream.sync(events[i])  # the slot's copies of span k - RING_SLOTS ran
            slot = slots[i]
            mv = memoryview(slot.numpy())[:end - pos]  # type: ignore[arg-type]
            _fill(fd, [mv], header.data_start + pos, path)
            h.update(mv)
            while seg < len(segs) and segs[seg][0] < end:
                b, e_end, on_device, target = segs[seg]
                lo, hi = max(b, pos), min(e_end, end)
                if hi > lo and on_device:
                    stream.run(lambda d=target[lo - b:hi - b], s=slot[lo - pos:hi - pos]:  # type: ignore[misc]
                               d.copy_(s, non_blocking=True))
                elif hi > lo:
                    target[lo - b:hi - b] = mv[lo - pos:hi - pos]
                if e_end > end:
                    break
                seg += 1
            events[i] = stream.record()
    finally:
        for ev in events:
            if ev is not None:
                stream.sync(ev)
        close = getattr(stream, "close", None)
        if callable(close):
            close()
    return tensors, direct


def verify_safetensors(folder: Path, name: str, *, expect: dict[str, Any], f: BinaryIO | None = None) -> None:
    """Check the listed file ``folder/name`` against its manifest entry (size, checksum) without keeping its
    bytes: read through a ring of :data:`READ_THREADS` reused :data:`READ_CHUNK` buffers, hashed in order
    (the bytes stay in the page cache for the read that follows). A CheckpointError naming the file if not.
    ``f``: the file already open (:func:`btckpt.format.manifest.open_member`), left open for that read."""
    path = folder / name
    with _opened(folder, name, f) as f:
        try:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            if size != expect["size"]:
                raise CorruptCheckpoint(f"{path}: size is {size} bytes, the manifest says {expect['size']}; "
                                        "the file was truncated or replaced")
            h = new_hasher()
            spans = [(pos, min(READ_CHUNK, size - pos)) for pos in range(0, size, READ_CHUNK)]
            ring = [bytearray(READ_CHUNK) for _ in range(min(READ_THREADS, len(spans)) or 1)]
            with ThreadPoolExecutor(len(ring), thread_name_prefix="btckpt-verify") as pool:
                def read(i: int) -> Any:
                    pos, n = spans[i]
                    mv = memoryview(ring[i % len(ring)])[:n]
                    return pool.submit(_fill, fd, [mv], pos, path)

                inflight = [read(i) for i in range(min(len(ring), len(spans)))]
                try:
                    for i in range(len(spans)):
                        inflight[i].result()
                        h.update(memoryview(ring[i % len(ring)])[:spans[i][1]])
                        if i + len(ring) < len(spans):
                            inflight.append(read(i + len(ring)))  # the slot just hashed is free again
                finally:
                    for fut in inflight:
                        fut.cancel()
            READS["verify_bytes"] += size
        except OSError as exc:
            raise read_error(path, exc) from None
    if h.hexdigest() != expect[CHECKSUM]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch ({CHECKSUM} {h.hexdigest()} != {expect[CHECKSUM]}); "
                                "the file is corrupt")


def _read_into(f: BinaryIO, header: Header, into: Mapping[str, torch.Tensor], h: Any, path: Path
               ) -> dict[str, torch.Tensor]:
    """The data section of the open file ``f`` read in one pass: into ``into``'s tensors where they fit
    (:func:`direct_target`: the destination itself is returned for its key), else into a fresh tensor each."""
    tensors: dict[str, torch.Tensor] = {}
    pieces: list[memoryview] = []
    direct = 0
    if any(isinstance(t, torch.Tensor) and is_device(t) for t in into.values()):
        tensors, direct = _read_via_ring(f.fileno(), header, into, h, path)
        READS["ring_bytes"] += header.data_size
        READS["direct_bytes"] += direct
        READS["fresh_bytes"] += header.data_size - direct
        return tensors
    for e in header.entries:  # sorted by offset, back to back (parse_header checks it)
        dtype = ST_TO_DTYPE.get(e.dtype)
        if dtype is None:
            raise CorruptCheckpoint(f"{path}: tensor {e.name!r} has dtype {e.dtype}, unknown to this torch build")
        dest = into.get(e.name)
        if dest is not None and direct_target(dest, dtype, e.shape):
            pieces.append(tensor_bytes(dest))
            tensors[e.name] = dest
            direct += e.end - e.begin
        else:
            raw = torch.empty(e.end - e.begin, dtype=torch.uint8)
            pieces.append(memoryview(raw.numpy()))  # type: ignore[arg-type]
            tensors[e.name] = raw.view(dtype).view(e.shape)
    _read_pieces(f.fileno(), pieces, header.data_start, h, path)
    READS["direct_bytes"] += direct
    READS["fresh_bytes"] += header.data_size - direct
    return tensors


def _opened(folder: Path, name: str, f: BinaryIO | None) -> Any:
    """``f`` as a context that leaves it open, or the member opened (and closed after)."""
    return contextlib.nullcontext(f) if f is not None else open_member(folder, name)


def read_safetensors(folder: Path, name: str, *, expect: dict[str, Any] | None,
                     into: Mapping[str, torch.Tensor] | None = None, f: BinaryIO | None = None
                     ) -> tuple[Header, dict[str, torch.Tensor]]:
    """Read the whole safetensors file ``folder/name`` (a regular file inside the folder: see
    :func:`btckpt.format.manifest.open_member`); check its size and checksum against ``expect`` (its manifest entry)
    if given. Every failure is a CheckpointError naming the file.

    ``into`` (key -> live tensor): read the data section straight into the destinations that fit (module doc);
    their bytes are in place before the checksum is checked, so a failure leaves them overwritten. ``f``: the
    file already open (kept from :func:`verify_safetensors`: a checkpoint retired since is still read whole)."""
    path = folder / name
    where = str(path)
    with _opened(folder, name, f) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if expect is not None and size != expect["size"]:
                raise CorruptCheckpoint(f"{path}: size is {size} bytes, the manifest says {expect['size']}; "
                                        "the file was truncated or replaced")
            header = read_header(f, size, where=where)
            f.seek(0)
            h = new_hasher()
            h.update(read_upto(f, header.data_start, where=path))
            direct = None
            if into is not None:
                direct = _read_into(f, header, into, h, path)
            else:
                buf = staging_buffer(header.data_size)
                if header.data_size:
                    _read_hashed(f.fileno(), memoryview(buf.numpy()), header.data_start, h,  # type: ignore[arg-type]
                                 path)
                READS["staged_bytes"] += header.data_size
        except OSError as exc:
            raise read_error(path, exc) from None
    if expect is not None and h.hexdigest() != expect[CHECKSUM]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch ({CHECKSUM} {h.hexdigest()} != {expect[CHECKSUM]}); "
                                "the file is corrupt")
    if direct is not None:
        return header, direct
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
    """Reads one checkpoint folder. ``manifest`` is None for a plain HF model folder (weights only).

    ``into`` (file -> key -> live tensor; None: staged reads): the files are read straight into these
    destinations (:func:`read_safetensors`), a file absent from it into fresh tensors of its own; ``on_read(file)``
    is called before a file's bytes start landing (the restore records which live tensors it overwrites)."""

    def __init__(self, folder: str | os.PathLike[str], manifest: Manifest | None) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self._files: dict[str, dict[str, torch.Tensor]] = {}
        self._headers: dict[str, Header] = {}
        self.into: dict[str, dict[str, torch.Tensor]] | None = None
        self.on_read: Callable[[str], None] | None = None
        self._kept: dict[str, BinaryIO] = {}  # verified files, kept open (and locked) for the read that follows
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        """Close the files :meth:`verify` kept open."""
        self._kept.clear()
        self._stack.close()

    def _expect(self, name: str) -> dict[str, Any] | None:
        if self.manifest is None:
            return None
        expect = self.manifest.files.get(name)
        if expect is None:
            raise CorruptCheckpoint(f"{self.folder}: the state references {name!r}, which the manifest "
                                    "does not list")
        return expect

    def header(self, name: str) -> Header:
        """The parsed header of the listed file ``name`` (its data not read), its size checked."""
        if name not in self._headers:
            expect = self._expect(name)
            path = self.folder / name
            with open_member(self.folder, name) as f:
                try:
                    size = os.fstat(f.fileno()).st_size
                    if expect is not None and size != expect["size"]:
                        raise CorruptCheckpoint(f"{path}: size is {size} bytes, the manifest says {expect['size']}; "
                                                "the file was truncated or replaced")
                    self._headers[name] = read_header(f, size, where=str(path))
                except OSError as exc:
                    raise read_error(path, exc) from None
        return self._headers[name]

    def verify(self, name: str) -> None:
        """Check the listed file ``name``'s size and checksum (:func:`verify_safetensors`), keeping none of its
        bytes but the file open (and its shared lock) until it is read or :meth:`close`: a checkpoint retired in
        between is still read as verified. A file this process checked as it wrote it, unchanged since
        (:func:`vouched`), is not hashed again here (its read still checks its checksum as it lands)."""
        expect = self._expect(name)
        if expect is not None and name not in self._files and name not in self._kept:
            if len(self._kept) >= MAX_KEPT:  # a checkpoint of very many files: the descriptors are not held
                verify_safetensors(self.folder, name, expect=expect)
                return
            f = self._stack.enter_context(open_member(self.folder, name))
            self._kept[name] = f
            if vouched(f, expect):  # checked by this process as it wrote it, unchanged since (:func:`vouch`)
                READS["vouched_bytes"] += int(expect["size"])
                return
            verify_safetensors(self.folder, name, expect=expect, f=f)

    @property
    def groups(self) -> list[str]:
        if self.manifest is None:
            return ["model"] if self._hf_weight_files() else []
        return list(self.manifest.state)

    def _file(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._files:
            expect = self._expect(name)
            into = None if self.into is None else self.into.get(name, {})
            if into and self.on_read is not None:
                self.on_read(name)
            _, self._files[name] = read_safetensors(self.folder, name, expect=expect, into=into,
                                                    f=self._kept.pop(name, None))
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
