"""The safetensors header: build it (padded so data starts on a 4 KiB boundary) and parse it safely.

Torch-free, so the CLI can summarise files without importing torch. Parsing validates everything the
format promises (length, JSON object, dtypes, shapes, contiguous in-bounds offsets) and never reads
more than the header.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from ..errors import CorruptCheckpoint
from .members import short_repr as _short

__all__ = ["DTYPE_SIZES", "TensorEntry", "Header", "build_header", "build_header_columns", "parse_header",
           "ALIGN"]

ALIGN = 4096
MAX_HEADER = 100 * 1024 * 1024  # same limit as the safetensors library

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1,
    "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    """A parsed header: its entries (in data order), metadata, and where the data section starts."""

    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    data_start: int

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}


def build_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None,
                 *, align: int = ALIGN) -> bytes:
    """Return ``8-byte length + JSON`` padded with spaces so that its total length is a multiple of align."""
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = metadata
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(obj, separators=(",", ":")).encode()
    total = -(-(8 + len(raw)) // align) * align
    n = total - 8
    return struct.pack("<Q", n) + raw + b" " * (n - len(raw))


_ENTRY = '{}:{{"dtype":"{}","shape":{},"data_offsets":[{},{}]}}'.format
_COMPACT = (",", ":")


def build_header_columns(names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[tuple[int, ...]],
                         begins: Sequence[int], ends: Sequence[int], metadata: dict[str, str] | None = None,
                         *, align: int = ALIGN) -> bytes:
    """:func:`build_header` of the entries given as columns (the same bytes), in one string: no dict per tensor.
    ``dtypes`` are safetensors names (``"F32"``)."""
    if metadata and "__metadata__" in names:  # that tensor's entry replaces the metadata: build_header does it
        return build_header([TensorEntry(*row) for row in zip(names, dtypes, shapes, begins, ends, strict=True)],
                            metadata, align=align)
    shape_json = {s: json.dumps(list(s), separators=_COMPACT) for s in set(shapes)}
    parts = list(map(_ENTRY, map(encode_basestring_ascii, names), dtypes, map(shape_json.__getitem__, shapes),
                     begins, ends))
    if metadata:
        parts.insert(0, '"__metadata__":' + json.dumps(metadata, separators=_COMPACT))
    raw = ("{" + ",".join(parts) + "}").encode()
    total = -(-(8 + len(raw)) // align) * align
    n = total - 8
    return struct.pack("<Q", n) + raw + b" " * (n - len(raw))


def parse_header(length_and_json: bytes, file_size: int, *, where: str) -> Header:
    """Parse the header bytes (the 8-byte length followed by the JSON); ``where`` names the file in errors."""
    if len(length_and_json) < 8:
        raise CorruptCheckpoint(f"{where}: file is {len(length_and_json)} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", length_and_json[:8])
    if n > MAX_HEADER:
        raise CorruptCheckpoint(f"{where}: header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise CorruptCheckpoint(f"{where}: header length {n} is larger than the file ({file_size} bytes); "
                                "the file is truncated")
    raw = length_and_json[8:8 + n]
    if len(raw) < n:
        raise CorruptCheckpoint(f"{where}: header truncated ({len(raw)} of {n} bytes)")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CorruptCheckpoint(f"{where}: header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptCheckpoint(f"{where}: __metadata__ must map strings to strings")
    entries = []
    for name, info in obj.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CorruptCheckpoint(f"{where}: tensor {name!r} lacks dtype/shape/data_offsets") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CorruptCheckpoint(f"{where}: tensor {name!r} has unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or len(shape) > 64 or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62 for s in shape) \
                or math.prod(max(s, 1) for s in shape) * DTYPE_SIZES[dtype] >= 2**62:
            raise CorruptCheckpoint(f"{where}: tensor {name!r} has a bad shape {_short(shape)} (non-negative "
                                    "integers whose product, zeros aside, fits in 62 bits)")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (begin, end)) or not 0 <= begin <= end:
            raise CorruptCheckpoint(f"{where}: tensor {name!r} has bad data_offsets {_short([begin, end])}")
        e = TensorEntry(name, dtype, tuple(shape), begin, end)
        if e.numel * DTYPE_SIZES[dtype] != end - begin:
            raise CorruptCheckpoint(f"{where}: tensor {name!r}: offsets span {end - begin} bytes but "
                                    f"{dtype}{list(shape)} needs {e.numel * DTYPE_SIZES[dtype]}")
        entries.append(e)
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise CorruptCheckpoint(f"{where}: tensor {e.name!r} starts at {e.begin}, expected {pos} "
                                    "(data offsets overlap or leave a hole)")
        pos = e.end
    data_start = 8 + n
    if data_start + pos != file_size:
        raise CorruptCheckpoint(f"{where}: data section is {file_size - data_start} bytes, header describes {pos}; "
                                "the file is truncated or has trailing bytes")
    return Header(tuple(entries), dict(meta), data_start)


