"""Corruption of a committed checkpoint: flip one byte, truncate, or delete each kind of file (tensor shard,
single-file group, index, manifest, RNG JSON, extra JSON). ``verify`` must report it naming the file, and
restore (Checkpointer.restore and btckpt.load on the folder) must fall back to the previous complete
checkpoint with a warning naming the file. A randomized sweep must detect 100% of the damage.

Internals used: btckpt.format.manifest, btckpt.storage.discovery (the manifest parser fed every byte flip, discovery
to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt import CheckpointError
from btckpt.storage.discovery import inspect
from btckpt.storage.discovery import verify as verify_files

MUTATIONS = ("flip", "truncate", "delete")
KINDS = {
    "shard": "model-00001-of-00003.safetensors",
    "last_shard": "model-00003-of-00003.safetensors",
    "group_file": "ema.safetensors",
    "opt_shard": "optimizer-00002-of-00005.safetensors",
    "index": "model.safetensors.index.json",
    "manifest": "btckpt.json",
    "rng_json": "rng_state_0.json",
    "extra_json": "config.json",
}


def make_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 48), torch.nn.Linear(48, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 48)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "ema": torch.randn(10), "extra": {"seed": seed}}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "ckpts"
    with btckpt.Checkpointer(dir=str(root), async_save=False, keep_last=None, max_shard_size=10_000,
                             handle_sigterm=False) as ck:
        for step in (1, 2):
            ck.save(step, make_state(step), extra_files={"config.json": b'{"hidden": 48}'})
    names = {p.name for p in (root / "checkpoint-2").iterdir()}
    assert set(KINDS.values()) <= names, names
    return root


def mutate(path: Path, how: str, rng: random.Random) -> str:
    if how == "delete":
        path.unlink()
        return "deleted"
    data = path.read_bytes()
    if how == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(data[:n])
        return f"truncated to {n}"
    i = rng.randrange(len(data))
    b = bytearray(data)
    b[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(b))
    return f"byte {i} flipped"


def verify(folder: Path) -> list[str]:
    """What ``btckpt verify`` reports: the completeness check, then every file's size and checksum."""
    info = inspect(folder)
    if not info.complete:
        return [f"{info.status}: {info.reason}"]
    return verify_files(info)


def damage_and_check(pristine: Path, work: Path, name: str, how: str, rng: random.Random,
                     caplog: pytest.LogCaptureFixture) -> None:
    root = work / "ckpts"
    shutil.copytree(pristine, root)
    what = mutate(root / "checkpoint-2" / name, how, rng)
    ctx = f"{name} {what}"
    problems = verify(root / "checkpoint-2")
    assert problems, f"verify missed: {ctx}"
    assert any(name in p for p in problems), f"verify does not name {name}: {problems} ({ctx})"
    assert verify(root / "checkpoint-1") == [], "the older checkpoint was affected"
    want = make_state(1)
    for loader in ("checkpointer", "load"):
        state = make_state(7)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="btckpt"):
            if loader == "checkpointer":
                with btckpt.Checkpointer(dir=str(root), handle_sigterm=False) as ck:
                    step = ck.restore(state)
            else:
                step = btckpt.load(root, state)
        assert step == 1, f"{loader} did not fall back ({ctx})"
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("checkpoint-2" in m and name in m for m in warned), f"{loader}: no warning naming {name}: {warned}"
        for k, v in want["model"].state_dict().items():
            assert torch.equal(state["model"].state_dict()[k], v), (loader, k, ctx)
    # the damaged folder named directly is refused with a CheckpointError naming the file
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        btckpt.load(root / "checkpoint-2", make_state(7))
    shutil.rmtree(work)


@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_and_mutation(pristine: Path, tmp_path: Path, kind: str, how: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    damage_and_check(pristine, tmp_path / "w", KINDS[kind], how, random.Random(f"{kind}/{how}"), caplog)


def test_randomized_sweep_detects_everything(pristine: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """200 random damages (any file, any mutation, any offset): 100% detected by verify and by restore."""
    rng = random.Random(20240601)
    files = sorted(p.name for p in (pristine / "checkpoint-2").iterdir())
    detected = 0
    for i in range(200):
        damage_and_check(pristine, tmp_path / f"w{i}", rng.choice(files), rng.choice(MUTATIONS), rng, caplog)
        detected += 1
    assert detected == 200


def test_manifest_every_single_byte_flip_is_detected(pristine: Path) -> None:
    """Exhaustive: each byte of the manifest XOR 0x01 and XOR 0x20 (letters' case, digits, quotes)."""
    from btckpt.format.manifest import Manifest

    raw = (pristine / "checkpoint-2" / "btckpt.json").read_bytes()
    missed = []
    for i in range(len(raw)):
        for x in (0x01, 0x20):
            b = bytearray(raw)
            b[i] ^= x
            try:
                Manifest.from_json(bytes(b), where="m")
            except CheckpointError:
                continue
            missed.append((i, x))
    assert not missed, f"{len(missed)} undetected manifest flips, e.g. {missed[:5]}"
