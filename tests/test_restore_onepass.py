"""The one-pass restore (issue 24): a candidate with an older one after it is read straight into the live tensors;
a damaged one then leaves the state exactly as restoring the older candidate does (model, optimizer with lazily
created state, RNG, plain data), the only candidate is verified before anything is applied, and a restore that
overwrote the state and found nothing to restore instead raises instead of starting fresh. Also: the one-pass
path is really taken (live storages kept, nothing staged, fresh optimizer state handed to the optimizer as read)
and tensors without a fitting destination (mismatched, non-contiguous, tied) still load by the old path.

Internals used: btckpt.restore.reader, btckpt.saving.snapshot (the reader's byte counters and the thread copy
stream).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import btckpt
import pytest
import torch
from btckpt import CorruptCheckpoint
from btckpt.restore import reader

SHARD = 768  # bytes per file: the tiny tensors below make several files per group


def build(seed: int, *, train_steps: int) -> dict[str, Any]:
    """A model (parameters and BatchNorm buffers, int64 included), Adam (its state created by the first step:
    none when ``train_steps`` is 0) and plain data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12),
                                torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(train_steps):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
    return {"model": model, "optimizer": opt, "extra": {"seed": seed, "steps": train_steps}}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Everything a restore sets, cloned: model tensors, optimizer state and groups, plain data, the RNG."""
    sd = state["optimizer"].state_dict()
    return {"model": {k: v.clone() for k, v in state["model"].state_dict().items()},
            "opt": {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()},
            "groups": sd["param_groups"], "extra": dict(state["extra"]), "rng": torch.get_rng_state()}


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["model"].keys() == want["model"].keys()
    for k, v in want["model"].items():
        assert got["model"][k].dtype == v.dtype and torch.equal(got["model"][k], v), k
    assert got["opt"].keys() == want["opt"].keys()
    for i, st in want["opt"].items():
        assert got["opt"][i].keys() == st.keys(), i
        for k, v in st.items():
            assert got["opt"][i][k].dtype == v.dtype and torch.equal(got["opt"][i][k], v), (i, k)
    assert got["groups"] == want["groups"] and got["extra"] == want["extra"]
    assert torch.equal(got["rng"], want["rng"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint-1 (after 1 training step) and checkpoint-2 (after 3), RNG included, several files a group."""
    root = tmp_path_factory.mktemp("onepass") / "ck"
    state = build(1, train_steps=1)
    with btckpt.Checkpointer(dir=root, async_save=False, handle_sigterm=False, max_shard_size=SHARD,
                             keep_last=None) as ck:
        ck.save(1, state)
        torch.manual_seed(2)
        for _ in range(2):
            state["optimizer"].zero_grad()
            state["model"](torch.randn(8, 16)).pow(2).sum().backward()
            state["optimizer"].step()
        state["extra"]["steps"] = 3
        ck.save(2, state)
    files = sorted((root / "checkpoint-2").glob("*.safetensors"))
    assert len([f for f in files if f.name.startswith("model")]) >= 3
    assert len([f for f in files if f.name.startswith("optimizer")]) >= 3
    return root


def live(trained: bool) -> dict[str, Any]:
    """The restarted job's state before restore: a trained optimizer (its state exists and is overwritten in
    place) or a fresh one (its state is created by the restore)."""
    return build(7, train_steps=1 if trained else 0)


def restored(root: Path, state: dict[str, Any], **kw: Any) -> int | None:
    with btckpt.Checkpointer(dir=root, handle_sigterm=False, **kw) as ck:
        return ck.restore(state)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def read_order(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files of the newest checkpoint in the order a restore reads them."""
    seen: list[str] = []
    real = reader.read_safetensors

    def spy(folder: Path, name: str, **kw: Any) -> Any:
        seen.append(name)
        return real(folder, name, **kw)

    monkeypatch.setattr(reader, "read_safetensors", spy)
    assert restored(root, live(True)) == 2
    monkeypatch.setattr(reader, "read_safetensors", real)
    return seen


@pytest.mark.parametrize("trained", [True, False], ids=["trained-optimizer", "fresh-optimizer"])
def test_a_flipped_byte_in_the_last_file_leaves_the_state_as_restoring_the_older_step(
        saved: Path, tmp_path: Path, trained: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    older = tmp_path / "older"
    shutil.copytree(saved, older)
    shutil.rmtree(older / "checkpoint-2")
    state = live(trained)
    assert restored(older, state) == 1
    want = snapshot(state)

    order = read_order(saved, monkeypatch)
    assert len(order) >= 6 and order[-1].startswith("optimizer")
    for name in [order[-1], order[0], order[len(order) // 2]]:  # the last file first: the one the issue names
        root = tmp_path / name
        shutil.copytree(saved, root)
        flip(root / "checkpoint-2" / name)
        state = live(trained)
        ptrs = [p.data_ptr() for p in state["model"].parameters()]
        counts = dict(reader.READS)
        assert restored(root, state) == 1, name
        assert reader.READS["direct_bytes"] > counts["direct_bytes"]  # checkpoint-2 was read into the state
        assert [p.data_ptr() for p in state["model"].parameters()] == ptrs
        assert_same(snapshot(state), want)
        torch.manual_seed(5)  # the next training step works on the restored state
        state["optimizer"].zero_grad()
        state["model"](torch.randn(8, 16)).pow(2).sum().backward()
        state["optimizer"].step()


def test_with_no_older_step_a_damaged_checkpoint_leaves_the_state_untouched(saved: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    order = read_order(saved, monkeypatch)
    root = tmp_path / "only"
    shutil.copytree(saved, root)
    shutil.rmtree(root / "checkpoint-1")
    flip(root / "checkpoint-2" / order[-1])
    for trained in (True, False):
        state = live(trained)
        before = snapshot(state)
        counts = dict(reader.READS)
        assert restored(root, state) is None  # start fresh, as before
        assert_same(snapshot(state), before)
        assert reader.READS["direct_bytes"] == counts["direct_bytes"]  # verified first: nothing written


def test_when_every_candidate_is_damaged_after_a_one_pass_read_the_restore_raises(saved: Path,
                                                                                  tmp_path: Path) -> None:
    root = tmp_path / "both"
    shutil.copytree(saved, root)
    for step in (1, 2):
        flip(sorted((root / f"checkpoint-{step}").glob("model*.safetensors"))[0])
    state = live(True)
    with pytest.raises(CorruptCheckpoint) as exc:
        restored(root, state)
    msg = str(exc.value)
    assert "checkpoint-2" in msg and "no longer what it was" in msg and "Rebuild the model" in msg


def test_the_one_pass_path_reads_into_the_live_storages_and_hands_fresh_state_to_the_optimizer(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: dict[str, dict[str, torch.Tensor]] = {}
    real = reader.read_safetensors

    def spy(folder: Path, name: str, **kw: Any) -> Any:
        header, tensors = real(folder, name, **kw)
        made[name] = tensors
        return header, tensors

    monkeypatch.setattr(reader, "read_safetensors", spy)
    for trained in (True, False):
        made.clear()
        state = live(trained)
        model_ptrs = {k: v.data_ptr() for k, v in state["model"].state_dict().items()}
        opt_ptrs = {(i, k): v.data_ptr() for i, st in state["optimizer"].state_dict()["state"].items()
                    for k, v in st.items()}
        model_bytes = sum(v.numel() * v.element_size() for v in state["model"].state_dict().values())
        opt_bytes = sum(v.numel() * v.element_size() for st in state["optimizer"].state.values()
                        for v in st.values())
        counts = dict(reader.READS)
        assert restored(saved, state) == 2
        delta = {k: reader.READS[k] - counts[k] for k in counts}
        assert delta["staged_bytes"] == 0 and delta["verify_bytes"] == 0  # no staging buffer, no hash pass
        assert delta["direct_bytes"] == model_bytes + opt_bytes  # everything that had a destination
        assert {k: v.data_ptr() for k, v in state["model"].state_dict().items()} == model_ptrs
        sd = state["optimizer"].state_dict()["state"]
        assert len(sd) == 8  # every parameter has Adam state
        if trained:  # read into the existing state tensors
            assert {(i, k): v.data_ptr() for i, st in sd.items() for k, v in st.items()} == opt_ptrs
            assert delta["fresh_bytes"] == 0
        else:  # the optimizer keeps the tensors the read allocated at their final size: no second copy
            read_ptrs = {t.data_ptr() for name, ts in made.items() if name.startswith("optimizer")
                         for t in ts.values()}
            assert {v.data_ptr() for st in sd.values() for v in st.values()} <= read_ptrs
            assert delta["fresh_bytes"] == sum(v.numel() * v.element_size() for st in sd.values()
                                               for v in st.values())


class Odd(torch.nn.Module):
    """A model with a layer whose shape can differ, a non-contiguous buffer and tied weights."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, out)
        self.register_buffer("t", torch.zeros(6, 4).t())
        self.c = torch.nn.Linear(8, 8, bias=False)
        self.d = torch.nn.Linear(8, 8, bias=False)
        self.d.weight = self.c.weight


def test_tensors_without_a_fitting_destination_take_the_old_path(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = Odd(4)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
        src.t.copy_(torch.randn(4, 6))
    for step in (1, 2):
        btckpt.save(tmp_path / f"checkpoint-{step}", {"model": src}, save_rng=False)
    dst = Odd(5)  # b's shape differs: strict=False leaves it as it is
    b_before = {k: v.clone() for k, v in dst.b.state_dict().items()}
    a_ptr, c_ptr, t_ptr = dst.a.weight.data_ptr(), dst.c.weight.data_ptr(), dst.t.data_ptr()
    counts = dict(reader.READS)
    with btckpt.Checkpointer(dir=tmp_path, handle_sigterm=False, save_rng=False) as ck:
        assert ck.restore({"model": dst}, strict=False) == 2
    delta = {k: reader.READS[k] - counts[k] for k in counts}
    assert torch.equal(dst.a.weight, src.a.weight) and torch.equal(dst.a.bias, src.a.bias)
    assert torch.equal(dst.t, src.t) and not dst.t.is_contiguous() and dst.t.data_ptr() == t_ptr
    assert torch.equal(dst.c.weight, src.c.weight) and dst.d.weight is dst.c.weight
    assert all(torch.equal(v, b_before[k]) for k, v in dst.b.state_dict().items())
    assert dst.a.weight.data_ptr() == a_ptr and dst.c.weight.data_ptr() == c_ptr
    # a and c read in place; b (other shape), t (non-contiguous) and the tied twin of c into fresh tensors
    direct = sum(v.numel() * 4 for v in (dst.a.weight, dst.a.bias, dst.c.weight))
    assert delta["direct_bytes"] == direct
    assert delta["fresh_bytes"] >= sum(v.numel() * 4 for v in (src.b.weight, src.b.bias, src.t))
    assert delta["staged_bytes"] == 0


RANK_PROGRAM = '''
import hashlib
import sys
from pathlib import Path

import btckpt
import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])
from test_restore_onepass import build, digest  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
state = build(7, train_steps=1)  # a trained optimizer: its state tensors are overwritten in place
ptrs = [p.data_ptr() for p in state["model"].parameters()]
with btckpt.Checkpointer(dir=Path(sys.argv[1]) / f"rank{rank}", name="onepass", async_save=False,
                         barrier_timeout=60, handle_sigterm=False, save_rng=False) as ck:
    step = ck.restore(state)
same = ptrs == [p.data_ptr() for p in state["model"].parameters()]
from btckpt.restore.reader import READS  # noqa: E402
print(f"RANK {rank} STEP {step} DIGEST {digest(state)} SAME {same} DIRECT {READS['direct_bytes']}", flush=True)
dist.destroy_process_group()
'''


def digest(state: dict[str, Any]) -> str:
    """A hash of the model's and the optimizer's tensors (with their names and dtypes) and the plain data."""
    h = hashlib.sha256()
    snap = snapshot(state)
    for k, v in snap["model"].items():
        h.update(f"{k}{v.dtype}".encode() + v.numpy().tobytes())
    for i, st in snap["opt"].items():
        for k, v in st.items():
            h.update(f"{i}{k}{v.dtype}".encode() + v.numpy().tobytes())
    h.update(repr((snap["groups"], snap["extra"])).encode())
    return h.hexdigest()


def test_two_ranks_where_one_ranks_copy_is_damaged_both_load_the_older_step_exactly(saved: Path,
                                                                                     tmp_path: Path) -> None:
    """Each rank resumes from its own copy (a node-local dir each); rank 1's copy of step 2 is damaged, rank 0
    reads step 2 one pass into its live state, the ranks agree on step 1: both end exactly as a restore of
    step 1 leaves the state."""
    from dist_launch import env_with, finish, raw_ranks

    for rank in (0, 1):
        shutil.copytree(saved, tmp_path / "ck" / f"rank{rank}")
    flip(sorted((tmp_path / "ck" / "rank1" / "checkpoint-2").glob("optimizer*.safetensors"))[-1])
    older = tmp_path / "older"
    shutil.copytree(saved, older)
    shutil.rmtree(older / "checkpoint-2")
    ref = live(True)
    assert restored(older, ref, save_rng=False) == 1
    want = digest(ref)
    script = tmp_path / "rank_program.py"
    script.write_text(RANK_PROGRAM)
    outs = []
    for proc in raw_ranks(str(script), [str(tmp_path / "ck"), str(Path(__file__).parent)], world=2,
                          env=env_with()):
        rc, out = finish(proc, timeout=180)
        assert rc == 0, out[-4000:]
        outs.append(out)
    found = [re.search(r"RANK (\d) STEP (\S+) DIGEST (\w+) SAME (\w+) DIRECT (\d+)", o) for o in outs]
    assert all(found), outs
    got = {int(m[1]): (m[2], m[3], m[4]) for m in found if m}
    assert got == {0: ("1", want, "True"), 1: ("1", want, "True")}, outs
    state_bytes = sum(v.numel() * v.element_size() for v in ref["model"].state_dict().values()) + sum(
        v.numel() * v.element_size() for st in ref["optimizer"].state.values() for v in st.values())
    direct = {int(m[1]): int(m[5]) for m in found if m}
    # each rank read all of step 2 in place (rank 1's damage is in its last file), then all of step 1
    assert direct == {0: 2 * state_bytes, 1: 2 * state_bytes}, (direct, state_bytes)
    assert "is damaged" in "".join(outs)


def test_device_destinations_go_through_the_pinned_ring_and_a_side_stream(saved: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA destinations on CPU: every destination counts as device memory, the H2D copies run on the saving
    side's CPU stand-in for a stream (:class:`btckpt.saving.snapshot.ThreadStream`), spans small enough that the
    ring's slots are reused. The state restored is exact, and a damaged newest step still ends as the older."""
    from btckpt.saving.snapshot import ThreadStream

    copies: list[int] = []

    class Counting(ThreadStream):
        def run(self, fn: Any) -> None:
            copies.append(1)
            super().run(fn)

    want = live(True)
    assert restored(saved, want) == 2  # the reference: the plain CPU path
    want_snap = snapshot(want)
    monkeypatch.setattr(reader, "is_device", lambda t: True)
    monkeypatch.setattr(reader, "device_stream", lambda device: Counting("btckpt-test-h2d"))
    monkeypatch.setattr(reader, "READ_CHUNK", 256)
    monkeypatch.setattr(reader, "RING_SLOTS", 2)
    for trained in (True, False):
        state = live(trained)
        ptrs = [p.data_ptr() for p in state["model"].parameters()]
        counts = dict(reader.READS)
        assert restored(saved, state) == 2
        assert reader.READS["ring_bytes"] > counts["ring_bytes"] and copies
        assert reader.READS["staged_bytes"] == counts["staged_bytes"]
        assert [p.data_ptr() for p in state["model"].parameters()] == ptrs
        assert_same(snapshot(state), want_snap)

    older = tmp_path / "older"
    shutil.copytree(saved, older)
    shutil.rmtree(older / "checkpoint-2")
    ref = live(True)
    assert restored(older, ref) == 1
    ref_snap = snapshot(ref)
    root = tmp_path / "damaged"
    shutil.copytree(saved, root)
    flip(sorted((root / "checkpoint-2").glob("optimizer*.safetensors"))[-1])
    state = live(True)
    assert restored(root, state) == 1
    assert_same(snapshot(state), ref_snap)


def test_a_non_strict_fallback_that_would_leave_overwritten_tensors_is_not_used(tmp_path: Path) -> None:
    """strict=False: checkpoint-2 is read one pass and fails; checkpoint-1 lacks layer 0, which checkpoint-2's
    read overwrote, so loading it would leave layer 0 half from a damaged checkpoint: it is skipped with a
    warning, and with nothing else to restore the restore raises (naming the checkpoint) instead of loading it."""
    from collections import OrderedDict

    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    part = torch.nn.Sequential(OrderedDict([("1", torch.nn.Linear(16, 4))]))  # no layer 0
    btckpt.save(tmp_path / "checkpoint-1", {"model": part}, save_rng=False)
    btckpt.save(tmp_path / "checkpoint-2", {"model": full}, save_rng=False, max_shard_size=512)
    files = sorted((tmp_path / "checkpoint-2").glob("model*.safetensors"))
    assert len(files) >= 2
    flip(files[-1])  # layer 0 lives in the first file: overwritten before the damage is found
    live_model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    with btckpt.Checkpointer(dir=tmp_path, handle_sigterm=False, save_rng=False) as ck:
        with pytest.raises(CorruptCheckpoint) as exc:
            ck.restore({"model": live_model}, strict=False)
    assert "checkpoint-2" in str(exc.value) and "model.0.weight" in str(exc.value)
    # the same checkpoint alone (nothing overwritten before it) loads non-strict as ever
    shutil.rmtree(tmp_path / "checkpoint-2")
    with btckpt.Checkpointer(dir=tmp_path, handle_sigterm=False, save_rng=False) as ck:
        assert ck.restore({"model": live_model}, strict=False) == 1
    assert torch.equal(live_model[1].weight, part[0].weight)
