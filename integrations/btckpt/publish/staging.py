"""``Checkpointer(dir=URL)``: commit into a local staging folder, publish through the uploader.

A checkpoint is committed at ``dir=URL`` when its manifest is there (the uploader sends data files first,
the manifest last). The Checkpointer writes and commits locally exactly as for a local ``dir`` (so a
crash never leaves a half-written checkpoint that looks whole, locally or remotely), and the uploader
process (``btckpt upload --watch --mirror-retention``) publishes each commit and mirrors retention.
Multi-node jobs give each node its part under ``URL/rank-<node>/`` (the platform's layout).

Call order (local leader of each node): :func:`commit_root` (:func:`remote_target`, :func:`staging_root`) at
construction;
the Checkpointer's ``wait()``/``close()`` end with the uploader's final pass (:func:`finish_upload`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..config import CheckpointConfig
from ..errors import CheckpointError, ConfigError
from ..storage.local import is_url, unwritable
from ..storage.remote import cache_root, join

__all__ = ["commit_root", "remote_target", "staging_root", "finish_upload"]


def commit_root(config: CheckpointConfig, *, nodes: int, node_rank: int) -> tuple[str | None, Path]:
    """Where a Checkpointer commits, ``(remote, root)``: for ``dir=URL``, this node's part of the URL
    (:func:`remote_target`) and its local staging folder; else ``(None, config.local_dir)``. Raises ConfigError
    when ``root`` is not writable (refused at construction, not at the first save)."""
    url = config.dir if config.dir is not None and is_url(config.dir) else None
    remote = remote_target(url, nodes=nodes, node_rank=node_rank) if url is not None else None
    root = staging_root(remote) if remote is not None else config.local_dir
    why = unwritable(root)
    if why:
        raise ConfigError(f"checkpoint dir {str(root)!r}: {why}; give it write access (chmod/chown), or "
                          "point dir= / $BT_CHECKPOINT_DIR at a writable folder")
    return remote, root


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
