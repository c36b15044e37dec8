"""The restore's read pattern on a cold file: does a readahead hint or a span size change its speed?

    sudo .venv/bin/python benchmarks/bench_readahead.py --gib 4 --rounds 10 --dir /var/tmp/btckpt-readahead

A ``--gib`` file of random bytes (made once, kept for the next run) is read into a buffer touched beforehand
(as the live tensors of a built model are), the page cache dropped before each read (``/proc/sys/vm/drop_caches``:
needs root), the way ``btckpt.restore.reader`` reads a data section: ``--threads`` threads, each ``os.preadv`` of
one span, spans submitted in file order. Contenders alternate round by round: ``--spans`` (MiB, comma-separated)
with the kernel's default readahead, and the first span size with ``POSIX_FADV_SEQUENTIAL`` on the whole file
(what the reader did before 2026-12-08). Prints medians, min-max and how many rounds each contender beat the
reader's own pattern (the first span size, no hint).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def read(path: Path, mv: memoryview, *, threads: int, span: int, hint: bool) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = len(mv)
        if hint:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)

        def fill(at: int) -> None:
            end = min(size, at + span)
            while at < end:
                got = os.preadv(fd, [mv[at:end]], at)
                if not got:
                    raise OSError(f"{path}: ended at {at}")
                at += got

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for fut in [pool.submit(fill, at) for at in range(0, size, span)]:
                fut.result()
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=4, help="spans in flight (the reader's READ_THREADS)")
    ap.add_argument("--spans", default="16", help="span sizes in MiB, comma-separated (the first: the reader's)")
    ap.add_argument("--dir", default="/var/tmp/btckpt-readahead")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    size = int(a.gib * (1 << 30))
    path = root / f"random-{size}.bin"
    if not path.is_file() or path.stat().st_size != size:
        with open(path, "wb") as f:
            for _ in range(0, size, 64 << 20):
                f.write(os.urandom(64 << 20)[: size - f.tell()])
            os.fsync(f.fileno())
    buf = bytearray(size)
    mv = memoryview(buf)
    for i in range(0, size, 4096):  # touched once, as a built model's memory is
        buf[i] = 1
    spans = [int(s) << 20 for s in a.spans.split(",")]
    contenders = {f"{s >> 20} MiB spans": (s, False) for s in spans}
    contenders[f"{spans[0] >> 20} MiB spans + POSIX_FADV_SEQUENTIAL"] = (spans[0], True)
    base = next(iter(contenders))
    times: dict[str, list[float]] = {k: [] for k in contenders}
    wins = dict.fromkeys(contenders, 0)
    for r in range(a.rounds):
        got = {}
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            span, hint = contenders[name]
            drop_caches()
            got[name] = read(path, mv, threads=a.threads, span=span, hint=hint)
            times[name].append(got[name])
        for name in contenders:
            wins[name] += got[name] < got[base]
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in got.items()), flush=True)
    print(f"\n| {a.threads} threads, cold {a.gib:g} GiB | median (min-max), n={a.rounds} | GB/s | faster than "
          f"'{base}' |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} s ({min(ts):.3f}-{max(ts):.3f}) | {size / med / 1e9:.2f} | "
              f"{'-' if name == base else f'{wins[name]} of {a.rounds}'} |")


if __name__ == "__main__":
    main()
