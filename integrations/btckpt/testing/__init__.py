"""Fault points for tests: ``faults.point(phase)`` fails a named phase of a save, commit or upload on
purpose (raise, ENOSPC, EIO, SIGKILL, exit) when a test arms it (``faults.arm`` or ``$BTCKPT_FAULT``).

A no-op unless armed. Imports nothing of btckpt; anything may import it.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); ``btckpt.testing.faults`` is the test-support surface
(``arm``, ``disarm``, ``point``, ``reached``, ``PHASES``, ``$BTCKPT_FAULT``: for tests, never for training code).
"""
