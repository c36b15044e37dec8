"""``Checkpointer(dir=URL)``: commit into a local staging folder, publish through the uploader.

A checkpoint is committed at ``dir=URL`` when its manifest is there (the uploader sends data files first,
the manifest last). The Checkpointer writes and commits locally exactly as for a local ``dir`` (so a
crash never leaves a half-written checkpoint that looks whole, locally or remotely), and the uploader
process (``btckpt upload --watch --mirror-retention``) publishes each commit and mirrors retention.
Multi-node jobs give each node its part under ``URL/rank-<node>/`` (the platform's layout).

Call order (local leader of each node): :func:`remote_target` and :func:`staging_root` at construction;
the Checkpointer's ``wait()``/``close()`` end with the uploader's final pass (:func:`finish_upload`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..storage.remote import cache_root, join

__all__ = ["remote_target", "staging_root", "finish_upload"]


def remote_target(url: str, *, nodes: int, node_rank: int) -> str:
    """Where this node's checkpoints go: ``url`` itself, or ``url/rank-<node>`` when there are several nodes."""
    return url.rstrip("/") if nodes == 1 else join(url, f"rank-{node_rank}")


def staging_root(target: str) -> Path:
    """The local folder checkpoints for ``target`` are committed in before upload (under the btckpt cache,
    ``$BTCKPT_CACHE`` or ``~/.cache/btckpt``): one per URL, so a restarted job finds its own staging."""
    return cache_root() / "staging" / hashlib.sha1(target.encode()).hexdigest()[:16]


def finish_upload(uploader: Any, target: str, *, restart: bool, timeout: float | None = None) -> None:
    """Let the uploader finish a final pass (every committed checkpoint published); restart it if asked.
    ``timeout``: how long that pass may take (None: the uploader's own bound), then it is stopped (its journal
    lets the next run finish).

    Raises :class:`CheckpointError` when that pass left something unpublished.
    """
    rc = uploader.stop() if timeout is None else uploader.stop(timeout=timeout)
    if restart:
        uploader.start()
    if rc:
        raise CheckpointError(f"uploading checkpoints to {target} did not finish (uploader exit status {rc}); "
                              "its log is above. Local copies are kept; re-run "
                              f"`btckpt upload {uploader.src} {target}` to finish")
