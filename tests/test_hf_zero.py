"""HF Trainer + DeepSpeed ZeRO (stages 1-3) with ``btckpt.hf.CheckpointCallback``: real torchrun, 2 ranks, gloo
on CPU (``DS_ACCELERATOR=cpu``), a tiny Llama from a config. Each rank writes its own ZeRO partition as
safetensors chunks (no pickle, no ``global_step*`` folder); SIGKILL of the whole job and resume is bit-identical
(own dir, and a nested load dir); a ZeRO-3 checkpoint of 2 ranks restores into 1 rank, into FSDP2 (2 ranks)
and into a plain model; the consolidated folder loads with ``from_pretrained`` (no ``zero_to_fp32.py``).

Needs the ``deepspeed`` extra (``pip install btckpt[deepspeed]``; scripts/test.sh installs it): skipped without.

Internals used: btckpt.distributed.zero, btckpt.format.manifest, btckpt.hf.deepspeed, btckpt.lightning.strategies,
btckpt.storage.discovery (the ZeRO refusal and Lightning's DeepSpeed check called on hand-built trainer and strategy
objects, ZeRO's partition boxes and the manifest's tiling check on hand-made layouts, discovery to judge the folders
on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from dist_launch import assert_same, env_with, finish, finish_after_rank_death, kill_when_paused, load_st, torchrun

pytest.importorskip("transformers")
SCRIPT = "hf_zero_train.py"


def _needs_deepspeed() -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (btckpt[deepspeed]); these tests run "
                        "a real ZeRO engine")


def run(tmp: Path, ckdir: str, *args: str, nproc: int = 2, **env: str) -> str:
    jit = tmp / f"jit-{ckdir}"  # DeepSpeed builds nothing (hf_train.zero_config): a compiled op would land here
    e = env_with(BT_CHECKPOINT_DIR=str(tmp / ckdir), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(jit), **env)
    rc, out = finish(torchrun(SCRIPT, ["--out", str(tmp / f"out-{ckdir}"), *args], nproc=nproc, env=e), timeout=280)
    assert rc == 0, out[-4000:]
    assert not jit.exists(), f"DeepSpeed JIT-built {sorted(p.name for p in jit.iterdir())} (minutes of CI)"
    return out


def resumed(out: str, stage: int, nproc: int) -> dict[str, str]:
    # ranks share torchrun's stdout pipe: match, don't split lines
    assert sorted(set(re.findall(r"rank (\d+): zero (\d) (\d+)", out))) == [
        (str(r), str(stage), str(nproc)) for r in range(nproc)], out[-3000:]  # a real ZeRO-S engine over nproc
    steps = dict(re.findall(r"rank (\d+): resumed from (\d+)", out))
    assert sorted(steps) == [str(r) for r in range(nproc)], out[-3000:]
    return steps


def only_zero_checkpoint(run: Path, step: int) -> dict:
    """``run`` holds exactly ``checkpoint-<step>``, each rank's partition in its own files, nothing pickled."""
    ck = run / f"checkpoint-{step}"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [ck.name]
    man = json.loads((ck / "btckpt.json").read_text())
    names = set(man["files"])
    for g in ("model", "optimizer", "master_weights"):
        assert {f"{g}-rank00000.safetensors", f"{g}-rank00001.safetensors"} <= names, names
    assert {"rng_state_0.json", "rng_state_1.json", "trainer_state.json", "config.json"} <= names
    on_disk = {p.name for p in ck.iterdir()}
    assert not [n for n in on_disk if n.endswith((".pt", ".pth", ".bin")) or n.startswith("global_step")], on_disk
    assert man["meta"]["btckpt.sharded"] == {"model": "model", "optimizer": "optimizer", "master_weights": "model"}
    assert man["meta"]["btckpt.zero"] == {"stage": int(man["state"]["deepspeed"]["stage"])}
    return man


@pytest.fixture(scope="module")
def zero3_ref8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The uninterrupted 2-rank ZeRO-3 run of 8 steps (a checkpoint every 4), shared by the tests that compare
    with it (read only): ``(folder, output)``; ``folder/ref`` holds ``checkpoint-4`` and ``checkpoint-8``,
    ``folder/ref.st`` the full fp32 master weights + moments at its end."""
    _needs_deepspeed()
    tmp = tmp_path_factory.mktemp("zero3-ref8")
    out = run(tmp, "ref", "--stage", "3", "--max-steps", "8", "--save-steps", "4", "--dump", str(tmp / "ref.st"))
    return tmp, out


def _reference8(tmp_path: Path, stage: int, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """The uninterrupted 8-step run of ``stage``: ZeRO-3's is shared (:func:`zero3_ref8`), others run here."""
    if stage == 3:
        return request.getfixturevalue("zero3_ref8")
    out = run(tmp_path, "ref", "--stage", str(stage), "--max-steps", "8", "--save-steps", "4",
              "--dump", str(tmp_path / "ref.st"))
    return tmp_path, out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2, 1])
def test_sigkill_whole_job_then_resume_is_bit_identical(tmp_path: Path, stage: int,
                                                        request: pytest.FixtureRequest) -> None:
    _needs_deepspeed()
    ref_dir, ref = _reference8(tmp_path, stage, request)
    assert set(resumed(ref, stage, 2).values()) == {"0"}
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "run"), DS_ACCELERATOR="cpu")
    job = torchrun(SCRIPT, ["--out", str(tmp_path / "out-run"), "--stage", str(stage), "--max-steps", "8",
                            "--pause-at", "6", "--pause-after", "4", "--progress", str(tmp_path / "progress")], env=env)
    kill_when_paused(job, tmp_path / "progress")  # rank 0 holds at step 6 once checkpoint-4 is committed
    man = only_zero_checkpoint(tmp_path / "run", 4)
    assert man["state"]["deepspeed"]["stage"] == stage
    # a parameter straddling the two ranks' partitions has chunks from both (stage 3: every parameter does)
    chunks = man["state"]["master_weights"]["model.embed_tokens.weight"]["__tensor__"]["sharded"]["chunks"]
    assert {c["file"] for c in chunks} <= {"master_weights-rank00000.safetensors",
                                           "master_weights-rank00001.safetensors"}

    out = run(tmp_path, "run", "--stage", str(stage), "--max-steps", "8", "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, stage, 2) == {"0": "4", "1": "4"}
    assert_same(ref_dir / "ref.st", tmp_path / "resumed.st")  # fp32 master + Adam moments, bit for bit
    ref_losses = sorted(set(re.findall(r"'loss': '([^']+)', 'grad_norm': '([^']+)'[^}]*'epoch': '([^']+)'", ref)))
    run_losses = set(re.findall(r"'loss': '([^']+)', 'grad_norm': '([^']+)'[^}]*'epoch': '([^']+)'", out))
    assert run_losses and run_losses <= set(ref_losses)  # steps 5-8: the reference's loss curve


@pytest.mark.slow
def test_zero3_from_nested_load_dir(tmp_path: Path, zero3_ref8: tuple[Path, str]) -> None:
    ref_dir, _ = zero3_ref8
    nested = tmp_path / "load" / "job-1" / "rank-0"
    nested.mkdir(parents=True)
    shutil.copytree(ref_dir / "ref" / "checkpoint-4", nested / "checkpoint-4")
    out = run(tmp_path, "b", "--stage", "3", "--max-steps", "8", "--dump", str(tmp_path / "resumed.st"),
              BT_LOAD_CHECKPOINT_DIR=str(tmp_path / "load"))
    assert resumed(out, 3, 2) == {"0": "4", "1": "4"}
    assert_same(ref_dir / "ref.st", tmp_path / "resumed.st")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank ZeRO-3 run of 4 steps (consolidated), shared by the reshard tests (read only): ``a/`` holds
    ``checkpoint-4``, ``saved.st`` the full fp32 master weights + moments right after its save."""
    _needs_deepspeed()
    tmp = tmp_path_factory.mktemp("zero3")
    run(tmp, "a", "--stage", "3", "--max-steps", "4", "--consolidate", "--dump-save", f"4:{tmp / 'saved.st'}")
    return tmp


@pytest.mark.slow
def test_zero3_reshards_to_one_rank_and_plain_model_and_is_servable(tmp_path: Path, zero3_run: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import btckpt
    import torch
    import tqdm
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no tqdm monitor thread (the leak check flags it)
    shutil.copy(zero3_run / "saved.st", tmp_path / "saved.st")
    shutil.copytree(zero3_run / "a", tmp_path / "a")
    saved = load_st(tmp_path / "saved.st")  # full fp32 master + moments at the save of step 4 (2 ranks)

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    out = run(tmp_path, "b", "--stage", "3", "--max-steps", "6", "--dump-start", str(tmp_path / "start.st"), nproc=1)
    assert resumed(out, 3, 1) == {"0": "4"}
    assert_same(tmp_path / "saved.st", tmp_path / "start.st")  # what one ZeRO-3 rank loaded is what two saved

    served = tmp_path / "a" / "consolidated" / "checkpoint-4"
    assert (served / "model.safetensors").is_file() and (served / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(served)  # no zero_to_fp32.py step
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[f"master.{n}"]), n

    plain = AutoModelForCausalLM.from_config(model.config)  # a plain model + torch AdamW, one process
    opt = torch.optim.AdamW(plain.parameters())
    btckpt.load(tmp_path / "a" / "checkpoint-4", {"model": plain, "optimizer": opt})
    for n, p in plain.named_parameters():
        assert torch.equal(p.detach(), saved[f"master.{n}"]), n
        assert torch.equal(opt.state[p]["exp_avg"], saved[f"optim.{n}.exp_avg"]), n
        assert torch.equal(opt.state[p]["exp_avg_sq"], saved[f"optim.{n}.exp_avg_sq"]), n
        assert float(opt.state[p]["step"]) == 4.0


@pytest.mark.slow
def test_zero3_of_two_ranks_restores_into_fsdp2_of_two_ranks(tmp_path: Path, zero3_run: Path) -> None:
    """ZeRO-3 (2 ranks, HF Trainer) -> FSDP2 (2 ranks, ``fully_shard`` per decoder layer + root, torch AdamW):
    every weight and both Adam moments of every parameter equal what was saved, and the step too."""
    import torch

    ck = zero3_run / "a" / "checkpoint-4"
    e = env_with(DS_ACCELERATOR="cpu")
    rc, out = finish(torchrun("zero_to_fsdp2.py", ["--ckpt", str(ck), "--dump", str(tmp_path / "fsdp2.st")],
                              env=e), timeout=280)
    assert rc == 0, out[-4000:]
    shards = re.findall(r"rank (\d): fsdp2 2 (\d+)/(\d+)", out)
    assert sorted(r for r, _, _ in shards) == ["0", "1"] and all(int(a) < int(b) for _, a, b in shards), out[-3000:]
    saved, got = load_st(zero3_run / "saved.st"), load_st(tmp_path / "fsdp2.st")
    assert sorted(saved) == sorted(got)
    for k in saved:
        assert got[k].dtype == saved[k].dtype and torch.equal(got[k], saved[k]), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fsdp2.st"), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "4" and json.loads(meta["optim_steps"]) == [4.0]


def test_nvme_offload_and_stage_0_are_refused_naming_the_option() -> None:
    from btckpt import ConfigError
    from btckpt.hf.deepspeed import refuse_unsupported_zero

    def trainer(cfg: dict) -> SimpleNamespace:
        plugin = SimpleNamespace(deepspeed_config=cfg)
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))

    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_optimizer\.device='nvme'.*device 'cpu'"):
        refuse_unsupported_zero(trainer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_param\.device='nvme'"):
        refuse_unsupported_zero(trainer({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    with pytest.raises(ConfigError, match=r"stage=0 is not one.*stage 1, 2 or 3"):
        refuse_unsupported_zero(trainer({"zero_optimization": {"stage": 0}}))
    refuse_unsupported_zero(trainer({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))


@pytest.mark.parametrize("shape", [[7], [3, 5], [2, 3, 4], [4, 1, 3, 2], []])
def test_zero_fragments_become_boxes_that_tile_the_shape(shape: list[int]) -> None:
    import math

    import torch
    from btckpt.distributed.zero import boxes
    from btckpt.format.manifest import tiling_problem

    total = math.prod(shape)
    full = torch.arange(total).view(shape) if shape else torch.tensor(0)
    for parts in (1, 2, 3, 5):  # ZeRO's equal partitions of the flattened parameter, the last one short
        size = -(-total // parts)
        chunks = []
        for r in range(parts):
            start, numel = r * size, max(0, min(size, total - r * size))
            got = []
            for offsets, sizes, at in boxes(shape, start, numel):
                view = full
                for d, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
                    view = view.narrow(d, o, s)
                assert torch.equal(view.reshape(-1), torch.arange(total)[start + at:start + at + view.numel()])
                got.append(view.numel())
                chunks.append({"offsets": offsets, "sizes": sizes})
            assert sum(got) == numel and len(got) <= max(1, 2 * len(shape) - 1)
        assert tiling_problem(shape, chunks) is None, (shape, parts, chunks)


def test_lightning_deepspeed_strategy_with_the_plugin_is_refused_naming_the_fix() -> None:
    _needs_deepspeed()
    pytest.importorskip("lightning")
    from btckpt import ConfigError
    from btckpt.lightning import SafetensorsCheckpointIO
    from btckpt.lightning.strategies import check_strategy
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(stage=3)
    strategy.checkpoint_io = SafetensorsCheckpointIO()
    with pytest.raises(ConfigError, match=r"DeepSpeedStrategy.*CUDA only.*drop the plugin.*HF Trainer"):
        check_strategy(strategy)


@pytest.mark.slow
def test_kill_during_one_ranks_partition_save_leaves_the_older_checkpoint_and_resumes_exactly(
        tmp_path: Path, zero3_ref8: tuple[Path, str]) -> None:
    """Crash harness, ZeRO path: rank 1 is SIGKILLed while writing its ZeRO-3 partition of checkpoint-8
    (``BTCKPT_FAULT=write_data:kill@1``; torchrun tears the job down). checkpoint-4 stays complete and verified,
    no checkpoint-8 is complete, and the restart resumes from 4, removes the torn temp folder and ends
    bit-identical to an uninterrupted run (:func:`zero3_ref8`)."""
    from btckpt.storage.discovery import inspect, verify

    ref_dir, _ = zero3_ref8
    common = ("--stage", "3", "--max-steps", "8")
    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "run"), DS_ACCELERATOR="cpu")
    job = torchrun(SCRIPT, ["--out", str(tmp_path / "out-run"), *common, "--pause-at", "6", "--pause-after", "4",
                            "--progress", str(tmp_path / "progress")], env=env)
    kill_when_paused(job, tmp_path / "progress")
    only_zero_checkpoint(tmp_path / "run", 4)

    env = env_with(BT_CHECKPOINT_DIR=str(tmp_path / "run"), DS_ACCELERATOR="cpu", BTCKPT_FAULT="write_data:kill@1")
    rc, out = finish_after_rank_death(torchrun(SCRIPT, ["--out", str(tmp_path / "out-run"), *common], env=env),
                                      timeout=280)
    # rank 1 died of the SIGKILL, first (the agent's root cause; it SIGKILLs the waiting rank 0 after that)
    assert rc != 0 and re.search(r"Root Cause.*?rank\s*:\s*1\b.*?exitcode\s*:\s*-9\b", out, re.S), out[-3000:]
    assert "rank 1: resumed from 4" in out
    ck4 = inspect(tmp_path / "run" / "checkpoint-4")
    assert ck4.complete and verify(ck4) == []
    assert not (tmp_path / "run" / "checkpoint-8").exists() or not inspect(tmp_path / "run" / "checkpoint-8").complete

    out = run(tmp_path, "run", *common, "--dump", str(tmp_path / "resumed.st"))
    assert resumed(out, 3, 2) == {"0": "4", "1": "4"}
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".checkpoint-")]
    assert_same(ref_dir / "ref.st", tmp_path / "resumed.st")
