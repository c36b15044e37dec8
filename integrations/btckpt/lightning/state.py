"""Lightning's checkpoint dict <-> btckpt groups, the link files that name checkpoint folders, and the small
helpers around them (the rank, ``$BT_CHECKPOINT_DIR``, weights-only dicts, a module's run identity).

Used by :mod:`btckpt.lightning`; kept apart so the plugin module stays small. Nothing here pickles.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import torch

from ..adapters import (
    STEP_DIR,
    CheckpointInfo,
    check_storable,
    inspect,
    is_group_name,
    is_url,
    replace_file,
    resume_folder,
    run_fingerprint,
    tensor_shapes,
)
from ..errors import UnsafeCheckpoint, UnsupportedValue

__all__ = ["LINK_FORMAT", "MAX_LINK", "RNG_KEY", "to_groups", "name_bad_key", "map_tree", "read_link",
           "write_link", "repair_links", "resume_path", "safe_for_background_copy",
           "process_rank", "platform_dir", "weights_only_dict", "weights_only_folder", "resumable", "run_identity"]

log = logging.getLogger("btckpt")

LINK_FORMAT = "btckpt-lightning-link/1"
MAX_LINK = 64 * 1024
RNG_KEY = "__btckpt_rng_key__"  # set in the dict by the every-rank RNG hook (_lightning_rng); never saved
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


def to_groups(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Lightning's dict -> (btckpt groups, group name -> Lightning key)."""
    groups: dict[str, Any] = {}
    keys: dict[str, str] = {}
    taken = set(_RENAMED.values())
    for n, (key, value) in enumerate(checkpoint.items()):
        if key == RNG_KEY:
            continue
        if not isinstance(key, str):
            raise UnsupportedValue(f"Lightning checkpoint key {key!r} is not a string; btckpt stores top-level "
                                   "keys as group names")
        name = _RENAMED.get(key)
        if name is None:
            name = key if is_group_name(key) and key not in taken else f"extra-{n}"
        if key in _HPARAMS:
            value = _plain_hparams(value)
        groups[name] = value
        keys[name] = key
    return groups, keys


def name_bad_key(groups: Mapping[str, Any], keys: Mapping[str, str], exc: UnsupportedValue) -> UnsupportedValue:
    """``exc`` re-worded to name the Lightning key whose value cannot be stored."""
    for name, value in groups.items():
        try:
            check_storable(name, value)
        except UnsupportedValue as inner:
            return UnsupportedValue(f"Lightning checkpoint key {keys[name]!r}: {inner}")
    return exc


def map_tree(tree: Any, device: torch.device) -> Any:
    """Every tensor of ``tree`` moved to ``device`` (containers rebuilt)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: map_tree(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tree(v, device) for v in tree]
    if isinstance(tree, tuple):
        return tuple(map_tree(v, device) for v in tree)
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


def write_link(link: Path, folder: Path) -> None:
    """Atomically (temp file, fsync, rename, fsync dir) make ``link`` name ``folder``."""
    replace_file(link, json.dumps({"format": LINK_FORMAT, "checkpoint": folder.name}).encode())


def repair_links(folder: Path, callbacks: Any) -> None:
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
            write_link(p, folder)
            log.info("btckpt: re-created %s -> %s (lost to a crash right after the commit)", p.name, folder.name)


def safe_for_background_copy(trainer: Any) -> bool:
    """True at a training batch end after which the next write to parameters is ``optimizer.step()``."""
    if not trainer.training or trainer.sanity_checking or trainer.should_stop:
        return False
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return not progress.is_last_batch


def resume_path(*, dir: str | os.PathLike[str] | None = None,
                load_dir: str | os.PathLike[str] | None = None, on_missing: str = "raise",
                local_tier_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The checkpoint to pass as ``trainer.fit(ckpt_path=...)``: the newest complete, verified checkpoint in
    ``dir`` (default ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``; the ``checkpoint-<N>`` folders directly in
    it), else in ``load_dir`` (default ``$BT_LOAD_CHECKPOINT_DIR``, nested ``<job>/rank-<node>/`` layouts
    included), else None. The same policy as ``Checkpointer.restore`` (:func:`btckpt.adapters.resume_folder`): a
    damaged checkpoint is skipped with a warning naming the file; :class:`btckpt.NoCheckpointFound` when
    ``load_dir`` is set and nothing was found anywhere, unless ``on_missing="start_fresh"``. The node-local
    tier of ``dir`` (``local_tier_dir``, default ``/dev/shm/btckpt/<job>``) is searched with it: its newer
    step wins."""
    return resume_folder(dir=dir, load_dir=load_dir, on_missing=on_missing, accept=resumable,
                         helper="resume_path()", local_tier_dir=local_tier_dir)


def weights_only_dict(checkpoint: Mapping[str, Any]) -> bool:
    """Whether Lightning built ``checkpoint`` with ``weights_only=True`` (``ModelCheckpoint(save_weights_only=
    True)``): it then holds ``loops`` but no ``optimizer_states`` (a full one holds both, ``[]`` included)."""
    return "loops" in checkpoint and "optimizer_states" not in checkpoint


def weights_only_folder(folder: Path) -> bool:
    """Whether the committed btckpt checkpoint ``folder`` was saved from a weights-only dict."""
    info = inspect(folder)
    return info.manifest is not None and _weights_only_info(info)


def _weights_only_info(info: CheckpointInfo) -> bool:
    meta = info.manifest.meta.get("lightning") if info.manifest is not None else None
    keys = meta.get("keys") if isinstance(meta, dict) else None
    return isinstance(keys, dict) and weights_only_dict({v: None for v in keys.values()})


def resumable(info: CheckpointInfo) -> bool:
    """A btckpt checkpoint ``fit(ckpt_path=...)`` can resume training from: not a weights-only one (Lightning's
    fit fails on those), as HF's ``resume_checkpoint()`` accepts only folders with ``trainer_state.json``."""
    return info.kind == "btckpt" and not _weights_only_info(info)


def process_rank() -> int:
    """This process's rank in torch.distributed's default group (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def platform_dir() -> Path | None:
    """``$BT_CHECKPOINT_DIR`` as an absolute path with links resolved, or None when unset or a URL."""
    value = os.environ.get("BT_CHECKPOINT_DIR")
    if not value or is_url(value):
        return None
    return Path(os.path.realpath(os.path.expanduser(value)))


def run_identity(module: Any) -> str:
    """The run identity of a LightningModule's run (README "Run identity"): its class and tensor names, shapes
    and dtypes. ``hparams`` are left out: they often hold paths, flags and settings that change between
    restarts of one run, and a retry refused as "another run" would lose the job."""
    return run_fingerprint({"integration": "lightning", "module": type(module).__qualname__,
                            "tensors": tensor_shapes(module)})
