"""The async snapshot: exact at the save() call while training goes on, arena reuse, errors, CUDA path.

Internals used: btckpt.format.manifest, btckpt.restore.reader, btckpt.saving.job, btckpt.saving.snapshot (the stager
(a fake CUDA stream), its copy and the save job's writer patched to slow or fail the background copy, the manifest
and the reader to check the bytes that landed; no public name reaches the snapshot).
"""

from __future__ import annotations

import copy
import logging
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import btckpt
import btckpt.saving.snapshot as snapshot_mod
import pytest
import torch
from btckpt import CheckpointError
from btckpt.format.manifest import MANIFEST, read_manifest
from btckpt.restore.reader import CheckpointReader
from btckpt.saving.snapshot import Stager
from btckpt.testing import faults

pytest.importorskip("hypothesis", reason="hypothesis: a dev dependency (btckpt[dev]), not in the lowest-versions venv")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _model(widths: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    x = torch.randn(8, width)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _saved(path: Path, group: str) -> dict:
    man = read_manifest(path)
    return CheckpointReader(path, man).load_group(group)


def _equal_tree(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_tree(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


@pytest.fixture
def slow_copies(monkeypatch: pytest.MonkeyPatch):
    """Make every background copy start late, so training runs into the snapshot window."""
    delays: list[float] = []
    real = snapshot_mod._copy_all

    def slow(pairs, *, non_blocking):  # type: ignore[no-untyped-def]
        d = random.uniform(0.0, 0.03)
        delays.append(d)
        time.sleep(d)
        real(pairs, non_blocking=non_blocking)

    monkeypatch.setattr(snapshot_mod, "_copy_all", slow)
    return delays


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(2, 48), min_size=2, max_size=4), steps=st.lists(st.integers(0, 3), min_size=3,
       max_size=5), seed=st.integers(0, 10_000))
def test_snapshot_equals_state_at_save_while_training_goes_on(tmp_path_factory: pytest.TempPathFactory,
                                                               slow_copies: list[float], widths: list[int],
                                                               steps: list[int], seed: int) -> None:
    torch.manual_seed(seed)
    d = tmp_path_factory.mktemp("ck")
    model = _model(widths)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    state = {"model": model, "optimizer": opt}
    expected = {}
    with btckpt.Checkpointer(dir=d, keep_last=None, copy_inline_bytes=0, handle_sigterm=False) as ckpt:
        step = 0
        for n in steps:
            for _ in range(n):
                _train_step(model, opt, widths[0])
            step += 1
            _train_step(model, opt, widths[0])
            expected[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
            ckpt.save(step, state)
            # training continues at once: forward changes BN buffers, step changes params and moments
            _train_step(model, opt, widths[0])
            _train_step(model, opt, widths[0])
        assert ckpt._gate.waits >= 0
    assert slow_copies, "the background copy path was not exercised"
    for s, (msd, osd) in expected.items():
        assert _equal_tree(_saved(d / f"checkpoint-{s}", "model"), dict(msd)), f"model differs at step {s}"
        assert _equal_tree(_saved(d / f"checkpoint-{s}", "optimizer"), osd), f"optimizer differs at step {s}"


def test_without_the_gate_the_snapshot_would_be_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: with the gate disabled and a late copy, training leaks into the snapshot."""
    gate = threading.Event()
    real = snapshot_mod._copy_all

    def late(pairs, *, non_blocking):  # type: ignore[no-untyped-def]
        gate.wait(10)
        real(pairs, non_blocking=non_blocking)

    monkeypatch.setattr(snapshot_mod, "_copy_all", late)
    model = _model([16, 16])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with btckpt.Checkpointer(dir=tmp_path, copy_inline_bytes=0, handle_sigterm=False) as ckpt:
        monkeypatch.setattr(ckpt._gate, "wait", lambda: None)
        before = copy.deepcopy(model.state_dict())
        ckpt.save(1, {"model": model, "optimizer": opt})
        _train_step(model, opt, 16)
        gate.set()
        ckpt._pending.result()  # type: ignore[union-attr]
    saved = _saved(tmp_path / "checkpoint-1", "model")
    assert not torch.equal(saved["0.weight"], before["0.weight"])


def test_repeated_saves_reuse_the_arena(tmp_path: Path) -> None:
    model = _model([64, 64, 64])
    opt = torch.optim.Adam(model.parameters())
    _train_step(model, opt, 64)
    with btckpt.Checkpointer(dir=tmp_path, keep_last=2, handle_sigterm=False) as ckpt:
        for s in range(1, 8):
            _train_step(model, opt, 64)
            ckpt.save(s, {"model": model, "optimizer": opt})
            if s == 1:
                ptr = ckpt._stager._arena.data_ptr()  # type: ignore[union-attr]
        ckpt.wait()
        assert ckpt._stager.allocations == 1
        assert ckpt._stager._arena.data_ptr() == ptr  # type: ignore[union-attr]
        bigger = _model([256, 1024])
        ckpt.save(20, {"model": bigger})
        ckpt.wait()
        assert ckpt._stager.allocations == 2  # re-planned and re-allocated when shapes grow


def test_writer_error_is_raised_once_from_the_next_call_and_nothing_commits(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    model = _model([8, 8])
    with btckpt.Checkpointer(dir=tmp_path, handle_sigterm=False) as ckpt:
        faults.arm("write_data", "raise")
        ckpt.save(1, {"model": model})  # returns: the failure happens in the background
        with pytest.raises(CheckpointError, match="injected I/O error"):
            ckpt.wait()
        assert "background save of step 1 failed" in caplog.text  # logged at once
        ckpt.wait()  # raised exactly once
        assert not (tmp_path / "checkpoint-1").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-")]
        faults.disarm()
        faults.arm("before_rename", "enospc")
        ckpt.save(2, {"model": model})
        deadline = time.monotonic() + 60
        while "before_rename" not in faults.reached():  # the writer hit the fault (it read the action first)
            assert time.monotonic() < deadline, "the background save never reached before_rename"
            time.sleep(0.01)
        faults.disarm()
        with pytest.raises(btckpt.InsufficientSpace):
            ckpt.save(3, {"model": model})  # the next save raises the pending error and does not save
        assert not (tmp_path / "checkpoint-3").exists()
        ckpt.save(4, {"model": model})
    assert btckpt.latest(tmp_path) == tmp_path / "checkpoint-4"


def test_on_error_warn_keeps_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _model([8, 8])
    with btckpt.Checkpointer(dir=tmp_path, on_error="warn", handle_sigterm=False) as ckpt:
        faults.arm("write_data", "enospc")
        ckpt.save(1, {"model": model})
        ckpt.wait()  # no raise
        faults.disarm()
        ckpt.save(2, {"model": model})
    assert "continuing, on_error='warn'" in caplog.text
    assert btckpt.latest(tmp_path) == tmp_path / "checkpoint-2" and not (tmp_path / "checkpoint-1").exists()


def test_back_pressure_waits_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    import btckpt.saving.job as saving

    real = saving.write_arena_file

    def slow_write(*a, **k):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(saving, "write_arena_file", slow_write)
    model = _model([8, 8])
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, handle_sigterm=False) as ckpt:
        ckpt.save(1, {"model": model})
        ckpt.save(2, {"model": model})
    assert "save interval is shorter than the write time" in caplog.text
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}


class FakeCudaStream:
    """Stands in for CudaStream on CPU: the copies run later on another thread, events are polled."""

    log: list[str] = []

    def __init__(self, device: torch.device) -> None:
        self.q: list = []

    def start_after_compute(self) -> None:
        FakeCudaStream.log.append("wait_compute")

    def run(self, fn) -> None:  # type: ignore[no-untyped-def]
        FakeCudaStream.log.append("copy")
        self.q.append(fn)

    def record(self):  # type: ignore[no-untyped-def]
        FakeCudaStream.log.append("record")
        ev = threading.Event()
        work = list(self.q)
        self.q.clear()

        def later() -> None:
            time.sleep(1.0)  # long enough that the training step reaches optimizer.step first
            for fn in work:
                fn()
            FakeCudaStream.log.append("copied")
            ev.set()

        t = threading.Thread(target=later, daemon=True)
        t.start()

        class Event:
            def query(self) -> bool:
                return ev.is_set()

            def synchronize(self) -> None:
                ev.wait()
                t.join()

        return Event()

    @staticmethod
    def query(ev) -> bool:  # type: ignore[no-untyped-def]
        return ev.query()

    @staticmethod
    def sync(ev) -> None:  # type: ignore[no-untyped-def]
        ev.synchronize()

    def gate(self, ev) -> None:  # type: ignore[no-untyped-def]
        FakeCudaStream.log.append("gate")
        ev.synchronize()  # a real CUDA stream makes the compute stream wait instead of the host


def test_cuda_stream_protocol_on_cpu_with_a_fake_stream(tmp_path: Path) -> None:
    FakeCudaStream.log = []
    model = _model([32, 32])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _train_step(model, opt, 32)
    with btckpt.Checkpointer(dir=tmp_path, copy_inline_bytes=0, handle_sigterm=False) as ckpt:
        ckpt._stager.close()
        ckpt._stager = Stager(device_stream=FakeCudaStream, is_device=lambda t: True, small_bytes=0)
        expect = copy.deepcopy(model.state_dict())
        ckpt.save(1, {"model": model, "optimizer": opt})
        opt.register_step_pre_hook(lambda *a: FakeCudaStream.log.append("step"))  # runs after the gate's hook
        _train_step(model, opt, 32)  # the step waits on the fake stream's event
        ckpt.wait()
        ckpt._stager.close()
    assert FakeCudaStream.log == ["wait_compute", "copy", "record", "gate", "copied", "step"]
    assert _equal_tree(_saved(tmp_path / "checkpoint-1", "model"), dict(expect))


def test_memory_budget_stages_in_windows_and_stays_exact(tmp_path: Path, slow_copies: list[float]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 700), torch.nn.BatchNorm1d(700), torch.nn.Linear(700, 300))
    opt = torch.optim.Adam(model.parameters())
    _train_step(model, opt, 512)
    with btckpt.Checkpointer(dir=tmp_path, memory_budget=1 << 20, handle_sigterm=False) as ckpt:
        msd, osd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        ckpt.save(1, {"model": model, "optimizer": opt})
        _train_step(model, opt, 512)
        ckpt.wait()
        assert ckpt._stager.arena_bytes <= 1 << 20
    assert _equal_tree(_saved(tmp_path / "checkpoint-1", "model"), dict(msd))
    assert _equal_tree(_saved(tmp_path / "checkpoint-1", "optimizer"), osd)


def test_fence_protects_other_in_place_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = snapshot_mod._copy_all

    def late(pairs, *, non_blocking):  # type: ignore[no-untyped-def]
        time.sleep(0.1)
        real(pairs, non_blocking=non_blocking)

    monkeypatch.setattr(snapshot_mod, "_copy_all", late)
    model = _model([16, 16])
    with btckpt.Checkpointer(dir=tmp_path, copy_inline_bytes=0, handle_sigterm=False) as ckpt:
        before = copy.deepcopy(model.state_dict())
        ckpt.save(1, {"model": model})
        ckpt.fence()
        with torch.no_grad():
            model[0].weight.mul_(0.5)  # an EMA-style in-place update after the fence
    assert torch.equal(_saved(tmp_path / "checkpoint-1", "model")["0.weight"], before["0.weight"])


def test_exit_with_a_save_in_flight_commits_it(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(
        "import sys, torch, btckpt\n"
        "m = torch.nn.Linear(256, 256)\n"
        f"c = btckpt.Checkpointer(dir={str(tmp_path / 'ck')!r})\n"
        "c.save(5, {'model': m})\n"
        "sys.exit(0)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert btckpt.latest(tmp_path / "ck") == tmp_path / "ck" / "checkpoint-5"


def test_save_logs_bytes_seconds_and_throughput(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="btckpt")
    with btckpt.Checkpointer(dir=tmp_path, async_save=False, handle_sigterm=False) as ckpt:
        ckpt.save(1, {"model": _model([8, 8])})
    assert any("MB in" in r.message and "MB/s" in r.message for r in caplog.records)


def test_many_small_tensors_and_adam_step_counters_copy_behind_the_gate(tmp_path: Path,
                                                                          slow_copies: list[float]) -> None:
    """2,000 tiny parameters with Adam state (a step counter each): every gated tensor, the 0-dim step
    counters included, is copied in the background, and each snapshot still equals the state at save()."""
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3)) for _ in range(2000)])
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    background: list[int] = []
    real = snapshot_mod._copy_all

    def counting(pairs, *, non_blocking):  # type: ignore[no-untyped-def]
        pairs = list(pairs)
        background.append(sum(1 for _, src in pairs if src.dim() == 0))
        real(pairs, non_blocking=non_blocking)

    snapshot_mod._copy_all = counting  # restored by slow_copies' monkeypatch (it patched the same name)

    def step() -> None:
        for p in model:
            p.grad = torch.randn_like(p)
        opt.step()

    expected = {}
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, handle_sigterm=False) as ck:
        for s in range(1, 4):
            step()
            expected[s] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
            ck.save(s, {"model": model, "optimizer": opt})
            step()  # waits at the gate, then moves every parameter, moment and step counter
        assert ck.stats.plan_reuses == 2  # the same structure: saves 2 and 3 reused the plan
    assert background and all(n == 2000 for n in background), background
    for s, (msd, osd) in expected.items():
        assert _equal_tree(_saved(tmp_path / f"checkpoint-{s}", "model"), dict(msd)), f"model differs at step {s}"
        assert _equal_tree(_saved(tmp_path / f"checkpoint-{s}", "optimizer"), osd), f"optimizer differs at step {s}"


def test_stats_after_saves(tmp_path: Path, slow_copies: list[float]) -> None:
    model = _model([8, 16])
    opt = torch.optim.Adam(model.parameters())
    _train_step(model, opt, 8)
    with btckpt.Checkpointer(dir=tmp_path, keep_last=None, handle_sigterm=False) as ck:
        assert ck.stats == btckpt.CheckpointStats()
        ck.save(1, {"model": model, "optimizer": opt})
        _train_step(model, opt, 8)
        ck.save(2, {"model": model, "optimizer": opt})
        ck.wait()
        st = ck.stats
    files = [p for p in (tmp_path / "checkpoint-2").iterdir() if p.name != MANIFEST]  # the rank's files
    assert st.saves == 2 and st.commits == 2 and st.last_committed_step == 2
    assert st.plan_reuses == 1
    assert st.last_bytes == sum(p.stat().st_size for p in files)
    assert st.bytes_written >= 2 * st.last_bytes - 64  # two saves of the same state (RNG files vary a little)
    assert st.save_block_s >= st.last_save_block_s > 0
    assert st.last_write_s > 0 and st.last_mb_s > 0
    assert st.gate_wait_s >= 0 and st.gate_waits >= 0
    assert st.as_dict()["saves"] == 2
    tensor_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # + Adam's two moments
    assert st.arena_bytes >= tensor_bytes and st.arena_allocations == 1  # allocated once, reused by save 2
    assert st.arena_pinned is False  # CPU tensors: no device copies, so no page-locked memory
    with pytest.raises(AttributeError):
        st.saves = 3  # type: ignore[misc]


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_writer_yields_to_training_and_gets_the_cpu_when_training_waits(tmp_path: Path) -> None:
    import os

    seen: dict[str, int] = {}
    started = threading.Event()

    def on_commit(_path: Path) -> None:  # runs on the writer thread
        seen["running"] = os.sched_getscheduler(0)
        started.set()
        deadline = time.monotonic() + 20
        while os.sched_getscheduler(0) == os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.01)  # until the training thread waits for this save (wait() below)
        seen["waited"] = os.sched_getscheduler(0)

    with btckpt.Checkpointer(dir=tmp_path, handle_sigterm=False) as ck:
        ck.save(1, {"model": _model([4, 4])}, on_commit=on_commit)
        assert started.wait(20)
        ck.wait()
    assert seen["running"] == os.SCHED_IDLE
    assert seen["waited"] == os.SCHED_OTHER
