"""What every framework adapter needs from the core, written once (HF Trainer, Lightning, the next one).

An adapter maps a framework's checkpoint hooks to these calls and nothing else:

- **resume search** -- :func:`resume_folder`: the folder to hand the framework (``resume_from_checkpoint``,
  ``ckpt_path``), chosen by the resume policy (:class:`btckpt.restore.policy.ResumePolicy`);
- **opening** what the framework hands back -- :func:`open_checkpoint` (damaged: an error naming it);
- **reading groups** -- :func:`read_groups` / :func:`load_groups` (into live objects, read and verified
  before anything is applied, any sharding) and :func:`group_values` (plain values, for a framework that
  takes a dict);
- **a rank's RNG** -- :func:`restore_rank_rng` (the core's reader, :func:`btckpt.restore.rng.read_rank_rng`), and for
  frameworks that hand the checkpoint to rank 0 only, :func:`publish_rank_rng` / :func:`gather_rank_rng`
  (each rank's :func:`~btckpt.restore.rng.capture_rng` through the c10d store, under a key all ranks derive from the
  checkpoint, never from creation order);
- **the local tier's cadence** -- :func:`local_save_due` (when a framework step goes into the tier with
  ``Checkpointer.save_local``; its durable saves go through the tier by themselves, ``Checkpointer.save``);
- **run identity** -- :func:`run_fingerprint` / :func:`tensor_shapes` (what the adapter says makes its run the
  same run, as the Checkpointer's ``run_id``), :func:`refuse_fresh_start` (a run started fresh in a used dir);
- **preemption** -- :func:`preemption_due` (a framework driving a shared Checkpointer, e.g. HF) and
  :class:`PreemptionWatch` (one whose ranks share none, e.g. Lightning, which saves on rank 0): a SIGTERM on
  any rank makes every rank stop at one agreed step, through the core's store agreement
  (:class:`btckpt.distributed.world.StopAgreement`: no collective, no device sync per step);
- **HF config files** -- :func:`model_config_files` (``config.json``, ``generation_config.json``) and
  :func:`files_written_by` (whatever a ``save_pretrained`` writes), so a folder loads with ``from_pretrained``;
- **saving** -- the :class:`~btckpt.checkpointer.Checkpointer` itself (an adapter drives one: ``save``,
  ``save_local``, ``wait``, ``close``), :func:`solo_world` (for one a single rank drives alone),
  :func:`unwrap_model` (the model inside a framework's wrappers), :data:`DEFAULT_MAX_SHARD_SIZE`;
- **sharded state** -- :func:`holds_live_shards` (a save every rank takes part in), :func:`is_dtensor`,
  :func:`sharded_group_names` (the groups a checkpoint holds as per-rank files); DeepSpeed ZeRO:
  :func:`zero_optimizer`, :class:`ZeroState`, :func:`zero_stage`, :func:`zero_save_groups`,
  :func:`load_zero_state`;
- **loading what a framework reads itself** -- :func:`named_checkpoint` (a folder the user named),
  :func:`optimizer_state_for_loading` (a saved optimizer state as ``optimizer.load_state_dict`` takes it),
  :func:`refuse_taken_step` (a step's folder already holds another run's, or a fresh run's, checkpoint);
- **the folders** -- :class:`CheckpointInfo` and :func:`inspect` (what a folder holds, complete or not; no
  checksums read), :data:`STEP_DIR` / :func:`checkpoint_name` (``checkpoint-<N>``), :func:`is_url`;
- **an adapter's own files beside the checkpoints** (Lightning's link files and its removal markers) --
  :func:`replace_file` (a small file replaced atomically), :func:`write_small_file`, :func:`fsync_dir`,
  :func:`delete_checkpoint` (a checkpoint folder removed: rename first, then its files), and
  :func:`is_group_name` / :func:`check_storable` (what a framework's dict keys and values may be);
- **retention by names** -- :class:`LinkRefcount` (:class:`btckpt.policies.Retention`'s second implementation:
  link files name folders, a folder goes when its last name does, and a framework's delete waits for the
  commit of the save that replaces it, with crash markers finished at the next start).

The names re-exported from the core (the Checkpointer, the ZeRO and discovery vocabulary,
``saving.commit``'s ``checkpoint_name`` / ``delete_checkpoint`` / ``write_small_file``, ``storage.local``'s
``fsync_dir`` / ``is_url``) keep the core's names and behaviour: this module is the one place an adapter reaches
them from (``tests/test_imports.py`` checks that ``btckpt.hf`` and ``btckpt.lightning`` import nothing of btckpt
but this, ``btckpt.errors`` and ``btckpt.config``).

Where an adapter does policy the core also has (kept as it is; candidates to fold into the core):

- Lightning's retention is ``ModelCheckpoint``'s (``save_top_k``), not the Checkpointer's ``keep_last``: its
  plugin drives a :class:`LinkRefcount` (now the core's, :mod:`btckpt.policies.retention`: the link files
  naming each folder counted, a folder removed with :func:`delete_checkpoint` when the last name goes, crash
  markers ``.btckpt-retire-*`` / ``.btckpt-unname-*`` finished at the next start), fed from the save's
  ``on_commit``; the plugin's Checkpointer runs with ``keep_last=None``;
- preemption: HF shares the core's SIGTERM handling (:func:`preemption_due`, ``Checkpointer.finish_preemption``);
  Lightning's ranks share no Checkpointer and use :class:`PreemptionWatch`, the same store agreement;
- a step's folder already there: ``Checkpointer.save`` refuses another run's (:class:`btckpt.CheckpointError`)
  and skips its own; Lightning's plugin refuses first (:func:`refuse_taken_step`), a fresh fit's too, since
  it names the folder (link files) whichever way it goes and learns whether the fit resumed only at a load.

Never imports transformers or lightning: the objects come from the adapter.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); this is the core's door for btckpt's own adapters, and its names
may change without notice (with the adapters).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from .checkpointer import Checkpointer
from .config import CheckpointConfig, resolve_dir, resolve_load_dir
from .distributed.shards import META_KEY, is_dtensor, sharded_groups
from .distributed.world import World, world
from .distributed.zero import ZERO_META, ZeroState, load_zero, plain_data, read_tensor, zero_optimizer, zero_stage
from .errors import ConfigError, CorruptCheckpoint, IncompleteCheckpoint
from .format.layout import GROUP_NAME, flatten_group
from .format.manifest import DEFAULT_MAX_SHARD_SIZE, MANIFEST
from .format.state import optimizer_state_for_loading, unwrap_model
from .policies.preemption import Preemption
from .policies.retention import LinkRefcount
from .policies.schedule import local_save_due
from .restore.load import read_checkpoint
from .restore.policy import ResumePolicy, other_run_error, same_run
from .restore.reader import CheckpointReader, NodeParts
from .restore.rng import apply_rng, capture_rng, read_rank_rng
from .saving.commit import checkpoint_name, delete_checkpoint, write_small_file
from .storage.atomic import replace_file
from .storage.discovery import STEP_DIR, CheckpointInfo, inspect
from .storage.local import fsync_dir, is_url
from .tiers import resumable_tier

__all__ = [
    # resume search, opening, reading groups, a rank's RNG, the tier, run identity, preemption, HF files
    "resume_folder", "refuse_fresh_start", "refuse_other_runs", "run_fingerprint", "tensor_shapes",
    "local_save_due", "open_checkpoint", "read_groups", "load_groups", "group_values",
    "restore_rank_rng", "publish_rank_rng", "gather_rank_rng", "peer_world", "solo_world", "files_written_by",
    "model_config_files", "preemption_due", "PreemptionWatch",
    # saving
    "Checkpointer", "unwrap_model", "DEFAULT_MAX_SHARD_SIZE",
    # sharded state, DeepSpeed ZeRO
    "holds_live_shards", "is_dtensor", "sharded_group_names", "zero_optimizer", "ZeroState", "zero_stage",
    "zero_save_groups", "load_zero_state",
    # loading what a framework reads itself
    "named_checkpoint", "optimizer_state_for_loading", "refuse_taken_step",
    # the folders
    "CheckpointInfo", "inspect", "STEP_DIR", "checkpoint_name", "is_url",
    # an adapter's own files beside the checkpoints
    "replace_file", "write_small_file", "fsync_dir", "delete_checkpoint", "is_group_name", "check_storable",
    # retention by names
    "LinkRefcount",
]

log = logging.getLogger("btckpt")


# -- resume search -------------------------------------------------------------------------------------------
def resume_folder(*, dir: str | os.PathLike[str] | None, load_dir: str | os.PathLike[str] | None,
                  on_missing: str, accept: Callable[[CheckpointInfo], bool] | None, helper: str,
                  local_tier_dir: str | os.PathLike[str] | None = None, run: str | None = None) -> str | None:
    """The local checkpoint folder a framework resumes from: the resume policy over ``dir`` (default
    ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``) then ``load_dir`` (default ``$BT_LOAD_CHECKPOINT_DIR``),
    checksums verified, ``accept`` for the framework's kind of checkpoint; None, or ``NoCheckpointFound``
    per ``on_missing``. Frameworks read local folders, so URL dirs are not searched; a URL load dir with
    nothing found locally is a :class:`ConfigError` naming ``helper`` (e.g. ``"resume_path()"``) unless
    ``on_missing="start_fresh"``. The own dir's node-local tier (``local_tier_dir``, default
    ``/dev/shm/btckpt-<uid>/<job>``; :mod:`btckpt.tiers`) is searched with it when it is there and this job's.
    ``run``: the run identity the framework's run has (:attr:`btckpt.config.CheckpointConfig.run_id`): ``dir``'s
    checkpoints of another run are passed over, and a ``dir`` holding only such ones is refused
    (:class:`ConfigError`, :func:`btckpt.restore.policy.other_run_error`)."""
    roots = [resolve_dir(dir), resolve_load_dir(load_dir)]
    own, load = (None if r is None or is_url(r) else r for r in roots)
    local = resumable_tier(own, local_tier_dir) if own is not None else None
    found = ResumePolicy.for_job(dir=own, load_dir=load, on_missing=on_missing, accept=accept, local=local,
                                 run=run).choose()
    if found is None and roots[1] is not None and is_url(roots[1]) and on_missing == "raise":
        raise ConfigError(f"load_dir {roots[1]!r} is a URL; {helper} reads local folders only (pass the "
                          "downloaded folder, or on_missing='start_fresh')")
    return str(found.path) if found is not None else None


def refuse_fresh_start(dir: str | os.PathLike[str] | None, *,
                       local_tier_dir: str | os.PathLike[str] | None = None) -> None:
    """For a run the user starts fresh (no resume asked for): raise :class:`ConfigError` naming ``dir`` (default
    ``$BT_CHECKPOINT_DIR``, else ``./checkpoints``) and the fixes when it (or its node-local tier) holds complete
    checkpoints, which the new run's saves would collide with (:func:`btckpt.restore.policy.other_run_error`)."""
    own = resolve_dir(dir)
    if is_url(own):
        return
    local = resumable_tier(own, local_tier_dir)
    found = [i for i in ResumePolicy.for_job(dir=own, load_dir=None, local=local).candidates() if i.complete]
    if found:
        raise other_run_error(own, found, fresh=True)


def refuse_other_runs(dir: str | os.PathLike[str] | None, *, run: str | None,
                      local_tier_dir: str | os.PathLike[str] | None = None) -> None:
    """For a run resumed from elsewhere (e.g. a warm start from the load dir): raise :class:`ConfigError` naming
    ``dir`` and the fixes when it holds checkpoints of another run and none of ``run`` (the resume policy's
    rule, :class:`~btckpt.restore.policy.ResumePolicy`)."""
    own = resolve_dir(dir)
    if run is not None and not is_url(own):
        ResumePolicy.for_job(dir=own, load_dir=None, local=resumable_tier(own, local_tier_dir), run=run).candidates()


def open_checkpoint(path: str | os.PathLike[str] | None, *, btckpt_only: bool = False) -> CheckpointInfo | None:
    """The complete checkpoint at ``path`` (a btckpt folder, or a plain HF model folder unless
    ``btckpt_only``); None for no path, or (``btckpt_only``) a folder without ``btckpt.json`` (the
    framework's own format). A damaged one raises :class:`IncompleteCheckpoint` / :class:`CorruptCheckpoint`."""
    if path is None or (btckpt_only and not (Path(path) / MANIFEST).exists()):
        return None
    info = inspect(path)
    if not info.complete:
        cls = CorruptCheckpoint if info.status == "corrupt" else IncompleteCheckpoint
        raise cls(f"cannot resume from {path}: it is {info.status} ({info.reason}); resume from another checkpoint "
                  "(btckpt.hf.resume_checkpoint() / btckpt.lightning.resume_path() pick the newest sound one)")
    return info


# -- reading groups ------------------------------------------------------------------------------------------
def read_groups(info: CheckpointInfo, state: MutableMapping[str, Any], names: Iterable[str], *, rank: int,
                strict: bool = True) -> Callable[[], None]:
    """Read and verify the groups ``names`` of ``info`` for the live objects in ``state``; return the function
    that loads them in place. Plain or sharded on either side (FSDP2 checkpoints load into any world size or
    a plain model, through DCP's planner: every rank calls this). RNG is separate (:func:`restore_rank_rng`)."""
    return read_checkpoint(info, state, list(names), rank=rank, want_rng=False, strict=strict)


def load_groups(info: CheckpointInfo, state: MutableMapping[str, Any], names: Iterable[str], *, rank: int,
                strict: bool = True) -> None:
    """:func:`read_groups`, then load them in place."""
    read_groups(info, state, names, rank=rank, strict=strict)()


def group_values(info: CheckpointInfo, *, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The plain values (tensor dicts, JSON data) of every group of ``info`` but ``exclude``, checksums
    verified (for a framework that takes its checkpoint as a dict)."""
    reader = CheckpointReader(info.path, info.manifest)
    return {g: reader.load_group(g) for g in reader.groups if g not in exclude}


# -- a rank's RNG --------------------------------------------------------------------------------------------
def restore_rank_rng(info: CheckpointInfo, rank: int) -> bool:
    """Set this process's RNGs from ``rank``'s saved state (read and verified first); False when the
    checkpoint holds none for it (:func:`btckpt.restore.rng.read_rank_rng` says why)."""
    rng = read_rank_rng(info.path, info.manifest, rank) if info.manifest is not None else None
    if rng is not None:
        apply_rng(rng)
    return rng is not None


def peer_world() -> World | None:
    """This process's World when it is one of several ranks sharing a c10d store, else None."""
    w = world()
    return w if w.size > 1 and w.store is not None else None


def solo_world() -> World:
    """A World of this process alone (rank 0 of 1, no store): for a Checkpointer one rank drives by itself
    (Lightning's plugin saves on rank 0 only, outside a sharded strategy)."""
    return World()


def _rng_key(key: str, rank: int) -> str:
    return f"rank-rng/{key}/{rank}"


def publish_rank_rng(key: str) -> bool:
    """On every rank of a framework that saves on rank 0 only, while the checkpoint is built: a non-zero rank
    publishes its RNG state under ``key`` (the same on every rank, derived from the checkpoint, e.g. its
    step). False when there are no peers (nothing to gather)."""
    w = peer_world()
    if w is None:
        return False
    if not w.is_leader:
        w.publish(_rng_key(key, w.rank), capture_rng())
    return True


def gather_rank_rng(key: str, *, timeout: float) -> dict[int, dict[str, Any]] | None:
    """On rank 0: every other rank's RNG published under ``key`` (rank -> state); the keys are freed, so the
    same key may be used again by the next save (saves are serialized by the framework's barrier)."""
    w = peer_world()
    if w is None:
        return None
    out: dict[int, dict[str, Any]] = {}
    for r in range(1, w.size):
        out[r] = w.collect(_rng_key(key, r), timeout=timeout)
        try:
            w.store.delete_key(f"btckpt/{_rng_key(key, r)}")
        except (RuntimeError, AttributeError):  # pragma: no cover - a store without delete: the key stays
            pass
    return out


# -- preemption ----------------------------------------------------------------------------------------------
def preemption_due(ckpt: Checkpointer, step: int) -> bool:
    """At a step boundary, on every rank: whether training stops and saves at ``step`` because SIGTERM reached
    some rank (``ckpt``'s handler, ``handle_sigterm``); every rank of ``ckpt``'s world gets the same answer at
    the same step. One store lookup, no collective (``Checkpointer.maybe_save`` uses the same agreement)."""
    return ckpt._preemption.due(step)


_WATCHES = itertools.count()  # every rank creates its watches in the same order: the same key on every rank


class PreemptionWatch(Preemption):
    """SIGTERM handling for a framework whose ranks share no Checkpointer (Lightning saves on rank 0 only):
    created on every rank (main thread) when training starts, it takes SIGTERM over until :meth:`close`, and
    :meth:`due` at each step boundary says, the same on every rank, whether to save and stop at that step
    (the core's :class:`~btckpt.policies.Preemption`, the same store agreement; one process: SIGTERM arrived).
    ``name`` tells the watches of one process apart (e.g. the checkpoint folder), the same on every rank."""

    def __init__(self, name: str) -> None:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a kept store never answers a new attempt
        super().__init__(peer_world() or World(), f"preempt-watch/{digest}/{attempt}/{next(_WATCHES)}",
                         grace=CheckpointConfig.preemption_grace, watched=True)
        self.install()


# -- HF config files -----------------------------------------------------------------------------------------
def files_written_by(write: Callable[[str], Any]) -> dict[str, bytes]:
    """The files ``write(folder)`` creates in an empty temporary folder (relative POSIX name -> bytes), e.g. a
    ``save_pretrained`` of a config, tokenizer or PEFT adapter config."""
    with tempfile.TemporaryDirectory(prefix="btckpt-files-") as tmp:
        write(tmp)
        return {f.relative_to(tmp).as_posix(): f.read_bytes() for f in sorted(Path(tmp).rglob("*")) if f.is_file()}


def model_config_files(model: Any) -> dict[str, bytes]:
    """``config.json``, and ``generation_config.json`` when the model generates, as ``save_pretrained`` writes
    them (empty for a model without a config)."""
    def write(folder: str) -> None:
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(folder)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(folder)

    return files_written_by(write)


# -- run identity --------------------------------------------------------------------------------------------
def run_fingerprint(parts: Mapping[str, Any]) -> str:
    """A run identity (:attr:`btckpt.config.CheckpointConfig.run_id`) from what an integration says makes a run the
    same run (model config, parameter shapes, key training arguments): 16 hex digits of a SHA-256 over their
    canonical JSON (keys sorted; other values by ``repr``)."""
    raw = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def tensor_shapes(module: Any) -> list[list[Any]]:
    """``[name, shape, dtype]`` of each entry of ``module.state_dict()`` that has a shape (global shapes for
    sharded tensors), for :func:`run_fingerprint`."""
    out: list[list[Any]] = []
    for name, value in module.state_dict().items():
        shape = getattr(value, "shape", None)
        if shape is not None:
            out.append([name, list(shape), str(getattr(value, "dtype", ""))])
    return out


# -- sharded state ---------------------------------------------------------------------------------------------
def holds_live_shards(groups: Mapping[str, Any]) -> bool:
    """Whether ``groups`` hold a live model or optimizer with DTensors (FSDP2 / tensor parallel, or an FSDP1
    root): a save every rank takes part in, each writing its own shards
    (:func:`btckpt.distributed.shards.sharded_groups`)."""
    return bool(sharded_groups(groups))


def sharded_group_names(info: CheckpointInfo) -> set[str]:
    """The groups of ``info`` that were saved sharded (per-rank files, loaded in place by :func:`read_groups`
    on every rank), from its manifest."""
    return set((info.manifest.meta.get(META_KEY) or {}) if info.manifest is not None else {})


def zero_save_groups(zs: ZeroState) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """What a save of a DeepSpeed ZeRO engine hands the Checkpointer (every rank): the state groups (``zero``:
    this rank's partition; ``deepspeed``: stage, partition count, counters, loss scaler as JSON), the
    optimizers to gate (the engine's inner one) and the manifest meta (the stage)."""
    groups: dict[str, Any] = {"zero": zs, "deepspeed": plain_data(zs)}
    return groups, [zs.optimizer.optimizer], {ZERO_META: {"stage": zero_stage(zs.optimizer)}}


def load_zero_state(zs: ZeroState, info: CheckpointInfo) -> dict[str, Any]:
    """Fill the live ZeRO engine of ``zs`` from ``info`` (any saving stage or world size; every tensor read and
    checked first: :func:`btckpt.distributed.zero.load_zero`); returns the saved ``deepspeed`` plain data
    (the engine's counters under ``"counters"``)."""
    assert info.manifest is not None
    parts = NodeParts(info.path, info.manifest)
    return load_zero(zs, info.manifest.state, read_tensor(parts, info.manifest.node_rank), where=str(info.path))


# -- loading what a framework reads itself ---------------------------------------------------------------------
def named_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The checkpoint a folder the user named means (Lightning's ``ckpt_path=<folder>``): the folder itself
    when it is a checkpoint (or a plain model folder), else the newest sound one at or under it, checksums
    verified (:meth:`btckpt.restore.policy.ResumePolicy.at`; :class:`btckpt.NoCheckpointFound` when none is)."""
    policy = ResumePolicy.at(path)
    return policy.target() or policy.choose()


def refuse_taken_step(dir: str | os.PathLike[str], info: CheckpointInfo, *, resumed: bool, run: str | None) -> None:
    """For a framework about to save a step whose folder in ``dir`` already holds ``info``, a complete
    checkpoint this process did not write: raise :class:`ConfigError` (naming the dir and the fixes,
    :func:`btckpt.restore.policy.other_run_error`) unless the run resumed and ``info`` may be of its run
    ``run`` (:func:`btckpt.restore.policy.same_run`): then the step is this run's, committed before a restart."""
    if not resumed or not same_run(info, run):  # a fresh fit, or another run's step
        raise other_run_error(dir, [info], fresh=not resumed)


# -- an adapter's own files beside the checkpoints -------------------------------------------------------------
def is_group_name(name: str) -> bool:
    """Whether ``name`` can be a group's name as it is (a framework's dict key kept as its group)."""
    return GROUP_NAME.match(name) is not None


def check_storable(name: str, value: Any) -> None:
    """Raise :class:`btckpt.UnsupportedValue` (naming the entry) when ``value`` cannot be stored as group
    ``name`` (e.g. an object that is neither a tensor nor plain data); None when it can."""
    flatten_group(name, value)
