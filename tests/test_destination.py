"""The write-side seam (issue 26 item 1): the Destination verbs of LocalDir and Remote, and the one multi-node
commit order (``commit_in_order``) that a save and a promotion share.

Internals used: btckpt.format.manifest, btckpt.saving.destination, btckpt.storage.discovery (the Destination seam
under test (``LocalDir``, ``Remote``, ``commit_in_order``), manifests, discovery to judge the folders on disk
(complete, verified), which no public name reports).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from btckpt import CheckpointError, CoordinationError
from btckpt.format.manifest import MANIFEST, Manifest
from btckpt.saving.destination import LocalDir, Remote, commit_in_order
from btckpt.storage.discovery import inspect, verify


def _manifest(step: int) -> Manifest:
    return Manifest(step=step, files={}, state={"extra": {"n": step}}, world={"size": 1, "nodes": 1, "node_rank": 0})


def test_local_dir_verbs(tmp_path: Path) -> None:
    dest = LocalDir(tmp_path, lock=True)
    try:
        p = dest.part(3, tag="t-1")
        assert not p.tmp.exists()  # a part is only a handle until begin
        dest.begin(p)
        size, ck = dest.put(p, "a.bin", b"hello")
        assert (p.tmp / "a.bin").read_bytes() == b"hello" and dest.list() == []  # nothing visible before commit
        dest.record(p, "a.bin", size, ck)
        final = dest.commit(p, _manifest(3))
        info = inspect(final)
        assert final == tmp_path / "checkpoint-3" and info.complete and not verify(info)
        assert dest.list() == ["checkpoint-3"]
        with pytest.raises(CheckpointError, match="never overwrites"):
            dest.begin(dest.part(3, tag="t-2"))
        # abort removes only what its own begin created
        q = dest.part(4, tag="t-3")
        dest.begin(q)
        dest.abort(q)
        assert not q.tmp.exists() and dest.list() == ["checkpoint-3"]
        dest.remove("checkpoint-3", retired=False)
        assert dest.list() == [] and not final.exists()
    finally:
        dest.release()


def test_local_dir_commits_given_manifest_bytes(tmp_path: Path) -> None:
    src = LocalDir(tmp_path / "a")
    p = src.part(1, tag="x")
    src.begin(p)
    src.record(p, "f", *src.put(p, "f", b"data"))
    raw = (src.commit(p, _manifest(1)) / MANIFEST).read_bytes()
    dst = LocalDir(tmp_path / "b")
    q = dst.part(1, tag="y")
    dst.begin(q)
    dst.put(q, "f", b"data")
    assert (dst.commit(q, raw) / MANIFEST).read_bytes() == raw  # a copy keeps the manifest byte for byte


def _remote() -> tuple[Remote, str]:
    url = f"memory://d{uuid.uuid4().hex[:8]}/run"
    return Remote(url), url[len("memory://"):]


def test_remote_manifest_last_and_uncommit() -> None:
    dest, root = _remote()
    fs = dest.fs
    try:
        p = dest.part(2, expect=None)
        dest.begin(p)
        dest.record(p, "w.bin", *dest.put(p, "w.bin", b"weights"))
        assert dest.list() == []  # data without a manifest is not a checkpoint
        dest.commit(p, _manifest(2))
        assert dest.list() == ["checkpoint-2"]
        raw = fs.cat_file(f"{root}/checkpoint-2/{MANIFEST}")
        assert Manifest.from_json(raw, where="x").files["w.bin"]["size"] == 7
        # the very manifest there: present, nothing to commit; a different one: refused unless superseding
        same = dest.part(2, listing=dest.listing(f"{dest.root}/checkpoint-2"), expect=raw)
        dest.begin(same)
        assert same.present
        other = dest.part(2, listing=dest.listing(f"{dest.root}/checkpoint-2"), expect=b"{}")
        with pytest.raises(CheckpointError, match="different checkpoint"):
            dest.begin(other)
        assert dest.list() == ["checkpoint-2"]
        other = dest.part(2, listing=dest.listing(f"{dest.root}/checkpoint-2"), expect=b"{}", supersede=True)
        dest.begin(other)
        assert dest.list() == []  # un-committed (manifest first) before anything is sent
        assert fs.exists(f"{root}/checkpoint-2/w.bin")
        # abort removes what was sent, never a committed checkpoint's files
        dest.abort(other, sent=[f"{root}/checkpoint-2/w.bin"])
        assert not fs.exists(f"{root}/checkpoint-2/w.bin")
        q = dest.part(5)
        dest.begin(q)
        dest.record(q, "w.bin", *dest.put(q, "w.bin", b"x"))
        dest.commit(q, _manifest(5))
        dest.abort(q)
        assert dest.list() == ["checkpoint-5"] and fs.exists(f"{root}/checkpoint-5/w.bin")
        dest.remove("checkpoint-5")
        assert dest.list() == [] and not fs.exists(f"{root}/checkpoint-5")
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


class _World:
    """Just what commit_in_order uses: the node rank, a barrier that records when it ran, fail."""

    def __init__(self, node_rank: int, events: list[str], *, barrier_fails: bool = False) -> None:
        self.node_rank, self.events, self.barrier_fails = node_rank, events, barrier_fails

    def barrier(self, key: str, *, timeout: float, ranks: int | None = None) -> None:
        self.events.append(f"barrier {key} {ranks}")
        if self.barrier_fails:
            raise CoordinationError("a peer failed")

    def fail(self, key: str) -> None:
        self.events.append(f"fail {key}")


@pytest.mark.parametrize("node", [0, 1])
def test_commit_in_order(node: int) -> None:
    events: list[str] = []
    commit_in_order(_World(node, events), lambda: events.append("commit"), key="k", timeout=1, ranks=2)  # type: ignore[arg-type]
    # node 0 commits after the barrier every node's part passed; the others before it
    assert events == (["barrier k 2", "commit"] if node == 0 else ["commit", "barrier k 2"])
    events.clear()
    commit_in_order(_World(node, events), lambda: events.append("commit"), key="k", timeout=1, commits=False)  # type: ignore[arg-type]
    assert events == ["barrier k None"]  # a rank that does not commit only joins


def test_commit_in_order_failure_commits_nothing_on_node0() -> None:
    events: list[str] = []
    with pytest.raises(CoordinationError):
        commit_in_order(_World(0, events, barrier_fails=True), lambda: events.append("commit"), key="k",  # type: ignore[arg-type]
                        timeout=1)
    assert "commit" not in events and events[-1] == "fail k"

    def broken() -> None:
        raise OSError("disk full")

    events.clear()
    with pytest.raises(OSError):
        commit_in_order(_World(1, events), broken, key="k", timeout=1)  # type: ignore[arg-type]
    assert events == ["fail k"]  # its peers raise at once instead of waiting out the barrier
