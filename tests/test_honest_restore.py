"""Restore that says what it did (issue 23, section 3): non-strict restore reports and refuses, tied weights
of HF folders count as present, errors name their cause, an unwritable dir is refused at construction.

Internals used: btckpt.checkpointer, btckpt.distributed.world, btckpt.oneshot, btckpt.restore.load,
btckpt.restore.resume, btckpt.storage.discovery (the restore's ``Resume`` driven directly, modules imported before a
child drops its privileges (they load lazily), discovery to judge the folders on disk (complete, verified), which no
public name reports).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import btckpt
import pytest
import torch
import tqdm
from btckpt import StateMismatch

tqdm.tqdm.monitor_interval = 0  # save_pretrained's progress bar would start tqdm's monitor thread (a "leak")


class Named(torch.nn.Module):
    """Two linear layers under names of our choosing (a "renamed" model has the same shapes, other keys)."""

    def __init__(self, a: str = "enc", b: str = "dec", extra: bool = False) -> None:
        super().__init__()
        setattr(self, a, torch.nn.Linear(4, 4))
        setattr(self, b, torch.nn.Linear(4, 2))
        if extra:
            self.head = torch.nn.Linear(2, 2)


def _saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    model = Named()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.dec(model.enc(torch.ones(3, 4))).sum().backward()
    opt.step()
    d = tmp_path / "ck"
    with btckpt.Checkpointer(dir=d) as ck:
        ck.save(7, {"model": model, "optimizer": opt})
    return d, {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


def _live(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- 1. non-strict restore reports what it did, and refuses what would be wrong ----------------------------
def test_strict_false_on_a_renamed_model_is_refused_and_changes_nothing(tmp_path: Path):
    d, _, _ = _saved(tmp_path)
    torch.manual_seed(1)
    model = Named("encoder", "decoder")  # same shapes, other names
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    before = _live(model)
    with btckpt.Checkpointer(dir=d) as ck:
        with pytest.raises(StateMismatch, match="strict=False"):  # the strict error suggests strict=False
            ck.restore({"model": model, "optimizer": opt})
        with pytest.raises(StateMismatch) as exc:
            ck.restore({"model": model, "optimizer": opt}, strict=False)
    msg = str(exc.value)
    assert "would load none of state group 'model'" in msg
    assert "encoder.weight" in msg and "enc.weight" in msg and "plain dict" in msg  # the keys and the fix
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state == {} and opt.param_groups[0]["lr"] == 0.5  # the other model's optimizer state not applied


def test_strict_false_reports_loaded_and_skipped_per_group(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    d, saved, _ = _saved(tmp_path)
    model = Named(extra=True)  # the saved model plus a new head
    with btckpt.Checkpointer(dir=d) as ck, caplog.at_level(logging.WARNING, logger="btckpt"):
        step = ck.restore({"model": model, "extra": {"x": 1}}, strict=False)
        report = ck.last_restore
    assert step == 7
    assert all(torch.equal(saved[k], model.state_dict()[k]) for k in saved)
    assert report is not None and report.step == 7 and not report.complete
    g = report.groups["model"]
    assert sorted(g.loaded) == sorted(saved) and sorted(g.missing) == ["head.bias", "head.weight"]
    assert report.groups["extra"].kind == "absent"
    text = caplog.text
    assert "loaded 4 of 6 tensors" in text and "head.weight" in text and "'extra': not in the checkpoint" in text
    assert "\\x0a" not in text and "\n  'model'" in text  # our own multi-line message reads as lines


def test_strict_false_refuses_optimizer_state_for_parameters_it_did_not_load(tmp_path: Path):
    d, _, _ = _saved(tmp_path)
    torch.manual_seed(1)
    model = Named()
    model.dec = torch.nn.Linear(4, 3)  # its shape changed: not loaded
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    before = _live(model)
    with btckpt.Checkpointer(dir=d) as ck, pytest.raises(StateMismatch) as exc:
        ck.restore({"model": model, "optimizer": opt}, strict=False)
    msg = str(exc.value)
    assert "optimizer state 'optimizer'" in msg and "model.dec.weight" in msg and "Leave 'optimizer' out" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and opt.state == {}


def test_one_shot_load_reports_through_restore_reports(tmp_path: Path):
    d, saved, _ = _saved(tmp_path)
    model = Named(extra=True)
    with btckpt.restore_reports() as reports:
        assert btckpt.load(d / "checkpoint-7", {"model": model}, strict=False) == 7
    assert len(reports) == 1 and sorted(reports[0].groups["model"].missing) == ["head.bias", "head.weight"]
    assert torch.equal(model.enc.weight, saved["enc.weight"])
    with btckpt.restore_reports() as reports:  # a strict load that matched everything reports too
        btckpt.load(d / "checkpoint-7", {"model": Named()})
    assert reports[0].complete and reports[0].strict


# -- 2. warm start from an HF save_pretrained folder of a tied-weight model -------------------------------
def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        hidden_size=8, intermediate_size=16, vocab_size=32,
                                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _bert() -> torch.nn.Module:  # ties the decoder's weight *and* bias
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=16,
                                      vocab_size=32, max_position_embeddings=16))


def _t5() -> torch.nn.Module:  # three keys tied to one
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=8, d_kv=4,
                                               d_ff=16, vocab_size=32, decoder_start_token_id=0))


@pytest.mark.compat
@pytest.mark.parametrize("build", [_gpt2, _llama, _bert, _t5], ids=["gpt2", "llama-tied", "bert", "t5"])
def test_warm_start_from_save_pretrained_of_a_tied_model(tmp_path: Path, build):
    torch.manual_seed(0)
    src = build()
    src.save_pretrained(tmp_path / "hf", safe_serialization=True)
    torch.manual_seed(1)
    dst = build()
    assert not torch.equal(dst.get_output_embeddings().weight, src.get_output_embeddings().weight)
    assert btckpt.load(tmp_path / "hf", {"model": dst}) == 0
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert dst.get_output_embeddings().weight.data_ptr() == dst.get_input_embeddings().weight.data_ptr()  # still tied


# -- 3. errors that say the cause ------------------------------------------------------------------------
def test_multi_line_warnings_read_as_lines_but_names_stay_escaped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    d = tmp_path / "ck"
    btckpt.save(d / "checkpoint-1", {"model": Named().state_dict()}, save_rng=False)
    hostile = {**Named().state_dict(), "w\nbtckpt: restored step 99": torch.zeros(1)}
    hostile.pop("dec.bias")
    btckpt.save(d / "checkpoint-2", {"model": hostile}, save_rng=False)
    with caplog.at_level(logging.INFO, logger="btckpt"):
        assert btckpt.load(d, {"model": Named()}) == 1  # the newest does not fit: a warning, then the older one
    assert "\\x0a" not in caplog.text
    assert "does not match the checkpoint:\n  missing from the checkpoint (1): ['dec.bias']" in caplog.text
    with caplog.at_level(logging.INFO, logger="btckpt"):
        with btckpt.restore_reports() as reports:
            btckpt.load(d / "checkpoint-2", {"model": Named()}, strict=False)
    text = caplog.text
    assert "\\x0a" not in text
    assert "\n  'model': loaded 3 of 4 tensors" in text
    assert not any(line.startswith("btckpt: restored step 99") for line in text.splitlines())  # a forged line
    assert reports[0].groups["model"].unexpected == ("w\nbtckpt: restored step 99",)


def test_a_newer_format_is_named_as_such_and_never_passed_over_silently(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture):
    import json

    from btckpt.storage.discovery import scan

    d = tmp_path / "ck"
    for s in (1, 2):
        btckpt.save(d / f"checkpoint-{s}", {"model": Named().state_dict()}, save_rng=False)
    man = d / "checkpoint-2" / "btckpt.json"
    obj = json.loads(man.read_bytes())
    obj.update(format="btckpt/2", layout_v2={"new": True})  # a field this btckpt does not know, too
    man.write_text(json.dumps(obj))
    with pytest.raises(btckpt.UnsupportedFormat) as exc:
        btckpt.load(d / "checkpoint-2", {"model": Named()})
    assert "written by a newer btckpt" in str(exc.value) and "upgrade btckpt" in str(exc.value)
    assert "corrupt" not in str(exc.value) and "damaged" not in str(exc.value)
    assert [(i.step, i.status) for i in scan(d)] == [(2, "newer"), (1, "complete")]
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        assert btckpt.load(d, {"model": Named()}) == 1
    warned = [r.getMessage() for r in caplog.records
              if "checkpoint-2" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "newer btckpt" in warned[0] and "falling back" in warned[0], warned


# As another uid (root, which CI runs as, bypasses permissions): a child process under uid/gid 65534.
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs a child as another uid, which needs root")


@pytest.fixture
def shared_tmp():
    """A folder in /tmp the child uid can enter (pytest's tmp_path is 0700 root); removed afterwards."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="btckpt-honest-", dir="/tmp"))
    base.chmod(0o755)
    (base / "home").mkdir()
    os.chown(base / "home", NOBODY, NOBODY)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _as_nobody(base: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child that imports btckpt as root, then drops to uid/gid 65534 (the interpreter may live
    where that uid cannot read, e.g. under /root: so the imports come first)."""
    src = str(Path(__file__).resolve().parents[1] / "integrations")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(base / "home"), "TMPDIR": str(base / "home"),
           "PYTHONPATH": src}
    prelude = ("import logging, sys, os, torch, btckpt, btckpt.checkpointer, btckpt.oneshot, btckpt.restore.load\n"
               f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


@needs_root
def test_an_unreadable_load_dir_says_permission_denied(shared_tmp: Path):
    load = shared_tmp / "load"
    btckpt.save(load / "checkpoint-3", {"model": Named().state_dict()}, save_rng=False)
    load.chmod(0o700)  # root's: the child may not list it
    own = shared_tmp / "own"
    own.mkdir()
    os.chown(own, NOBODY, NOBODY)
    code = f"""
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
for fn in (lambda: btckpt.Checkpointer(dir={str(own)!r}, load_dir={str(load)!r}).restore({{"w": torch.zeros(1)}}),
           lambda: btckpt.load({str(load)!r}, {{"w": torch.zeros(1)}})):
    try:
        fn()
    except btckpt.NoCheckpointFound as exc:
        print("ERROR", exc)
"""
    r = _as_nobody(shared_tmp, code)
    assert r.returncode == 0, r.stderr
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 2, r.stdout
    for e in errors:
        assert "Permission denied" in e and str(load) in e, e
        assert "damaged ones are named" not in e
    assert f"cannot read {load} (Permission denied)" in r.stdout  # the warning too


@needs_root
def test_an_existing_unwritable_dir_is_refused_at_construction(shared_tmp: Path):
    d = shared_tmp / "ck"
    d.mkdir()
    (d / ".btckpt.lock").touch()  # an earlier run's lock file, writable by the child: only the dir is not
    for p in (d, d / ".btckpt.lock"):
        os.chown(p, NOBODY, NOBODY)
    d.chmod(0o555)
    code = f"""
try:
    ck = btckpt.Checkpointer(dir={str(d)!r}, async_save=False, handle_sigterm=False)
except btckpt.ConfigError as exc:
    print("REFUSED", exc)
else:
    try:
        ck.save(1, {{"w": torch.zeros(1)}})
        ck.close()
    except btckpt.CheckpointError as exc:
        print("AT SAVE", exc)
"""
    r = _as_nobody(shared_tmp, code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("REFUSED"), r.stdout
    assert str(d) in r.stdout and "not writable" in r.stdout and "$BT_CHECKPOINT_DIR" in r.stdout
    assert list(d.iterdir()) == [d / ".btckpt.lock"]  # nothing written


# -- 5. default retention, said where a user looks ---------------------------------------------------------
def test_default_retention_keeps_3_and_says_so(tmp_path: Path):
    import pydoc

    from btckpt.hf import CheckpointCallback
    from btckpt.lightning import SafetensorsCheckpointIO

    d = tmp_path / "ck"
    with btckpt.Checkpointer(dir=d, async_save=False, handle_sigterm=False) as ck:
        for s in range(1, 6):
            ck.save(s, {"w": torch.full((2,), float(s))})
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert "keep_last=3" in pydoc.render_doc(btckpt.Checkpointer, renderer=pydoc.plaintext)  # help(Checkpointer)
    assert "default 3" in " ".join((btckpt.CheckpointConfig.__doc__ or "").split())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "Retention is on by default: `keep_last=3` keeps the 3 newest" in readme
    assert "as the Trainer does" in " ".join((CheckpointCallback.__doc__ or "").split())
    assert "``keep_last`` is off here" in " ".join((SafetensorsCheckpointIO.__doc__ or "").split())


def test_the_ranks_candidates_name_a_newer_format_they_pass_over(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    import json

    from btckpt import CheckpointConfig
    from btckpt.distributed.world import World
    from btckpt.restore.resume import Resume

    d = tmp_path / "ck"
    for s in (1, 2):
        btckpt.save(d / f"checkpoint-{s}", {"w": torch.zeros(1)}, save_rng=False)
    man = d / "checkpoint-2" / "btckpt.json"
    man.write_text(json.dumps({**json.loads(man.read_bytes()), "format": "btckpt/3"}))
    resume = Resume(config=CheckpointConfig(dir=str(d)), world=World(), root=d, remote=None, session="s")
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        assert [i.step for i in resume.candidates()] == [1]  # what the ranks agree on
    assert any("checkpoint-2" in r.getMessage() and "newer btckpt" in r.getMessage() for r in caplog.records)
