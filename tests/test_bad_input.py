"""Bad input catalogue: each case must raise a clear error (the right CheckpointError subclass, a message
naming the path or key) and write nothing (no checkpoint, no temp folder, no stray file anywhere under
the test's folder)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import btckpt
import pytest
import torch
from btckpt import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    NoCheckpointFound,
    StateMismatch,
    UnsupportedFormat,
    UnsupportedValue,
)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (but the test's $TMPDIR), files with size and mtime: 'nothing written'."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(dirpath) == root and d == "_tmp")]
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            is_file = p.is_file() and not p.is_symlink()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if is_file else (0, 0)
    return out


def model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(width, 4)


def saved(tmp: Path, name: str = "checkpoint-1", **state: Any) -> Path:
    return btckpt.save(tmp / "ck" / name, state or {"model": model(), "extra": {"a": 1}})


def edit_manifest(folder: Path, fn: Callable[[dict], Any]) -> Path:
    man = folder / "btckpt.json"
    obj = json.loads(man.read_text())
    obj.pop("checksum", None)  # a hand edit: what is left is checked field by field
    fn(obj)
    man.write_text(json.dumps(obj))
    return folder


def hf_folder(tmp: Path, st_bytes: bytes, index: Any = None) -> Path:
    d = tmp / "hfmodel"
    d.mkdir()
    (d / "config.json").write_text("{}")
    if index is not None:
        (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    else:
        (d / "model.safetensors").write_bytes(st_bytes)
    return d


def st_file(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@dataclass
class Case:
    exc: type[BaseException]
    setup: Callable[[Path, pytest.MonkeyPatch], tuple[Callable[[], Any], list[str]]]


def _ckpt(tmp: Path, **kw: Any) -> btckpt.Checkpointer:
    return btckpt.Checkpointer(dir=str(tmp / "ck"), async_save=False, handle_sigterm=False, **kw)


def load_into_model(folder: Path, m: torch.nn.Module | None = None) -> Callable[[], Any]:
    return lambda: btckpt.load(folder, {"model": m if m is not None else model()})


def env_dir_is_file(tmp, mp):
    f = tmp / "afile"
    f.write_text("x")
    mp.setenv("BT_CHECKPOINT_DIR", str(f))
    return (lambda: btckpt.Checkpointer()), [str(f), "BT_CHECKPOINT_DIR"]


def env_load_dir_is_file(tmp, mp):
    f = tmp / "afile"
    f.write_text("x")
    mp.setenv("BT_LOAD_CHECKPOINT_DIR", str(f))
    return (lambda: btckpt.Checkpointer(dir=str(tmp / "ck"))), [str(f), "LOAD_CHECKPOINT_DIR"]


def dir_under_a_file(tmp, mp):
    f = tmp / "afile"
    f.write_text("x")
    return (lambda: btckpt.Checkpointer(dir=str(f / "sub" / "ck"))), [str(f)]


def missing_load_dir(tmp, mp):
    ck = _ckpt(tmp, load_dir=str(tmp / "nowhere"))

    def go():
        try:
            ck.restore({"model": model()})
        finally:
            ck.close()
    return go, [str(tmp / "nowhere"), "on_missing"]


def load_relative_missing(tmp, mp):
    return (lambda: btckpt.load("runs/nope", {"model": model()})), ["runs/nope"]


def step_not_int(tmp, mp):
    ck = _ckpt(tmp)

    def go():
        try:
            ck.save("5", {"model": model()})  # type: ignore[arg-type]
        finally:
            ck.close()
    return go, ["step='5'"]


def step_negative(tmp, mp):
    ck = _ckpt(tmp)

    def go():
        try:
            ck.save(-1, {"model": model()})
        finally:
            ck.close()
    return go, ["step=-1"]


def duplicate_step_oneshot(tmp, mp):
    folder = saved(tmp)
    return (lambda: btckpt.save(folder, {"model": model()})), [str(folder), "already exists"]


def duplicate_step_incomplete_folder(tmp, mp):
    (tmp / "ck" / "checkpoint-3").mkdir(parents=True)
    ck = _ckpt(tmp)

    def go():
        try:
            ck.save(3, {"model": model()})
        finally:
            ck.close()
    return go, [str(tmp / "ck" / "checkpoint-3"), "not a complete"]


def non_numeric_step_folder_is_not_a_checkpoint(tmp, mp):
    folder = saved(tmp)
    (tmp / "ck" / "checkpoint-latest").symlink_to(folder)  # not a step: never listed
    os.rename(folder, tmp / "ck" / "checkpoint-best")
    return (lambda: btckpt.load(tmp / "ck", {"model": model()})), [str(tmp / "ck")]


def manifest_not_json(tmp, mp):
    folder = saved(tmp)
    (folder / "btckpt.json").write_text("{not json")
    return load_into_model(folder), ["btckpt.json", "not valid JSON"]


def manifest_wrong_format(tmp, mp):
    folder = edit_manifest(saved(tmp), lambda o: o.update(format="zip/1"))
    return load_into_model(folder), ["btckpt.json", "zip/1"]


def manifest_newer_format(tmp, mp):  # not damaged: written by a newer btckpt
    folder = edit_manifest(saved(tmp), lambda o: o.update(format="btckpt/9"))
    return load_into_model(folder), ["btckpt.json", "btckpt/9", "written by a newer btckpt", "upgrade btckpt"]


def manifest_bad_step(tmp, mp):
    folder = edit_manifest(saved(tmp), lambda o: o.update(step="one"))
    return load_into_model(folder), ["btckpt.json", "'one'"]


def manifest_entry_without_checksum(tmp, mp):
    folder = edit_manifest(saved(tmp), lambda o: o["files"]["model.safetensors"].pop("xxh3_64"))
    return load_into_model(folder), ["btckpt.json", "model.safetensors"]


def manifest_state_not_object(tmp, mp):
    folder = edit_manifest(saved(tmp), lambda o: o.update(state=[1, 2]))
    return load_into_model(folder), ["btckpt.json", "'state'"]


def manifest_unlisted_file(tmp, mp):
    def fn(o):
        o["state"]["model"]["weight"]["__tensor__"]["file"] = "other.safetensors"
    folder = edit_manifest(saved(tmp), fn)
    return load_into_model(folder), [str(folder), "other.safetensors"]


def manifest_missing_tensor_key(tmp, mp):
    def fn(o):
        o["state"]["model"]["weight"]["__tensor__"]["key"] = "nope"
    folder = edit_manifest(saved(tmp), fn)
    return load_into_model(folder), ["model.safetensors", "'nope'"]


def manifest_step_disagrees_with_folder(tmp, mp):
    folder = edit_manifest(saved(tmp), lambda o: o.update(step=7))
    return load_into_model(folder), [str(folder), "step"]


def index_without_weight_map(tmp, mp):
    d = hf_folder(tmp, b"", index={"metadata": {}})
    return load_into_model(d), ["model.safetensors.index.json", "weight_map"]


def index_not_json(tmp, mp):
    d = hf_folder(tmp, b"", index="{oops")
    return load_into_model(d), ["model.safetensors.index.json"]


def st_truncated_header(tmp, mp):
    d = hf_folder(tmp, b"\x10\x00\x00")
    return load_into_model(d), [str(d / "model.safetensors"), "shorter than a safetensors header"]


def st_header_longer_than_file(tmp, mp):
    d = hf_folder(tmp, st_file({}, length=10_000))
    return load_into_model(d), [str(d / "model.safetensors"), "larger than the file"]


def st_header_not_json(tmp, mp):
    d = hf_folder(tmp, struct.pack("<Q", 5) + b"{abc}")
    return load_into_model(d), [str(d / "model.safetensors"), "not valid JSON"]


def st_unknown_dtype(tmp, mp):
    d = hf_folder(tmp, st_file({"weight": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
    return load_into_model(d), ["model.safetensors", "'weight'", "F12"]


def st_overlapping_offsets(tmp, mp):
    hdr = {"weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    d = hf_folder(tmp, st_file(hdr, b"\0" * 4))
    return load_into_model(d), ["model.safetensors", "overlap"]


def st_offsets_disagree_with_shape(tmp, mp):
    d = hf_folder(tmp, st_file({"weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4))
    return load_into_model(d), ["model.safetensors", "'weight'"]


def shape_mismatch(tmp, mp):
    folder = saved(tmp)
    return load_into_model(folder, torch.nn.Linear(9, 4)), ["'model'", "weight", "strict=False"]


def key_mismatch(tmp, mp):
    folder = saved(tmp)
    return load_into_model(folder, torch.nn.Linear(8, 4, bias=False)), ["'model'", "bias"]


def group_missing_in_checkpoint(tmp, mp):
    folder = saved(tmp)
    return (lambda: btckpt.load(folder, {"model": model(), "optimizer": {"lr": 1}})), ["'optimizer'", str(folder)]


def group_type_mismatch(tmp, mp):
    folder = saved(tmp, model=torch.ones(3))
    return (lambda: btckpt.load(folder, {"model": model()})), ["'model'"]


def meta_tensor(tmp, mp):
    with torch.device("meta"):
        m = torch.nn.Linear(4, 4)
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"model": m})), ["model.weight", "meta"]


def non_json_value(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"extra": {"cb": object()}})), ["cb", "object"]


def set_value(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"extra": {"ids": {1, 2}}})), ["ids", "set"]


def object_dict_key(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"extra": {"m": {object(): 1}}})), ["'m'", "dict key"]


def bad_group_name(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"../model": model()})), ["'../model'"]


def sparse_tensor(tmp, mp):
    t = torch.eye(3).to_sparse()
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"extra": {"adj": t}})), ["extra.adj", "to_dense"]


def complex128_tensor(tmp, mp):
    t = torch.zeros(2, dtype=torch.complex128)
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"extra": {"z": t}})), ["extra.z", "complex128"]


def empty_state(tmp, mp):
    ck = _ckpt(tmp)

    def go():
        try:
            ck.save(1, {})
        finally:
            ck.close()
    return go, ["non-empty"]


def keep_last_zero(tmp, mp):
    return (lambda: btckpt.Checkpointer(dir=str(tmp / "ck"), keep_last=0)), ["keep_last=0"]


def on_error_unknown(tmp, mp):
    return (lambda: btckpt.Checkpointer(dir=str(tmp / "ck"), on_error="ignore")), ["on_error='ignore'"]


def max_shard_size_zero(tmp, mp):
    return (lambda: btckpt.Checkpointer(dir=str(tmp / "ck"), max_shard_size=0)), ["max_shard_size=0"]


def node_rank_not_a_number(tmp, mp):
    saved(tmp)
    mp.setenv("BT_NODE_RANK", "two")
    return (lambda: btckpt.latest(tmp / "ck")), ["BT_NODE_RANK", "'two'"]


def extra_file_escapes(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"model": model()},
                                extra_files={"../evil.json": b"{}"})), ["'../evil.json'"]


def extra_file_overwrites_manifest(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"model": model()},
                                extra_files={"btckpt.json": b"{}"})), ["'btckpt.json'"]


def extra_file_clashes_with_tensors(tmp, mp):
    return (lambda: btckpt.save(tmp / "ck" / "checkpoint-1", {"model": model()},
                                extra_files={"model.safetensors": b"x"})), ["'model.safetensors'"]


def unwritable_dir(tmp, mp):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs (root ignores chmod)")
    ro = tmp / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)

    def go():
        try:
            btckpt.Checkpointer(dir=str(ro / "ck"))
        finally:
            subprocess.run(["umount", str(ro)], check=True)
    return go, [str(ro / "ck"), "not writable"]


CASES: dict[str, Case] = {
    "env_dir_is_file": Case(ConfigError, env_dir_is_file),
    "env_load_dir_is_file": Case(ConfigError, env_load_dir_is_file),
    "dir_under_a_file": Case(ConfigError, dir_under_a_file),
    "unwritable_dir": Case(ConfigError, unwritable_dir),
    "missing_load_dir": Case(NoCheckpointFound, missing_load_dir),
    "load_relative_missing": Case(NoCheckpointFound, load_relative_missing),
    "step_not_int": Case(ConfigError, step_not_int),
    "step_negative": Case(ConfigError, step_negative),
    "duplicate_step_oneshot": Case(CheckpointError, duplicate_step_oneshot),
    "duplicate_step_incomplete_folder": Case(CheckpointError, duplicate_step_incomplete_folder),
    "non_numeric_step_folders": Case(NoCheckpointFound, non_numeric_step_folder_is_not_a_checkpoint),
    "manifest_not_json": Case(CorruptCheckpoint, manifest_not_json),
    "manifest_wrong_format": Case(CorruptCheckpoint, manifest_wrong_format),
    "manifest_newer_format": Case(UnsupportedFormat, manifest_newer_format),
    "manifest_bad_step": Case(CorruptCheckpoint, manifest_bad_step),
    "manifest_entry_without_checksum": Case(CorruptCheckpoint, manifest_entry_without_checksum),
    "manifest_state_not_object": Case(CorruptCheckpoint, manifest_state_not_object),
    "manifest_unlisted_file": Case(CorruptCheckpoint, manifest_unlisted_file),
    "manifest_missing_tensor_key": Case(CorruptCheckpoint, manifest_missing_tensor_key),
    "manifest_step_disagrees_with_folder": Case(CorruptCheckpoint, manifest_step_disagrees_with_folder),
    "index_without_weight_map": Case(CorruptCheckpoint, index_without_weight_map),
    "index_not_json": Case(CorruptCheckpoint, index_not_json),
    "st_truncated_header": Case(CorruptCheckpoint, st_truncated_header),
    "st_header_longer_than_file": Case(CorruptCheckpoint, st_header_longer_than_file),
    "st_header_not_json": Case(CorruptCheckpoint, st_header_not_json),
    "st_unknown_dtype": Case(CorruptCheckpoint, st_unknown_dtype),
    "st_overlapping_offsets": Case(CorruptCheckpoint, st_overlapping_offsets),
    "st_offsets_disagree_with_shape": Case(CorruptCheckpoint, st_offsets_disagree_with_shape),
    "shape_mismatch": Case(StateMismatch, shape_mismatch),
    "key_mismatch": Case(StateMismatch, key_mismatch),
    "group_missing_in_checkpoint": Case(StateMismatch, group_missing_in_checkpoint),
    "group_type_mismatch": Case(StateMismatch, group_type_mismatch),
    "meta_tensor": Case(UnsupportedValue, meta_tensor),
    "non_json_value": Case(UnsupportedValue, non_json_value),
    "set_value": Case(UnsupportedValue, set_value),
    "object_dict_key": Case(UnsupportedValue, object_dict_key),
    "bad_group_name": Case(UnsupportedValue, bad_group_name),
    "sparse_tensor": Case(UnsupportedValue, sparse_tensor),
    "complex128_tensor": Case(UnsupportedValue, complex128_tensor),
    "empty_state": Case(ConfigError, empty_state),
    "keep_last_zero": Case(ConfigError, keep_last_zero),
    "on_error_unknown": Case(ConfigError, on_error_unknown),
    "max_shard_size_zero": Case(ConfigError, max_shard_size_zero),
    "node_rank_not_a_number": Case(ConfigError, node_rank_not_a_number),
    "extra_file_escapes": Case(ConfigError, extra_file_escapes),
    "extra_file_overwrites_manifest": Case(ConfigError, extra_file_overwrites_manifest),
    "extra_file_clashes_with_tensors": Case(ConfigError, extra_file_clashes_with_tensors),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    go, must_name = case.setup(tmp_path, monkeypatch)
    before = tree(tmp_path)
    with pytest.raises(case.exc) as ei:
        go()
    assert isinstance(ei.value, CheckpointError), f"{type(ei.value).__name__} is not a CheckpointError"
    msg = str(ei.value)
    for part in must_name:
        assert part in msg, f"message does not name {part!r}: {msg}"
    assert tree(tmp_path) == before, "the failed call wrote something"


def test_catalogue_size() -> None:
    assert len(CASES) >= 25
