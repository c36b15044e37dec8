"""What ``btckpt ls / show`` and ``btckpt browse`` tell about a checkpoint: its type, its files, its tensors.

Torch-free (the CLI starts without torch). Files and headers are read through the checkpoint's Store
(:mod:`btckpt.storage.store`), so local folders and URLs are shown by the same code; a safetensors header is read
with one or two range reads, never the whole file.
"""

from __future__ import annotations

import struct

from ..format.header import MAX_HEADER, Header, parse_header
from ..storage.discovery import HF_WEIGHTS, CheckpointInfo
from ..storage.store import walk

__all__ = ["human", "checkpoint_type", "listed_files", "read_header", "HEAD_GUESS"]

HEAD_GUESS = 64 * 1024  # one range read covers most headers (btckpt pads them to 4 KiB)


def human(n: int) -> str:
    """Bytes in binary units (``1.5 MiB``)."""
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if f < 1024 or unit == "TiB":
            return f"{int(f)} B" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{n} B"  # pragma: no cover


def listed_files(info: CheckpointInfo) -> dict[str, int]:
    """``{name: size}``: the files the manifest lists (its sizes), else every file in the folder."""
    if info.manifest is not None:
        return {n: int(e["size"]) for n, e in info.manifest.files.items()}
    return {n: e.size for n, e in walk(info.store, info.path).items() if e.is_file}


def checkpoint_type(info: CheckpointInfo) -> str:
    """``LoRA`` (adapter weights), ``training-state`` (optimizer or other tensor groups beside the model),
    ``full`` (model weights only), ``state`` (plain data only) or ``-`` (unreadable)."""
    if info.status == "corrupt" and info.manifest is None:
        return "-"
    names = list(listed_files(info))
    if any(n.startswith("adapter_model") for n in names):
        return "LoRA"
    groups = set(info.manifest.state) if info.manifest is not None else set()
    st_groups = {n.split(".")[0].split("-0")[0] for n in names if n.endswith(".safetensors")}
    if "optimizer" in groups or st_groups - {"model"}:
        return "training-state"
    if "model" in st_groups or any(n in names for n in HF_WEIGHTS):
        return "full"
    return "state"


def read_header(info: CheckpointInfo, name: str, size: int, *, counter: list[int] | None = None) -> Header:
    """Parse the safetensors header of the file ``name`` (``size`` bytes) of ``info``: one range read, two
    when the header exceeds :data:`HEAD_GUESS`. ``counter[0]`` grows by the bytes read."""
    store, where = info.store, info.store.where(info.path, name)
    first = store.read(info.path, name, 0, min(size, HEAD_GUESS))
    if len(first) >= 8:
        (n,) = struct.unpack("<Q", first[:8])
        if len(first) < 8 + n <= size and n <= MAX_HEADER:
            first += store.read(info.path, name, len(first), 8 + n)
    if counter is not None:
        counter[0] += len(first)
    return parse_header(first, size, where=where)
