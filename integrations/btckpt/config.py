"""The one configuration object of a Checkpointer, validated at construction.

Public through ``btckpt``: :class:`CheckpointConfig` (``btckpt.CheckpointConfig``); import it from there.
The module itself is internal: its path and its other names may change without notice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError
from .format.manifest import DEFAULT_MAX_SHARD_SIZE
from .storage.local import is_url, local_path

__all__ = ["CheckpointConfig", "resolve_dir", "resolve_load_dir", "default_budget", "DEFAULT_DIR"]

DEFAULT_DIR = "./checkpoints"


def resolve_dir(value: str | os.PathLike[str] | None) -> str:
    """``value``, else ``$BT_CHECKPOINT_DIR``, else ``./checkpoints`` (URLs kept as strings)."""
    if value is None:
        value = os.environ.get("BT_CHECKPOINT_DIR") or DEFAULT_DIR
    return os.fspath(value)


def resolve_load_dir(value: str | os.PathLike[str] | None) -> str | None:
    """``value``, else ``$BT_LOAD_CHECKPOINT_DIR``, else None."""
    if value is None:
        value = os.environ.get("BT_LOAD_CHECKPOINT_DIR") or None
    return os.fspath(value) if value is not None else None


def _check_local_dir(path: str, what: str) -> None:
    p = local_path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a file, not a folder; point it at a folder "
                          "(it is created when missing)")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise ConfigError(f"{what} {str(p)!r} cannot be created: {str(q)!r} is a file")


def default_budget(local_ranks: int) -> int:
    """Half the host's available memory, shared among the node's local ranks (``memory_budget=None``)."""
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()[1].isdigit()}
        avail = info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:  # pragma: no cover
        avail = 0
    if not avail:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(64 << 20, avail // 2 // max(1, local_ranks))


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Every option of a :class:`~btckpt.Checkpointer` (all keyword-only, all optional).

    ``dir``/``load_dir``: where to save / where a previous job's checkpoints were downloaded
    (defaults from ``$BT_CHECKPOINT_DIR`` / ``$BT_LOAD_CHECKPOINT_DIR``). ``keep_last``: committed
    checkpoints kept, **default 3**: after each commit the older ``checkpoint-<N>`` folders of this
    writer in ``dir`` are deleted (None keeps all; protected ones always stay).
    ``async_save``: snapshot and return, write in the background.
    ``max_shard_size``: bytes per safetensors file before sharding. ``save_rng``: save/restore RNGs.
    ``every_steps``/``every_seconds``: when :meth:`maybe_save` saves. ``on_missing``: what restore does when
    ``load_dir`` is set but holds no checkpoint (``"raise"`` or ``"start_fresh"``). ``on_error``: what a
    failed save does (``"raise"``: sync saves raise at once, async ones at the next call; or ``"warn"``: log,
    skip that checkpoint and go on; a save the preflight check refuses for lack of space counts too).
    ``space_margin``: bytes kept free beyond the checkpoint's size (preflight).
    ``memory_budget``: bytes of staging memory (None: from available memory / local ranks).
    ``copy_inline_bytes``: parameters and optimizer state smaller than this are copied before ``save()``
    returns; the rest (by default all of them, Adam's ``step`` counters included) copy in the background
    behind the step gate. Other tensors (buffers) are always copied before ``save()`` returns.
    ``io_threads``: background threads that write and checksum a save (1: the writer checksums what it
    writes; 2, the default: a second thread checksums while the first writes). Both run at the lowest CPU
    priority (nice 19) so that training threads win the CPU.
    ``barrier_timeout``: seconds ranks wait for each other. ``preemption_grace``: seconds a SIGTERM
    save may take. ``handle_sigterm``: install the SIGTERM handler used by :meth:`maybe_save`.
    ``dir`` may be an fsspec URL (``s3://bucket/run``): checkpoints commit in a local staging folder under the
    btckpt cache and the uploader publishes them there (manifest last), mirroring retention; ``wait()``
    and ``close()`` include its pass.
    ``upload_to``: an fsspec URL; a separate uploader process (``btckpt upload --watch``) mirrors each
    committed checkpoint there, and :meth:`close` waits for its final pass.
    ``consolidate``: after each commit, global rank 0 writes the checkpoint's ``model`` group as a
    servable HF folder (full tensors, HF file names, the checkpoint's ``config.json`` & co.) in a
    background thread, committed atomically as ``<consolidate dir>/checkpoint-<step>/``. ``True`` puts
    them under ``<dir>/consolidated/``; a path puts them there. The checkpoint itself is never changed.
    Retention keeps as many consolidated folders as checkpoints (``keep_last``), and those of protected
    checkpoints. See :mod:`btckpt.consolidate` (multi-node needs every node's part visible to rank 0).
    ``local_every_steps``: the node-local tier (:mod:`btckpt.tiers`): :meth:`maybe_save` saves every that many
    steps into ``local_tier_dir`` (same format and commit; at most two steps kept there), and the durable
    cadence (``every_steps``/``every_seconds``, SIGTERM, ``close()``) copies the newest of them into ``dir``
    in the background. ``local_tier_dir``: that folder (default ``/dev/shm/btckpt-<uid>/<job>``, ``<job>`` derived
    from the resolved checkpoint dir, so two jobs never share one); a local path, never inside ``dir``.
    ``peer_replicas``: with a local tier and two or more nodes, each node's tier checkpoints are also kept in
    the next node's tier, and a node that lost its memory fetches its part back from there at start
    (:mod:`btckpt.tiers.replicas`); the tier then needs room for twice as many copies.
    ``run_id``: this run's identity (a string the same on every rank and every restart of the run, e.g. a hash
    of the model config and the hyperparameters; the HF and Lightning integrations compute one). Recorded in
    each checkpoint's manifest; :meth:`restore` then resumes only this run's checkpoints from ``dir`` (a
    ``load_dir`` checkpoint is a deliberate warm start and is taken whatever its identity), refuses a ``dir``
    that holds only another run's checkpoints, and a save never skips a step another run committed there.
    None (default): no identity, every checkpoint in ``dir`` counts as this run's.
    """

    dir: str | None = None
    load_dir: str | None = None
    keep_last: int | None = 3
    async_save: bool = True
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    save_rng: bool = True
    every_steps: int | None = None
    every_seconds: float | None = None
    on_missing: Literal["raise", "start_fresh"] = "raise"
    on_error: Literal["raise", "warn"] = "raise"
    space_margin: int = 16 << 20
    memory_budget: int | None = None
    copy_inline_bytes: int = 0
    io_threads: int = 2
    barrier_timeout: float = 600.0
    preemption_grace: float = 120.0
    handle_sigterm: bool = True
    protect: tuple[str, ...] = field(default_factory=tuple)
    upload_to: str | None = None
    consolidate: bool | str = False
    local_every_steps: int | None = None
    local_tier_dir: str | None = None
    peer_replicas: bool = True
    run_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", resolve_dir(self.dir))
        object.__setattr__(self, "load_dir", resolve_load_dir(self.load_dir))
        assert self.dir is not None
        if not is_url(self.dir):
            src = "dir" if os.environ.get("BT_CHECKPOINT_DIR") != self.dir else "$BT_CHECKPOINT_DIR"
            _check_local_dir(self.dir, src)
        if self.load_dir is not None and not is_url(self.load_dir):
            p = local_path(self.load_dir)
            if p.exists() and not p.is_dir():
                raise ConfigError(f"load_dir / $BT_LOAD_CHECKPOINT_DIR {self.load_dir!r} is a file, not a folder")
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ConfigError(f"keep_last={self.keep_last!r}: must be a positive integer or None (keep all)")
        if not isinstance(self.max_shard_size, int) or self.max_shard_size < 1:
            raise ConfigError(f"max_shard_size={self.max_shard_size!r}: must be a positive number of bytes")
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ConfigError(f"every_steps={self.every_steps!r}: must be a positive integer or None")
        if self.every_seconds is not None and not self.every_seconds > 0:
            raise ConfigError(f"every_seconds={self.every_seconds!r}: must be positive or None")
        if self.on_missing not in ("raise", "start_fresh"):
            raise ConfigError(f"on_missing={self.on_missing!r}: use 'raise' or 'start_fresh'")
        if self.on_error not in ("raise", "warn"):
            raise ConfigError(f"on_error={self.on_error!r}: use 'raise' or 'warn'")
        if self.memory_budget is not None and self.memory_budget < 1 << 20:
            raise ConfigError(f"memory_budget={self.memory_budget!r}: must be at least 1 MiB")
        if not isinstance(self.copy_inline_bytes, int) or self.copy_inline_bytes < 0:
            raise ConfigError(f"copy_inline_bytes={self.copy_inline_bytes!r}: must be a non-negative integer")
        if not isinstance(self.io_threads, int) or isinstance(self.io_threads, bool) or self.io_threads not in (1, 2):
            raise ConfigError(f"io_threads={self.io_threads!r}: use 1 (the writer checksums inline) or 2 (a second "
                              "thread checksums while the writer writes)")
        if self.upload_to is not None and (not isinstance(self.upload_to, str) or "://" not in self.upload_to):
            raise ConfigError(f"upload_to={self.upload_to!r}: must be an fsspec URL such as 's3://bucket/run'")
        if self.upload_to is not None and is_url(self.dir):
            raise ConfigError(f"dir={self.dir!r} is already a URL (checkpoints are published there); upload_to "
                              "mirrors a local dir: set one of them")
        if self.run_id is not None and not (isinstance(self.run_id, str) and 0 < len(self.run_id) <= 256):
            raise ConfigError(f"run_id={self.run_id!r}: must be a non-empty string (at most 256 characters), the "
                              "same on every rank and restart of the run, or None")
        self._check_consolidate()
        self._check_local_tier()
        if not self.barrier_timeout > 0 or not self.preemption_grace > 0:
            raise ConfigError("barrier_timeout and preemption_grace must be positive seconds")

    def _check_consolidate(self) -> None:
        c = self.consolidate
        if isinstance(c, os.PathLike):
            c = os.fspath(c)
            object.__setattr__(self, "consolidate", c)
        if isinstance(c, bool):
            return
        if not isinstance(c, str) or not c or is_url(c):
            raise ConfigError(f"consolidate={c!r}: use True (<dir>/consolidated/), False, or a local folder path")
        assert self.dir is not None
        if not is_url(self.dir) and local_path(c).resolve() == local_path(self.dir).resolve():
            raise ConfigError(f"consolidate={c!r} is the checkpoint dir itself; consolidated folders would clash "
                              "with the checkpoints: use another folder (or True for <dir>/consolidated/)")
        _check_local_dir(c, "consolidate")

    def _check_local_tier(self) -> None:
        k, d = self.local_every_steps, self.local_tier_dir
        if not isinstance(self.peer_replicas, bool):
            raise ConfigError(f"peer_replicas={self.peer_replicas!r}: must be True or False")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"local_every_steps={k!r}: must be a positive integer (steps between node-local "
                              "saves) or None (no local tier)")
        if d is None:
            return
        if isinstance(d, os.PathLike):
            d = os.fspath(d)
            object.__setattr__(self, "local_tier_dir", d)
        if k is None:
            raise ConfigError(f"local_tier_dir={d!r} is set but local_every_steps is None; set local_every_steps "
                              "to use the local tier, or drop local_tier_dir")
        if not isinstance(d, str) or not d or is_url(d):
            raise ConfigError(f"local_tier_dir={d!r}: must be a local folder (node-local memory such as "
                              "/dev/shm/..., or a local disk), not a URL")
        _check_local_dir(d, "local_tier_dir")
        assert self.dir is not None
        if not is_url(self.dir):
            tier, durable = local_path(d).resolve(), local_path(self.dir).resolve()
            if tier == durable or durable in tier.parents or tier in durable.parents:
                raise ConfigError(f"local_tier_dir={d!r} and dir={self.dir!r} overlap; the local tier must be a "
                                  "folder of its own (e.g. /dev/shm/btckpt-<uid>/<job>), outside the checkpoint dir")

    @property
    def consolidate_dir(self) -> Path | None:
        """Where save-time consolidated model folders go (None: off)."""
        if self.consolidate is False:
            return None
        if self.consolidate is True:
            return self.local_dir / "consolidated"
        return local_path(str(self.consolidate))

    @property
    def local_dir(self) -> Path:
        """``dir`` as a local Path (raises for URLs)."""
        assert self.dir is not None
        if is_url(self.dir):
            raise ConfigError(f"dir={self.dir!r} is a URL; this operation needs a local folder")
        return local_path(self.dir)
