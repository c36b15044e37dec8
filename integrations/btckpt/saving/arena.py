"""A staging arena made of files: the snapshot of a local-tier save lands where the checkpoint lives.

A local-tier save (:mod:`btckpt.tiers`) would otherwise copy the state twice on the host: device (or
tensors) -> staging arena, then arena -> the tier's files. A :class:`FileArena` makes the arena *be* those
files: each file of the layout is created in an arena folder of the tier (a tmpfs), sized, and mapped
``MAP_SHARED``; the snapshot copies each tensor straight into its file's data section (on CUDA the
mapping is registered as page-locked memory, so the device-to-host copy is a DMA into the file). The
writer then writes each header into the mapping, checksums the bytes in place, syncs, and renames the
files into the commit's temp folder (:meth:`FileArena.land`): no second host copy, and the bytes survive
the death of the training process, because they are the tier's files.

Reuse without faulting pages in again: a Stager alternates two file arenas. When retention retires the
checkpoint that holds one arena's files (the folder is first renamed to a temp name, so it never looks
whole again), :meth:`FileArena.reclaim` renames the files back into the arena folder, mappings intact; the
next snapshot into that arena overwrites them. A file only ever holds new bytes while it sits in an arena
or temp folder, never in a committed checkpoint, so a crash at any instant leaves every committed
checkpoint as it was. An arena whose files did not come back (still promoted or sent to a peer, deleted
by someone) is replaced by fresh files.

Call order (one rank, its Stager): ``FileArena(folder, layout)`` on the training thread -> tensors copied
into :meth:`region` views -> the writer thread: :meth:`land` per file, into one commit's temp folder ->
(later, a retention thread) :meth:`reclaim` on the retired folder -> ... -> :meth:`close`. The Stager
serializes reclaim against the choice of arena (its lock).
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..format.checksum import new_hasher
from ..format.layout import FilePlan, Layout
from ..testing import faults

__all__ = ["FileArena", "Register"]

log = logging.getLogger("btckpt")

_CHUNK = 32 << 20

Register = Callable[[int, int], Callable[[], None]]
"""``register(address, nbytes)`` page-locks a mapping for device copies; returns the call that unlocks it."""


@dataclass
class _File:
    plan: FilePlan
    mm: mmap.mmap
    data: torch.Tensor  # the whole file: header, then the data section
    ident: tuple[int, int]  # (st_dev, st_ino): the file, wherever it was renamed to
    unregister: Callable[[], None] | None


class FileArena:
    """The staging arena of one snapshot layout, as files in ``folder`` (see the module doc).

    The folder is 0700 and its files 0600, created without following links (a tier is private: DESIGN.md
    "Shared places"). ``register``: page-lock each mapping (CUDA; :data:`Register`), None on CPU. Raises
    OSError when the files cannot be created (the caller falls back to an anonymous arena); nothing is left behind then.
    """

    def __init__(self, folder: Path, layout: Layout, *, register: Register | None = None) -> None:
        self.folder = folder
        self.signature = layout.signature
        self.nbytes = sum(fp.file_size for fp in layout.files)
        self.pinned = register is not None
        self._files: dict[str, _File] = {}
        self._begins: list[int] = []
        self._by_begin: list[_File] = []
        try:
            shutil.rmtree(folder, ignore_errors=True)  # a stale arena of this name (a crashed run): only ours
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(0o700)  # in the tier's private folder: private, like every file of the tier
            for fp in sorted(layout.files, key=lambda f: f.begin):
                f = self._create(fp, register)
                self._files[fp.name] = f
                self._begins.append(fp.begin)
                self._by_begin.append(f)
        except BaseException:
            self.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _create(self, fp: FilePlan, register: Register | None) -> _File:
        fd = os.open(self.folder / fp.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # allocated now: a full tmpfs fails here (ENOSPC), not later as a SIGBUS in the middle of a copy. Not
            # MAP_POPULATE: the page tables are filled by the first copy, on the copy thread, not on the training
            # thread (252 MB: fallocate 0.06 s, populating 0.10 s), and stay filled while the arena is reused
            os.posix_fallocate(fd, 0, fp.file_size)
            mm = mmap.mmap(fd, fp.file_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if hasattr(mmap, "MADV_DONTFORK"):  # a forked DataLoader worker must not keep (or share) the arena
                mm.madvise(mmap.MADV_DONTFORK)
            st = os.fstat(fd)
        finally:
            os.close(fd)  # the mapping keeps the file
        data = torch.frombuffer(mm, dtype=torch.uint8)
        try:
            unregister = register(data.data_ptr(), fp.file_size) if register is not None else None
        except BaseException:
            del data
            mm.close()
            raise
        return _File(fp, mm, data, (st.st_dev, st.st_ino), unregister)

    def region(self, begin: int, size: int) -> torch.Tensor:
        """The arena bytes ``[begin, begin+size)`` (layout offsets; within one file's data section)."""
        f = self._by_begin[bisect.bisect_right(self._begins, begin) - 1]
        at = len(f.plan.header) + begin - f.plan.begin
        return f.data[at:at + size]

    def present(self) -> bool:
        """Whether every file of this arena is in its folder (so it can take the next snapshot)."""
        return all(self._at(self.folder, f) for f in self._files.values())

    @staticmethod
    def _at(folder: Path, f: _File) -> bool:
        try:
            st = os.stat(folder / f.plan.name, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == f.ident

    def land(self, fp: FilePlan, target: Path) -> tuple[int, str]:
        """Write ``fp``'s header into its file, checksum the file in place, sync it, rename it to ``target``
        (in the commit's temp folder); ``(size, checksum)`` as :func:`~btckpt.saving.writer.write_arena_file`.
        Writer thread, after the snapshot's copies are done."""
        f = self._files[fp.name]
        if not self._at(self.folder, f):
            raise FileNotFoundError(f"{self.folder / fp.name}: the staged file is gone (removed by someone "
                                    "else while the snapshot was written); this step is not saved")
        view = memoryview(f.mm)
        try:
            view[:len(fp.header)] = fp.header
            faults.point("write_data")
            h = new_hasher()
            for off in range(0, fp.file_size, _CHUNK):
                h.update(view[off:off + _CHUNK])
        finally:
            view.release()  # else a kept traceback would keep the mapping past close()
        faults.point("before_fsync")
        f.mm.flush()  # msync: durable where the tier is on a disk; on a tmpfs it only orders
        faults.point("after_fsync")
        os.rename(self.folder / fp.name, target)
        return fp.file_size, h.hexdigest()

    def reclaim(self, retired: Path) -> bool:
        """When ``retired`` (a retired checkpoint folder, already renamed to a temp name) holds this arena's
        files and no reader holds any of them (each can be locked exclusively: btckpt's readers hold a shared
        ``flock``, :func:`btckpt.format.members.open_regular`), rename them back into the arena folder for the
        next snapshot; True then. Else False: the caller deletes them (a reader keeps its bytes)."""
        if not self._files or not all(self._at(retired, f) for f in self._files.values()):
            return False
        fds: list[int] = []
        try:
            for name in self._files:
                fds.append(os.open(retired / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
                try:
                    fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    log.info("btckpt: %s is being read (%s); its bytes are left to the reader", retired / name,
                             exc.strerror)
                    return False
            for name in self._files:  # locked: a reader opening it now finds it gone (open_regular)
                os.rename(retired / name, self.folder / name)
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Unmap (and unpin) the files; they stay where they are (a committed checkpoint keeps its bytes)."""
        for f in self._files.values():
            if f.unregister is not None:
                try:
                    f.unregister()
                except Exception as exc:  # noqa: BLE001 - never fail a close over it
                    log.warning("btckpt: unpinning %s failed: %s", f.plan.name, exc)
            del f.data
            try:
                f.mm.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                pass
        self._files = {}
        self._begins, self._by_begin = [], []
