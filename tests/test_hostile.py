"""Hostile checkpoints: a manifest or index naming ``../`` or absolute paths, links out of the folder, pickle
payloads where a loader might look, oversized or deeply nested JSON. Each is refused (a CheckpointError,
with restore falling back past it), nothing is executed (no unpickling, no eval, no process started:
checked with a Python audit hook), and nothing outside the checkpoint folder is opened.

Checksums are not signatures: an attacker recomputes them, so every case here carries valid checksums."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import btckpt
import pytest
import torch
from btckpt.errors import CheckpointError, CorruptCheckpoint, UnsafeCheckpoint
from btckpt.manifest import MANIFEST, Manifest
from btckpt.storage import file_checksum

_AUDIT: dict[str, Any] = {"on": False, "opened": [], "bad": []}
_BAD_EVENTS = ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
               "builtins.input", "socket.connect", "ctypes.dlopen")


def _hook(event: str, args: tuple) -> None:
    if not _AUDIT["on"]:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _AUDIT["opened"].append(os.fsdecode(args[0]))
    elif event.startswith(_BAD_EVENTS) or (event == "exec" and _AUDIT.get("no_exec")):
        _AUDIT["bad"].append(event)


sys.addaudithook(_hook)


class Boom:
    """Unpickling this creates a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def make(tmp: Path, step: int = 1) -> Path:
    return btckpt.save(tmp / "ck" / f"checkpoint-{step}", {"model": model(), "extra": {"k": 1}})


def rewrite_manifest(folder: Path, fn) -> None:
    """Edit the manifest like an attacker would: change it, then recompute its checksum."""
    man = Manifest.from_json((folder / MANIFEST).read_bytes(), where="x")
    fn(man)
    (folder / MANIFEST).write_bytes(man.to_json())


def relist(folder: Path, man: Manifest, name: str, real: Path) -> None:
    size, digest = file_checksum(real)
    man.files[name] = {"size": size, "xxh3_64": digest}


def guarded(folder_allowed: Path, fn):
    """Run fn with the audit hook on; return (result or exception, files opened under the test dir)."""
    _AUDIT.update(on=True, opened=[], bad=[])
    try:
        try:
            out: Any = fn()
        except Exception as exc:  # noqa: BLE001 - inspected by the caller
            out = exc
    finally:
        _AUDIT["on"] = False
    return out, list(_AUDIT["opened"]), list(_AUDIT["bad"])


def assert_stayed_inside(opened: list[str], inside: Path, test_root: Path) -> None:
    inside_r = inside.resolve()
    for p in opened:
        rp = Path(p).resolve() if os.path.isabs(p) else (Path.cwd() / p).resolve()
        if test_root.resolve() in rp.parents and rp != inside_r and inside_r not in rp.parents:
            raise AssertionError(f"opened {p} outside the checkpoint folder {inside}")


def check_refused(tmp: Path, folder: Path, exc_type=CheckpointError, must: str = "") -> None:
    """Loading ``folder`` directly is refused; restore from its parent falls back to checkpoint-1."""
    out, opened, bad = guarded(folder, lambda: btckpt.load(folder, {"model": model(), "extra": {}}))
    assert isinstance(out, exc_type), repr(out)
    assert must in str(out), str(out)
    assert not bad, f"executed something: {bad}"
    assert_stayed_inside(opened, folder, tmp)
    out, opened, bad = guarded(folder.parent, lambda: btckpt.load(folder.parent, {"model": model(), "extra": {}}))
    assert out == 1, f"restore did not fall back to checkpoint-1: {out!r}"
    assert not bad
    assert_stayed_inside(opened, folder.parent, tmp)
    assert not (tmp / "marker").exists(), "a payload ran"


@pytest.fixture
def two(tmp_path: Path) -> Path:
    make(tmp_path, 1)
    return make(tmp_path, 2)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A valid safetensors file outside every checkpoint folder: nothing may read it."""
    out = tmp_path / "outside"
    out.mkdir()
    btckpt.save(out / "checkpoint-9", {"model": model()})
    return out / "checkpoint-9" / "model.safetensors"


@pytest.mark.parametrize("name", ["../../outside/checkpoint-9/model.safetensors", "/etc/passwd", "a/../../x",
                                  "C:/x", "\\\\server\\share", "sub/\x00.safetensors", ""])
def test_manifest_names_a_path_outside(tmp_path: Path, two: Path, secret: Path, name: str) -> None:
    def fn(man: Manifest) -> None:
        relist(two, man, name, secret)
        man.state["model"]["weight"]["__tensor__"]["file"] = name
    rewrite_manifest(two, fn)
    check_refused(tmp_path, two, UnsafeCheckpoint)


def test_manifest_lists_itself(tmp_path: Path, two: Path) -> None:
    rewrite_manifest(two, lambda man: relist(two, man, MANIFEST, two / "model.safetensors"))
    check_refused(tmp_path, two, UnsafeCheckpoint)


def test_data_file_is_a_link_out(tmp_path: Path, two: Path, secret: Path) -> None:
    (two / "model.safetensors").unlink()
    (two / "model.safetensors").symlink_to(secret)
    rewrite_manifest(two, lambda man: relist(two, man, "model.safetensors", secret))
    check_refused(tmp_path, two, CorruptCheckpoint, "outside")


def test_subfolder_is_a_link_out(tmp_path: Path, two: Path, secret: Path) -> None:
    (two / "sub").symlink_to(secret.parent)

    def fn(man: Manifest) -> None:
        relist(two, man, "sub/model.safetensors", secret)
        man.state["model"]["weight"]["__tensor__"]["file"] = "sub/model.safetensors"
    rewrite_manifest(two, fn)
    check_refused(tmp_path, two, UnsafeCheckpoint, "outside")


def test_manifest_is_a_link(tmp_path: Path, two: Path, secret: Path) -> None:
    real = tmp_path / "outside" / "checkpoint-9" / MANIFEST
    (two / MANIFEST).unlink()
    (two / MANIFEST).symlink_to(real)
    check_refused(tmp_path, two, CorruptCheckpoint, "symbolic link")


@pytest.mark.parametrize("name", ["../outside/checkpoint-9/model.safetensors", "/etc/hostname"])
def test_hf_index_names_a_path_outside(tmp_path: Path, secret: Path, name: str) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"weight": name, "bias": name}}))
    out, opened, bad = guarded(d, lambda: btckpt.load(d, {"model": model()}))
    assert isinstance(out, UnsafeCheckpoint), repr(out)
    assert not bad
    assert_stayed_inside(opened, d, tmp_path)


def test_hf_weights_link_out(tmp_path: Path, secret: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").symlink_to(secret)
    out, opened, bad = guarded(d, lambda: btckpt.load(d, {"model": model()}))
    assert isinstance(out, UnsafeCheckpoint), repr(out)
    assert_stayed_inside(opened, d, tmp_path)


PICKLE_NAMES = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_0.pth", "training_args.bin",
                "pytorch_model.bin", "model.ckpt", "last.ckpt", "extra_state.pkl"]


def test_pickle_payloads_are_never_unpickled(tmp_path: Path, two: Path) -> None:
    """Pickles under every name a torch/HF/Lightning loader would try, in a committed checkpoint, in a
    manifest-less HF-looking folder, and disguised as a .safetensors file: never loaded, never run."""
    marker = tmp_path / "marker"
    payload = pickle.dumps(Boom(marker))
    for n in PICKLE_NAMES:
        (two / n).write_bytes(payload)
    hf = tmp_path / "ck" / "checkpoint-3"  # newer, manifest-less, only pickles + config.json
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for n in PICKLE_NAMES:
        (hf / n).write_bytes(payload)
    state = {"model": model(), "extra": {}}
    out, opened, bad = guarded(tmp_path, lambda: btckpt.load(tmp_path / "ck", state))
    assert out == 2, repr(out)
    assert not bad, bad
    assert not any(Path(p).name in PICKLE_NAMES for p in opened), [p for p in opened if Path(p).name in PICKLE_NAMES]
    with btckpt.Checkpointer(dir=str(tmp_path / "ck"), handle_sigterm=False) as ck:
        out, opened, bad = guarded(tmp_path, lambda: ck.restore(state))
    assert out == 2 and not bad
    # a pickle disguised as the weights file: refused by the safetensors parser
    (two / "model.safetensors").write_bytes(payload)
    rewrite_manifest(two, lambda man: relist(two, man, "model.safetensors", two / "model.safetensors"))
    out, opened, bad = guarded(two, lambda: btckpt.load(two, {"model": model()}))
    assert isinstance(out, CorruptCheckpoint), repr(out)
    assert not bad and not marker.exists()


def test_oversized_safetensors_header_is_not_read(tmp_path: Path, two: Path) -> None:
    for n in (2**40, 100 * 1024 * 1024 + 1):
        data = struct.pack("<Q", n) + b"{}"
        (two / "model.safetensors").write_bytes(data)
        rewrite_manifest(two, lambda man: relist(two, man, "model.safetensors", two / "model.safetensors"))
        check_refused(tmp_path, two, CorruptCheckpoint, "header length")


def test_huge_shape_claim_allocates_nothing(tmp_path: Path, two: Path) -> None:
    hdr = json.dumps({"weight": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    (two / "model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr)
    rewrite_manifest(two, lambda man: relist(two, man, "model.safetensors", two / "model.safetensors"))
    check_refused(tmp_path, two, CorruptCheckpoint, "truncated")


def test_deeply_nested_safetensors_header(tmp_path: Path, two: Path) -> None:
    hdr = b"[" * 200_000 + b"]" * 200_000
    (two / "model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr)
    rewrite_manifest(two, lambda man: relist(two, man, "model.safetensors", two / "model.safetensors"))
    check_refused(tmp_path, two, CorruptCheckpoint)


@pytest.mark.parametrize("depth", [150_000, 400])
def test_deeply_nested_manifest_state(tmp_path: Path, two: Path, depth: int) -> None:
    raw = json.loads((two / MANIFEST).read_bytes())
    raw.pop("checksum")
    raw["state"]["extra"] = {"k": 1, "deep": json.loads("[" * 400 + "]" * 400) if depth < 1000 else 0}
    text = json.dumps(raw)
    if depth >= 1000:
        text = text.replace('"deep": 0', '"deep": ' + "[" * depth + "]" * depth)
    (two / MANIFEST).write_text(text)
    check_refused(tmp_path, two, CorruptCheckpoint)


def test_oversized_manifest(tmp_path: Path, two: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from btckpt import manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST", 4096)
    (two / MANIFEST).write_bytes(b"{" + b" " * 10_000 + b"}")
    check_refused(tmp_path, two, CorruptCheckpoint, "larger than")


@pytest.mark.parametrize("value", [
    {"__float__": "__import__('os').system('touch marker')"},
    {"__dict__": [[1, 2, 3]]},
    {"__dict__": "ab"},
    {"__dict__": [[[1], 2]]},
    {"__tuple__": 5},
    {"__tensor__": {"file": "model.safetensors"}},
    {"__tensor__": "model.safetensors"},
])
def test_malformed_tags_in_manifest_state(tmp_path: Path, two: Path, value: Any) -> None:
    def fn(man: Manifest) -> None:
        man.state["extra"] = {"k": value}
    rewrite_manifest(two, fn)
    out, opened, bad = guarded(two, lambda: btckpt.load(two, {"model": model(), "extra": {}}))
    assert isinstance(out, CorruptCheckpoint), repr(out)
    assert not bad and not (tmp_path / "marker").exists()


def test_hostile_checkpoint_is_skipped_with_a_warning(tmp_path: Path, two: Path, secret: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rewrite_manifest(two, lambda man: relist(two, man, "../x.safetensors", secret))
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        with btckpt.Checkpointer(dir=str(tmp_path / "ck"), handle_sigterm=False) as ck:
            assert ck.restore({"model": model()}) == 1
    assert any("checkpoint-2" in r.getMessage() and "../x.safetensors" in r.getMessage() for r in caplog.records)
