"""Lightning + FSDP1 with ``btckpt.lightning.FSDPStrategy`` (Lightning's ``FSDPStrategy``, same arguments) and
``SafetensorsCheckpointIO``: real torchrun, 2 ranks, gloo on CPU (tests/scripts/lightning_fsdp_train.py
``--strategy fsdp1``; its doc says what the CPU harness fills in). Each rank writes its own shards of FSDP1's
sharded state dict, Lightning's own folder (``.distcp`` + pickled ``meta.pt``) or ``.ckpt`` pickle is never
written; SIGKILL of the whole job and resume is bit-identical; the checkpoint reshards into one rank and into
FSDP2 (``btckpt.lightning.ModelParallelStrategy``); Lightning's own FSDPStrategy with the plugin is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from dist_launch import assert_same, env_with, finish, kill_when_paused, only_sharded_checkpoint, torchrun

pytest.importorskip("lightning")
pytestmark = pytest.mark.slow
SCRIPT = "lightning_fsdp_train.py"


def run(tmp: Path, ckdir: str, *args: str, nproc: int = 2, strategy: str = "fsdp1") -> str:
    rc, out = finish(torchrun(SCRIPT, ["--dir", str(tmp / ckdir), "--strategy", strategy, *args], nproc=nproc,
                              env=env_with()), timeout=240)
    assert rc == 0, out[-4000:]
    return out


def resumed(out: str, nproc: int) -> set[str]:
    steps = dict(re.findall(r"rank (\d+): resumed at step (\d+)", out))  # ranks share one pipe: match
    assert sorted(steps) == [str(r) for r in range(nproc)], out[-3000:]
    return set(steps.values())


def test_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ref = run(tmp_path, "ref", "--steps", "10", "--dump", str(tmp_path / "ref.st"))
    assert resumed(ref, 2) == {"0"}
    job = torchrun(SCRIPT, ["--dir", str(tmp_path / "run"), "--strategy", "fsdp1", "--steps", "10", "--pause-at", "6",
                            "--pause-after", "4", "--progress", str(tmp_path / "progress")], env=env_with())
    kill_when_paused(job, tmp_path / "progress")  # rank 0 holds at step 6 once checkpoint-4 is committed
    man = only_sharded_checkpoint(tmp_path / "run", 4)
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer"}
    w = man["state"]["model"]["net.0.weight"]["__tensor__"]["sharded"]  # the LightningModule's keys
    assert w["shape"] == [16, 8] and [c["offsets"] for c in w["chunks"]] == [[0, 0], [8, 0]]
    ck = tmp_path / "run" / "checkpoint-4"
    assert not any(p.suffix in (".pt", ".distcp", ".pth", ".bin") for p in ck.iterdir())  # not Lightning's own
    assert not any(p.is_dir() and p.suffix == ".ckpt" for p in (tmp_path / "run").iterdir())  # no DCP folder
    out = run(tmp_path, "run", "--steps", "10", "--resume", "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, 2) == {"4"}
    assert_same(tmp_path / "ref.st", tmp_path / "resumed.st")


def test_resume_on_one_rank_and_into_fsdp2_reshards(tmp_path: Path) -> None:
    run(tmp_path, "run", "--steps", "8", "--dump", str(tmp_path / "at8.st"))
    shutil.copytree(tmp_path / "run", tmp_path / "fsdp2")
    out = run(tmp_path, "run", "--steps", "10", "--resume", "--dump-start", str(tmp_path / "start1.st"), nproc=1)
    assert resumed(out, 1) == {"8"}
    assert_same(tmp_path / "at8.st", tmp_path / "start1.st")  # FSDP1 on 2 ranks -> FSDP1 (NO_SHARD) on 1
    assert (tmp_path / "run" / "checkpoint-10").is_dir()  # and the one rank trained on and saved
    out = run(tmp_path, "fsdp2", "--steps", "10", "--resume", "--dump-start", str(tmp_path / "start2.st"),
              strategy="btckpt")
    assert resumed(out, 2) == {"8"}
    assert_same(tmp_path / "at8.st", tmp_path / "start2.st")  # FSDP1 -> FSDP2 (ModelParallelStrategy)
    man = json.loads((tmp_path / "fsdp2" / "checkpoint-10" / "btckpt.json").read_text())
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer"}


@pytest.mark.compat
def test_lightning_own_fsdp_strategy_with_the_plugin_is_refused() -> None:
    from btckpt import ConfigError
    from btckpt.lightning import FSDPStrategy, SafetensorsCheckpointIO, check_strategy
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    own = LightningFSDP()
    own.checkpoint_io = SafetensorsCheckpointIO()
    with pytest.raises(ConfigError, match="use btckpt.lightning.FSDPStrategy"):
        check_strategy(own)
    ours = FSDPStrategy()
    ours.checkpoint_io = SafetensorsCheckpointIO()
    check_strategy(ours)  # accepted
