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

Where checkpoints go: with ``$BT_CHECKPOINT_DIR`` set (a local folder), every checkpoint this plugin writes is
stored directly in it, whichever ``ModelCheckpoint`` chose the path (this module's, Lightning's own, the
default one Lightning adds, a subclass), so the platform backs it up and ``resume_path()``,
``ckpt_path="last"`` and ``ckpt_path="best"`` find it after a restart. Lightning's folder choice
(``ModelCheckpoint``'s ``dirpath``, resolved in its ``setup`` and for ``ckpt_path="last"``) is routed through
:meth:`SafetensorsCheckpointIO.placement` for trainers that use this plugin, so Lightning's names
(``last.ckpt``, ``epoch=0-step=5.ckpt``) and its records (``best_model_path``) name the real place; any other
path handed to ``save_checkpoint`` (``trainer.save_checkpoint("x.ckpt")``) is stored under its file name in
``$BT_CHECKPOINT_DIR`` too, and loading or removing that path finds it there. An explicit ``dirpath`` (or a
saved path) in another folder is still redirected, with one warning naming both folders: checkpoints
outside ``$BT_CHECKPOINT_DIR`` would be neither backed up nor found on a restart. Several callbacks then
share the folder, so give them distinct ``filename=`` patterns. Unset, paths are used as given.

Sharded models (FSDP2 ``fully_shard`` / tensor parallel in ``configure_model``): use
:class:`ModelParallelStrategy` (Lightning's, same arguments; Lightning's own saves and loads around the
plugin); FSDP1: :class:`FSDPStrategy` (Lightning's ``FSDPStrategy``, same arguments). Every rank then writes
its own shards in one commit and a resume reshards to any world size; see
:mod:`btckpt.lightning.strategies`. Lightning's ``ModelParallelStrategy``/``FSDPStrategy``/``DeepSpeedStrategy``
with this plugin are refused when :class:`ModelCheckpoint` sets up.

HF models: with :class:`ModelCheckpoint` (this module's; it hands the LightningModule to the plugin) and a
``transformers.PreTrainedModel`` inside the LightningModule (e.g. ``self.model``), each folder is also
servable: ``model.safetensors`` keys that model's weights as HF does (``model.`` stripped; other keys kept)
and ``config.json`` (+ ``generation_config.json`` when it generates) join the commit, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads it; the manifest's ``meta`` records the mapping and
loading gives Lightning its original keys. ``SafetensorsCheckpointIO(hf_model=...)``: True (default) finds
the one PreTrainedModel (several: none, one warning), ``"backbone.lm"`` names it, False turns it off. A
key collision from the stripping is refused with an error.

Package: this module (the plugin, ``ModelCheckpoint``, ``resume_path``), ``state`` (the Lightning dict
<-> groups, link files), ``rng`` (every rank's RNG through the c10d store), ``servable`` (HF model folders),
``strategies`` (FSDP / ModelParallel / DeepSpeed). An adapter: of btckpt it imports only ``btckpt.adapters``
(the Checkpointer and everything else of the core it uses come through it), ``btckpt.errors``,
``btckpt.config`` and its own modules; never ``btckpt.hf`` or ``btckpt.cli`` (``tests/test_imports.py`` checks
it). Its retention (link files counted per folder, removal markers) is its own: see :mod:`btckpt.adapters`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..adapters import (
    DEFAULT_MAX_SHARD_SIZE,
    STEP_DIR,
    Checkpointer,
    PreemptionWatch,
    checkpoint_name,
    delete_checkpoint,
    fsync_dir,
    group_values,
    inspect,
    is_url,
    local_save_due,
    named_checkpoint,
    open_checkpoint,
    optimizer_state_for_loading,
    refuse_fresh_start,
    refuse_other_runs,
    refuse_taken_step,
    restore_rank_rng,
    run_fingerprint,
    solo_world,
    tensor_shapes,
    write_small_file,
)
from ..config import CheckpointConfig, resolve_dir
from ..errors import (
    CheckpointError,
    ConfigError,
    IncompleteCheckpoint,
    UnsafeCheckpoint,
    UnsupportedValue,
)
from . import rng as _rng
from .servable import HFLayout, from_hf_keys
from .state import (
    LINK_FORMAT,
    MAX_LINK,
    map_tree,
    name_bad_key,
    platform_dir,
    process_rank,
    read_link,
    repair_links,
    resumable,
    resume_path,
    safe_for_background_copy,
    to_groups,
    weights_only_dict,
    weights_only_folder,
    write_link,
)
from .strategies import (
    FSDPStrategy,
    ModelParallelStrategy,
    ShardedCheckpointIO,
    check_strategy,
    hf_model_group,
    is_live,
    read_in_place,
    refuse_rank0_shards,
    saved_sharded,
)

__all__ = ["SafetensorsCheckpointIO", "ModelCheckpoint", "ModelParallelStrategy", "resume_path", "run_identity",
           "LINK_FORMAT", "FSDPStrategy"]

log = logging.getLogger("btckpt")
RETIRE = ".btckpt-retire-"  # + folder name: that folder's last name is being removed (see remove_checkpoint)
UNNAME = ".btckpt-unname-"  # + a name + UNNAME_END: Lightning asked to remove it while its replacement was writing
UNNAME_END = ".pending"  # (so a marker never matches the user's own "*.ckpt")
MAX_DEFERRED = 64  # removals waiting for a commit; past it, remove_checkpoint waits for the save first


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
        self._pending: dict[Path, list[Path]] = {}  # folder being written -> link files to write on commit
        self._mine: set[Path] = set()  # folders this process wrote or loaded (safe to share between names)
        self._deferred: list[Path] = []  # names/folders Lightning removed while a save was still writing
        self._weights_only: set[Path] = set()  # folders this process saved from a save_weights_only dict
        self._lock = threading.Lock()
        self._warned_dirs: set[str] = set()
        self._run: str | None = None  # the attached LightningModule's run identity (run_identity)
        self._resumed = False  # a training checkpoint was loaded: this fit continues a run

    # -- where checkpoints go -----------------------------------------------------------------------------
    def placement(self, asked: str | os.PathLike[str] | None, *, what: str) -> Path | None:
        """The folder this plugin stores checkpoints in when Lightning (or the user) asked for folder ``asked``
        (None: Lightning's default): ``$BT_CHECKPOINT_DIR`` when set to a local folder, else None (``asked``
        stands). A different ``asked`` gets one warning per folder naming both (module doc); ``what`` says
        who asked, e.g. ``"ModelCheckpoint(dirpath='/x')"``."""
        bt = platform_dir()
        if bt is None or asked is None:
            return bt
        here = os.fspath(asked)
        if not is_url(here) and os.path.realpath(os.path.expanduser(here)) == str(bt):
            return bt
        with self._lock:
            first = here not in self._warned_dirs
            self._warned_dirs.add(here)
        if first:
            log.warning("btckpt: %s is not $BT_CHECKPOINT_DIR (%s): SafetensorsCheckpointIO stores these "
                        "checkpoints in %s instead, the only folder the platform backs up and the one "
                        "resume_path() and ckpt_path=\"last\" search after a restart; nothing is written to %s. "
                        "Leave dirpath unset (or point it there) to silence this; to write to %s, unset "
                        "BT_CHECKPOINT_DIR (checkpoints there are neither backed up nor found on a restart).",
                        what, bt, bt, here, here)
        return bt

    def _stored_at(self, path: Path) -> Path:
        """Where ``save_checkpoint(path)`` stores ``path`` (module doc)."""
        bt = self.placement(path.parent, what=f"the checkpoint path {str(path)!r}")
        return path if bt is None or path.parent == bt else bt / path.name

    def _found_at(self, path: Path) -> Path:
        """``path`` when it exists, else where ``save_checkpoint(path)`` would have stored it (when that exists)."""
        bt = platform_dir()
        if bt is None or os.path.lexists(path):
            return path
        moved = bt / path.name
        return moved if os.path.lexists(moved) or self._is_pending(moved) else path

    def _is_pending(self, path: Path) -> bool:
        with self._lock:
            return any(path in links or path == f for f, links in self._pending.items())

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
                self._finish_retirements(key)  # under the Checkpointer's writer lock
        return ck

    def _committed(self, folder: Path) -> None:
        with self._lock:
            links = self._pending.pop(folder, [])
        self._run_deferred()  # first: once the new names exist, nothing of the older checkpoints is left to do
        for link in links:
            self._relink(link, folder)

    def _run_deferred(self) -> None:
        """Carry out the removals Lightning asked for while a save was writing, once none is (DESIGN.md,
        Deletion: a deletion the framework asks for waits until the save that replaces it committed)."""
        with self._lock:
            if self._pending:
                return
            todo, self._deferred = self._deferred, []
        for path in todo:
            self._remove_now(path)

    def _relink(self, link: Path, folder: Path) -> None:
        """Point ``link`` at ``folder``; a folder that loses its last name this way is retired (as an
        overwritten ``.ckpt`` file would be gone with TorchCheckpointIO)."""
        if process_rank() != 0:
            return  # a sharded save runs on every rank; names are rank 0's
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
        self._run_deferred()

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
        peer_rng = _rng.gather(checkpoint, timeout=self.rng_timeout) if process_rank() == 0 else None  # frees keys
        if distributed:
            peer_rng = None  # every rank saves its own RNG
        elif peer_rng is None and self.save_rng and not self._warned_rng and _rng.peer_world() is not None \
                and "loops" in checkpoint:
            self._warned_rng = True
            log.warning("btckpt: only rank 0's RNG state is saved; use btckpt.lightning.ModelCheckpoint so every "
                        "rank's RNG is saved and a resume is exact")
        gate, self._gate_next = self._gate_next, None
        # sharded: the live optimizer is in the state, so the core gates its shards itself
        optimizers = gate[1] if gate is not None and gate[0] is checkpoint and not distributed else []
        link = self._stored_at(Path(os.path.abspath(path)))
        step = int(checkpoint.get("global_step", 0))
        full = not weights_only_dict(checkpoint)
        folder = link if STEP_DIR.match(link.name) else link.parent / checkpoint_name(step)
        ck = self.checkpointer(folder.parent, distributed=distributed)
        if self._into_tier:
            self._save_groups(ck.save_local, step, checkpoint, distributed=distributed, peer_rng=peer_rng,
                              optimizers=optimizers)
            return
        with self._lock:
            # a name (or folder) saved again is no longer to be removed by an earlier, deferred request
            cancelled = [p for p in self._deferred if p in (link, folder)]
            self._deferred = [p for p in self._deferred if p not in (link, folder)]
            for p in cancelled:
                _unname_marker(p).unlink(missing_ok=True)
            waiting = self._pending.get(folder)
            # a full save never shares a weights-only folder of its step (a weights-only one shares a full one)
            upgrade = full and folder in self._weights_only and not distributed
            if waiting is not None and not upgrade:  # the same step is being written: this name shares the folder
                if link != folder:
                    waiting.append(link)
                return
        if not upgrade and folder in self._mine and inspect(folder).complete \
                and not (full and not distributed and weights_only_folder(folder)):
            if link != folder:
                self._relink(link, folder)
            return
        ck.wait()  # at most one save in flight (btckpt's back-pressure); also surfaces an earlier error
        with self._lock:
            self._pending.clear()
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
                self._relink(link, folder)
            self._mine.add(folder)
            return
        with self._lock:
            self._pending[folder] = [n for n in [link, *names] if n != folder]
            if not full:
                self._weights_only.add(folder)
        try:
            self._save_groups(ck.save, step, checkpoint, distributed=distributed, peer_rng=peer_rng,
                              optimizers=optimizers, on_commit=self._committed)
        except BaseException:
            with self._lock:
                self._pending.pop(folder, None)
            raise
        self._mine.add(folder)

    def _replace_weights_only(self, folder: Path) -> list[Path]:
        """Make way for a full (resumable) save of ``folder``'s step: a ``save_weights_only`` callback saved
        that step first. Its folder holds nothing to resume from, so it goes now; the names pointing at it
        are returned, to name the full folder once that committed (a weights-only name may name a full
        checkpoint: it holds the same weights; the reverse would make ``fit(ckpt_path="last")`` fail)."""
        names = [entry for entry in folder.parent.iterdir() if self._names_folder(entry, folder)]
        log.info("btckpt: %s was saved weights-only; a full checkpoint of its step replaces it (%s will name that)",
                 folder.name, ", ".join(n.name for n in names) or "no name")
        delete_checkpoint(folder)
        self._mine.discard(folder)
        with self._lock:
            self._weights_only.discard(folder)
        return names

    @staticmethod
    def _names_folder(entry: Path, folder: Path) -> bool:
        """Whether ``entry`` is a link file naming ``folder``."""
        if not entry.is_file() or entry.name.startswith(".") or entry.stat().st_size > MAX_LINK:
            return False
        try:
            return read_link(entry) == folder
        except (UnsafeCheckpoint, OSError):
            return False

    def _save_groups(self, save: Callable[..., Any], step: int, checkpoint: dict[str, Any], *, distributed: bool,
                     peer_rng: Any, optimizers: list[torch.optim.Optimizer], **keywords: Any) -> None:
        """Lightning's dict as btckpt groups (+ the HF model folder form), saved by ``save`` (the Checkpointer's
        ``save`` or ``save_local``)."""
        groups, keys = to_groups(checkpoint)
        if not distributed:
            refuse_rank0_shards(groups, keys)
        meta: dict[str, Any] = {"keys": keys}
        files: dict[str, bytes] | None = None
        hf = self._hf.prepare(groups["model"]) if isinstance(groups.get("model"), dict) else None
        if hf is not None:
            groups["model"], files, meta["hf"] = hf
        elif distributed:
            files = hf_model_group(self._hf, groups, meta)
        try:
            save(step, groups, meta={"lightning": meta}, extra_files=files,
                 peer_rng=peer_rng if self.save_rng else None, optimizers=optimizers, **keywords)
        except UnsupportedValue as exc:
            raise name_bad_key(groups, keys, exc) from None

    def _resolve(self, path: Path) -> Path:
        path = self._found_at(path)
        if self._is_pending(path):
            self.wait()
        if path.is_dir():  # a checkpoint (or plain model folder) itself, else the resume policy under it
            info = named_checkpoint(path)
            assert info is not None  # a named folder with nothing sound raises NoCheckpointFound
            return info.path
        if path.is_file():
            folder = read_link(path)
            if not folder.is_dir():
                raise IncompleteCheckpoint(f"{path} names {folder.name}, which does not exist (removed?)")
            return folder
        raise FileNotFoundError(f"Checkpoint at {path} not found. Aborting training.")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None, *,
                        into: dict[str, Any] | None = None, strict: bool = True) -> dict[str, Any]:
        """Rebuild Lightning's dict from safetensors + JSON (checksums verified; never unpickles).

        ``path``: a link file, a checkpoint folder, a plain HF model folder (weights only) or a folder of
        checkpoints (the newest complete one). ``map_location``: a device (tensors load on CPU otherwise).
        ``weights_only`` is accepted for the interface; loading is always data-only. ``into`` (every rank,
        :class:`ModelParallelStrategy`): ``{"model": module, "optimizer": optimizer}`` loaded in place (any
        world size), left out of the returned dict; ``strict`` applies to them.
        """
        folder = self._resolve(Path(os.path.abspath(path)))
        info = open_checkpoint(folder)
        assert info is not None
        meta = info.manifest.meta.get("lightning", {}) if info.manifest is not None else {}
        keys = meta.get("keys", {"model": "state_dict"}) if isinstance(meta, dict) else {}
        sharded = saved_sharded(info)
        if sharded and into is None:
            raise ConfigError(f"{folder} was saved sharded (per-rank files, by btckpt.lightning."
                              "ModelParallelStrategy or FSDPStrategy); load it with that strategy (any number of "
                              "ranks)")
        rank = process_rank()
        apply = read_in_place(info, into, rank=rank, strict=strict) if into else None
        elsewhere = sharded | set(into or ())  # loaded in place by read_in_place
        out = {keys.get(g, g): v for g, v in group_values(info, exclude=elsewhere).items()}
        if isinstance(meta, dict) and "hf" in meta and "state_dict" in out:
            out["state_dict"] = from_hf_keys(out["state_dict"], meta["hf"], where=str(folder))
        if map_location is not None and isinstance(map_location, (str, torch.device)):
            out = map_tree(out, torch.device(map_location))
        if isinstance(out.get("optimizer_states"), list):  # Lightning hands each to optimizer.load_state_dict
            out["optimizer_states"] = [optimizer_state_for_loading(s) if isinstance(s, Mapping) else s
                                       for s in out["optimizer_states"]]
        if apply is not None:
            apply()
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
        p = self._found_at(Path(os.path.abspath(path)))
        with self._lock:
            for links in self._pending.values():
                while p in links:
                    links.remove(p)
            defer = bool(self._pending)
            new = defer and p not in self._deferred
            if new:
                self._deferred.append(p)
            full = len(self._deferred) > MAX_DEFERRED
        if new:
            self._mark_deferred(p)
        if full:
            self.wait()  # bounded: the saves commit (or raise) and run the removals
            self._run_deferred()
        if defer:
            return
        self._remove_now(p)

    @staticmethod
    def _mark_deferred(p: Path) -> None:
        """A marker beside ``p``: a kill after the replacing save committed but before the removal ran leaves
        the request on disk, and the next start carries it out (:meth:`_finish_retirements`)."""
        try:
            write_small_file(_unname_marker(p), b"")
            fsync_dir(p.parent)
        except OSError as exc:  # e.g. a name too long for a marker: the removal still runs after the commit
            log.warning("btckpt: could not record the pending removal of %s (%s); a kill before it runs "
                        "leaves that checkpoint behind", p.name, exc)

    def _remove_now(self, p: Path) -> None:
        self._remove_name(p)
        _unname_marker(p).unlink(missing_ok=True)

    def _remove_name(self, p: Path) -> None:
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
        """Carry out the removals an earlier process was asked for but died before running: a name whose
        replacing save had committed (a complete, resumable newer checkpoint exists; else it stays), and the
        folders whose last name was removed before they were deleted."""
        for marker in sorted(root.glob(f"{UNNAME}*{UNNAME_END}")):
            name = root / marker.name[len(UNNAME):-len(UNNAME_END)]
            if self._replaced(name):
                log.warning("btckpt: removing %s, whose removal an earlier run asked for after a newer checkpoint",
                            name.name)
                self._remove_name(name)
            marker.unlink(missing_ok=True)
        for marker in sorted(root.glob(f"{RETIRE}checkpoint-*")):
            folder = root / marker.name[len(RETIRE):]
            if STEP_DIR.match(folder.name) and folder.is_dir() and not self._named(folder):
                log.warning("btckpt: deleting %s, whose last name was removed by an earlier run", folder)
                delete_checkpoint(folder)
            marker.unlink(missing_ok=True)

    @staticmethod
    def _replaced(name: Path) -> bool:
        """Whether a complete, resumable checkpoint newer than the one ``name`` (a link or a folder) names exists."""
        try:
            folder = name if name.is_dir() else read_link(name) if name.is_file() else None
        except (UnsafeCheckpoint, OSError):
            return False
        found = STEP_DIR.match(folder.name) if folder is not None else None
        if folder is None or found is None:
            return False
        for entry in folder.parent.iterdir():
            m = STEP_DIR.match(entry.name)
            if m and int(m.group(1)) > int(found.group(1)):
                info = inspect(entry)
                if info.complete and resumable(info):
                    return True
        return False

    def _named(self, folder: Path, *, besides: Path | None = None) -> bool:
        with self._lock:
            if self._pending.get(folder):
                return True
        return any(entry != besides and self._names_folder(entry, folder) for entry in folder.parent.iterdir())

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
            with self._lock:
                kept, self._deferred = self._deferred, []  # a save failed: keep what it would have replaced
            for p in kept:
                _unname_marker(p).unlink(missing_ok=True)
            raise errors[0]
        self._run_deferred()


def _unname_marker(p: Path) -> Path:
    return p.parent / f"{UNNAME}{p.name}{UNNAME_END}"


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with the platform's defaults (same arguments, same state key).

    ``dirpath`` defaults to ``$BT_CHECKPOINT_DIR``, else Lightning's own choice (``<default_root_dir>/checkpoints``,
    or the logger's ``<log_dir>/checkpoints``: two experiments never share a folder). A fit started fresh
    (no ``ckpt_path``) into a folder holding checkpoints, or resumed from elsewhere into one holding only another
    run's, is refused before its first step (:class:`ConfigError` naming the folder and the fixes; README "Run
    identity"). Under DDP it makes every
    rank's RNG state part of the checkpoint (module doc). With
    :class:`SafetensorsCheckpointIO`, a SIGTERM (preemption) saves ``last.ckpt`` at the next training batch
    end, waits for its commit, and stops the trainer cleanly (exit status 0); with several ranks, a SIGTERM
    on any of them makes every rank save and stop at the same step (agreed through the c10d store, no
    collective: :class:`btckpt.adapters.PreemptionWatch`). With the plugin's ``local_every_steps=K`` it also
    saves into the local tier every K training steps.
    """

    def __init__(self, dirpath: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(resolve_dir(dirpath) if dirpath is not None or platform_dir() else None, *args, **kwargs)
        self._ck: Checkpointer | None = None
        self._watch: PreemptionWatch | None = None  # several ranks: SIGTERM on any makes every rank stop
        self._local_step: int | None = None  # the newest step saved into the local tier

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
        check_strategy(trainer.strategy)
        if isinstance(trainer.strategy.checkpoint_io, SafetensorsCheckpointIO):
            trainer.strategy.checkpoint_io.attach(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, SafetensorsCheckpointIO) or not self.dirpath:
            return
        if trainer.ckpt_path is None:  # every rank: all refuse together; a fresh fit would take earlier names
            refuse_fresh_start(self.dirpath, local_tier_dir=io.local_tier_dir)
        elif Path(os.path.abspath(trainer.ckpt_path)).parent != Path(os.path.abspath(self.dirpath)):
            # a warm start from elsewhere: the folder must not hold only another run's checkpoints
            refuse_other_runs(self.dirpath, run=io._run, local_tier_dir=io.local_tier_dir)
        # created after Lightning installed its SIGTERM handler: ours takes over until teardown
        if trainer.world_size == 1:
            self._ck = io.checkpointer(self.dirpath, handle_sigterm=True)
        else:  # every rank: Lightning saves on rank 0 only, so no Checkpointer is shared by the ranks
            self._watch = PreemptionWatch(f"lightning:{self.dirpath}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ck, watch = self._ck, self._watch
        if not ((ck is not None and ck.preempted) or (watch is not None and watch.due(trainer.global_step))):
            self._maybe_save_local(trainer)
            return
        assert self.dirpath is not None
        filepath = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self.last_model_path = filepath
        trainer.save_checkpoint(filepath)  # every rank (Lightning's save is collective)
        trainer.strategy.checkpoint_io.wait()
        if watch is not None:
            watch.stopped(timeout=CheckpointConfig.preemption_grace)
        log.warning("btckpt: preemption checkpoint for step %d committed; stopping", trainer.global_step)
        raise SIGTERMException()

    def _maybe_save_local(self, trainer: Any) -> None:
        """Every ``local_every_steps`` training steps (the plugin's), a save of this step into the local tier,
        unless this callback saved the step already; on every rank, as Lightning's own saves."""
        io = trainer.strategy.checkpoint_io
        step = trainer.global_step
        if not isinstance(io, SafetensorsCheckpointIO) or not self.dirpath or not local_save_due(
                io.local_every_steps, step, done=(self._last_global_step_saved, self._local_step)):
            return
        with io.into_local_tier():
            trainer.save_checkpoint(os.path.join(self.dirpath, checkpoint_name(step)))
        self._local_step = step

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._watch is not None:
            self._watch.close()
        self._ck, self._watch, self._local_step = None, None, None
        super().teardown(trainer, pl_module, stage)


def run_identity(module: Any) -> str:
    """The run identity of a LightningModule's run (README "Run identity"): its class and tensor names, shapes
    and dtypes. ``hparams`` are left out: they often hold paths, flags and settings that change between
    restarts of one run, and a retry refused as "another run" would lose the job."""
    return run_fingerprint({"integration": "lightning", "module": type(module).__qualname__,
                            "tensors": tensor_shapes(module)})


_RESOLVE_DIR = "_ModelCheckpoint__resolve_ckpt_dir"  # Lightning >= 2.0: ModelCheckpoint's one folder choice


def _route_lightning_dir_choice() -> None:
    """Make Lightning's ``ModelCheckpoint`` ask :meth:`SafetensorsCheckpointIO.placement` for its folder.

    Lightning decides a ``ModelCheckpoint``'s folder in one private method, called by ``setup`` and by
    ``ckpt_path="last"`` (before any plugin call): for a trainer whose ``checkpoint_io`` is this plugin and
    with ``$BT_CHECKPOINT_DIR`` set, the answer becomes that folder; every other trainer keeps Lightning's.
    Without the method (a future Lightning), ``save_checkpoint`` still stores under ``$BT_CHECKPOINT_DIR``,
    with its warning; only ``ckpt_path="last"`` would no longer look there.
    """
    lightning_choice = getattr(_ModelCheckpoint, _RESOLVE_DIR, None)
    if lightning_choice is None or getattr(lightning_choice, "_btckpt", False):
        return

    def resolve_ckpt_dir(callback: _ModelCheckpoint, trainer: Any) -> Any:
        io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)
        if isinstance(io, SafetensorsCheckpointIO):
            check_strategy(trainer.strategy)  # also for Lightning's own / the default ModelCheckpoint
            asked = callback.dirpath
            bt = io.placement(asked, what=f"{type(callback).__name__}(dirpath={asked!r})")
            if bt is not None:
                return str(bt)
        return lightning_choice(callback, trainer)

    resolve_ckpt_dir._btckpt = True  # type: ignore[attr-defined]
    setattr(_ModelCheckpoint, _RESOLVE_DIR, resolve_ckpt_dir)


_route_lightning_dir_choice()
