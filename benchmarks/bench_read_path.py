"""Where a verified restore's time goes: the read path's stages and variants, on one file of random bytes.

    python benchmarks/bench_read_path.py --gib 1 --rounds 5 --dirs /var/tmp,/dev/shm
    python benchmarks/bench_read_path.py --quick     # smoke: 64 MiB, 1 round

Per folder (a disk folder: page cache dropped before each read; a tmpfs folder such as /dev/shm: the bytes
are in RAM), alternating the contenders round by round, medians:

- read variants, each reading the whole file into a fresh buffer and hashing every byte (xxh3-64) as it lands:
  ``pread xN`` (btckpt's reader, N threads ``pread`` successive spans while the caller hashes in order),
  ``readinto 1 thread`` (read a span, hash it, next span: no thread), the same into a buffer mapped with
  ``MADV_HUGEPAGE`` (``+ hugepages``: 512x fewer page faults), and ``dd`` (read only, no buffer kept);
- the same reads into an already-touched buffer (the live parameters: what the one-pass restore does);
- the stages alone, bytes in RAM: page faults of a fresh buffer (``torch.empty`` + ``fill_``; the same with
  hugepages), the checksum of 1 buffer (xxh3-64), and the copy into already-touched destination tensors
  (``copy_``: what ``load_state_dict`` costs after the read);
- end to end: ``Checkpointer(dir=...)`` + ``restore({"model": m})`` of a checkpoint of the same size (checksums
  verified), with the staging buffer of 4 KiB pages (``torch.empty``: before) and with btckpt's
  (:func:`btckpt.restore.reader.staging_buffer`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import btckpt
import torch
from _common import StateModule, drop_file_cache, transformer_like_state
from btckpt.format.checksum import new_hasher
from btckpt.restore import reader

SPAN = 16 << 20


def fresh(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def read_pread(path: Path, n: int, threads: int, alloc: Callable[[int], torch.Tensor]) -> str:
    old = reader.READ_THREADS
    reader.READ_THREADS = threads
    try:
        buf = alloc(n)
        h = new_hasher()
        fd = os.open(path, os.O_RDONLY)
        try:
            reader._read_hashed(fd, memoryview(buf.numpy()), 0, h, path)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        return str(h.hexdigest())
    finally:
        reader.READ_THREADS = old


def read_seq(path: Path, n: int, alloc: Callable[[int], torch.Tensor]) -> str:
    buf = alloc(n)
    mv = memoryview(buf.numpy())  # type: ignore[arg-type]
    h = new_hasher()
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, n, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        while pos < n:
            got = f.readinto(mv[pos:pos + SPAN])
            assert got
            h.update(mv[pos:pos + got])
            pos += got
    return str(h.hexdigest())


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def restore_rows(folder: Path, gib: float, rounds: int, cold: bool) -> dict[str, list[float]]:
    """End to end: a Checkpointer restore of ``gib`` GiB, staging buffer of 4 KiB pages vs btckpt's."""
    tensors = transformer_like_state(int(gib * 2**30))
    own = folder / "bench-read-path-ckpt"
    btckpt.save(own / "checkpoint-1", {"model": StateModule(tensors)}, save_rng=False)
    files = [p for p in (own / "checkpoint-1").iterdir() if p.is_file()]
    ours = reader.staging_buffer
    variants = {"btckpt restore, torch.empty staging (before)": fresh, "btckpt restore (after)": ours}
    times: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                reader.staging_buffer = variants[name]  # type: ignore[assignment]
                model = StateModule({k: torch.zeros_like(v) for k, v in tensors.items()})
                if cold:
                    drop_file_cache(files)
                t0 = time.perf_counter()
                with btckpt.Checkpointer(dir=own, save_rng=False, handle_sigterm=False) as ck:
                    assert ck.restore({"model": model}) == 1
                times.setdefault(name, []).append(time.perf_counter() - t0)
                assert all(torch.equal(model.p[k], v) for k, v in tensors.items())
                del model
    finally:
        reader.staging_buffer = ours  # type: ignore[assignment]
        shutil.rmtree(own)
    return times


def run_folder(folder: Path, gib: float, rounds: int) -> list[str]:
    n = int(gib * 2**30)
    path = folder / "bench-read-path.bin"
    with open(path, "wb") as f:
        for _ in range(0, n, 64 << 20):
            f.write(os.urandom(min(64 << 20, n - f.tell())))
    cold = not str(folder).startswith("/dev/shm")
    huge = reader.staging_buffer
    live = torch.empty(n, dtype=torch.uint8).fill_(0)  # the live parameters a one-pass restore reads into

    def touched(m: int) -> torch.Tensor:
        return live[:m]

    contenders: dict[str, Callable[[], object]] = {
        "pread x4, torch.empty (before)": lambda: read_pread(path, n, 4, fresh),
        "pread x2, torch.empty": lambda: read_pread(path, n, 2, fresh),
        "readinto 1 thread, torch.empty": lambda: read_seq(path, n, fresh),
        "pread x4, hugepages": lambda: read_pread(path, n, 4, huge),
        "pread x2, hugepages": lambda: read_pread(path, n, 2, huge),
        "readinto 1 thread, hugepages": lambda: read_seq(path, n, huge),
        "pread x4, into touched destination (one-pass)": lambda: read_pread(path, n, 4, touched),
        "pread x1, into touched destination": lambda: read_pread(path, n, 1, touched),
        "readinto 1 thread, into touched destination": lambda: read_seq(path, n, touched),
        "dd bs=16M (no buffer, no hash)": lambda: subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=16M", "status=none"], check=True),
    }
    times: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                if cold:
                    drop_file_cache([path])
                times.setdefault(name, []).append(timed(contenders[name]))
        # the stages alone (bytes in RAM)
        src = torch.empty(n, dtype=torch.uint8).fill_(1)
        dst = torch.empty(n, dtype=torch.uint8).fill_(0)
        stages: dict[str, Callable[[], object]] = {
            "stage: fresh buffer page faults (empty + fill_)": lambda: fresh(n).fill_(0),
            "stage: xxh3-64 of the buffer": lambda: new_hasher().update(memoryview(src.numpy())),  # type: ignore
            "stage: copy_ into touched params": lambda: dst.copy_(src),
        }
        stages["stage: hugepage buffer page faults (+ fill_)"] = lambda: huge(n).fill_(0)
        for r in range(rounds):
            for name in (list(stages) if r % 2 == 0 else list(reversed(stages))):
                times.setdefault(name, []).append(timed(stages[name]))
    finally:
        path.unlink()
    times.update(restore_rows(folder, gib, rounds, cold))
    lines = [f"{folder} ({'page cache dropped' if cold else 'tmpfs: in RAM'}), {gib:g} GiB, rounds {rounds}",
             "| contender | median | GB/s | min..max |", "|---|---|---|---|"]
    for k, v in times.items():
        med = statistics.median(v)
        lines.append(f"| {k} | {med:.3f}s | {n / med / 1e9:.2f} | {min(v):.3f}..{max(v):.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dirs", default="/var/tmp,/dev/shm", help="folders to read from, comma-separated")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 round")
    args = ap.parse_args()
    gib, rounds = (1 / 16, 1) if args.quick else (args.gib, args.rounds)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    for d in args.dirs.split(","):
        for line in run_folder(Path(d), gib, rounds):
            print(line, flush=True)


if __name__ == "__main__":
    main()
