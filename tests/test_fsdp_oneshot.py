"""The one-shot ``btckpt.load(path, state)`` of one named FSDP2 checkpoint into an FSDP2 model (real torchrun,
gloo): sharded groups go through DCP like ``Checkpointer.restore`` does, on any world size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dist_launch import assert_same, env_with, finish, torchrun

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("nproc", [2, 1])
def test_oneshot_load_of_a_sharded_checkpoint_into_fsdp2(tmp_path: Path, nproc: int) -> None:
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "ck"))
    rc, out = finish(torchrun("dist_hf.py", [str(tmp_path / "saved.st")], nproc=2, env=env), timeout=240)
    assert rc == 0, out[-4000:]
    rc, out = finish(torchrun("fsdp_oneshot_load.py", [str(tmp_path / "ck" / "checkpoint-1"),
                                                       str(tmp_path / "loaded.st")], nproc=nproc, env=env),
                     timeout=240)
    assert rc == 0, out[-4000:]
    assert sorted(re.findall(r"rank (\d+): loaded step (\d+)", out)) == [(str(r), "1") for r in range(nproc)]
    assert_same(tmp_path / "saved.st", tmp_path / "loaded.st")
