"""The read-side seam: a local folder and the same folder in a bucket (fsspec ``memory://``) are found,
classified and verified by the same code, with the same answers.

Internals used: btckpt.storage.discovery, btckpt.storage.store (the Store seam under test (local and fsspec stores,
walk), discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import btckpt
import fsspec
import pytest
import torch
from btckpt.storage.discovery import inspect, scan, verify
from btckpt.storage.store import FsspecStore, LocalStore, open_store, walk


@pytest.fixture
def bucket() -> Iterator[str]:
    fs = fsspec.filesystem("memory")
    root = f"/store-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _tree(root: Path) -> Path:
    """Every status: complete (two layouts), a missing file, never committed, a damaged byte."""
    state = {"model": {"w": torch.arange(6, dtype=torch.float32)}, "optimizer": {"m": torch.ones(3)}}
    for step in (1, 2, 3):
        btckpt.save(root / f"checkpoint-{step}", state, save_rng=False)
    btckpt.save(root / "rank-0" / "checkpoint-5", state, save_rng=False)
    (root / "checkpoint-3" / "optimizer.safetensors").unlink()
    (root / "checkpoint-4").mkdir()
    (root / "checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    f = root / "checkpoint-2" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    return root


def _put(local: Path, url: str) -> None:
    fsspec.filesystem("memory").put(str(local) + "/", url.removeprefix("memory://") + "/", recursive=True)


def _summary(infos: list[btckpt.storage.discovery.CheckpointInfo]) -> list[tuple[int, str, str, str, list[str]]]:
    def same(s: str) -> str:  # the one wording that differs: a bucket folder may be an upload in progress
        return s.replace(" (or upload unfinished)", "")

    return [(i.step, i.status, i.kind, same(i.reason), [same(p) for p in verify(i)]) for i in infos]


def test_local_folder_and_bucket_get_the_same_answers(tmp_path: Path, bucket: str) -> None:
    local = _tree(tmp_path / "ck")
    _put(local, bucket)
    here, there = scan(local), scan(bucket)
    assert _summary(here) == _summary(there)
    assert [(i.step, i.status) for i in here] == [(5, "complete"), (4, "incomplete"), (3, "incomplete"),
                                                  (2, "complete"), (1, "complete")]
    problems = dict((s, p) for s, *_, p in _summary(here))
    assert problems[2] == [problems[2][0]] and problems[2][0].startswith("model.safetensors: checksum mismatch")
    assert problems[1] == [] and problems[5] == []
    assert all(isinstance(i.store, LocalStore) and i.where == str(i.path) for i in here)
    assert all(isinstance(i.store, FsspecStore) and i.where.startswith("memory://") for i in there)
    assert there[0].where == f"{bucket}/rank-0/checkpoint-5"
    assert btckpt.latest(local) == local / "rank-0" / "checkpoint-5"
    assert btckpt.latest(bucket) == f"{bucket}/rank-0/checkpoint-5"
    assert [i.step for i in scan(bucket, own=True)] == [4, 3, 2, 1]  # directly under the dir only


def test_a_manifest_less_model_folder_counts_in_a_bucket_only_where_named(tmp_path: Path, bucket: str) -> None:
    """Locally a folder appears whole (rename); in a bucket an upload shows its files one by one, so a
    ``checkpoint-<N>`` holding weights and config.json but no manifest is an unfinished upload there."""
    hf = tmp_path / "hf" / "checkpoint-7"
    hf.mkdir(parents=True)
    btckpt.save(tmp_path / "tmp", {"model": {"w": torch.ones(2)}}, save_rng=False)
    (hf / "model.safetensors").write_bytes((tmp_path / "tmp" / "model.safetensors").read_bytes())
    (hf / "config.json").write_text("{}")
    _put(tmp_path / "hf", bucket)
    assert [(i.status, i.kind) for i in scan(tmp_path / "hf")] == [("complete", "hf")]
    remote = scan(bucket)
    assert [(i.status, i.kind) for i in remote] == [("incomplete", "btckpt")]
    assert "upload unfinished" in remote[0].reason
    named = scan(f"{bucket}/checkpoint-7")  # the folder itself is named: still a checkpoint-<N>, never whole
    assert [i.status for i in named] == ["incomplete"]
    _put(hf, f"{bucket}/model")  # a plain model folder named by the user
    assert [(i.status, i.kind) for i in scan(f"{bucket}/model")] == [("complete", "hf")]


def test_stores_list_stat_and_read_alike(tmp_path: Path, bucket: str) -> None:
    local = tmp_path / "ck" / "checkpoint-1"
    btckpt.save(local, {"model": {"w": torch.arange(4, dtype=torch.float32)}}, save_rng=False)
    (local / "sub").mkdir()
    (local / "sub" / "note.txt").write_text("hello")
    _put(local, bucket)
    (ls, lroot), (rs, rroot) = open_store(local), open_store(bucket)
    names = {n: e.size for n, e in walk(ls, lroot).items()}
    assert names == {n: e.size for n, e in walk(rs, rroot).items()} and names["sub/note.txt"] == 5
    for store, root in ((ls, lroot), (rs, rroot)):
        assert [e.kind for e in store.list(root) or [] if e.name == "sub"] == ["dir"]
        assert store.list(f"{root}/nothing-here") is None
        assert set(store.stat(root, ["sub/note.txt", "missing"])) == {"sub/note.txt"}
        assert store.read(root, "sub/note.txt", 1, 4) == b"ell"
        assert store.get(root, "sub/note.txt", limit=5) == b"hello"
        with pytest.raises(btckpt.CorruptCheckpoint, match="larger than 4 bytes"):
            store.get(root, "sub/note.txt", limit=4)
        with pytest.raises(btckpt.IncompleteCheckpoint):
            store.read(root, "missing", 0, 1)
    assert inspect(local).complete and inspect(bucket).complete
