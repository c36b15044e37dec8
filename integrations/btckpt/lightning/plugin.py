"""The plugin: :class:`SafetensorsCheckpointIO`, Lightning's ``CheckpointIO`` writing btckpt folders
(:mod:`btckpt.lightning`'s module doc). Which folder a path means is :mod:`.placement`'s; the dict's groups
:mod:`.dict_io`'s; which folders go when Lightning removes a name the :class:`~btckpt.adapters.LinkRefcount`'s."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

from ..adapters import (
    DEFAULT_MAX_SHARD_SIZE,
    STEP_DIR,
    Checkpointer,
    LinkRefcount,
    checkpoint_name,
    delete_checkpoint,
    inspect,
    is_url,
    open_checkpoint,
    refuse_taken_step,
    restore_rank_rng,
    solo_world,
)
from ..config import CheckpointConfig
from ..errors import CheckpointError, ConfigError
from . import rng as _rng
from .dict_io import read_dict, save_groups
from .placement import Placement
from .servable import HFLayout
from .state import (
    MAX_LINK,
    process_rank,
    read_link,
    repair_links,
    resumable,
    run_identity,
    weights_only_dict,
    weights_only_folder,
    write_link,
)
from .strategies import ShardedCheckpointIO, is_live

__all__ = ["SafetensorsCheckpointIO"]

log = logging.getLogger("btckpt")


class SafetensorsCheckpointIO(CheckpointIO, ShardedCheckpointIO):
    """Lightning ``CheckpointIO`` writing atomic, asynchronous, pickle-free btckpt folders (module doc).

    Options: ``async_save`` (write in the background; default True), ``max_shard_size``, ``save_rng``
    (per-rank RNG files; restored when a training checkpoint is loaded), ``restore_rng``,
    ``rng_timeout`` (seconds rank 0 waits for the other ranks' RNG states at a save), ``background_copy``
    (copy parameters and optimizer moments behind the step gate; module doc), ``hf_model`` (the HF
    model folder form; module doc). ``local_every_steps=K`` (and ``local_tier_dir``): with this module's
    :class:`ModelCheckpoint`, every K training steps a save into the node-local tier; the ModelCheckpoint
    saves go through the tier and are promoted into their folder (README "Tiers"); resume with
    ``resume_path(local_tier_dir=...)``. Retention is ``ModelCheckpoint``'s (``save_top_k``): btckpt's own
    ``keep_last`` is off here, nothing is deleted that Lightning did not ask to remove.
    """

    def __init__(self, *, async_save: bool = True, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 save_rng: bool = True, restore_rng: bool = True, rng_timeout: float = 600.0,
                 background_copy: bool = True, hf_model: str | bool = True, local_every_steps: int | None = None,
                 local_tier_dir: str | os.PathLike[str] | None = None) -> None:
        self.local_every_steps = local_every_steps
        self.local_tier_dir = None if local_tier_dir is None else os.fspath(local_tier_dir)
        if local_every_steps is not None or local_tier_dir is not None:  # refused now, not at the first save
            CheckpointConfig(local_every_steps=local_every_steps, local_tier_dir=self.local_tier_dir)
        self._into_tier = False  # the save in progress goes into the local tier (save_local)
        self._hf = HFLayout(hf_model)
        self.async_save = async_save
        self.background_copy = background_copy
        self._gate_next: tuple[dict[str, Any], list[torch.optim.Optimizer]] | None = None
        self.rng_timeout = rng_timeout
        self._warned_rng = False
        self.max_shard_size = max_shard_size
        self.save_rng = save_rng
        self.restore_rng = restore_rng
        self._ckpts: dict[Path, Checkpointer] = {}
        self._mine: set[Path] = set()  # folders this process wrote or loaded (safe to share between names)
        self._weights_only: set[Path] = set()  # folders this process saved from a save_weights_only dict
        self._lock = threading.Lock()
        self._places = Placement()
        self._retention = LinkRefcount(read_link=read_link, write_link=write_link, max_link=MAX_LINK,
                                       resumable=resumable, leader=lambda: process_rank() == 0, wait=self.wait,
                                       forget=self._mine.discard)
        self._run: str | None = None  # the attached LightningModule's run identity (run_identity)
        self._resumed = False  # a training checkpoint was loaded: this fit continues a run

    def placement(self, asked: str | os.PathLike[str] | None, *, what: str) -> Path | None:
        """The folder this plugin stores checkpoints in when Lightning (or the user) asked for folder ``asked``
        (None: Lightning's default): ``$BT_CHECKPOINT_DIR`` when set to a local folder, else None (``asked``
        stands). A different ``asked`` gets one warning per folder naming both (module doc); ``what`` says
        who asked, e.g. ``"ModelCheckpoint(dirpath='/x')"``."""
        return self._places.folder(asked, what=what)

    def _found_at(self, path: Path) -> Path:
        return self._places.found_at(path, pending=self._retention.is_pending)

    # -- plumbing ---------------------------------------------------------------------------------------
    def checkpointer(self, root: str | os.PathLike[str], *, handle_sigterm: bool = False,
                     distributed: bool = False) -> Checkpointer:
        """The Checkpointer writing into ``root``; created on first use. Single-process, unless ``distributed``
        (every rank saves its shards: :class:`ModelParallelStrategy`)."""
        if is_url(os.fspath(root)):
            raise CheckpointError(f"{root}: SafetensorsCheckpointIO writes local folders only; point "
                                  "ModelCheckpoint(dirpath=...) at a local folder (the platform uploads it)")
        key = Path(os.path.abspath(root))
        ck = self._ckpts.get(key)
        if ck is None:
            ck = Checkpointer(world=None if distributed else solo_world(), dir=str(key), keep_last=None,
                              async_save=self.async_save, max_shard_size=self.max_shard_size, save_rng=self.save_rng,
                              handle_sigterm=handle_sigterm, local_every_steps=self.local_every_steps,
                              local_tier_dir=self.local_tier_dir, run_id=self._run)
            self._ckpts[key] = ck
            if process_rank() == 0:
                self._retention.recover(key)  # under the Checkpointer's writer lock
        return ck

    def wait(self) -> None:
        """Block until every save so far committed and its names are written (raises a save's error)."""
        for ck in list(self._ckpts.values()):
            ck.wait()
        self._retention.run_deferred()

    def fence(self) -> None:
        """Block until the last save's background copies are done (before writing parameters in place
        outside ``optimizer.step()``)."""
        for ck in list(self._ckpts.values()):
            ck.fence()

    def gate_with(self, checkpoint: dict[str, Any], optimizers: list[torch.optim.Optimizer]) -> None:
        """Let the save of ``checkpoint`` copy tensors owned by ``optimizers`` behind their step gate
        (:class:`ModelCheckpoint` calls this at safe points; module doc)."""
        self._gate_next = (checkpoint, list(optimizers)) if self.background_copy and optimizers else None

    def attach(self, module: Any) -> None:
        """Tell the plugin the LightningModule (for ``hf_model`` and the run identity, :func:`run_identity`;
        :class:`ModelCheckpoint` calls this)."""
        self._hf.attach(module)
        self._run = run_identity(module) if module is not None else None

    @contextlib.contextmanager
    def into_local_tier(self) -> Iterator[None]:
        """Within it, ``save_checkpoint`` saves into the local tier (``Checkpointer.save_local``), names
        nothing, and leaves the dir alone (:class:`ModelCheckpoint` wraps its tier saves in it, every rank)."""
        if self.local_every_steps is None:
            raise ConfigError("into_local_tier(): pass SafetensorsCheckpointIO(local_every_steps=K) for a local tier")
        self._into_tier = True
        try:
            yield
        finally:
            self._into_tier = False

    # -- CheckpointIO -----------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` into ``<dir>/checkpoint-<global_step>`` and name it ``path`` once committed."""
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            "SafetensorsCheckpointIO")
        distributed = is_live(checkpoint)  # the live model/optimizer of ModelParallelStrategy: every rank saves
        peer_rng = self._peer_rng(checkpoint, distributed=distributed)
        gate, self._gate_next = self._gate_next, None
        # sharded: the live optimizer is in the state, so the core gates its shards itself
        optimizers = gate[1] if gate is not None and gate[0] is checkpoint and not distributed else []
        link = self._places.stored_at(Path(os.path.abspath(path)))
        step = int(checkpoint.get("global_step", 0))
        full = not weights_only_dict(checkpoint)
        folder = link if STEP_DIR.match(link.name) else link.parent / checkpoint_name(step)
        ck = self.checkpointer(folder.parent, distributed=distributed)
        save: dict[str, Any] = dict(layout=self._hf, distributed=distributed, optimizers=optimizers,
                                    peer_rng=peer_rng if self.save_rng else None)
        if self._into_tier:
            save_groups(ck.save_local, step, checkpoint, **save)
            return
        self._retention.cancel(link, folder)  # a name (or folder) saved again: an earlier removal no longer stands
        with self._lock:  # a full save never shares a weights-only folder of its step (the reverse it does)
            upgrade = full and folder in self._weights_only and not distributed
        if not upgrade and self._retention.share(folder, link):  # the same step is being written
            return
        if not upgrade and folder in self._mine and inspect(folder).complete \
                and not (full and not distributed and weights_only_folder(folder)):
            if link != folder:
                self._retention.name(link, folder)
            return
        ck.wait()  # at most one save in flight (btckpt's back-pressure); also surfaces an earlier error
        self._retention.abandon()
        info = inspect(folder) if folder.exists() else None
        if info is not None and info.complete and folder not in self._mine:  # a fresh fit, or another run's step
            refuse_taken_step(folder.parent, info, resumed=self._resumed, run=self._run)
        names: list[Path] = []
        if full and not distributed and info is not None and info.complete and weights_only_folder(folder):
            names = self._replace_weights_only(folder)
        if folder.exists() and inspect(folder).complete:
            # this run committed this step before a restart (e.g. the checkpoint this run resumed from): btckpt
            # never deletes a committed checkpoint before a newer one committed, so the name points at it
            log.info("btckpt: %s was committed by an earlier run at this step; naming it %s", folder, link.name)
            if link != folder:
                self._retention.name(link, folder)
            self._mine.add(folder)
            return
        self._retention.expect(folder, [link, *names])
        if not full:
            with self._lock:
                self._weights_only.add(folder)
        try:
            save_groups(ck.save, step, checkpoint, on_commit=self._retention.committed, **save)
        except BaseException:
            self._retention.abandon(folder)
            raise
        self._mine.add(folder)

    def _peer_rng(self, checkpoint: dict[str, Any], *, distributed: bool) -> Any:
        """The other ranks' RNG states for this save (rank 0; frees their keys), None when every rank saves its
        own (``distributed``) or there are none; one warning when only rank 0's can be saved."""
        peer_rng = _rng.gather(checkpoint, timeout=self.rng_timeout) if process_rank() == 0 else None
        if distributed:
            return None
        if peer_rng is None and self.save_rng and not self._warned_rng and _rng.peer_world() is not None \
                and "loops" in checkpoint:
            self._warned_rng = True
            log.warning("btckpt: only rank 0's RNG state is saved; use btckpt.lightning.ModelCheckpoint so every "
                        "rank's RNG is saved and a resume is exact")
        return peer_rng

    def _replace_weights_only(self, folder: Path) -> list[Path]:
        """Make way for a full (resumable) save of ``folder``'s step: a ``save_weights_only`` callback saved
        that step first. Its folder holds nothing to resume from, so it goes now; the names pointing at it
        are returned, to name the full folder once that committed (a weights-only name may name a full
        checkpoint: it holds the same weights; the reverse would make ``fit(ckpt_path="last")`` fail)."""
        names = self._retention.names_of(folder)
        log.info("btckpt: %s was saved weights-only; a full checkpoint of its step replaces it (%s will name that)",
                 folder.name, ", ".join(n.name for n in names) or "no name")
        delete_checkpoint(folder)
        self._mine.discard(folder)
        with self._lock:
            self._weights_only.discard(folder)
        return names

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None, *,
                        into: dict[str, Any] | None = None, strict: bool = True) -> dict[str, Any]:
        """Rebuild Lightning's dict from safetensors + JSON (checksums verified; never unpickles).

        ``path``: a link file, a checkpoint folder, a plain HF model folder (weights only) or a folder of
        checkpoints (the newest complete one). ``map_location``: a device (tensors load on CPU otherwise).
        ``weights_only`` is accepted for the interface; loading is always data-only. ``into`` (every rank,
        :class:`ModelParallelStrategy`): ``{"model": module, "optimizer": optimizer}`` loaded in place (any
        world size), left out of the returned dict; ``strict`` applies to them.
        """
        folder = self._places.resolve(Path(os.path.abspath(path)), pending=self._retention.is_pending, wait=self.wait)
        info = open_checkpoint(folder)
        assert info is not None
        rank = process_rank()
        out = read_dict(info, into=into, strict=strict, map_location=map_location, rank=rank)
        if "loops" in out:
            self._resumed = True
        if self.restore_rng and "loops" in out:
            restore_rank_rng(info, rank)
        if "loops" in out and rank == 0:
            repair_links(folder, out.get("callbacks"))
        self._mine.add(folder)
        return out

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the name ``path``; the folder goes (rename, then delete) when no name points at it.

        Lightning asks right after ``save_checkpoint`` of the checkpoint that replaces it returned, while that
        one is still being written: the removal then waits until it committed (it runs right after the
        commit, on the writer; a kill before that leaves the older checkpoint in place, named). A save that
        fails leaves the removal waiting for the next commit (or the clean end of ``teardown``)."""
        self._retention.remove(self._found_at(Path(os.path.abspath(path))))

    def teardown(self) -> None:
        """Wait for every save, write pending names, release the writers (raises a save's error)."""
        ckpts, self._ckpts = list(self._ckpts.values()), {}
        errors = []
        for ck in ckpts:
            try:
                ck.close()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        self._retention.close(failed=bool(errors))  # a save failed: keep what it would have replaced
        if errors:
            raise errors[0]
