"""Helpers shared by the benchmarks: state builders, fsync'd writers, page-cache dropping, stats."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def transformer_like_state(total_bytes: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state of about ``total_bytes`` (down to a 48 KiB multiple) of float32 tensors: a few large matrices
    (rows of 1024) and many small ones (~6% of the bytes at 1 GiB)."""
    g = torch.Generator().manual_seed(seed)
    small_n, small_bytes = 256, 256 << 10
    big_total = total_bytes - small_n * small_bytes
    big_n = 12
    rows = big_total // big_n // 4 // 1024  # whole rows: any total_bytes gives matrices of 1024 columns
    if rows < 1:
        raise ValueError(f"total_bytes={total_bytes}: at least {small_n * small_bytes + big_n * 4096} bytes")
    out: dict[str, torch.Tensor] = {}
    for i in range(big_n):
        out[f"layers_{i}_mlp_weight"] = torch.randn(rows * 1024, generator=g).view(rows, 1024)
    for i in range(small_n):
        out[f"layers_{i % 12}_norm{i}_weight"] = torch.randn(small_bytes // 4, generator=g)
    return out


class StateModule(torch.nn.Module):
    """A module whose parameters are the given tensors (the restore target, like a real model)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v, requires_grad=False) for k, v in tensors.items()})


def drop_caches() -> bool:
    """Drop the page cache (root only); True when it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_write(path: Path, nbytes: int) -> None:
    """``dd conv=fsync`` of ``nbytes`` from /dev/zero (the disk's sequential write ceiling)."""
    bs = 16 << 20
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={-(-nbytes // bs)}", "conv=fsync",
                    "status=none"], check=True)


def summary(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"median {med:.3f}s  (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def evict(paths: list[Path]) -> None:
    """Drop the page cache of ``paths`` without root: fsync each file (dirty pages cannot be dropped), then
    ``posix_fadvise(DONTNEED)`` drops its clean pages."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float:
    """The fraction of the bytes of ``paths`` in the page cache (``mincore`` on a read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if not size:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            try:
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
                resident += sum(v & 1 for v in bytes(vec)) * page
                total += pages * page
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def drop_file_cache(paths: list[Path]) -> str:
    """Drop the page cache: the whole cache when root may (``drop_caches``), else each file's pages
    (:func:`evict`); checked with :func:`resident_fraction`. Returns how, for the report."""
    how = "drop_caches" if drop_caches() else "fadvise DONTNEED"
    if how != "drop_caches":
        evict(paths)
    left = resident_fraction(paths)
    if left > 0.01:
        evict(paths)
        left = resident_fraction(paths)
        how += f" (+ fadvise; {left:.0%} still cached)"
    return how


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io`` counters (``rchar``: bytes read through read(2) and friends,
    ``read_bytes``: bytes fetched from the disk)."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (killed on exit) holding an empty ``bucket``; sets the environment and
    fsspec's config so ``s3://`` URLs reach it, in this process and its children. Yields the endpoint."""
    import boto3
    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # up to a minute to start
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint,
                           "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing"})
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()
