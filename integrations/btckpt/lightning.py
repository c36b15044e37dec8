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

Async: ``save_checkpoint`` copies every tensor of the dict into btckpt's reusable staging arena before it
returns (the dict holds live parameters and optimizer moments; the stall is one memcpy), and the write,
checksums, commit and link run on btckpt's background writer.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .commit import checkpoint_name, delete_checkpoint
from .config import resolve_dir, resolve_load_dir
from .discovery import STEP_DIR, inspect, scan
from .distributed import World
from .errors import CheckpointError, IncompleteCheckpoint, NoCheckpointFound, UnsafeCheckpoint, UnsupportedValue
from .layout import GROUP_NAME, flatten_group
from .manager import Checkpointer
from .reader import CheckpointReader, read_verified_bytes
from .rng import restore_rng, rng_file
from .storage import fsync_dir, fsync_file, is_url

__all__ = ["SafetensorsCheckpointIO", "ModelCheckpoint", "resume_path", "LINK_FORMAT"]

log = logging.getLogger("btckpt")

LINK_FORMAT = "btckpt-lightning-link/1"
MAX_LINK = 64 * 1024
_RENAMED = {"state_dict": "model", "optimizer_states": "optimizer", "lr_schedulers": "scheduler"}
_HPARAMS = ("hyper_parameters", "datamodule_hyper_parameters")


def _plain_hparams(value: Any) -> Any:
    """Documented conversions for hyper-parameters only: Path -> str, torch.dtype -> str ("torch.float32"),
    Enum -> its value, argparse.Namespace -> dict. Anything else non-JSON is refused by flatten."""
    if isinstance(value, Mapping):
        return {k: _plain_hparams(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_hparams(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_hparams(v) for v in value)
    if isinstance(value, PurePath) or isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, enum.Enum):
        return _plain_hparams(value.value)
    if isinstance(value, argparse.Namespace):
        return _plain_hparams(vars(value))
    return value


def _to_groups(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Lightning's dict -> (btckpt groups, group name -> Lightning key)."""
    groups: dict[str, Any] = {}
    keys: dict[str, str] = {}
    taken = set(_RENAMED.values())
    for n, (key, value) in enumerate(checkpoint.items()):
        if not isinstance(key, str):
            raise UnsupportedValue(f"Lightning checkpoint key {key!r} is not a string; btckpt stores top-level "
                                   "keys as group names")
        name = _RENAMED.get(key)
        if name is None:
            name = key if GROUP_NAME.match(key) and key not in taken else f"extra-{n}"
        if key in _HPARAMS:
            value = _plain_hparams(value)
        groups[name] = value
        keys[name] = key
    return groups, keys


def _name_bad_key(groups: Mapping[str, Any], keys: Mapping[str, str], exc: UnsupportedValue) -> UnsupportedValue:
    for name, value in groups.items():
        try:
            flatten_group(name, value)
        except UnsupportedValue as inner:
            return UnsupportedValue(f"Lightning checkpoint key {keys[name]!r}: {inner}")
    return exc


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _map(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _map(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, device) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_map(v, device) for v in tree)
    return tree


def read_link(path: Path) -> Path:
    """The checkpoint folder a link file names. Refuses anything else (a pickle ``.ckpt`` included)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_LINK + 1)
    what = (f"{path} is not a btckpt link file (a torch/pickle .ckpt?). btckpt never unpickles; load a "
            "Lightning .ckpt you trust with TorchCheckpointIO")
    if len(raw) > MAX_LINK or not raw.lstrip().startswith(b"{"):
        raise UnsafeCheckpoint(what)
    try:
        obj = json.loads(raw)
    except ValueError:
        raise UnsafeCheckpoint(what) from None
    name = obj.get("checkpoint") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("format") != LINK_FORMAT or not isinstance(name, str) \
            or not STEP_DIR.match(name):
        raise UnsafeCheckpoint(f"{path}: not a valid btckpt link (needs format {LINK_FORMAT!r} and a sibling "
                               f"'checkpoint-<step>' folder name); refusing it")
    return path.parent / name


def _repair_links(folder: Path, callbacks: Any) -> None:
    """Re-create names of ``folder`` lost to a crash between its commit and its link files.

    Saves are serialized and each waits for the previous one's links, so a name that a ModelCheckpoint
    state (saved inside ``folder``) lists in the same directory but that is missing can only be ``folder``'s.
    """
    if not isinstance(callbacks, dict):
        return
    names: set[str] = set()
    for state in callbacks.values():
        if isinstance(state, dict):
            names |= {k for k in state.get("best_k_models") or {} if isinstance(k, str)}
            names |= {state[k] for k in ("best_model_path", "kth_best_model_path", "last_model_path")
                      if isinstance(state.get(k), str) and state[k]}
    for name in names:
        p = Path(name)
        if p.parent == folder.parent and p.suffix == ".ckpt" and not p.exists() and not p.is_symlink():
            SafetensorsCheckpointIO._write_link(p, folder)
            log.info("btckpt: re-created %s -> %s (lost to a crash right after the commit)", p.name, folder.name)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing atomic, asynchronous, pickle-free btckpt folders (module doc).

    Options: ``async_save`` (write in the background; default True), ``max_shard_size``, ``save_rng``
    (per-rank RNG files; restored when a training checkpoint is loaded), ``restore_rng``.
    """

    def __init__(self, *, async_save: bool = True, max_shard_size: int = 5 * 10**9, save_rng: bool = True,
                 restore_rng: bool = True) -> None:
        self.async_save = async_save
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
        self._write_link(link, folder)
        with self._lock:
            busy = old in self._pending
        if old is not None and old != folder and not busy and old.is_dir() and not self._named(old):
            delete_checkpoint(old)
            self._mine.discard(old)
            log.info("btckpt: removed %s (its last name, %s, now names %s)", old.name, link.name, folder.name)

    @staticmethod
    def _write_link(link: Path, folder: Path) -> None:
        data = json.dumps({"format": LINK_FORMAT, "checkpoint": folder.name}).encode()
        tmp = link.parent / f".{link.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            fsync_file(fd)
        finally:
            os.close(fd)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    def wait(self) -> None:
        """Block until every save so far committed and its names are written (raises a save's error)."""
        for ck in list(self._ckpts.values()):
            ck.wait()

    # -- CheckpointIO -----------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` into ``<dir>/checkpoint-<global_step>`` and name it ``path`` once committed."""
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            "SafetensorsCheckpointIO")
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
        groups, keys = _to_groups(checkpoint)
        with self._lock:
            self._pending[folder] = [] if link == folder else [link]
        try:
            ck.save(step, groups, meta={"lightning": {"keys": keys}}, on_commit=self._committed)
        except UnsupportedValue as exc:
            with self._lock:
                self._pending.pop(folder, None)
            raise _name_bad_key(groups, keys, exc) from None
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
        if map_location is not None and isinstance(map_location, (str, torch.device)):
            out = _map(out, torch.device(map_location))
        if self.restore_rng and "loops" in out and info.manifest is not None:
            name = rng_file(_rank())
            if name in info.manifest.files:
                restore_rng(json.loads(read_verified_bytes(folder, info.manifest, name)), where=str(folder))
        if "loops" in out and _rank() == 0:
            _repair_links(folder, out.get("callbacks"))
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
        os.unlink(p)
        fsync_dir(p.parent)
        if folder is not None and not self._named(folder):
            self._retire(folder)

    def _named(self, folder: Path) -> bool:
        with self._lock:
            if self._pending.get(folder):
                return True
        for entry in folder.parent.iterdir():
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

    ``dirpath`` defaults to ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``. With
    :class:`SafetensorsCheckpointIO` on a single process, a SIGTERM (preemption) saves ``last.ckpt`` at
    the next training batch end, waits for its commit, and stops the trainer cleanly (exit status 0).
    """

    def __init__(self, dirpath: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(resolve_dir(dirpath), *args, **kwargs)
        self._ck: Checkpointer | None = None

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


def resume_path(*, dir: str | os.PathLike[str] | None = None,
                load_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The checkpoint to pass as ``trainer.fit(ckpt_path=...)``: the newest complete checkpoint in ``dir``
    (default ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``), else in ``load_dir`` (default
    ``$BT_LOAD_CHECKPOINT_DIR``, nested ``<job>/rank-<node>/`` layouts included), else None."""
    for root in (resolve_dir(dir), resolve_load_dir(load_dir)):
        if root is None or is_url(root):
            continue
        for info in scan(root):
            if info.complete and info.kind == "btckpt":
                return str(info.path)
    return None
