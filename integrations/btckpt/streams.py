"""Copy streams: an in-order queue of copies that runs beside the training (or restoring) thread.

:class:`CudaStream` is a side CUDA stream; :class:`ThreadStream` is its CPU stand-in (one thread), used for
host copies and by tests that drive the device paths without a GPU. Both speak the same verbs: ``run(fn)``
enqueues, ``record()`` returns an event set once everything enqueued so far ran, ``query(ev)`` / ``sync(ev)``
poll or wait for it, ``gate(ev)`` orders the caller's next work after it, ``close()``. The snapshot
(:mod:`btckpt.saving.snapshot`) and the restore (:mod:`btckpt.restore.reader`) use them.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its names may change without notice.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ThreadStream", "CudaStream"]


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

    @staticmethod
    def query(ev: threading.Event) -> bool:
        return ev.is_set()

    @staticmethod
    def sync(ev: threading.Event) -> None:
        ev.wait()

    gate = sync  # host copies: the training thread itself must wait

    def take_error(self) -> BaseException | None:
        err, self._error = self._error, None
        return err

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)


class CudaStream:
    """A side CUDA stream for copies between device and host: a snapshot's device->host copies (after
    :meth:`start_after_compute`, the compute stream's work so far) and a restore's host->device copies."""

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

    @staticmethod
    def query(ev: Any) -> bool:
        return bool(ev.query())

    @staticmethod
    def sync(ev: Any) -> None:
        ev.synchronize()

    def gate(self, ev: Any) -> None:
        """Order the compute stream after the copy: the host does not block, the GPU waits if needed."""
        ev.wait(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        """Block until everything enqueued so far has run (the stream itself needs no teardown)."""
        self.stream.synchronize()
