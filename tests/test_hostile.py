"""Hostile checkpoints: a manifest or index naming ``../`` or absolute paths, links out of the folder, pickle
payloads where a loader might look, oversized or deeply nested JSON. Each is refused (a CheckpointError,
with restore falling back past it), nothing is executed (no unpickling, no eval, no process started:
checked with a Python audit hook), and nothing outside the checkpoint folder is opened.

Checksums are not signatures: an attacker recomputes them, so every case here carries valid checksums.

Internals used: btckpt.cli, btckpt.format.checksum, btckpt.format.manifest, btckpt.storage.discovery (manifests and
checksums forged as an attacker would, the manifest's name checks, the command's ``main``/``verify``, discovery to
judge the folders on disk (complete, verified), which no public name reports).
"""

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
from btckpt import CheckpointError, CorruptCheckpoint, UnsafeCheckpoint
from btckpt.format.checksum import file_checksum
from btckpt.format.manifest import MANIFEST, Manifest

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
    from btckpt.format import manifest as manifest_mod
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


# -- issue 11 item 5: every failure while reading a candidate is a CheckpointError, and restore falls back -----
def tamper(folder: Path, name: str, data: bytes) -> None:
    """Replace the listed file ``name`` with ``data`` and re-sign the manifest (size and checksum)."""
    (folder / name).write_bytes(data)
    rewrite_manifest(folder, lambda man: relist(folder, man, name, folder / name))


def sevens() -> torch.nn.Module:
    m = torch.nn.Linear(4, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(7.0)
    return m


def assert_untouched(m: torch.nn.Module) -> None:
    assert all(bool((p == 7.0).all()) for p in m.parameters()), "the failed load changed the live model"


def check_falls_back(tmp: Path, folder: Path, must: str, exc_type: type = CheckpointError) -> None:
    """Direct load: ``exc_type`` naming ``must``, live state untouched. Restore from the parent, by the one-shot
    load and by a Checkpointer: step 1 (the older good one), with the model restored."""
    m = sevens()
    with pytest.raises(exc_type, match=must.replace(".", r"\.")):
        btckpt.load(folder, {"model": m, "extra": {}})
    assert_untouched(m)
    check_refused(tmp, folder, exc_type, must)
    m = sevens()
    with btckpt.Checkpointer(dir=str(folder.parent), handle_sigterm=False, keep_last=None) as ck:
        assert ck.restore({"model": m, "extra": {}}) == 1
    assert torch.equal(m.weight, model().weight)


def test_tensor_reference_key_is_a_list(tmp_path: Path, two: Path) -> None:
    rewrite_manifest(two, lambda man: man.state["model"]["weight"]["__tensor__"].update(key=["weight"]))
    check_falls_back(tmp_path, two, "btckpt.json", CorruptCheckpoint)


@pytest.mark.parametrize("value", [["x"], "text", 5])
def test_manifest_meta_is_not_an_object(tmp_path: Path, two: Path, value: Any) -> None:
    rewrite_manifest(two, lambda man: setattr(man, "meta", value))
    check_falls_back(tmp_path, two, "meta", CorruptCheckpoint)


@pytest.mark.parametrize("world", [[1], {"node_rank": "a"}, {"size": 1, "nodes": 1, "node_rank": 3}])
def test_manifest_world_is_malformed(tmp_path: Path, two: Path, world: Any) -> None:
    rewrite_manifest(two, lambda man: setattr(man, "world", world))
    check_falls_back(tmp_path, two, "world", CorruptCheckpoint)


def st_file(entries: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file with exactly these (dtype, shape, data) entries, as an attacker writes it."""
    hdr, data, pos = {}, b"", 0
    for k, (dtype, shape, raw) in entries.items():
        hdr[k] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    h = json.dumps(hdr).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**63], [2**40, 0, 2**40], [-1]])
def test_safetensors_shape_out_of_range(tmp_path: Path, two: Path, shape: list[int]) -> None:
    tamper(two, "model.safetensors", st_file({"weight": ("F32", shape, b""), "bias": ("F32", [2], b"\0" * 8)}))
    check_falls_back(tmp_path, two, "model.safetensors", CorruptCheckpoint)


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, None, 3])
def test_safetensors_dtype_of_the_wrong_type(tmp_path: Path, two: Path, dtype: Any) -> None:
    tamper(two, "model.safetensors", st_file({"weight": (dtype, [2, 4], b"\0" * 32), "bias": ("F32", [2], b"\0" * 8)}))
    check_falls_back(tmp_path, two, "model.safetensors", CorruptCheckpoint)


def test_a_directory_where_a_listed_file_should_be(tmp_path: Path, two: Path) -> None:
    (two / "model.safetensors").unlink()
    (two / "model.safetensors").mkdir()
    size = (two / "model.safetensors").lstat().st_size  # re-signed: the size matches, so the scan calls it complete

    def fn(man: Manifest) -> None:
        man.files["model.safetensors"]["size"] = size
    rewrite_manifest(two, fn)
    check_falls_back(tmp_path, two, "model.safetensors", CorruptCheckpoint)


def test_plain_tensor_where_a_module_state_is_expected(tmp_path: Path, two: Path) -> None:
    """A checkpoint whose model weight is plain data: refused before any parameter changed."""
    rewrite_manifest(two, lambda man: man.state["model"].update(weight=5))
    check_falls_back(tmp_path, two, "weight")


@pytest.mark.parametrize("rng", [{"torch": [1, 2, 3]}, {"python": [3, [1, 2], None]}, {"numpy": "abcde"},
                                 [1, 2], {"torch": "x"}, {"torch": [2**70]}])
def test_rng_file_of_the_wrong_shape_is_parsed_before_anything_is_applied(tmp_path: Path, rng: Any) -> None:
    """The RNG file is parsed and checked before the model is loaded: a malformed one leaves the live
    model untouched (it used to be parsed after the model was overwritten) and restore falls back."""
    make(tmp_path, 1)
    two = make(tmp_path, 2)
    tamper(two, "rng_state_0.json", json.dumps(rng).encode())
    check_falls_back(tmp_path, two, "rng_state_0.json", CorruptCheckpoint)


def test_manifest_naming_the_folder_itself(tmp_path: Path, two: Path) -> None:
    """A manifest listing ``"."`` used to raise IndexError from scan, latest, load, restore and ``btckpt ls``."""
    from btckpt.cli import main
    from btckpt.storage.discovery import scan

    size = two.lstat().st_size
    rewrite_manifest(two, lambda man: man.files.update({".": {"size": size, "xxh3_64": "0" * 16}}))
    infos = scan(two.parent)
    assert [(i.step, i.status) for i in infos] == [(2, "corrupt"), (1, "complete")], infos
    assert "'.'" in infos[0].reason
    assert btckpt.latest(two.parent) == two.parent / "checkpoint-1"
    assert main(["ls", str(two.parent), "--json"]) == 0
    check_falls_back(tmp_path, two, "'.'", UnsafeCheckpoint)
    with btckpt.Checkpointer(dir=str(two.parent), handle_sigterm=False, keep_last=1, async_save=False) as ck:
        ck.save(3, {"model": model()})
    assert btckpt.latest(two.parent) == two.parent / "checkpoint-3"


@pytest.mark.parametrize("name", [".", "./model.safetensors", "a//b", "sub/.", "x/./y"])
def test_names_with_dot_or_empty_parts_are_unsafe(name: str) -> None:
    from btckpt.format.manifest import check_relative_name

    with pytest.raises(UnsafeCheckpoint):
        check_relative_name(name, where="m")


# -- issue 11 item 7: sharded chunks must tile the global shape exactly ---------------------------------------
def sharded(folder: Path, chunks: list[tuple[list[int], list[int]]], *, via_dcp: bool) -> None:
    """Make ``folder``'s model weight [2, 4] a sharded tensor whose chunks are ``(offsets, sizes)``: each chunk
    ``c<i>`` in its own file's tensor, holding the right rows of the saved weight. Re-signed."""
    from safetensors.torch import load_file

    w = load_file(str(folder / "model.safetensors"))["weight"]
    parts = {}
    for i, (off, size) in enumerate(chunks):
        block = torch.zeros(size)
        real = w[off[0]:off[0] + size[0], off[1]:off[1] + size[1]]  # empty past the end (out of bounds)
        block[:real.shape[0], :real.shape[1]] = real
        parts[f"c{i}"] = ("F32", size, block.numpy().tobytes())
    tamper(folder, "model-rank00000.safetensors", st_file(parts))

    def fn(man: Manifest) -> None:
        relist(folder, man, "model-rank00000.safetensors", folder / "model-rank00000.safetensors")
        man.state["model"]["weight"] = {"__tensor__": {"sharded": {
            "key": "weight", "shape": [2, 4], "dtype": "F32",
            "chunks": [{"offsets": off, "sizes": size, "file": "model-rank00000.safetensors", "key": f"c{i}",
                        "node": 0} for i, (off, size) in enumerate(chunks)]}}}
        if via_dcp:
            man.meta = {"btckpt.sharded": {"model": "model"}}
    rewrite_manifest(folder, fn)


TILINGS = {
    "overlap": [([0, 0], [1, 4])] * 2,                      # row 0 twice, row 1 never: volume matches
    "overlap_many": [([0, 0], [1, 2])] * 4,                 # the same half row four times
    "out_of_bounds": [([1, 0], [1, 4]), ([2, 0], [1, 4])],  # row 0 a hole, a chunk past the end
    "partial_overlap": [([0, 0], [2, 3]), ([0, 2], [1, 2])],  # columns 2 overlap, 3 of row 1 a hole
}


@pytest.mark.parametrize("via_dcp", [False, True])
@pytest.mark.parametrize("case", sorted(TILINGS))
def test_sharded_chunks_must_tile_exactly(tmp_path: Path, two: Path, case: str, via_dcp: bool) -> None:
    sharded(two, TILINGS[case], via_dcp=via_dcp)
    check_falls_back(tmp_path, two, "btckpt.json", CorruptCheckpoint)


@pytest.mark.parametrize("via_dcp", [False, True])
def test_sharded_chunks_that_tile_load(tmp_path: Path, two: Path, via_dcp: bool) -> None:
    """The control: rows split in two chunks, and columns of row 1 in two more, load the saved weight."""
    sharded(two, [([0, 0], [1, 4]), ([1, 0], [1, 1]), ([1, 1], [1, 3])], via_dcp=via_dcp)
    m = sevens()
    assert btckpt.load(two, {"model": m, "extra": {}}) == 2
    assert torch.equal(m.weight, model().weight)


def test_chunk_file_shape_differs_from_the_manifest(tmp_path: Path, two: Path) -> None:
    sharded(two, [([0, 0], [1, 4]), ([1, 0], [1, 4])], via_dcp=False)
    data = (two / "model-rank00000.safetensors").read_bytes()
    tamper(two, "model-rank00000.safetensors", data.replace(b'"shape": [1, 4]', b'"shape": [2, 2]', 1))
    check_falls_back(tmp_path, two, "model-rank00000.safetensors", CorruptCheckpoint)


def test_tiling_problem_is_exact() -> None:
    from btckpt.format.manifest import tiling_problem

    def ch(*boxes: tuple[list[int], list[int]]) -> list[dict[str, Any]]:
        return [{"offsets": o, "sizes": s} for o, s in boxes]
    assert tiling_problem([4, 6], ch(([0, 0], [2, 6]), ([2, 0], [2, 3]), ([2, 3], [2, 3]))) is None
    assert tiling_problem([], ch(([], []))) is None
    assert tiling_problem([0, 5], []) is None
    assert tiling_problem([3], ch(([0], [2]), ([2], [1]), ([1], [0]))) is None  # an empty chunk is harmless
    assert "overlap" in str(tiling_problem([3], ch(([0], [2]), ([1], [1]))))  # volumes differ
    assert "overlap" in str(tiling_problem([2, 2], ch(([0, 0], [1, 2]), ([0, 0], [1, 1]), ([0, 1], [1, 1]))))
    assert "outside" in str(tiling_problem([2], ch(([1], [1]), ([2], [1]))))
    assert "overlap" in str(tiling_problem([2], ch(([0], [1]), ([0], [1]))))
    assert "overlap" in str(tiling_problem([3, 3], ch(([0, 0], [2, 2]), ([1, 1], [2, 2]), ([0, 2], [1, 1]))))
    assert "not 2 non-negative" in str(tiling_problem([2, 2], ch(([0], [2, 2]))))
    assert "not 1 non-negative" in str(tiling_problem([2], [{"offsets": [True], "sizes": [2]}]))


# -- issue 11 item 8: a FIFO (or socket, device, directory) named like a listed file is refused, never opened --
def fifo_checkpoint(two: Path, name: str) -> None:
    (two / name).unlink()
    os.mkfifo(two / name)

    def fn(man: Manifest) -> None:
        man.files[name]["size"] = 0  # what the scan sees: a FIFO's size; re-signed so the scan calls it complete
    rewrite_manifest(two, fn)


LOAD = ("import sys, torch, btckpt; torch.manual_seed(0); m = torch.nn.Linear(4, 2)\n"
        "try:\n    print(btckpt.load(sys.argv[1], {'model': m, 'extra': {}}))\n"
        "except btckpt.CheckpointError as e:\n    print(type(e).__name__, e)\n")


@pytest.mark.parametrize("name", ["model.safetensors", "rng_state_0.json", MANIFEST])
def test_fifo_does_not_hang_verify_or_load(tmp_path: Path, two: Path, name: str) -> None:
    """Run in subprocesses with a timeout: the old code blocked forever in open()."""
    import subprocess

    if name == MANIFEST:
        (two / MANIFEST).unlink()
        os.mkfifo(two / MANIFEST)
    else:
        fifo_checkpoint(two, name)
    py = sys.executable
    r = subprocess.run([py, "-m", "btckpt.cli", "verify", str(two)], capture_output=True, text=True, timeout=60)
    assert r.returncode in (1, 2) and "FIFO" in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)
    r = subprocess.run([py, "-c", LOAD, str(two)], capture_output=True, text=True, timeout=60)
    assert "FIFO" in r.stdout and name in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.split()[0] in ("CorruptCheckpoint", "IncompleteCheckpoint"), r.stdout
    r = subprocess.run([py, "-c", LOAD, str(two.parent)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "1", (r.stdout, r.stderr)


def test_socket_and_symlink_to_fifo_are_refused(tmp_path: Path, two: Path) -> None:
    import socket

    fifo = tmp_path / "ck" / "pipe"
    os.mkfifo(fifo)
    (two / "model.safetensors").unlink()
    (two / "model.safetensors").symlink_to(fifo)  # a link inside the parent, but outside the folder
    rewrite_manifest(two, lambda man: man.files["model.safetensors"].update(size=0))
    check_falls_back(tmp_path, two, "model.safetensors", CorruptCheckpoint)
    (two / "model.safetensors").unlink()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(two / "model.safetensors"))
        check_falls_back(tmp_path, two, "socket", CorruptCheckpoint)
    finally:
        s.close()


def test_verify_reports_a_fifo_in_process(tmp_path: Path, two: Path) -> None:
    from btckpt.cli import verify

    fifo_checkpoint(two, "model.safetensors")
    _, problems = verify(str(two))
    assert len(problems) == 1 and problems[0].startswith("model.safetensors:") and "FIFO" in problems[0]
