"""Restart time: from ``Checkpointer(...)`` to the first training step, page cache dropped.

    python benchmarks/bench_restart.py --sizes 1,4 --rounds 3 --dir /var/tmp/btckpt-restart [--s3]
    python benchmarks/bench_restart.py --quick          # smoke: 160 MiB, 1 round, s3 included
    python benchmarks/bench_restart.py --sizes 16 --rounds 2 --dir /var/tmp/btckpt-restart   # lean (>= 8 GiB)

Contenders, in one run, alternating order round by round, each after the page cache was dropped
(``/proc/sys/vm/drop_caches`` as root, else ``posix_fadvise(DONTNEED)`` per file, checked with ``mincore``):

- ``btckpt restore, older step present (one pass)``: ``Checkpointer(dir=...)`` + ``restore({"model": m})`` +
  one step that reads a parameter, the dir holding the newest step and an older one (a running job's dir; the
  older one is tiny here, only its presence matters): the newest is read in one pass straight into the model's
  tensors (checksums as the bytes land);
- ``btckpt restore, only checkpoint (verify first)``: the same with nothing to fall back on: every file hashed
  through a small ring first, then read into the model (the disk read once, the second read from the page cache);
- ``btckpt restore, only checkpoint (staged, before)``: today's reader before issue 24 (each file read into a
  fresh staging buffer, verified, copied in by ``load_state_dict``: ``LAST_CANDIDATE = "staged"``);
- ``btckpt restore from tmpfs (tier)``: the one-pass restore from a copy of the dir on ``/dev/shm`` (what a
  node-local tier restart reads; no disk at all), ``--tier`` (default on);
- ``load_file + load_state_dict``: safetensors' loader on the same bytes (no checksums);
- ``DCP load``: ``torch.distributed.checkpoint.load`` of a DCP checkpoint of the same state;
- ``dd``: ``dd if=<file> of=/dev/null bs=16M`` of every file btckpt reads (the disk's raw read speed).
- with ``--s3``: ``btckpt restore`` from ``s3://`` (moto server on 127.0.0.1; download + verify + load, the
  download cache emptied before each round) vs the download alone (``fs.get`` of the same files).

Prints per contender the median time, GB/s, and btckpt's ratio to dd's speed (goal >= 0.9x), plus the bytes
btckpt read (``/proc/self/io`` ``rchar``) per checkpoint byte (1.0 = each byte read once) and the extra host
memory of each btckpt restore: peak RSS during it (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
RSS before it (the model already built); goal <= 64 MiB + the largest tensor; and the process's peak RSS
(``VmHWM``) during each contender (its target model built in it; max over rounds) and over the whole run.

Lean mode (``--lean``; automatic for sizes >= 8 GiB, ``--no-lean`` turns that off) holds one copy of the state
in RAM at a time, so a 16 GiB state fits a 24 GiB machine: the source state is made, saved (the same layout;
the ``only`` dir's big files are hard links to ``own``'s, so the disk holds the bytes once), and each tensor's
digest recorded (xxh3-128 of its bytes, order-sensitive, plus shape and dtype), then the tensors are freed
before any contender runs; the equality check compares the restored tensors against those digests. The
target model is built with ``torch.empty`` of the right shapes (its pages then touched, untimed, as a built
model's are), so a btckpt restore holds one copy. ``load_file + load_state_dict`` into a built model would
hold two, so it is replaced by ``load_file + assign (meta model)``: ``load_state_dict(assign=True)`` into a
model built on the meta device (one copy), and the ratio column is computed against that. ``load_file`` maps
the file and reads it on first touch, so in lean mode every contender's first step reads one byte of every page
of every parameter (the whole state is in RAM when the timed part ends). Left out (printed):
the tier (the tmpfs copy + the model: two copies in RAM), DCP, the staged reader (a file's size of staging)
and s3.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import btckpt
import torch
import xxhash
from _common import StateModule, drop_file_cache, io_counters, moto_s3, transformer_like_state
from btckpt.restore import load as restore_load
from safetensors.torch import load_file

warnings.filterwarnings("ignore")

LEAN_FROM_GIB = 8.0  # sizes from this on run lean unless --no-lean
_PEAK = [0]  # the highest VmHWM seen since the last reset_peak_rss(total=True)


def first_step(model: torch.nn.Module, *, every_page: bool = False) -> float:
    """The first training step after the restart: here, one read of every parameter's first element; with
    ``every_page`` (lean mode) one byte of every 4 KiB page of every parameter, so a lazily mapped state (what
    safetensors' ``load_file`` returns: the file ``mmap``'d, read on first touch) is in RAM when the step ends,
    as a real step's forward pass needs it."""
    if every_page:
        return float(sum(p.detach().reshape(-1).view(torch.uint8)[::4096].sum() for p in model.parameters()))
    return float(sum(p.view(-1)[0] for p in model.parameters()))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss(*, total: bool = False) -> int:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; the RSS in bytes. The peak so far is kept
    in ``_PEAK`` (for the whole run's peak, :func:`run_peak_rss`); ``total`` starts that over too."""
    _PEAK[0] = 0 if total else max(_PEAK[0], peak_rss())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5\n")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def run_peak_rss() -> int:
    """This process's peak RSS since the last ``reset_peak_rss(total=True)``, across the per-restore resets."""
    return max(_PEAK[0], peak_rss())


Shapes = dict[str, tuple[torch.Size, torch.dtype]]


def tensor_digest(t: torch.Tensor) -> str:
    """An exact check of a tensor's bytes without keeping them: xxh3-128 of its bytes in 256 MiB chunks (any
    changed, missing or moved byte changes it with probability 1 - 2**-128; ``torch.hash_tensor``'s xor
    reduction would miss swapped chunks), with its shape and dtype."""
    c = t.detach().contiguous()
    flat = memoryview((ctypes.c_ubyte * (c.numel() * c.element_size())).from_address(c.data_ptr()))  # no copy
    h = xxhash.xxh3_128()
    step = 256 << 20
    for i in range(0, len(flat), step):
        h.update(flat[i:i + step])
    return f"{tuple(t.shape)}:{t.dtype}:{h.hexdigest()}"


def lean_model(shapes: Shapes) -> StateModule:
    """The lean target model: uninitialised storage of the right shapes (one copy of the state), its pages then
    touched as a built model's are (else the timed restore would pay the page faults)."""
    return StateModule({k: torch.empty(shape, dtype=dtype).zero_() for k, (shape, dtype) in shapes.items()})


def meta_model(shapes: Shapes) -> StateModule:
    """A model built on the meta device (no storage), for ``load_state_dict(assign=True)``."""
    return StateModule({k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()})


def link_tree(src: Path, dst: Path) -> None:
    """``copytree`` that hard-links the files over 1 MiB (the tensor files: the disk holds their bytes once; the
    restore only reads them) and copies the small ones (the manifest and the like, in case one is rewritten)."""
    def copy(s: str, d: str) -> None:
        if os.path.getsize(s) > 1 << 20:
            os.link(s, d)
        else:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=copy)


def fresh_model(tensors: dict[str, torch.Tensor]) -> StateModule:
    """The restart's target model (built before the timed part, as a training script does)."""
    return StateModule({k: torch.zeros_like(v) for k, v in tensors.items()})


def add_s3(contenders: dict[str, tuple[Callable[[], float], list[Path]]], root: Path, ck_dir: Path,
           tensors: dict[str, torch.Tensor], check: Callable[[torch.nn.Module, str], None]) -> None:
    """Upload the checkpoint to ``s3://restart/run`` (moto) and add the two s3 contenders: btckpt's restore
    from the URL (its download cache emptied each time) and the download alone (``fs.get`` of every file)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(ck_dir) + "/", "restart/run/checkpoint-2/", recursive=True)
    fs.invalidate_cache()
    cache = root / "s3-cache"
    os.environ["BTCKPT_CACHE"] = str(cache)

    def c_s3() -> float:
        shutil.rmtree(cache, ignore_errors=True)
        model = fresh_model(tensors)
        t0 = time.perf_counter()
        with btckpt.Checkpointer(dir=root / "s3-own", load_dir="s3://restart/run", save_rng=False,
                                 handle_sigterm=False) as ck:
            step = ck.restore({"model": model})
            first_step(model)
            dt = time.perf_counter() - t0
        assert step == 2, step
        check(model, "btckpt s3")
        return dt

    def c_s3_get() -> float:
        out = root / "s3-get"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        fs.get("restart/run/checkpoint-2/", str(out) + "/", recursive=True)
        return time.perf_counter() - t0

    contenders["btckpt restore from s3:// (moto)"] = (c_s3, [])
    contenders["s3 download only (fs.get)"] = (c_s3_get, [])


def run_size(gib: float, rounds: int, root: Path, with_s3: bool, *, tier: bool, dcp_too: bool,
             staged: bool = True, lean: bool = False) -> list[str]:
    reset_peak_rss(total=True)
    lines: list[str] = []
    if lean:
        left_out = []
        for name, on, why in (("tier (tmpfs)", tier, "the tmpfs copy + the model: two copies in RAM"),
                              ("DCP", dcp_too, "its save and load: time and a second copy"),
                              ("staged reader", staged, "a file's size of staging buffer beside the model"),
                              ("s3", with_s3, "the download cache + the model")):
            if on:
                print(f"lean mode: {name} left out ({why})", flush=True)
                left_out.append(name)
        tier = dcp_too = staged = with_s3 = False
        lines.append("lean mode: one copy of the state in RAM (digest check, empty target model, "
                     "load_file + assign into a meta model); left out: " + (", ".join(left_out) or "nothing"))
    nbytes = int(gib * 2**30)
    tensors = transformer_like_state(nbytes)
    src = StateModule(tensors)
    own = root / "own"
    only = root / "only"
    # the older step a running job's dir holds: only its being there matters (the newest is what is read), so a
    # tiny one keeps the benchmark's memory (the tier copy lives in RAM) and disk small
    btckpt.save(own / "checkpoint-1", {"model": StateModule({"w": torch.zeros(16)})}, save_rng=False)
    btckpt.save(own / "checkpoint-2", {"model": src}, save_rng=False)
    only.mkdir()
    os.rename(own / "checkpoint-2", only / "checkpoint-2")  # the same bytes: the only checkpoint of a dir
    if lean:
        link_tree(only / "checkpoint-2", own / "checkpoint-2")
    else:
        shutil.copytree(only / "checkpoint-2", own / "checkpoint-2")
    ck_dir = own / "checkpoint-2"
    files = sorted(p for p in ck_dir.iterdir() if p.is_file())
    only_files = sorted(p for p in (only / "checkpoint-2").iterdir() if p.is_file())
    st_files = [p for p in files if p.suffix == ".safetensors"]  # one, or the shards of a state over max_shard_size

    def load_files() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p in st_files:
            out.update(load_file(str(p)))
        return out
    shm = Path(tempfile.mkdtemp(prefix="btckpt-restart-tier-", dir="/dev/shm")) if tier else None
    if shm is not None:
        shutil.copytree(own, shm / "own")
    dcp_dir = root / "dcp"
    import torch.distributed.checkpoint as dcp

    if dcp_too:
        dcp.save({"model": src.state_dict()}, checkpoint_id=str(dcp_dir), no_dist=True)
    dcp_files = sorted(p for p in dcp_dir.rglob("*") if p.is_file())
    del src
    total = sum(p.stat().st_size for p in files)
    largest = max(v.numel() * v.element_size() for v in tensors.values())
    shapes: Shapes = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    digests: dict[str, str] = {}
    if lean:
        t0 = time.perf_counter()
        digests = {k: tensor_digest(v) for k, v in tensors.items()}
        digest_s = time.perf_counter() - t0
        tensors = {}
        gc.collect()
        print(f"lean mode: source digested in {digest_s:.1f}s and freed: RSS {reset_peak_rss() / 2**30:.2f} GiB, "
              f"peak so far {run_peak_rss() / 2**30:.2f} GiB", flush=True)

    times: dict[str, list[float]] = {}
    rchar: dict[str, list[float]] = {}
    extra: dict[str, list[int]] = {}
    how = ""
    peak: dict[str, list[int]] = {}  # per contender: the process's peak RSS during it (its model built in it)
    run_peak = 0

    def check(model: torch.nn.Module, label: str) -> None:
        got = model.state_dict()
        if lean:
            differs = set(got) != {f"p.{k}" for k in digests} or any(
                tensor_digest(got[f"p.{k}"]) != d for k, d in digests.items())
        else:
            differs = any(not torch.equal(got[f"p.{k}"], v) for k, v in tensors.items())
        if differs:
            raise SystemExit(f"{label}: the restored state differs from the saved one")

    def target() -> StateModule:
        return lean_model(shapes) if lean else fresh_model(tensors)

    def btckpt_restore(label: str, folder: Path, *, last: str = "verify_first") -> Callable[[], float]:
        def run() -> float:
            model = target()
            old = restore_load.LAST_CANDIDATE
            restore_load.LAST_CANDIDATE = last
            before = io_counters()["rchar"]
            rss = reset_peak_rss()
            try:
                t0 = time.perf_counter()
                with btckpt.Checkpointer(dir=folder, save_rng=False, handle_sigterm=False) as ck:
                    step = ck.restore({"model": model})
                    first_step(model, every_page=lean)
                    dt = time.perf_counter() - t0
            finally:
                restore_load.LAST_CANDIDATE = old
            extra.setdefault(label, []).append(peak_rss() - rss)
            rchar.setdefault(label, []).append((io_counters()["rchar"] - before) / total)
            assert step == 2, step
            check(model, label)
            return dt
        return run

    def c_safetensors() -> float:
        model = fresh_model(tensors)
        t0 = time.perf_counter()
        model.load_state_dict(load_files())
        first_step(model)
        dt = time.perf_counter() - t0
        check(model, "safetensors")
        return dt

    def c_safetensors_assign() -> float:
        model = meta_model(shapes)
        t0 = time.perf_counter()
        model.load_state_dict(load_files(), assign=True)
        first_step(model, every_page=True)
        dt = time.perf_counter() - t0
        check(model, "safetensors assign")
        return dt

    def c_dcp() -> float:
        model = fresh_model(tensors)
        t0 = time.perf_counter()
        sd = {"model": model.state_dict()}
        dcp.load(sd, checkpoint_id=str(dcp_dir), no_dist=True)
        model.load_state_dict(sd["model"])
        first_step(model)
        dt = time.perf_counter() - t0
        check(model, "DCP")
        return dt

    def c_dd() -> float:
        t0 = time.perf_counter()
        for p in files:
            subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=16M", "status=none"], check=True)
        return time.perf_counter() - t0

    onepass = "btckpt restore, older step present (one pass)"
    lsd_label = "load_file + assign (meta model)" if lean else "load_file + load_state_dict"
    contenders: dict[str, tuple[Callable[[], float], list[Path]]] = {
        onepass: (btckpt_restore(onepass, own), files),
        "btckpt restore, only checkpoint (verify first)": (
            btckpt_restore("btckpt restore, only checkpoint (verify first)", only), only_files),
        lsd_label: (c_safetensors_assign if lean else c_safetensors, files),
        "dd (raw read)": (c_dd, files),
    }
    if staged:
        label = "btckpt restore, only checkpoint (staged, before)"
        contenders[label] = (btckpt_restore(label, only, last="staged"), only_files)
    if dcp_too:
        contenders["DCP load"] = (c_dcp, dcp_files)
    if shm is not None:
        label = "btckpt restore from tmpfs (tier, one pass)"
        contenders[label] = (btckpt_restore(label, shm / "own"), [])
    warm = root / "warm"  # one untimed restore of each kind first: imports, thread pools
    small = {"w": torch.randn(1 << 16)}
    for step in (1, 2):
        btckpt.save(warm / f"checkpoint-{step}", {"model": StateModule(small)}, save_rng=False)
    for last in ("verify_first", "staged"):
        restore_load.LAST_CANDIDATE = last
        with btckpt.Checkpointer(dir=warm, save_rng=False, handle_sigterm=False) as ck:
            ck.restore({"model": fresh_model(small)})
    restore_load.LAST_CANDIDATE = "verify_first"
    try:
        with contextlib.ExitStack() as stack:
            if with_s3:
                stack.enter_context(moto_s3("restart"))
                add_s3(contenders, root, ck_dir, tensors, check)
            for r in range(rounds):
                order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                for name in order:
                    fn, paths = contenders[name]
                    if paths or name.startswith("btckpt restore from s3") or name.startswith("s3 "):
                        how = drop_file_cache(paths or files)
                    gc.collect()  # a contender's model may sit in a reference cycle: free it before the next is built
                    run_peak = max(run_peak, run_peak_rss())
                    reset_peak_rss(total=True)
                    times.setdefault(name, []).append(fn())
                    peak.setdefault(name, []).append(run_peak_rss())
    finally:
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    dd = med["dd (raw read)"]
    lsd = med[lsd_label]
    vs_lsd = "speed / (load_file + assign)'s" if lean else "speed / load_file's"
    lines += [f"state {total / 2**30:.2f} GiB in {len(files)} files (largest tensor {largest / 2**20:.0f} MiB); "
              f"page cache: {how}; rounds {rounds}",
              f"| contender | median | GB/s | speed / dd's | {vs_lsd} | min..max | extra RSS (median) | "
              "process peak RSS (max) |",
              "|---|---|---|---|---|---|---|---|"]
    for k, v in med.items():
        mem = f"{statistics.median(extra[k]) / 2**20:.0f} MiB" if k in extra else ""
        mem += f" | {max(peak[k]) / 2**30:.2f} GiB" if k in peak else " |"
        lines.append(f"| {k} | {v:.3f}s | {total / v / 1e9:.2f} | {dd / v:.2f}x | {lsd / v:.2f}x | "
                     f"{min(times[k]):.3f}..{max(times[k]):.3f} | {mem} |")
    for k, per_byte in rchar.items():
        lines.append(f"{k}: read {statistics.median(per_byte):.3f} bytes per checkpoint byte (rchar)")
    if shm is not None:
        lines.append(f"tier restart speed-up over the cold disk (one pass both): "
                     f"{med[onepass] / med['btckpt restore from tmpfs (tier, one pass)']:.2f}x (goal >= 5x)")
    lines.append(f"goals: speed / dd's >= 0.9x, {vs_lsd.removeprefix('speed ')} >= 1.0x; extra RSS <= 64 MiB + "
                 f"largest tensor = {(64 * 2**20 + largest) / 2**20:.0f} MiB")
    lines.append(f"peak RSS of the process (VmHWM, this size's whole run: make, save, contenders): "
                 f"{max(run_peak, run_peak_rss()) / 2**30:.2f} GiB")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="state sizes in GiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp folder on /var/tmp)")
    ap.add_argument("--s3", action="store_true", help="also restore from s3:// (moto server on 127.0.0.1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 160 MiB, 1 round, s3 included")
    ap.add_argument("--no-tier", action="store_true", help="leave out the tmpfs (tier) restore")
    ap.add_argument("--no-dcp", action="store_true", help="leave out DCP's load")
    ap.add_argument("--no-staged", action="store_true", help="leave out the staged reader (needs a file's size "
                    "of extra RAM)")
    lean_group = ap.add_mutually_exclusive_group()
    lean_group.add_argument("--lean", action="store_true",
                      help=f"one copy of the state in RAM (automatic for sizes >= {LEAN_FROM_GIB:g} GiB): digest "
                      "check, empty target, load_file + assign into a meta model; no tier, DCP, staged reader or s3")
    lean_group.add_argument("--no-lean", dest="lean", action="store_false", help="never lean, whatever the size")
    ap.set_defaults(lean=None)
    args = ap.parse_args()
    sizes = [160 / 1024] if args.quick else [float(s) for s in args.sizes.split(",")]
    rounds = 1 if args.quick else args.rounds
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="btckpt-restart-", dir="/var/tmp"))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, dir {base}",
          flush=True)
    try:
        for gib in sizes:
            root = base / f"{gib:g}gib"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            lean = args.lean if args.lean is not None else gib >= LEAN_FROM_GIB
            for line in run_size(gib, rounds, root, args.s3 or args.quick, tier=not args.no_tier,
                                 dcp_too=not args.no_dcp, staged=not args.no_staged, lean=lean):
                print(line, flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
