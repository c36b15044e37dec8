"""The write job of one save: files from the staged arena into a temp folder, then the commit.

Mechanism only (when and how many is the manager's business). Runs on the background worker (async)
or the caller's thread (sync), on every rank. Call order per rank: the node's leader creates the temp
folder; every rank writes its files (the leader: tensor groups and index files; each rank: its RNG
file); ranks publish what they wrote through the store; the node's leader writes the manifest and
renames (through :class:`~btckpt.saving.destination.LocalDir`). With several nodes, node 0 commits its part last,
after every other node committed, so a complete node-0 part certifies the whole checkpoint
(:func:`~btckpt.saving.destination.commit_in_order`, the order a promotion uses too). Any failure aborts the
temp folder and tells peers.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed.world import World
from ..errors import ConfigError, UnsafeCheckpoint
from ..format.checksum import CHECKSUM
from ..format.layout import RANK_STATE_NAME, FlatState, Layout, rank_state_file, rng_file
from ..format.manifest import MANIFEST, Manifest, check_relative_name
from ..storage.local import preflight, space_error
from ..testing import faults
from .destination import LocalDir, commit_in_order
from .snapshot import ChunkedStaged, Snapshot
from .writer import write_arena_file

__all__ = ["SaveJob", "run_save", "check_extra_files", "checked_extra_files"]

log = logging.getLogger("btckpt")

RNG_NAME = re.compile(r"^rng_state_\d+\.json$")


def check_extra_files(extra: Mapping[str, Any] | None, reserved: Iterable[str]) -> dict[str, bytes]:
    """Validate ``extra_files`` (plain file names inside the folder, bytes, no clash with btckpt's own files)."""
    out: dict[str, bytes] = {}
    taken = set(reserved) | {MANIFEST}
    for name, data in (extra or {}).items():
        try:
            check_relative_name(name, where="extra_files")
        except UnsafeCheckpoint as exc:
            raise ConfigError(str(exc)) from None
        if "/" in name or name.startswith(".") or RNG_NAME.match(name) or RANK_STATE_NAME.match(name) or name in taken:
            raise ConfigError(f"extra_files name {name!r} is not allowed: use a plain file name (no folders, not "
                              f"hidden) that is not one of btckpt's own files ({MANIFEST}, rng_state_<rank>.json, "
                              "state_<rank>.json, tensor files and their indexes)")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"extra_files[{name!r}] is {type(data).__name__}; pass the file's bytes")
        out[name] = bytes(data)
    return out


def checked_extra_files(layout: Layout, extra: Mapping[str, Any] | None, *, root: Path,
                        margin: int) -> dict[str, bytes]:
    """``extra`` validated against the layout's file names (:func:`check_extra_files`), after checking that
    the checkpoint fits on ``root``'s disk (raises InsufficientSpace)."""
    out = check_extra_files(extra, [f.name for f in layout.files] + list(layout.index_files))
    preflight(root, layout.total_bytes + sum(len(v) for v in out.values()), margin=margin)
    return out


@dataclass
class SaveJob:
    """Everything the writer needs; built on the training thread by ``save()``."""

    step: int
    root: Path
    tag: str
    world: World
    flat: FlatState
    staged: Snapshot | None
    rng: dict[str, Any] | None = None
    peer_rng: dict[int, dict[str, Any]] = field(default_factory=dict)  # other ranks' RNG (rank-0-only savers)
    rank_state: dict[str, Any] = field(default_factory=dict)  # this rank's plain groups (not the node's leader)
    tensor_groups: list[str] = field(default_factory=list)  # this rank's groups holding tensors (not the leader)
    extra_files: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    barrier_timeout: float = 600.0
    sharded: Any = None  # btckpt.distributed.shards.ShardedPart: this rank's shards (FSDP2/DTensor groups)
    on_commit: Callable[[Path], None] | None = None
    name: str | None = None  # the committed folder's name (default checkpoint-<step>)
    supersede: bool = False  # the folder of this step there is damaged: replaced once this save committed
    started: float = field(default_factory=time.perf_counter)
    written_bytes: int = 0  # set by run_save: the bytes this rank wrote
    io_threads: int = 2  # 1: the writer checksums its own writes; 2: a second thread checksums alongside
    dest: LocalDir | None = None  # where it commits (default: LocalDir(root)); a test passes a faulty one


def _check_tensor_groups(rank: int, theirs: list[str], ours: set[str]) -> None:
    """Groups holding tensors are saved from the node's leader only: refuse a rank's group it lacks."""
    missing = sorted(set(theirs) - ours)
    if missing:
        raise ConfigError(f"rank {rank} saves group(s) {missing} holding tensors that its node's local rank 0 does not "
                          "have; btckpt saves tensor groups once per node, from local rank 0 (replicated, as under "
                          "DDP). Give every rank the same tensor groups, or keep per-rank data as plain values "
                          "(numbers, strings, lists), which are saved per rank")


def run_save(job: SaveJob) -> Path:
    """Write and commit one checkpoint; return the committed folder. Raises on any failure (nothing committed)."""
    w = job.world
    dest = job.dest if job.dest is not None else LocalDir(job.root)
    commit = dest.part(job.step, tag=job.tag, name=job.name, supersede=job.supersede)
    key = f"{job.tag}/{job.step}"
    leader = w.is_local_leader
    nbytes = 0
    try:
        if leader:
            dest.begin(commit)
        w.barrier(f"{key}/begin", timeout=job.barrier_timeout)
        written: dict[str, dict[str, Any]] = {}

        def put(name: str, data: bytes) -> None:
            size, digest = dest.put(commit, name, data)
            written[name] = {"size": size, CHECKSUM: digest}

        try:
            if job.staged is not None:
                for fp in job.staged.layout.files:
                    target = commit.tmp / fp.name
                    if job.staged.files is not None:  # staged into the tier's files: they become the checkpoint's
                        size, digest = job.staged.land(fp, target)
                    else:
                        size, digest = write_arena_file(target, fp.header, job.staged.pieces(fp.begin, fp.size),
                                                        hash_aside=job.io_threads > 1)
                    written[fp.name] = {"size": size, CHECKSUM: digest}
                for name, data in job.staged.layout.index_files.items():
                    put(name, data)
            for name, data in (job.extra_files.items() if leader else ()):  # one copy per node
                put(name, data)
            if job.rng is not None:
                faults.point("write_rng")
                put(rng_file(w.rank), json.dumps(job.rng).encode())
            if job.rank_state:
                put(rank_state_file(w.rank), json.dumps(job.rank_state).encode())
            for r, state in (sorted(job.peer_rng.items()) if leader else ()):
                put(rng_file(r), json.dumps(state).encode())
        except OSError as exc:
            raise space_error(exc, commit.tmp) from exc
        nbytes = job.written_bytes = sum(v["size"] for v in written.values())
        w.publish(f"{key}/files/{w.rank}", {"files": written, "tensor_groups": job.tensor_groups})
        if job.sharded is not None:
            job.sharded.publish(w, key)
        w.barrier(f"{key}/written", timeout=job.barrier_timeout)
        if leader:
            for r in range(w.rank, w.rank + w.local_size):
                if r == w.rank:
                    files = written
                else:
                    theirs = w.collect(f"{key}/files/{r}", timeout=job.barrier_timeout)
                    _check_tensor_groups(r, theirs["tensor_groups"], {g.name for g in job.flat})
                    files = theirs["files"]
                for name, info in files.items():
                    dest.record(commit, name, info["size"], info[CHECKSUM])
            manifest = Manifest(step=job.step, files={}, state={g.name: g.tree for g in job.flat},
                                world=w.as_json(), meta=job.meta)
            if job.sharded is not None:
                job.sharded.finish_manifest(manifest, w, key, timeout=job.barrier_timeout)
        commit_in_order(w, lambda: dest.commit(commit, manifest), key=f"{key}/parts", timeout=job.barrier_timeout,
                        commits=leader)
        w.barrier(f"{key}/committed", timeout=job.barrier_timeout)
    except BaseException:
        if isinstance(job.staged, ChunkedStaged):
            job.staged.abandon()
        w.fail(f"{key}/begin")
        w.fail(f"{key}/written")
        w.fail(f"{key}/parts")
        w.fail(f"{key}/committed")
        if leader:
            dest.abort(commit)
        raise
    dt = time.perf_counter() - job.started
    log.info("btckpt: committed %s (%.1f MB in %.2fs, %.0f MB/s)", commit.final, nbytes / 1e6, dt,
             nbytes / 1e6 / max(dt, 1e-9))
    return commit.final
