"""The snapshot: copy the state's tensors into a reusable staging arena, off the training thread.

Call order (by each rank, from the training thread): ``Stager.stage(flat, layout, sync_keys)`` returns a
:class:`Staged` once the small/volatile tensors are copied; large tensors keep copying on a side CUDA
stream (device tensors) or the copy thread (host tensors). :class:`StepGate` makes every
``optimizer.step()`` wait for those copies, so the arena equals the state at the ``save()`` call.
The arena is laid out as the files' data sections (see :mod:`btckpt.layout`), page-aligned, pinned on
CUDA, allocated once and reused while the layout's signature is unchanged.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import faults
from .layout import FlatState, Layout

__all__ = ["ThreadStream", "CudaStream", "Staged", "Stager", "StepGate", "PAGE"]

PAGE = 4096


class ThreadStream:
    """An in-order work queue on one thread: the CPU stand-in for a CUDA stream (and the host copier)."""

    def __init__(self, name: str = "btckpt-copy") -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                self._error = exc

    def run(self, fn: Callable[[], None]) -> None:
        """Enqueue ``fn`` after everything enqueued before it."""
        self._q.put(fn)

    def record(self) -> threading.Event:
        """An event set when everything enqueued so far has run."""
        ev = threading.Event()
        self._q.put(ev.set)
        return ev

    def take_error(self) -> BaseException | None:
        err, self._error = self._error, None
        return err

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)


class CudaStream:
    """A side CUDA stream that first waits for the compute stream, then copies device->host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def start_after_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def run(self, fn: Callable[[], None]) -> None:
        with torch.cuda.stream(self.stream):
            fn()

    def record(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev


class Staged:
    """A snapshot in flight: the arena view per file, and the events its async copies signal."""

    def __init__(self, arena: torch.Tensor, layout: Layout, events: list[Any], host: ThreadStream) -> None:
        self.arena = arena
        self.layout = layout
        self._events = events
        self._host = host
        self.error: BaseException | None = None
        self.copied_at: float | None = None if events else time.perf_counter()

    def done(self) -> bool:
        """True once every async copy finished (never blocks)."""
        return all((e.is_set() if isinstance(e, threading.Event) else e.query()) for e in self._events)

    def wait(self) -> float:
        """Block until every copy finished; return seconds waited. A copy error lands in ``error``."""
        t0 = time.perf_counter()
        for e in self._events:
            if isinstance(e, threading.Event):
                e.wait()
            else:
                e.synchronize()
        self._events = []
        err = self._host.take_error()
        if err is not None:
            self.error = err
        if self.copied_at is None:
            self.copied_at = time.perf_counter()
        return time.perf_counter() - t0

    def data(self, begin: int, size: int) -> memoryview:
        """The arena bytes ``[begin, begin+size)`` as a memoryview (for the writer)."""
        return memoryview(self.arena.numpy())[begin:begin + size]  # type: ignore[arg-type]


class Stager:
    """Owns the staging arena and the copy streams of one Checkpointer (one per rank)."""

    def __init__(self, *, small_bytes: int = 1 << 20) -> None:
        self.small_bytes = small_bytes
        self.allocations = 0
        self._arena: torch.Tensor | None = None
        self._arena_pinned = False
        self._views: dict[tuple[str, str], torch.Tensor] = {}
        self._views_sig: Any = None
        self._host = ThreadStream()
        self._cuda: dict[torch.device, CudaStream] = {}

    @property
    def arena_bytes(self) -> int:
        return 0 if self._arena is None else self._arena.numel()

    def _ensure_arena(self, layout: Layout, pinned: bool) -> torch.Tensor:
        need = layout.arena_size
        if self._arena is None or self._arena.numel() < need or (pinned and not self._arena_pinned):
            self._arena = None
            self._views = {}
            raw = torch.empty(max(need, 1) + PAGE, dtype=torch.uint8, pin_memory=pinned)
            shift = (-raw.data_ptr()) % PAGE
            self._arena = raw[shift:shift + max(need, 1)]
            self._arena_pinned = pinned
            self.allocations += 1
        if self._views_sig != layout.signature:
            self._views = {key: self._arena[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
                           for key, s in layout.slots.items()}
            self._views_sig = layout.signature
        return self._arena

    def stage(self, flat: FlatState, layout: Layout, *, async_keys: set[tuple[str, str]], sync: bool) -> Staged:
        """Copy every tensor into the arena. Keys in ``async_keys`` copy in the background unless ``sync``."""
        faults.point("stage")
        on_cuda = any(t.is_cuda for g in flat for t in g.tensors.values())
        arena = self._ensure_arena(layout, pinned=on_cuda and torch.cuda.is_available())
        later_host: list[tuple[torch.Tensor, torch.Tensor]] = []
        later_dev: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad():
            for g in flat:
                for key, t in g.tensors.items():
                    dst = self._views[(g.name, key)]
                    if sync or (g.name, key) not in async_keys or t.numel() * t.element_size() < self.small_bytes:
                        dst.copy_(t)
                    elif t.is_cuda:
                        later_dev.setdefault(t.device, []).append((dst, t))
                    else:
                        later_host.append((dst, t))
        events: list[Any] = []
        for dev, pairs in later_dev.items():
            cs = self._cuda.get(dev)
            if cs is None:
                cs = self._cuda[dev] = CudaStream(dev)
            cs.start_after_compute()
            cs.run(functools.partial(_copy_all, pairs, non_blocking=True))
            events.append(cs.record())
        if later_host:
            self._host.run(lambda: _copy_all(later_host, non_blocking=False))
            events.append(self._host.record())
        return Staged(arena, layout, events, self._host)

    def close(self) -> None:
        self._host.close()
        self._arena = None
        self._views = {}


def _copy_all(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, non_blocking: bool) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src, non_blocking=non_blocking)


class StepGate:
    """Holds ``optimizer.step()`` until the current snapshot's copies are done (a step pre-hook).

    Register once per optimizer in the saved state; ``arm(staged)`` at each save; ``wait()`` is also the
    public fence for other in-place writers (EMA updates, manual weight edits).
    """

    def __init__(self) -> None:
        self._staged: Staged | None = None
        self._handles: dict[int, Any] = {}
        self.waited = 0.0
        self.waits = 0

    def watch(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        for opt in optimizers:
            if id(opt) not in self._handles:
                self._handles[id(opt)] = opt.register_step_pre_hook(lambda *_a, **_k: self.wait())

    def arm(self, staged: Staged) -> None:
        self._staged = staged

    def wait(self) -> None:
        staged = self._staged
        if staged is None:
            return
        if not staged.done():
            self.waits += 1
        self.waited += staged.wait()
        self._staged = None

    def close(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        self._staged = None
