"""The snapshot: copy the state's tensors into a reusable staging arena, off the training thread.

Call order (by each rank, from the training thread): ``Stager.stage(flat, layout, sync_keys)`` returns a
:class:`Staged` once the small/volatile tensors are copied; large tensors keep copying on a side CUDA
stream (device tensors) or the copy thread (host tensors). :class:`StepGate` makes every
``optimizer.step()`` wait for those copies, so the arena equals the state at the ``save()`` call.
The arena is laid out as the files' data sections (see :mod:`btckpt.format.layout`), page-aligned, pinned on
CUDA, allocated once and reused while the layout's signature is unchanged. A local-tier save stages into
files instead (``stage(..., into=)``, :class:`~btckpt.saving.arena.FileArena`): the arena is then the tier's
checkpoint files themselves, and the writer only checksums and renames them (one host copy).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..format.layout import FilePlan, FlatState, Layout
from ..streams import CudaStream, ThreadStream
from ..testing import faults
from .arena import FileArena, Register

__all__ = ["ThreadStream", "CudaStream", "Staged", "ChunkedStaged", "DirectStaged", "Snapshot", "Stager", "StepGate",
           "PAGE"]

PAGE = 4096

log = logging.getLogger("btckpt")


class Staged:
    """A snapshot in flight over a full arena: the events its async copies signal.

    ``gate()`` (the step gate, the fence) orders what follows after the copies: the host waits for host
    copies; for device copies the compute stream waits on the copy event (no host stall). ``wait()``
    blocks the host until every copy is done; ``pieces()`` (the writer) yields the arena bytes of one file
    in large slices, after the copies are done. Over a :class:`~btckpt.saving.arena.FileArena` (``files``)
    the writer instead calls ``land()``, which makes the staged file itself the checkpoint's file.
    ``region(begin, size)`` is the arena's bytes; ``events`` holds ``(stream, event)`` pairs.
    """

    def __init__(self, region: Callable[[int, int], torch.Tensor], layout: Layout, events: list[tuple[Any, Any]],
                 host: ThreadStream, *, files: FileArena | None = None) -> None:
        self.region = region
        self.files = files
        self.layout = layout
        self._events = events
        self._host = host
        self.error: BaseException | None = None

    def done(self) -> bool:
        """True once every async copy finished (never blocks)."""
        return all(stream.query(ev) for stream, ev in self._events)

    def gate(self) -> float:
        """Make what the training thread does next run after the copies; return host seconds waited."""
        t0 = time.perf_counter()
        for stream, ev in list(self._events):
            stream.gate(ev)
        return time.perf_counter() - t0

    def wait(self) -> float:
        """Block until every copy finished; return seconds waited. A copy error lands in ``error``."""
        t0 = time.perf_counter()
        for stream, ev in list(self._events):
            stream.sync(ev)
        self._events = []
        err = self._host.take_error()
        if err is not None:
            self.error = err
        return time.perf_counter() - t0

    def pieces(self, begin: int, size: int, *, chunk: int = 32 << 20) -> Iterator[memoryview]:
        """The arena bytes ``[begin, begin+size)`` in slices of at most ``chunk`` bytes."""
        self.wait()
        if self.error is not None:
            raise self.error
        mv = memoryview(self.region(begin, size).numpy())  # type: ignore[arg-type]
        for off in range(0, size, chunk):
            yield mv[off:min(off + chunk, size)]

    def land(self, fp: FilePlan, target: Path) -> tuple[int, str]:
        """Over a file arena: make its staged file ``fp`` the checkpoint's file ``target`` (must not exist);
        ``(size, checksum)``. Writer thread, after the copies are done (it waits for them)."""
        assert self.files is not None
        self.wait()
        if self.error is not None:
            raise self.error
        return self.files.land(fp, target)


class ChunkedStaged:
    """A snapshot larger than the memory budget: the writer copies one window of the (virtual) arena
    at a time into a budget-sized buffer and writes it. The step gate holds ``optimizer.step()`` until
    the last window was copied (more stall, bounded memory). Volatile tensors were cloned at ``save()``.
    """

    files = None  # written from pieces(), never landed (see Staged)

    def __init__(self, buf: torch.Tensor, layout: Layout, sources: dict[tuple[str, str], torch.Tensor]) -> None:
        self.buf = buf
        self.layout = layout
        self.error: BaseException | None = None
        self._sources = sources
        self._slots = sorted(layout.slots.items(), key=lambda kv: kv[1].offset)
        self._window = -1
        self._copied = threading.Event()
        if layout.arena_size == 0:
            self._copied.set()

    def done(self) -> bool:
        return self._copied.is_set()

    def wait(self) -> float:
        t0 = time.perf_counter()
        self._copied.wait()
        return time.perf_counter() - t0

    gate = wait

    def abandon(self) -> None:
        """Release the gate when the writer gives up (the error is raised elsewhere)."""
        self._copied.set()

    def _fill(self, w: int) -> None:
        size = self.buf.numel()
        lo, hi = w * size, min((w + 1) * size, self.layout.arena_size)
        with torch.no_grad():
            for key, s in self._slots:
                a, b = max(lo, s.offset), min(hi, s.offset + s.nbytes)
                if a >= b:
                    continue
                src = self._sources[key]
                flat = src.detach().contiguous().reshape(-1).view(torch.uint8)
                self.buf[a - lo:b - lo].copy_(flat[a - s.offset:b - s.offset])
        self._window = w
        if hi >= self.layout.arena_size:
            self._copied.set()

    def pieces(self, begin: int, size: int, *, chunk: int = 32 << 20) -> Iterator[memoryview]:
        wsize = self.buf.numel()
        mv = memoryview(self.buf.numpy())  # type: ignore[arg-type]
        pos, end = begin, begin + size
        while pos < end:
            w = pos // wsize
            if w != self._window:
                self._fill(w)
            stop = min((w + 1) * wsize, end, pos + chunk)
            yield mv[pos - w * wsize:stop - w * wsize]
            pos = stop
        if end >= self.layout.arena_size:
            self._copied.set()


class DirectStaged:
    """A synchronous save of host tensors: the writer reads the tensors themselves, no arena copy.

    Only for a sync save, where ``save()`` returns after the write, so nothing mutates the tensors while
    they are read. The bytes written are the same as an arena's (same layout, same order).
    """

    files = None  # written from pieces(), never landed (see Staged)

    def __init__(self, flat: FlatState, layout: Layout) -> None:
        self.layout = layout
        self.error: BaseException | None = None
        self._sources = {(g.name, k): t for g in flat for k, t in g.tensors.items()}
        self._slots = sorted((s.offset, s.nbytes, key) for key, s in layout.slots.items())

    def done(self) -> bool:
        return True

    def wait(self) -> float:
        return 0.0

    gate = wait

    def pieces(self, begin: int, size: int, *, chunk: int = 32 << 20) -> Iterator[memoryview]:
        end = begin + size
        for off, nbytes, key in self._slots:
            if nbytes == 0 or not begin <= off < end:
                continue
            t = self._sources[key].detach().resolve_conj().resolve_neg().contiguous()
            mv = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            for a in range(0, nbytes, chunk):
                yield mv[a:a + chunk]


Snapshot = Staged | ChunkedStaged | DirectStaged


class Stager:
    """Owns the staging arenas and the copy streams of one Checkpointer (one per rank).

    ``small_bytes``: gated tensors smaller than this are copied before ``stage()`` returns (default 0:
    every gated tensor, Adam's ``step`` counters included, copies behind the step gate). ``budget``: the
    most bytes of (anonymous) staging memory; a larger snapshot is staged in windows
    (:class:`ChunkedStaged`). ``device_stream``/``is_device`` let tests drive the CUDA code path on CPU;
    ``pin`` replaces the CUDA page-locking of file arenas (:data:`~btckpt.saving.arena.Register`).
    ``small_via_arena``: a sync save of many small host tensors is staged through the anonymous arena and written
    from it in large pieces (:func:`_small_tensors`; a one-shot save, whose Stager is closed after it).

    Arenas: one anonymous arena (pinned on CUDA) for saves into a folder, and, for saves into a local tier
    (``stage(..., into=prefix)``), two :class:`~btckpt.saving.arena.FileArena` used in turn, in the folders
    ``<prefix>-0`` and ``<prefix>-1``. :meth:`reclaim` (retention, any thread) gives a file arena its files
    back when the checkpoint holding them is retired.
    """

    def __init__(self, *, small_bytes: int = 0, budget: int | None = None,
                 device_stream: Callable[[torch.device], Any] | None = None,
                 is_device: Callable[[torch.Tensor], bool] | None = None, pin: Register | None = None,
                 small_via_arena: bool = False) -> None:
        self.small_bytes = small_bytes
        self.small_via_arena = small_via_arena
        self.budget = budget
        self.allocations = 0
        self._arena: torch.Tensor | None = None
        self._arena_pinned = False
        self._anon: _Target | None = None
        self._file_targets: list[_Target | None] = [None, None]  # the two file arenas (their ``files``)
        self._turn = 0
        self._files_lock = threading.Lock()  # reclaim (retention threads) vs. the choice of file arena
        self._host = ThreadStream()
        self._streams: dict[torch.device, Any] = {}
        self._device_stream = device_stream or CudaStream
        self._is_device = is_device or (lambda t: t.is_cuda)
        self._pin = pin

    @property
    def arena_bytes(self) -> int:
        """Bytes of the staging arenas now (0: none allocated): the anonymous one plus the file arenas."""
        anon = 0 if self._arena is None else self._arena.numel()
        return anon + sum(fa.nbytes for fa in self._files())

    @property
    def arena_pinned(self) -> bool:
        """Whether the arenas in use are page-locked (allocated for device-to-host copies)."""
        if self._files():
            return all(fa.pinned for fa in self._files())
        return self._arena is not None and self._arena_pinned

    def _alloc(self, need: int, pinned: bool) -> _Target:
        if self._arena is None or self._arena.numel() < need or (pinned and not self._arena_pinned):
            self._arena = None
            self._anon = None
            raw = torch.empty(max(need, 1) + PAGE, dtype=torch.uint8, pin_memory=pinned)
            shift = (-raw.data_ptr()) % PAGE
            arena = self._arena = raw[shift:shift + max(need, 1)]
            self._arena_pinned = pinned
            self._anon = _Target(lambda begin, size: arena[begin:begin + size])
            self.allocations += 1
        assert self._anon is not None
        return self._anon

    def _file_target(self, into: Path, layout: Layout, pinned: bool) -> _Target | None:
        """A file arena ready for ``layout``: the one whose turn it is, or the other when only that one has its
        files back (after a failed save), else fresh files for the one whose turn it is; None when files cannot
        be made there (logged; the caller stages into the anonymous arena). After the previous save finished."""
        with self._files_lock:
            ready = [k for k in (self._turn, 1 - self._turn) if self._ready(k, into, layout)]
            k = ready[0] if ready else self._turn  # after a failed save the other arena may be the free one
            if not ready:
                self._drop_file_arena(k)
                folder = Path(f"{into}-{k}")
                try:
                    fa = FileArena(folder, layout, register=self._pin or (_cuda_pin if pinned else None))
                except OSError as exc:
                    log.warning("btckpt: cannot stage into files in %s (%s); staging into memory and writing "
                                "the files after (one more host copy)", folder, exc)
                    return None
                self._file_targets[k] = _Target(fa.region, files=fa)
                self.allocations += 1
            self._turn = 1 - k
            return self._file_targets[k]

    def _ready(self, k: int, into: Path, layout: Layout) -> bool:
        """Whether file arena ``k`` can take a snapshot of ``layout`` into ``into`` now: made for that layout
        there, and its files back in its folder (not part of a committed checkpoint)."""
        target = self._file_targets[k]
        fa = target.files if target is not None else None
        return (fa is not None and (fa.signature is layout.signature or fa.signature == layout.signature)
                and fa.folder == Path(f"{into}-{k}") and fa.present())

    def _drop_file_arena(self, k: int, *, remove: bool = False) -> None:
        """Unmap file arena ``k`` (``remove``: and delete its folder, which holds no committed file), after its
        last snapshot's copies finished: a device copy still in flight into memory about to be unpinned and
        unmapped (a failed save that never waited for it) would write into freed pages."""
        target, self._file_targets[k] = self._file_targets[k], None
        if target is None or target.files is None:
            return
        if target.last is not None:
            target.last.wait()
        target.files.close()
        if remove:
            shutil.rmtree(target.files.folder, ignore_errors=True)

    def _files(self) -> list[FileArena]:
        return [t.files for t in self._file_targets if t is not None and t.files is not None]

    def reclaim(self, retired: Path) -> bool:
        """Called with a retired checkpoint folder (renamed to a temp name, about to be removed): when it holds
        the files of one of the file arenas, move them back into that arena's folder; True then."""
        with self._files_lock:
            return any(fa.reclaim(retired) for fa in self._files())

    def stage(self, flat: FlatState, layout: Layout, *, async_keys: set[tuple[str, str]], sync: bool,
              into: Path | None = None) -> Snapshot:
        """Copy every tensor into an arena. Keys in ``async_keys`` copy in the background unless ``sync``.
        ``into``: a local tier's arena prefix: stage into files there (see the class doc)."""
        faults.point("stage")
        if sync and all(t.device.type == "cpu" and not self._is_device(t) for g in flat for t in g.tensors.values()) \
                and (into is not None or not self.small_via_arena or not _small_tensors(layout, self.budget)):
            return DirectStaged(flat, layout)
        pinned = torch.cuda.is_available() and any(t.is_cuda for g in flat for t in g.tensors.values())
        chosen = self._file_target(into, layout, pinned) if into is not None else None
        if chosen is not None:  # the tier's memory, preflighted by the tier: the budget is not this arena's
            target = chosen
        elif self.budget is not None and layout.arena_size > self.budget:
            return self._stage_chunked(flat, layout, async_keys, pinned)
        else:
            target = self._alloc(layout.arena_size, pinned)
        if target.signature is not layout.signature:
            target.views = _views(target.region, layout, flat)
            target.signature = layout.signature
            target.copies = None
        sources = self._copy_plan(target, flat, async_keys, sync).sources(flat)
        with torch.no_grad():
            if sources.now:
                torch._foreach_copy_(sources.now_dst, sources.now)
        events: list[tuple[Any, Any]] = []
        for dev, (dsts, srcs) in sources.later_dev.items():
            cs = self._streams.get(dev)
            if cs is None:
                cs = self._streams[dev] = self._device_stream(dev)
            cs.start_after_compute()
            cs.run(functools.partial(_copy_all, _Pairs(dsts, srcs), non_blocking=True))
            events.append((cs, cs.record()))
        if sources.later_host:
            self._host.run(functools.partial(_copy_all, _Pairs(sources.later_host_dst, sources.later_host),
                                             non_blocking=False))
            events.append((self._host, self._host.record()))
        staged = Staged(target.region, layout, events, self._host, files=target.files)
        if target.files is not None:
            target.last = staged
        return staged

    def _copy_plan(self, target: _Target, flat: FlatState, async_keys: set[tuple[str, str]], sync: bool) -> _CopyPlan:
        """Which tensors copy now and which behind the gate (host thread or device stream), with their arena
        views; cached per arena while the views, the gated keys and the tensors' devices stay the same.
        C-speed passes per group (``itertools.compress`` over the gated flags)."""
        key = (sync, sum(len(g.tensors) for g in flat))
        if target.copies is not None and target.copies[0] == key and target.copies[2] is async_keys:
            return target.copies[1]  # the same gated-key set object: the save plan was reused
        plan = _CopyPlan()
        i = 0
        for g in flat:
            keys, ts = list(g.tensors), list(g.tensors.values())
            dsts = list(map(target.views[g.name].__getitem__, keys))
            idx = range(i, i + len(keys))
            i += len(keys)
            if sync or not async_keys:
                plan.now.extend(idx)
                plan.now_dst.extend(dsts)
                continue
            later = list(map(async_keys.__contains__, zip(itertools.repeat(g.name), keys)))
            if self.small_bytes:
                later = list(map(operator.and_, later, map(self.small_bytes.__le__, map(_NBYTES, ts))))
            now = list(map(operator.not_, later))
            plan.now.extend(itertools.compress(idx, now))
            plan.now_dst.extend(itertools.compress(dsts, now))
            for j, dst, t in zip(itertools.compress(idx, later), itertools.compress(dsts, later),
                                 itertools.compress(ts, later), strict=True):
                if self._is_device(t):
                    dd, di = plan.later_dev.setdefault(t.device, ([], []))
                    dd.append(dst)
                    di.append(j)
                else:
                    plan.later_host.append(j)
                    plan.later_host_dst.append(dst)
        target.copies = (key, plan, async_keys)
        return plan

    def _stage_chunked(self, flat: FlatState, layout: Layout, async_keys: set[tuple[str, str]],
                       pinned: bool) -> ChunkedStaged:
        assert self.budget is not None
        self._alloc(max(PAGE, self.budget // PAGE * PAGE), pinned)
        assert self._arena is not None
        sources: dict[tuple[str, str], torch.Tensor] = {}
        for g in flat:
            for key, t in g.tensors.items():
                volatile = (g.name, key) not in async_keys or t.numel() * t.element_size() < self.small_bytes
                sources[(g.name, key)] = t.detach().to("cpu", copy=True) if volatile else t
        return ChunkedStaged(self._arena, layout, sources)

    def close(self) -> None:
        """Release the arenas (the file arenas' folders removed: they hold no committed file), stop the copier."""
        with self._files_lock:
            for k in range(len(self._file_targets)):
                self._drop_file_arena(k, remove=True)
        self._host.close()
        self._arena = None
        self._anon = None


@dataclass
class _Target:
    """One staging arena (its bytes by ``region(begin, size)``; ``files``: a file arena's) and what is kept with
    it: the tensors' views for one layout signature, the copy plan, and (file arenas) the last snapshot into it,
    waited for before the arena is unmapped."""

    region: Callable[[int, int], torch.Tensor]
    files: FileArena | None = None
    last: Staged | None = None
    signature: Any = None
    views: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # group -> key -> view
    copies: tuple[Any, _CopyPlan, set[tuple[str, str]]] | None = None


SMALL_MEAN = 64 << 10  # bytes: a sync save whose tensors are this small on average goes through an arena
SMALL_ARENA = 256 << 20  # ... when the arena would be at most this large


def _small_tensors(layout: Layout, budget: int | None) -> bool:
    """Whether a sync save of host tensors is written faster through a staging arena than straight from the
    tensors (:class:`DirectStaged` writes one piece per tensor: 80k tensors are 80k writes; an arena is filled by
    one ``_foreach_copy_`` and written in 32 MiB pieces): many small tensors, a small arena (within ``budget``)."""
    n = len(layout.slots)
    limit = SMALL_ARENA if budget is None else min(budget, SMALL_ARENA)
    return n > 0 and layout.arena_size <= limit and layout.arena_size < SMALL_MEAN * n


_DTYPE = operator.attrgetter("dtype")
_NBYTES = operator.attrgetter("nbytes")


def _views(region: Callable[[int, int], torch.Tensor], layout: Layout,
           flat: FlatState) -> dict[str, dict[str, torch.Tensor]]:
    """``{group: {key: the arena view its tensor is copied into}}``: per run of one dtype in a file, one region
    viewed as that dtype and cut into the tensors' shapes by ``unflatten_dense_tensors`` (one C++ call, no Python
    code per tensor)."""
    by_name = {g.name: g.tensors for g in flat}
    views: dict[str, dict[str, torch.Tensor]] = {g.name: {} for g in flat}
    listed = 0
    for fp in layout.files:
        src = by_name[fp.group] if fp.keys and fp.group in by_name else None
        if src is None:
            continue
        listed += len(fp.keys)
        ts = list(map(src.__getitem__, fp.keys))
        nbytes = list(map(_NBYTES, ts))
        out: list[torch.Tensor] = []
        off = fp.begin
        pos = 0
        for dtype, run in itertools.groupby(map(_DTYPE, ts)):
            n = sum(1 for _ in run)
            part, sizes = ts[pos:pos + n], nbytes[pos:pos + n]
            size = sum(sizes)
            vs = list(torch._C._nn.unflatten_dense_tensors(region(off, size).view(dtype), part))
            if 0 in sizes:  # an empty tensor comes back as a fresh (0,): its own view, in its shape
                at = off
                for j, nb in enumerate(sizes):
                    if nb == 0:
                        vs[j] = region(at, 0).view(dtype).view(part[j].shape)
                    at += nb
            out += vs
            off += size
            pos += n
        views[fp.group].update(zip(fp.keys, out, strict=True))
    if listed != len(layout.slots):  # a layout whose files do not list their tensors: one slot at a time
        for (group, key), s in layout.slots.items():
            if key not in views.setdefault(group, {}):
                views[group][key] = region(s.offset, s.nbytes).view(s.dtype).view(s.shape)
    return views


def _cuda_pin(address: int, nbytes: int) -> Callable[[], None]:
    """Page-lock ``nbytes`` at ``address`` for CUDA copies (``cudaHostRegister``); the call that undoes it.
    An OSError when CUDA refuses (the Stager then stages into its pinned anonymous arena)."""
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(address, nbytes, 1))  # 1: cudaHostRegisterPortable
    if err:
        raise OSError(f"cudaHostRegister of {nbytes} bytes failed (cudaError {err})")
    return lambda: cudart.cudaHostUnregister(address)


@dataclass
class _Sources:
    """A copy plan's source tensors for one flattening (``later_dev``: device -> (arena views, sources))."""

    tensors: list[dict[str, torch.Tensor]]  # the groups' tensor dicts they were taken from
    now: list[torch.Tensor]
    now_dst: list[torch.Tensor]
    later_host: list[torch.Tensor]
    later_host_dst: list[torch.Tensor]
    later_dev: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]]


@dataclass
class _CopyPlan:
    """Positions (in flattening order) and arena views of the tensors copied now / behind the gate."""

    now: list[int] = field(default_factory=list)
    now_dst: list[torch.Tensor] = field(default_factory=list)
    later_host: list[int] = field(default_factory=list)
    later_host_dst: list[torch.Tensor] = field(default_factory=list)
    later_dev: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = field(default_factory=dict)
    last: _Sources | None = None

    def sources(self, flat: FlatState) -> _Sources:
        """The source tensors of ``flat`` in this plan's order; the last ones again (no Python work per tensor)
        when ``flat``'s groups hold the very same tensor dicts (a watched, unchanged state)."""
        dicts = [g.tensors for g in flat]
        last = self.last
        if last is not None and len(last.tensors) == len(dicts) and all(map(operator.is_, dicts, last.tensors)):
            return last
        srcs = [t for d in dicts for t in d.values()]
        self.last = _Sources(dicts, [srcs[i] for i in self.now], self.now_dst, [srcs[i] for i in self.later_host],
                             self.later_host_dst, {dev: (dsts, [srcs[i] for i in idx])
                                                   for dev, (dsts, idx) in self.later_dev.items()})
        return self.last


class _Pairs:
    """``(arena view, source)`` pairs kept as two lists (no tuple per tensor, which the cyclic garbage collector
    would then walk); iterates as pairs."""

    __slots__ = ("dsts", "srcs")

    def __init__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        self.dsts, self.srcs = dsts, srcs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.dsts, self.srcs, strict=True)


def _copy_all(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, non_blocking: bool) -> None:
    """Copy each ``(dst, src)``: host sources in one batched ``_foreach_copy_``, device ones one by one
    (each must be recorded on the side stream)."""
    if isinstance(pairs, _Pairs):
        dsts, srcs = pairs.dsts, pairs.srcs
    else:
        both = list(pairs)
        dsts, srcs = [d for d, _ in both], [src for _, src in both]
    with torch.no_grad():
        if not any(src.is_cuda for src in srcs):
            if srcs:
                torch._foreach_copy_(dsts, srcs)
            return
        for dst, src in zip(dsts, srcs, strict=True):
            if src.is_cuda:  # on the side stream: keep the caching allocator from reusing src until the copy ran
                src.record_stream(torch.cuda.current_stream(src.device))
            dst.copy_(src, non_blocking=non_blocking)


class StepGate:
    """Holds ``optimizer.step()`` until the current snapshot's copies are done (a step pre-hook).

    Register once per optimizer in the saved state; ``arm(staged)`` at each save; ``wait()`` is also the
    public fence for other in-place writers (EMA updates, manual weight edits).
    """

    def __init__(self) -> None:
        self._staged: Snapshot | None = None
        # by weak reference, never by id(): a rebuilt optimizer may get a dead one's id
        self._handles: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()
        self.waited = 0.0
        self.waits = 0

    def watch(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Make sure each optimizer's ``step()`` waits for the snapshot (called at every save: an optimizer
        rebuilt mid-run, or one whose hooks were cleared, is hooked again)."""
        for opt in optimizers:
            handle = self._handles.get(opt)
            hooks = getattr(opt, "_optimizer_step_pre_hooks", None)  # torch's registry: is our hook still there?
            if handle is None or (hooks is not None and handle.id not in hooks):
                self._handles[opt] = opt.register_step_pre_hook(self._pre_step)

    def _pre_step(self, *_args: Any, **_kwargs: Any) -> None:
        self.wait()

    def arm(self, staged: Snapshot) -> None:
        self._staged = staged

    def wait(self) -> None:
        staged = self._staged
        if staged is None:
            return
        if not staged.done():
            self.waits += 1
        self.waited += staged.gate()
        self._staged = None

    def close(self) -> None:
        for h in list(self._handles.values()):
            h.remove()
        self._handles = weakref.WeakKeyDictionary()
        self._staged = None
