"""Encode a state tree as JSON with tensor references, and decode it back.

Leaves are JSON scalars, tensors (replaced by ``{"__tensor__": {"file", "key"}}`` references) or tagged values for
what plain JSON cannot hold: tuples, non-finite floats, dicts with non-string keys. Nothing is pickled;
anything else raises :class:`UnsupportedValue` naming the key path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import CorruptCheckpoint, UnsupportedValue

__all__ = ["encode_tree", "encode_scalar", "NOT_SCALAR", "decode_tree", "TAGS", "MAX_DEPTH"]

TAGS = ("__tensor__", "__tuple__", "__float__", "__dict__")
MAX_DEPTH = 200


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


NOT_SCALAR: Any = object()  # encode_scalar's answer for anything but a JSON scalar


def encode_scalar(value: Any, path: tuple[Any, ...]) -> Any:
    """The JSON form of a leaf that is a plain scalar (None, bool, str, int, float: non-finite floats tagged),
    or :data:`NOT_SCALAR`; raises when ``path`` is nested deeper than :data:`MAX_DEPTH`."""
    if len(path) > MAX_DEPTH:
        raise UnsupportedValue(f"state at {_path_str(path)!r} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"__float__": repr(float(value))}
    return NOT_SCALAR


def encode_tree(
    value: Any,
    on_tensor: Callable[[tuple[Any, ...], Any], Any],
    *,
    is_tensor: Callable[[Any], bool],
    path: tuple[Any, ...] = (),
) -> Any:
    """Return a JSON-able copy of ``value``; ``on_tensor(path, tensor)`` gives each tensor's key."""
    scalar = encode_scalar(value, path)
    if scalar is not NOT_SCALAR:
        return scalar
    if is_tensor(value):
        return {"__tensor__": on_tensor(path, value)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_tree(v, on_tensor, is_tensor=is_tensor, path=path + (i,))
                              for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_tree(v, on_tensor, is_tensor=is_tensor, path=path + (i,)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) for k in value) and not any(k in TAGS for k in value)
        if plain:
            return {k: encode_tree(v, on_tensor, is_tensor=is_tensor, path=path + (k,)) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise UnsupportedValue(
                    f"dict key {k!r} at {_path_str(path)!r} has type {type(k).__name__}; "
                    "use str, int, float, bool, None or tuple keys (btckpt stores state as JSON, never pickle)")
            items.append([encode_tree(k, on_tensor, is_tensor=is_tensor, path=path + ("<key>",)),
                          encode_tree(v, on_tensor, is_tensor=is_tensor, path=path + (k,))])
        return {"__dict__": items}
    # numpy scalars and similar: accept exact conversions to int/float/bool only.
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return encode_tree(item(), on_tensor, is_tensor=is_tensor, path=path)
    raise UnsupportedValue(
        f"state value at {_path_str(path)!r} has type {type(value).__module__}.{type(value).__qualname__}, "
        "which is neither a tensor nor JSON data; convert it to a tensor, number, string, list or dict "
        "(btckpt never pickles)")


def decode_tree(value: Any, load_tensor: Callable[[Any], Any], *, depth: int = 0) -> Any:
    """Inverse of :func:`encode_tree`; ``load_tensor(key)`` returns the tensor for a reference."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpoint(f"manifest state is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        return [decode_tree(v, load_tensor, depth=depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            return load_tensor(inner)
        if tag == "__tuple__":
            if not isinstance(inner, list):
                raise CorruptCheckpoint(f"bad tuple tag {inner!r} in the manifest (needs a list)")
            return tuple(decode_tree(v, load_tensor, depth=depth + 1) for v in inner)
        if tag == "__float__":
            if inner not in ("inf", "-inf", "nan"):
                raise CorruptCheckpoint(f"bad float tag {inner!r} in the manifest")
            return float(inner)
        if tag == "__dict__":
            if not isinstance(inner, list) or not all(isinstance(p, list) and len(p) == 2 for p in inner):
                raise CorruptCheckpoint("bad dict tag in the manifest (needs a list of [key, value] pairs)")
            out = {}
            for k, v in inner:
                k = decode_tree(k, load_tensor, depth=depth + 1)
                try:
                    hash(k)
                except TypeError:
                    raise CorruptCheckpoint(f"bad dict key {k!r} in the manifest (not hashable)") from None
                out[k] = decode_tree(v, load_tensor, depth=depth + 1)
            return out
    return {k: decode_tree(v, load_tensor, depth=depth + 1) for k, v in value.items()}
