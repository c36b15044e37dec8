"""Checkpoint folders are servable by vLLM/SGLang-style loaders, not only by ``from_pretrained``.

Those engines' default loaders take every ``*.safetensors`` at the top of a local model folder and narrow
the list by ``model.safetensors.index.json`` only when that file exists. ``engine_selection`` below is that
rule; every kind of checkpoint folder btckpt writes must yield exactly the model's tensors through it.

Internals used: btckpt.consolidate, btckpt.format.manifest (the consolidation function, manifests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import btckpt
import pytest
import torch
from btckpt.format.manifest import MANIFEST, Manifest


def engine_selection(folder: Path) -> list[Path]:
    """The files a vLLM/SGLang default loader reads as weights: top-level ``*.safetensors``, filtered by the
    index's ``weight_map`` files when ``model.safetensors.index.json`` exists."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        files = [f for f in files if f.name in wanted]
    return files


def selected_keys(folder: Path) -> list[str]:
    """Every tensor name the engine would feed to the model's weight loader (repeats kept)."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in engine_selection(folder):
        with safe_open(str(f), "pt") as st:
            keys.extend(st.keys())
    return keys


def unique_keys(sd: dict[str, Any]) -> set[str]:
    """A state dict's keys, tied aliases (same storage, offset, shape) dropped: what a checkpoint stores."""
    seen: set[tuple[Any, ...]] = set()
    out: set[str] = set()
    for k, v in sd.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if ident not in seen:
            seen.add(ident)
            out.add(k)
    return out


def assert_serves_exactly(folder: Path, model_sd: dict[str, Any]) -> None:
    keys = selected_keys(folder)
    assert len(keys) == len(set(keys)), f"{folder}: a tensor would be read twice: {sorted(keys)}"
    assert set(keys) == unique_keys(model_sd), (sorted(keys), sorted(unique_keys(model_sd)))
    names = {p.name for p in folder.glob("*.safetensors")}
    assert names - {p.name for p in engine_selection(folder)}, f"{folder}: nothing else to leave out: {names}"


def _torch_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return {"model": model, "optimizer": opt, "scheduler": sched, "ema": {"w": torch.randn(8)}, "extra": {"e": 1}}


@pytest.mark.parametrize("shard", [None, 4_000], ids=["single-file", "sharded"])
def test_plain_torch_checkpoint_serves_only_the_model(tmp_path: Path, shard: int | None) -> None:
    state = _torch_state()
    kw = {} if shard is None else {"max_shard_size": shard}
    with btckpt.Checkpointer(dir=tmp_path, **kw) as ck:
        ck.save(5, state)
    folder = tmp_path / "checkpoint-5"
    shards = list(folder.glob("model-0*.safetensors"))
    assert (folder / "model.safetensors").is_file() if shard is None else len(shards) > 1
    assert (folder / "optimizer.safetensors").is_file() or list(folder.glob("optimizer-0*.safetensors"))
    assert_serves_exactly(folder, state["model"].state_dict())
    # the index is part of the commit: listed in the manifest with its checksum, and it passes verify
    man = Manifest.from_json((folder / MANIFEST).read_bytes(), where=str(folder))
    assert "model.safetensors.index.json" in man.files
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    model_bytes = sum(v.numel() * v.element_size() for v in state["model"].state_dict().values())
    assert index["metadata"]["total_size"] == model_bytes
    assert btckpt.latest(tmp_path) == folder
    # and the checkpoint still restores through btckpt
    fresh = _torch_state(1)
    with btckpt.Checkpointer(dir=tmp_path, async_save=False) as ck:
        assert ck.restore(fresh) == 5
    assert all(torch.equal(a, b) for a, b in zip(fresh["model"].state_dict().values(),
                                                   state["model"].state_dict().values(), strict=True))


def test_format_1_checkpoint_without_model_index_still_reads(tmp_path: Path) -> None:
    """Checkpoints written before the model index existed (format 1 as before) restore unchanged."""
    state = _torch_state()
    folder = btckpt.save(tmp_path / "checkpoint-3", state, step=3)
    man = Manifest.from_json((folder / MANIFEST).read_bytes(), where=str(folder))
    man.files.pop("model.safetensors.index.json")  # what the earlier writer produced
    (folder / "model.safetensors.index.json").unlink()
    (folder / MANIFEST).write_bytes(man.to_json())
    assert btckpt.latest(tmp_path) == folder
    fresh = _torch_state(1)
    btckpt.load(folder, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh["model"].state_dict().values(),
                                                   state["model"].state_dict().values(), strict=True))
    assert fresh["scheduler"].state_dict() == state["scheduler"].state_dict()


@pytest.mark.parametrize("shard", [None, 4_000], ids=["single-file", "sharded"])
def test_consolidated_folder_serves_only_the_model(tmp_path: Path, shard: int | None) -> None:
    from btckpt.consolidate import consolidate

    state = _torch_state()
    btckpt.save(tmp_path / "ck" / "checkpoint-2", state, step=2)
    kw = {} if shard is None else {"max_shard_size": shard}
    out = consolidate(tmp_path / "ck", tmp_path / "served", **kw)
    assert_only_the_model(out, state["model"].state_dict())


def assert_only_the_model(folder: Path, model_sd: dict[str, Any]) -> None:
    """A consolidated folder holds only the model: the selection is every file, and exactly the model."""
    keys = selected_keys(folder)
    assert sorted(keys) == sorted(unique_keys(model_sd))
    assert (folder / "model.safetensors.index.json").is_file()  # servable whatever a loader prefers


@pytest.mark.parametrize("shard", [None, 20_000], ids=["single-file", "sharded"])
def test_hf_trainer_checkpoint_serves_only_the_model(tmp_path: Path, shard: int | None) -> None:
    pytest.importorskip("transformers")
    import tqdm
    from btckpt.hf import CheckpointCallback
    from test_hf import _tiny_trainer
    from transformers import AutoModelForCausalLM

    tqdm.tqdm.monitor_interval = 0
    kw = {} if shard is None else {"max_shard_size": shard}
    trainer, _ = _tiny_trainer(tmp_path / "out", [CheckpointCallback(dir=str(tmp_path / "ck"), **kw)],
                               max_steps=2, save_steps=2)
    trainer.train()
    folder = tmp_path / "ck" / "checkpoint-2"
    assert_serves_exactly(folder, trainer.model.state_dict())
    served = AutoModelForCausalLM.from_pretrained(folder)  # from_pretrained still loads it
    assert all(torch.equal(served.state_dict()[k], v) for k, v in trainer.model.state_dict().items())


def test_peft_adapter_stays_as_peft_writes_it(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import hf_train
    from btckpt.hf import CheckpointCallback
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_embd=32, n_head=2))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=hf_train.Synthetic(8, 1),
            callbacks=[CheckpointCallback(dir=str(tmp_path / "ck"))]).train()
    names = {p.name for p in (tmp_path / "ck" / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not [n for n in names if n.endswith(".index.json")], names  # PEFT writes no index


def test_lightning_checkpoint_serves_only_the_module(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from btckpt.lightning import ModelCheckpoint, SafetensorsCheckpointIO
    from lightning_train import Batches, Tiny

    torch.manual_seed(0)
    module = Tiny()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, plugins=[SafetensorsCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)])
    trainer.fit(module, train_dataloaders=Batches(n=32, bs=4))
    assert_serves_exactly(tmp_path / "checkpoint-3", module.state_dict())


@pytest.mark.compat
def test_lightning_hf_model_checkpoint_serves_only_the_model(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    import tqdm
    from test_lightning import _fit_gpt, _gpt_module
    from transformers import AutoModelForCausalLM

    tqdm.tqdm.monitor_interval = 0
    module = _gpt_module(0)
    _fit_gpt(module, tmp_path, steps=3)
    folder = tmp_path / "checkpoint-3"
    # the HF model under its own keys, plus the LightningModule's own parameter ("scale"), nothing else
    assert_serves_exactly(folder, {**module.model.state_dict(), "scale": module.scale})
    AutoModelForCausalLM.from_pretrained(folder)
