"""``btckpt consolidate CKPT OUT``: a servable HF model folder from a (sharded) checkpoint.

Reads the ``model`` group of a checkpoint (per-rank FSDP2/DTensor shards, on one node or with every
node's part side by side as ``rank-<node>/checkpoint-<step>``), assembles full tensors (checksums verified),
and writes ``OUT`` atomically: ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + index)
under the model's own keys, plus the checkpoint's non-tensor files such as ``config.json``,
``generation_config.json`` and tokenizer files, so ``from_pretrained(OUT)`` loads it.

Save-time consolidation (``Checkpointer(consolidate=True | PATH)``, :class:`Consolidator`): after each
commit, global rank 0 consolidates the new checkpoint on a background thread (niced; training never
waits for it, except :meth:`~btckpt.Checkpointer.close`, which lets the last one finish). Output goes to
``<dir>/consolidated/checkpoint-<step>/`` (or ``PATH/checkpoint-<step>/``): a sibling tree, because a
committed checkpoint folder never changes, and named ``checkpoint-<step>`` so ``btckpt.latest()`` and
HF's ``get_last_checkpoint`` find the newest. Each folder is committed atomically (temp folder + rename,
the checkpoint protocol); stale temp folders are removed at start. The checkpoint being read is
protected from retention until done; when saves outpace consolidation, only the newest waiting
checkpoint is consolidated. Retention keeps ``keep_last`` consolidated folders plus those of protected
checkpoints. A failure is logged and raised once from the next ``save()``/``wait()``/``close()`` (or
only logged with ``on_error='warn'``).

Multi-node: rank 0 reads every node's part, so each node's dir must be ``<shared>/rank-<node>`` on a
filesystem rank 0 sees (the platform's nested layout on shared storage). Any other multi-node layout
is refused with :class:`~btckpt.errors.ConfigError` at construction; run ``btckpt consolidate`` after
gathering the parts instead.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); ``btckpt consolidate`` is public as a command line and
``Checkpointer(consolidate=...)`` as an option, not this module: its names may change without notice.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .distributed.shards import assemble
from .errors import CheckpointError, ConfigError, IncompleteCheckpoint, NoCheckpointFound
from .format.manifest import DEFAULT_MAX_SHARD_SIZE, MANIFEST
from .format.tree import decode_tree
from .names import safe
from .oneshot import save
from .restore.policy import latest
from .restore.reader import CheckpointReader, NodeParts, read_verified_bytes
from .saving.commit import delete_checkpoint, remove_stale_temps
from .saving.retention import apply_retention
from .storage.discovery import inspect, verify
from .testing import faults

__all__ = ["consolidate", "Consolidator", "main"]

log = logging.getLogger("btckpt")

_SKIP = re.compile(r"^((rng_)?state_\d+\.json|.+-rank\d{5}(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"
                   r"|[A-Za-z0-9_.-]+(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?)$")


def _model_tensors(folder: Path, group: str) -> dict[str, torch.Tensor]:
    info = inspect(folder)
    if not info.complete or info.manifest is None:
        raise IncompleteCheckpoint(f"{folder}: not a complete btckpt checkpoint ({info.reason or info.status})")
    man = info.manifest
    if group not in man.state:
        raise CheckpointError(f"{folder}: the checkpoint has no group {group!r} (it has {sorted(man.state)})")
    parts = NodeParts(folder, man)
    plain = CheckpointReader(folder, man)

    def load(ref: Any) -> torch.Tensor:
        if isinstance(ref, dict) and "sharded" in ref:
            return assemble(ref["sharded"], parts.tensor, where=str(folder))
        return plain.tensor(ref["file"], ref["key"])

    tree = decode_tree(man.state[group], load)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{folder}: group {group!r} is not a state dict")
    return {k: v for k, v in tree.items() if isinstance(v, torch.Tensor)}


def consolidate(src: str | os.PathLike[str], out: str | os.PathLike[str], *, group: str = "model",
                max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the full weights of ``src``'s ``group`` as an HF model folder ``out`` (must not exist).

    ``src`` is a checkpoint folder or a folder holding checkpoints (the newest complete one is used).
    Returns ``out``. The folder is committed atomically and carries a btckpt manifest as well.
    """
    src_p = Path(src)
    if not (src_p / MANIFEST).exists():
        found = latest(src_p)
        if found is None:
            raise NoCheckpointFound(f"no complete checkpoint at or under {src_p}")
        src_p = Path(found)
    tensors = _model_tensors(src_p, group)
    info = inspect(src_p)
    assert info.manifest is not None
    extra: dict[str, bytes] = {}
    for name in info.manifest.files:
        if "/" in name or _SKIP.match(name):
            continue
        extra[name] = read_verified_bytes(src_p, info.manifest, name)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return save(out, {"model": contiguous}, step=info.step, max_shard_size=max_shard_size, save_rng=False,
                extra_files=extra)


class Consolidator:
    """Save-time consolidation on global rank 0, one background thread (see the module doc)."""

    def __init__(self, out: Path, *, keep_last: int | None, group: str = "model",
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.out, self.keep_last, self.group, self.max_shard_size = out, keep_last, group, max_shard_size
        self._lock = threading.Lock()
        self._next: Path | None = None
        self._current: Path | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._protected: frozenset[Path] = frozenset()
        # the folders consolidated here that retention still keeps, oldest first (pruned as it retires them)
        self.done: list[Path] = []
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"consolidate: cannot create {out} ({exc.strerror})") from None
        removed = remove_stale_temps(out)
        if removed:
            log.warning("btckpt: removed %d unfinished consolidated folder(s): %s", len(removed),
                        ", ".join(p.name for p in removed))

    @classmethod
    def create(cls, config: Any, world: Any, root: Path) -> Consolidator | None:
        """The Checkpointer's consolidator: None when off or not global rank 0 (every rank validates)."""
        out = config.consolidate_dir
        if out is None:
            return None
        if world.nodes > 1 and root.name != f"rank-{world.node_rank}":
            raise ConfigError(
                f"consolidate: this is a {world.nodes}-node job and global rank 0 must read every node's part, "
                f"but dir {str(root)!r} is not in the <shared>/rank-<node> layout on storage every node shares. "
                "Use dir=<shared>/rank-<node> on each node, or drop consolidate= and run `btckpt consolidate "
                "<dir>/rank-0/checkpoint-<step> OUT` once every node's part sits side by side")
        if not world.is_leader:
            return None
        return cls(out, keep_last=config.keep_last, max_shard_size=config.max_shard_size)

    @property
    def busy(self) -> set[Path]:
        """Checkpoints being read or waiting (retention must not delete them yet)."""
        with self._lock:
            return {p for p in (self._current, self._next) if p is not None}

    def submit(self, ckpt: Path, *, protected: Iterable[Path] = ()) -> None:
        """Consolidate the committed checkpoint ``ckpt`` in the background (newest wins when behind)."""
        with self._lock:
            self._protected = frozenset(protected)
            if self._next is not None:
                log.info("btckpt: consolidation of %s skipped: %s is newer", self._next, ckpt)
            self._next = ckpt
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="btckpt-consolidate")
                self._thread.start()

    def _run(self) -> None:
        try:  # let training win the CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        except (OSError, AttributeError):  # pragma: no cover
            pass
        while True:
            with self._lock:
                src, self._next = self._next, None
                self._current = src
                if src is None:
                    self._thread = None
                    return
            try:
                self._one(src)
            except BaseException as exc:  # noqa: BLE001 - reported through take_error()
                if not src.exists():
                    log.warning("btckpt: consolidation of %s skipped: retention removed it first (raise "
                                "keep_last)", src)
                else:
                    log.error("btckpt: consolidation of %s failed: %s", src, exc)
                    with self._lock:
                        self._error = self._error or exc
            finally:
                with self._lock:
                    self._current = None

    def _one(self, src: Path) -> None:
        dest = self.out / src.name
        if dest.is_dir() and not dest.is_symlink():
            there = inspect(dest)
            problems = verify(there) if there.complete else [there.reason or there.status]
            if not problems:  # "done" only when its bytes verify (a restart re-submits the step)
                return
            log.warning("btckpt: consolidated copy %s is damaged or incomplete (%s); writing it again from %s",
                        safe(str(dest)), problems[0], safe(str(src)))
            delete_checkpoint(dest, retired=False)  # derived from src, which verified: written again below
        faults.point("consolidate")
        consolidate(src, dest, group=self.group, max_shard_size=self.max_shard_size)
        log.info("btckpt: consolidated %s -> %s", src, dest)
        keep = {dest} | {self.out / p.name for p in self._protected}
        removed = set(apply_retention(self.out, keep_last=self.keep_last, protected=keep))
        self.done = [p for p in self.done if p not in removed] + [dest]  # rebound: readers see whole lists

    def take_error(self) -> BaseException | None:
        """The first failure since the last call (once), or None."""
        with self._lock:
            err, self._error = self._error, None
        return err

    def close(self, *, timeout: float | None = None) -> bool:
        """Wait for the running and waiting consolidations (up to ``timeout`` s: after SIGTERM, the grace left);
        False when one was still running then (it goes on until the process exits; the restart's first save
        consolidates again)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                t = self._thread
            if t is None:
                return True
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("btckpt: consolidation of %s still running when time ran out; left to the exit",
                            safe(str(self._current)))
                return False


def main(argv: list[str] | None = None) -> int:
    """``btckpt consolidate CKPT OUT [--max-shard-size BYTES]``."""
    ap = argparse.ArgumentParser(prog="btckpt consolidate", description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--group", default="model")
    ap.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_SIZE)
    args = ap.parse_args(argv)
    try:
        path = consolidate(args.ckpt, args.out, group=args.group, max_shard_size=args.max_shard_size)
    except CheckpointError as exc:
        print(f"btckpt consolidate: {exc}", file=sys.stderr)
        return 1
    print(safe(path))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
