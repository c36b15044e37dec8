"""Helpers shared by the benchmarks: state builders, fsync'd writers, page-cache dropping, stats."""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

import torch


def transformer_like_state(total_bytes: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state of ``total_bytes`` float32 tensors: a few large matrices and many small ones (~6% of bytes)."""
    g = torch.Generator().manual_seed(seed)
    small_n, small_bytes = 256, 256 << 10
    big_total = total_bytes - small_n * small_bytes
    big_n = 12
    out: dict[str, torch.Tensor] = {}
    for i in range(big_n):
        out[f"layers_{i}_mlp_weight"] = torch.randn(big_total // big_n // 4, generator=g).view(-1, 1024)
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
