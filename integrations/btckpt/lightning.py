"""Lightning integration: a ``CheckpointIO`` plugin writing btckpt folders, a ``ModelCheckpoint`` with the
platform's defaults, and ``resume_path()``.

Mapping (Lightning's checkpoint dict -> ``<dirpath>/checkpoint-<global_step>/``): ``state_dict`` is the
``model`` group (``model.safetensors``, the LightningModule's own keys), ``optimizer_states`` the
``optimizer`` group, ``lr_schedulers`` the ``scheduler`` group, every other key (``loops``, ``callbacks``,
``hyper_parameters``, ``epoch``, ``global_step``, user keys) a group of its own: tensors to safetensors,
the rest JSON in the manifest. Nothing is pickled, on saving or loading.

The path ModelCheckpoint asks for (``<dirpath>/<filename>.ckpt``, e.g. ``epoch=0-step=100.ckpt`` or
``last.ckpt``) becomes a *link file*: a few bytes of JSON naming the folder, written atomically after the
folder committed. Several names at one step (a top-k name and ``last.ckpt``) share one folder; the folder
goes away when the last name pointing at it is removed (``save_top_k``). A path already named
``checkpoint-<N>`` is the folder itself.

Async: the write, checksums, commit and link run on btckpt's background writer. The dict holds live
parameters and optimizer moments, so they are copied into btckpt's reusable staging arena first. With
:class:`ModelCheckpoint` (this module's), a save made at a training batch end registers the trainer's
optimizers with btckpt's step gate: parameters and moments then copy in the background while the next
forward/backward runs, and the next ``optimizer.step()`` waits for that copy (``background_copy=False``
turns this off). Saves at an epoch's last batch, the final step, or from validation copy everything
before returning (epoch-end callbacks such as SWA write parameters in place). A callback that writes
parameters in place in ``on_train_batch_start``/``on_before_optimizer_step`` must call
:meth:`SafetensorsCheckpointIO.fence` first. Otherwise ``save_checkpoint`` returns after one memcpy.

Several processes (``strategy="ddp"``): Lightning calls ``save_checkpoint`` on rank 0 only. With
:class:`ModelCheckpoint` (this module's) every rank's RNG state is still saved: each rank hands its state to
rank 0 through the c10d store while Lightning builds the dict, and the one commit holds
``rng_state_<rank>.json`` for every rank; on resume each rank restores its own.

HF models: with :class:`ModelCheckpoint` (this module's; it hands the LightningModule to the plugin) and a
``transformers.PreTrainedModel`` inside the LightningModule (e.g. ``self.model``), each folder is also
servable: ``model.safetensors`` keys that model's weights as HF does (``model.`` stripped; other keys kept)
and ``config.json`` (+ ``generation_config.json`` when it generates) join the commit, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads it; the manifest's ``meta`` records the mapping and
loading gives Lightning its original keys. ``SafetensorsCheckpointIO(hf_model=...)``: True (default) finds
the one PreTrainedModel (several: none, one warning), ``"backbone.lm"`` names it, False turns it off. A
key collision from the stripping is refused with an error.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import _lightning_rng as _rng
from ._lightning_hf import HFLayout, from_hf_keys
from ._lightning_state import (
    LINK_FORMAT,
    MAX_LINK,
    map_tree,
    name_bad_key,
    process_rank,
    read_link,
    repair_links,
    resume_path,
    safe_for_background_copy,
    to_groups,
    write_link,
)
from .commit import checkpoint_name, delete_checkpoint, write_small_file
from .config import resolve_dir
from .discovery import STEP_DIR, inspect, scan
from .distributed import World
from .errors import CheckpointError, IncompleteCheckpoint, NoCheckpointFound, UnsafeCheckpoint, UnsupportedValue
from .manager import Checkpointer
from .reader import CheckpointReader
from .rng import restore_rng_file, rng_file
from .storage import fsync_dir, is_url

__all__ = ["SafetensorsCheckpointIO", "ModelCheckpoint", "resume_path", "LINK_FORMAT"]

log = logging.getLogger("btckpt")
RETIRE = ".btckpt-retire-"  # + folder name: that folder's last name is being removed (see remove_checkpoint)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing atomic, asynchronous, pickle-free btckpt folders (module doc).

    Options: ``async_save`` (write in the background; default True), ``max_shard_size``, ``save_rng``
    (per-rank RNG files; restored when a training checkpoint is loaded), ``restore_rng``,
    ``rng_timeout`` (seconds rank 0 waits for the other ranks' RNG states at a save), ``background_copy``
    (copy parameters and optimizer moments behind the step gate; module doc), ``hf_model`` (the HF
    model folder form; module doc).
    """

    def __init__(self, *, async_save: bool = True, max_shard_size: int = 5 * 10**9, save_rng: bool = True,
                 restore_rng: bool = True, rng_timeout: float = 600.0, background_copy: bool = True,
                 hf_model: str | bool = True) -> None:
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
        self._pending: dict[Path, list[Path]] = {}  # folder being written -> link files to write on commit
        self._mine: set[Path] = set()  # folders this process wrote or loaded (safe to share between names)
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------------
    def checkpointer(self, root: str | os.PathLike[str], *, handle_sigterm: bool = False) -> Checkpointer:
        """The (single-process) Checkpointer writing into ``root``; created on first use."""
        if is_url(os.fspath(root)):
            raise CheckpointError(f"{root}: SafetensorsCheckpointIO writes local folders only; point "
                                  "ModelCheckpoint(dirpath=...) at a local folder (the platform uploads it)")
        key = Path(os.path.abspath(root))
        ck = self._ckpts.get(key)
        if ck is None:
            ck = Checkpointer(world=World(), dir=str(key), keep_last=None, async_save=self.async_save,
                              max_shard_size=self.max_shard_size, save_rng=self.save_rng,
                              handle_sigterm=handle_sigterm)
            self._ckpts[key] = ck
            self._finish_retirements(key)  # under the Checkpointer's writer lock
        return ck

    def _committed(self, folder: Path) -> None:
        with self._lock:
            links = self._pending.pop(folder, [])
        for link in links:
            self._relink(link, folder)

    def _relink(self, link: Path, folder: Path) -> None:
        """Point ``link`` at ``folder``; a folder that loses its last name this way is retired (as an
        overwritten ``.ckpt`` file would be gone with TorchCheckpointIO)."""
        old = None
        if link.is_file():
            try:
                old = read_link(link)
            except (UnsafeCheckpoint, OSError):
                old = None
        write_link(link, folder)
        with self._lock:
            busy = old in self._pending
        if old is not None and old != folder and not busy and old.is_dir() and not self._named(old):
            delete_checkpoint(old)
            self._mine.discard(old)
            log.info("btckpt: removed %s (its last name, %s, now names %s)", old.name, link.name, folder.name)

    def wait(self) -> None:
        """Block until every save so far committed and its names are written (raises a save's error)."""
        for ck in list(self._ckpts.values()):
            ck.wait()

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
        """Tell the plugin the LightningModule (for ``hf_model``; :class:`ModelCheckpoint` calls this)."""
        self._hf.attach(module)

    # -- CheckpointIO -----------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` into ``<dir>/checkpoint-<global_step>`` and name it ``path`` once committed."""
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            "SafetensorsCheckpointIO")
        peer_rng = _rng.gather(checkpoint, timeout=self.rng_timeout)  # also frees the store keys
        if peer_rng is None and self.save_rng and not self._warned_rng and _rng.peer_world() is not None \
                and "loops" in checkpoint:
            self._warned_rng = True
            log.warning("btckpt: only rank 0's RNG state is saved; use btckpt.lightning.ModelCheckpoint so every "
                        "rank's RNG is saved and a resume is exact")
        gate, self._gate_next = self._gate_next, None
        optimizers = gate[1] if gate is not None and gate[0] is checkpoint else []
        link = Path(os.path.abspath(path))
        step = int(checkpoint.get("global_step", 0))
        folder = link if STEP_DIR.match(link.name) else link.parent / checkpoint_name(step)
        ck = self.checkpointer(folder.parent)
        with self._lock:
            waiting = self._pending.get(folder)
            if waiting is not None:  # the same step is being written: this name shares the folder
                if link != folder:
                    waiting.append(link)
                return
        if folder in self._mine and inspect(folder).complete:
            if link != folder:
                self._relink(link, folder)
            return
        ck.wait()  # at most one save in flight (btckpt's back-pressure); also surfaces an earlier error
        with self._lock:
            self._pending.clear()
        if folder.exists() and inspect(folder).complete:
            # an earlier run committed this step (e.g. the checkpoint this run resumed from): btckpt never
            # deletes a committed checkpoint before a newer one committed, so the name points at it
            log.info("btckpt: %s was committed by an earlier run at this step; naming it %s", folder, link.name)
            if link != folder:
                self._relink(link, folder)
            self._mine.add(folder)
            return
        groups, keys = to_groups(checkpoint)
        meta: dict[str, Any] = {"keys": keys}
        files: dict[str, bytes] | None = None
        hf = self._hf.prepare(groups["model"]) if isinstance(groups.get("model"), dict) else None
        if hf is not None:
            groups["model"], files, meta["hf"] = hf
        with self._lock:
            self._pending[folder] = [] if link == folder else [link]
        try:
            ck.save(step, groups, meta={"lightning": meta}, extra_files=files,
                    on_commit=self._committed,
                    peer_rng=peer_rng if self.save_rng else None, optimizers=optimizers)
        except UnsupportedValue as exc:
            with self._lock:
                self._pending.pop(folder, None)
            raise name_bad_key(groups, keys, exc) from None
        except BaseException:
            with self._lock:
                self._pending.pop(folder, None)
            raise
        self._mine.add(folder)

    def _resolve(self, path: Path) -> Path:
        with self._lock:
            pending = any(path in links or path == f for f, links in self._pending.items())
        if pending:
            self.wait()
        if path.is_dir():
            if (path / "btckpt.json").exists() or STEP_DIR.match(path.name) or (path / "config.json").exists():
                return path
            found = [i for i in scan(path) if i.complete]
            if not found:
                raise NoCheckpointFound(f"no complete btckpt checkpoint at or under {path}")
            return found[0].path
        if path.is_file():
            folder = read_link(path)
            if not folder.is_dir():
                raise IncompleteCheckpoint(f"{path} names {folder.name}, which does not exist (removed?)")
            return folder
        raise FileNotFoundError(f"Checkpoint at {path} not found. Aborting training.")

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Rebuild Lightning's dict from safetensors + JSON (checksums verified; never unpickles).

        ``path``: a link file, a checkpoint folder, a plain HF model folder (weights only) or a folder of
        checkpoints (the newest complete one). ``map_location``: a device (tensors load on CPU otherwise).
        ``weights_only`` is accepted for the interface; loading is always data-only.
        """
        folder = self._resolve(Path(os.path.abspath(path)))
        info = inspect(folder)
        if not info.complete:
            raise IncompleteCheckpoint(f"{folder} is {info.status}: {info.reason}")
        reader = CheckpointReader(folder, info.manifest)
        meta = info.manifest.meta.get("lightning", {}) if info.manifest is not None else {}
        keys = meta.get("keys", {"model": "state_dict"}) if isinstance(meta, dict) else {}
        out = {keys.get(g, g): reader.load_group(g) for g in reader.groups}
        if isinstance(meta, dict) and "hf" in meta and "state_dict" in out:
            out["state_dict"] = from_hf_keys(out["state_dict"], meta["hf"], where=str(folder))
        if map_location is not None and isinstance(map_location, (str, torch.device)):
            out = map_tree(out, torch.device(map_location))
        rank = process_rank()
        if self.restore_rng and "loops" in out and info.manifest is not None:
            name = rng_file(rank)
            if name in info.manifest.files:
                restore_rng_file(folder, info.manifest, name)
            elif any(n.startswith("rng_state_") for n in info.manifest.files):
                log.warning("btckpt: %s holds no RNG state for rank %d (saved by fewer ranks, or without "
                            "btckpt.lightning.ModelCheckpoint); this rank's RNG is not restored", folder, rank)
        if "loops" in out and rank == 0:
            repair_links(folder, out.get("callbacks"))
        self._mine.add(folder)
        return out

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the name ``path``; the folder goes (rename, then delete) when no name points at it."""
        p = Path(os.path.abspath(path))
        with self._lock:
            for links in self._pending.values():
                while p in links:
                    links.remove(p)
        if p.is_dir() and STEP_DIR.match(p.name):
            self._retire(p)
            return
        if not p.is_file():
            return
        try:
            folder: Path | None = read_link(p)
        except UnsafeCheckpoint:
            folder = None  # not ours (e.g. a .ckpt from TorchCheckpointIO): remove it as Lightning would
        # the last name of a folder: a marker first, so a kill between unlinking and deleting never leaves a
        # complete folder that nothing names (the next start finishes the deletion, see _finish_retirements)
        marker = p.parent / f"{RETIRE}{folder.name}" if folder is not None and not self._named(folder, besides=p) \
            else None
        if marker is not None and not marker.exists():
            write_small_file(marker, b"")
            fsync_dir(p.parent)
        os.unlink(p)
        fsync_dir(p.parent)
        if marker is not None and folder is not None:
            self._retire(folder)
            marker.unlink(missing_ok=True)

    def _finish_retirements(self, root: Path) -> None:
        """Delete the folders whose last name was removed by a process that died before deleting them."""
        for marker in sorted(root.glob(f"{RETIRE}checkpoint-*")):
            folder = root / marker.name[len(RETIRE):]
            if STEP_DIR.match(folder.name) and folder.is_dir() and not self._named(folder):
                log.warning("btckpt: deleting %s, whose last name was removed by an earlier run", folder)
                delete_checkpoint(folder)
            marker.unlink(missing_ok=True)

    def _named(self, folder: Path, *, besides: Path | None = None) -> bool:
        with self._lock:
            if self._pending.get(folder):
                return True
        for entry in folder.parent.iterdir():
            if entry == besides:
                continue
            if entry.is_file() and not entry.name.startswith(".") and entry.stat().st_size <= MAX_LINK:
                try:
                    if read_link(entry) == folder:
                        return True
                except (UnsafeCheckpoint, OSError):
                    continue
        return False

    def _retire(self, folder: Path) -> None:
        with self._lock:
            pending = folder in self._pending
        if pending:
            self.wait()
        if folder.is_dir():
            delete_checkpoint(folder)
        self._mine.discard(folder)

    def teardown(self) -> None:
        """Wait for every save, write pending names, release the writers (raises a save's error)."""
        ckpts, self._ckpts = list(self._ckpts.values()), {}
        errors = []
        for ck in ckpts:
            try:
                ck.close()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        with self._lock:
            self._pending.clear()
        if errors:
            raise errors[0]


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with the platform's defaults (same arguments, same state key).

    ``dirpath`` defaults to ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``. Under DDP it makes every
    rank's RNG state part of the checkpoint (module doc). With
    :class:`SafetensorsCheckpointIO` on a single process, a SIGTERM (preemption) saves ``last.ckpt`` at
    the next training batch end, waits for its commit, and stops the trainer cleanly (exit status 0).
    """

    def __init__(self, dirpath: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(resolve_dir(dirpath), *args, **kwargs)
        self._ck: Checkpointer | None = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """On every rank: hand this rank's RNG state to rank 0's plugin; at a mid-epoch training batch end,
        let rank 0's plugin copy parameters and moments behind the step gate (module doc)."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, SafetensorsCheckpointIO):
            return
        if io.save_rng:
            _rng.note(checkpoint)
        if trainer.is_global_zero and safe_for_background_copy(trainer):
            io.gate_with(checkpoint, list(trainer.optimizers))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if isinstance(trainer.strategy.checkpoint_io, SafetensorsCheckpointIO):
            trainer.strategy.checkpoint_io.attach(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        io = trainer.strategy.checkpoint_io
        if isinstance(io, SafetensorsCheckpointIO) and trainer.world_size == 1 and self.dirpath:
            # created after Lightning installed its SIGTERM handler: ours takes over until teardown
            self._ck = io.checkpointer(self.dirpath, handle_sigterm=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ck = self._ck
        if ck is None or not ck.preempted:
            return
        assert self.dirpath is not None
        filepath = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self.last_model_path = filepath
        trainer.save_checkpoint(filepath)
        trainer.strategy.checkpoint_io.wait()
        log.warning("btckpt: preemption checkpoint for step %d committed; stopping", trainer.global_step)
        raise SIGTERMException()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._ck = None
        super().teardown(trainer, pl_module, stage)
