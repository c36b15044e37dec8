"""Which run a checkpoint belongs to (issue 23, section 1): real ``transformers.Trainer`` and ``lightning.Trainer``
runs (tiny models from configs, CPU) into used folders, with the platform's variables unset or set.

The rule (README "Run identity"): each checkpoint records its run's identity; the same run resumes, another
run's checkpoints in the own dir are never resumed, overwritten or skipped (a run that would write beside them
is refused before its first step, naming the dir and the fixes); a load dir's checkpoint is a warm start
whatever its identity; off the platform the default dir is the framework's own.

Internals used: btckpt.format.manifest (manifests built by hand (with and without the run identity)).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
import tqdm

tqdm.tqdm.monitor_interval = 0  # from_pretrained's progress bar would start tqdm's monitor thread (a "leak")

from btckpt import Checkpointer, CheckpointError, ConfigError  # noqa: E402


@pytest.fixture(autouse=True)
def off_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No platform variables, and a cwd of the test's own (the old default ``./checkpoints`` lands there)."""
    for var in ("BT_CHECKPOINT_DIR", "BT_LOAD_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- HF Trainer ------------------------------------------------------------------------------------------
class Steps:
    """A TrainerCallback recording the global step at each step's begin."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class _Steps(TrainerCallback):
            def __init__(self) -> None:
                self.begun: list[int] = []

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.begun.append(int(state.global_step))

        return _Steps()


def _trainer(out: Path, callbacks: list[Any], *, lr: float = 1e-2, seed: int = 0, evaluate: bool = False,
             **kw: Any) -> Any:
    import hf_train
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=hf_train.VOCAB, n_positions=hf_train.SEQ, n_layer=2, n_embd=32,
                                       n_head=2))
    extra: dict[str, Any] = {}
    if evaluate:
        extra = dict(eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                     greater_is_better=False)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=lr,
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=seed, logging_steps=1,
                             **extra, **kw)
    return Trainer(model=model, args=args, train_dataset=hf_train.Synthetic(24, 1),
                   eval_dataset=hf_train.Synthetic(8, 2) if evaluate else None, callbacks=callbacks)


def _hf(out: Path, *, steps: int = 4, save_steps: int = 2, **kw: Any) -> tuple[Any, Any]:
    from btckpt.hf import CheckpointCallback

    options = {k: kw.pop(k) for k in ("dir", "load_dir") if k in kw}
    steps_seen = Steps()
    trainer = _trainer(out, [CheckpointCallback(**options), steps_seen], max_steps=steps, save_steps=save_steps, **kw)
    return trainer, steps_seen


def test_hf_start_fresh_in_a_used_dir_is_refused_before_a_step_and_the_earlier_run_is_intact(tmp_path: Path) -> None:
    """``train(resume_from_checkpoint=False)`` used to train, skip every save at an existing step with a log line
    and leave the earlier run's checkpoints as the ones a restart resumes."""
    ck = tmp_path / "ck"
    first, _ = _hf(tmp_path / "out", dir=str(ck))
    first.train()
    before = {n: _weights(ck / n) for n in ("checkpoint-2", "checkpoint-4")}
    again, seen = _hf(tmp_path / "out", dir=str(ck), seed=1)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run") as err:
        again.train(resume_from_checkpoint=False)
    msg = str(err.value)
    assert str(ck) in msg and "checkpoint-4" in msg and "starts fresh" in msg
    assert "CheckpointCallback(dir=" in msg and "move the earlier run's" in msg  # the two fixes
    assert seen.begun == []  # refused before the first step
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all(_same(before[n], _weights(ck / n)) for n in before)
    # the same fresh start in a folder of its own trains and saves every step it is asked to
    fresh, seen = _hf(tmp_path / "out", dir=str(tmp_path / "ck2"), seed=1)
    fresh.train(resume_from_checkpoint=False)
    assert seen.begun[0] == 0 and sorted(p.name for p in (tmp_path / "ck2").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4"]
    assert not _same(before["checkpoint-4"], _weights(tmp_path / "ck2" / "checkpoint-4"))


def test_hf_off_the_platform_checkpoints_follow_output_dir_and_experiments_stay_apart(tmp_path: Path) -> None:
    """Without ``$BT_CHECKPOINT_DIR`` every run used ``./checkpoints`` and auto-resumed from it: a second
    experiment (other output_dir, seed, lr) from the same cwd silently continued the first one."""
    a, seen_a = _hf(tmp_path / "exp_a")
    a.train()
    assert seen_a.begun[0] == 0
    assert sorted(p.name for p in (tmp_path / "exp_a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((tmp_path / "exp_a" / "checkpoint-4" / "btckpt.json").read_text())["meta"]["btckpt.run"]
    assert not (tmp_path / "checkpoints").exists()
    b, seen_b = _hf(tmp_path / "exp_b", seed=1, lr=5e-3)
    b.train()
    assert seen_b.begun == [0, 1, 2, 3]  # trained from scratch, not resumed from exp_a's checkpoint-4
    assert not _same(_weights(tmp_path / "exp_a" / "checkpoint-4"), _weights(tmp_path / "exp_b" / "checkpoint-4"))


def test_hf_a_changed_run_in_a_used_dir_is_refused_and_the_same_run_resumes(tmp_path: Path) -> None:
    """Auto-resume took any checkpoint in the dir: a run with another learning rate continued the earlier one.
    Now another run's checkpoints are not resumed (refused, naming the dir); the same run with a larger
    ``max_steps`` (continuing it) still resumes."""
    ck = tmp_path / "ck"
    first, _ = _hf(tmp_path / "out", dir=str(ck))
    first.train()
    kept = _weights(ck / "checkpoint-4")
    changed, seen = _hf(tmp_path / "out", dir=str(ck), lr=3e-3)
    with pytest.raises(ConfigError, match="run identity") as err:
        changed.train()
    assert str(ck) in str(err.value) and "checkpoint-4" in str(err.value)
    assert seen.begun == [] and _same(kept, _weights(ck / "checkpoint-4"))
    # a load dir's checkpoint is a deliberate warm start: another identity (lr, max_steps) does not refuse it,
    # but an own dir holding only the other run's checkpoints does, also for an explicit path from elsewhere
    warm, seen = _hf(tmp_path / "out", dir=str(tmp_path / "ck_warm"), load_dir=str(ck), lr=3e-3, steps=6)
    warm.train()
    assert seen.begun == [4, 5] and (tmp_path / "ck_warm" / "checkpoint-6").is_dir()
    into_used, seen = _hf(tmp_path / "out", dir=str(tmp_path / "ck_warm"), lr=1e-3, steps=8)
    with pytest.raises(ConfigError, match="ck_warm holds checkpoints of an earlier run"):
        into_used.train(resume_from_checkpoint=str(ck / "checkpoint-4"))
    assert seen.begun == []
    same, seen = _hf(tmp_path / "out", dir=str(ck), steps=6)
    same.train()
    assert seen.begun == [4, 5]  # resumed from checkpoint-4
    assert (ck / "checkpoint-6" / "btckpt.json").is_file() and _same(kept, _weights(ck / "checkpoint-4"))


@pytest.mark.compat
def test_hf_rerun_of_a_finished_run_trains_nothing_and_ends_with_its_final_weights(tmp_path: Path) -> None:
    """Re-running a finished job resumed its final checkpoint and trained one step past ``max_steps`` (as the
    plain Trainer does from its own final checkpoint), saving checkpoint-5."""
    ck = tmp_path / "ck"
    first, _ = _hf(tmp_path / "out", dir=str(ck))
    first.train()
    rerun, seen = _hf(tmp_path / "out", dir=str(ck))
    out = rerun.train()
    assert seen.begun == [] and out.global_step == 4 and rerun.state.global_step == 4
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    live = {k: v for k, v in rerun.model.state_dict().items()}
    final = _weights(ck / "checkpoint-4")
    assert all(torch.equal(live[k], v) for k, v in final.items())


@pytest.mark.compat
def test_hf_best_model_record_survives_a_restart_from_the_load_dir(tmp_path: Path) -> None:
    """A warm start from ``$BT_LOAD_CHECKPOINT_DIR`` kept the previous job's ``best_model_checkpoint`` path (gone
    on the new machine), so ``load_best_model_at_end`` silently ended with the last model."""
    job1 = tmp_path / "job1"
    first, _ = _hf(tmp_path / "out", dir=str(job1), evaluate=True, eval_steps=2)
    first.train()
    best_step = first.state.best_global_step
    assert best_step in (2, 4)
    load = tmp_path / "loaded"  # the platform's nested layout; the first job's own path is gone
    (load / "j1").mkdir(parents=True)
    shutil.move(str(job1), str(load / "j1" / "rank-0"))
    best = load / "j1" / "rank-0" / f"checkpoint-{best_step}"
    # the second job trains on past step 4 without evaluating or saving again: the best stays the first job's
    second, seen = _hf(tmp_path / "out", dir=str(tmp_path / "job2"), load_dir=str(load), steps=6, evaluate=True,
                       eval_steps=100, save_steps=100)
    second.train()
    assert seen.begun == [4, 5]
    assert second.state.best_model_checkpoint == str(best)
    live = second.model.state_dict()
    want = _weights(best)
    assert all(torch.equal(live[k], v) for k, v in want.items())  # the best model, not step 6's


# ---- a plain Checkpointer (torchrun users): the option ----------------------------------------------------
def _state(value: float) -> dict[str, Any]:
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(value)
    return {"model": m}


def test_checkpointer_run_id_resumes_its_own_refuses_another_and_never_skips_its_step(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    with Checkpointer(dir=str(ck), async_save=False, run_id="run-a") as a:
        a.save(3, _state(1.0))
    # no run_id: today's behaviour (any checkpoint in the dir counts as this run's)
    with Checkpointer(dir=str(ck), async_save=False) as plain:
        st = _state(0.0)
        assert plain.restore(st) == 3 and float(st["model"].weight[0, 0]) == 1.0
    with Checkpointer(dir=str(ck), async_save=False, run_id="run-a") as same:
        st = _state(0.0)
        assert same.restore(st) == 3 and float(st["model"].weight[0, 0]) == 1.0
    with Checkpointer(dir=str(ck), async_save=False, run_id="run-b") as other:
        with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
            other.restore(_state(0.0))
        with pytest.raises(CheckpointError, match="committed by another run"):  # not "already exists; skipped"
            other.save(3, _state(2.0))
    assert float(_weights(ck / "checkpoint-3")["weight"][0, 0]) == 1.0
    # a load dir's checkpoint is a deliberate warm start: taken whatever its identity
    with Checkpointer(dir=str(tmp_path / "new"), load_dir=str(ck), async_save=False, run_id="run-b") as warm:
        st = _state(0.0)
        assert warm.restore(st) == 3 and float(st["model"].weight[0, 0]) == 1.0
    with pytest.raises(ConfigError, match="run_id"):
        Checkpointer(dir=str(tmp_path / "x"), run_id="")


def test_manifest_run_identity_is_optional_and_checked(tmp_path: Path) -> None:
    """The identity lives in ``meta`` (format stays btckpt/1; a manifest without it reads as before)."""
    from btckpt import CorruptCheckpoint
    from btckpt.format.manifest import FORMAT, Manifest

    old = Manifest(step=1, files={}, state={})
    assert FORMAT == "btckpt/1" and Manifest.from_json(old.to_json(), where="x").run is None
    new = Manifest(step=1, files={}, state={}, meta={"btckpt.run": "abc"})
    assert json.loads(new.to_json())["format"] == "btckpt/1"
    assert Manifest.from_json(new.to_json(), where="x").run == "abc"
    bad = Manifest(step=1, files={}, state={}, meta={"btckpt.run": 7})
    with pytest.raises(CorruptCheckpoint, match="x: manifest meta 'btckpt.run' 7 is not a run identity"):
        Manifest.from_json(bad.to_json(), where="x")


# ---- Lightning -------------------------------------------------------------------------------------------
def _module(seed: int) -> Any:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(seed)
    return Tiny()


def _loader() -> Any:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(module: Any, *, callback: Any, root: Path | None = None, steps: int = 6, ckpt_path: str | None = None
         ) -> Any:
    import lightning as L
    from btckpt.lightning import SafetensorsCheckpointIO

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[SafetensorsCheckpointIO()], callbacks=[callback],
                        default_root_dir=str(root) if root is not None else None)
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer


def _lightning_weights(path: Path) -> torch.Tensor:
    from btckpt.lightning import SafetensorsCheckpointIO

    io = SafetensorsCheckpointIO()
    try:
        return io.load_checkpoint(path)["state_dict"]["layer.weight"]
    finally:
        io.teardown()


@pytest.mark.parametrize("own", [True, False], ids=["btckpt-ModelCheckpoint", "lightnings-ModelCheckpoint"])
def test_lightning_fresh_fit_into_a_used_dir_never_names_the_earlier_runs_folders(tmp_path: Path, own: bool) -> None:
    """A fresh ``fit()`` into a folder with an earlier run named the earlier run's folders (``last-v1.ckpt`` ->
    its checkpoint-6) and never wrote its own state: loading its last checkpoint gave the old weights."""
    from btckpt.lightning import ModelCheckpoint
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    ck = tmp_path / "ck"
    cls = ModelCheckpoint if own else LightningModelCheckpoint

    def callback() -> Any:
        return cls(dirpath=str(ck), every_n_train_steps=3, save_top_k=-1, save_last=True)

    first = _module(0)
    _fit(first, callback=callback())
    old = _lightning_weights(ck / "last.ckpt")
    assert torch.equal(old, first.layer.weight.detach())
    second = _module(1)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run") as err:
        _fit(second, callback=callback())
    assert str(ck) in str(err.value) and "starts fresh" in str(err.value)
    assert sorted(p.name for p in ck.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    assert torch.equal(_lightning_weights(ck / "last.ckpt"), old)
    # resuming the earlier run (ckpt_path) into its folder goes on as before
    resumed = _module(0)
    _fit(resumed, callback=callback(), steps=9, ckpt_path=str(ck / "last.ckpt"))
    assert torch.equal(_lightning_weights(ck / "last.ckpt"), resumed.layer.weight.detach())


@pytest.mark.compat
def test_lightning_off_the_platform_the_default_dir_is_lightnings_own(tmp_path: Path) -> None:
    """Without ``$BT_CHECKPOINT_DIR``, btckpt's ModelCheckpoint wrote to ``./checkpoints`` whatever
    ``default_root_dir`` said, so two experiments shared one folder."""
    from btckpt.lightning import ModelCheckpoint

    a, b = tmp_path / "exp_a", tmp_path / "exp_b"
    _fit(_module(0), callback=ModelCheckpoint(every_n_train_steps=3, save_top_k=-1), root=a)
    _fit(_module(1), callback=ModelCheckpoint(every_n_train_steps=3, save_top_k=-1), root=b)
    assert not (tmp_path / "checkpoints").exists()
    for d in (a, b):
        assert sorted(p.name for p in (d / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not torch.equal(_lightning_weights(a / "checkpoints" / "checkpoint-6"),
                           _lightning_weights(b / "checkpoints" / "checkpoint-6"))
