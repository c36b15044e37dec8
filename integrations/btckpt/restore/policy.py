"""The resume policy: which checkpoint a (re)started job or a named folder resumes from, written once.

Every entry point asks a :class:`ResumePolicy`: the Checkpointer (:mod:`btckpt.restore.resume`), the one-shot
``btckpt.load``, HF's ``resume_checkpoint``, Lightning's ``resume_path`` and its load of a folder, and the
CLI (``btckpt show``/``verify``). The policy says

- *in which dir*: a job's own dir (the ``checkpoint-<N>`` folders directly in it, ``$BT_CHECKPOINT_DIR``
  by default; with ``dir=URL`` also the published ones; and its node-local tier, :mod:`btckpt.tiers`: the
  newest step of either wins, the tier's copy first on a tie), then its load dir (``$BT_LOAD_CHECKPOINT_DIR`` by
  default; any layout, nested ``<job>/rank-<node>/checkpoint-<N>/`` included) -- or, for a folder a user
  names, that folder in every layout (:meth:`ResumePolicy.at`), the folder itself when it is a checkpoint;
- *which checkpoint*: the newest complete one, in that order, that the caller's ``accept`` takes;
- *verified how*: checksums (:meth:`~ResumePolicy.choose`, for callers that hand a path on), or a full,
  verified read into the state (:func:`btckpt.restore.resume.restore_from`); a damaged candidate is skipped with a
  warning naming the file (:func:`btckpt.storage.discovery.select`);
- *what if none*: ``on_missing`` -- ``"raise"`` (:class:`NoCheckpointFound` when a load dir was set, or a
  named folder holds nothing) or ``"start_fresh"`` (None);
- *whose*: with a ``run`` identity (``btckpt.run`` in the manifest, :attr:`btckpt.format.manifest.Manifest.run`),
  the own dir's checkpoints of another run are never candidates, and an own dir holding only such ones is
  refused (:class:`ConfigError` naming the dir and the fixes: :func:`other_run_error`), since this run's saves
  would land beside them under the same step names; a load dir's checkpoint is a deliberate warm start and is
  taken whatever its identity. Checkpoints without one (older btckpt) count as any run's.

Torch-free (the CLI imports it). The mechanism is :mod:`btckpt.storage.discovery`'s (``scan``, ``select``,
``verified``, ``nothing_to_resume``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NoCheckpointFound
from ..storage.discovery import (
    CheckpointInfo,
    nothing_to_resume,
    resume_candidates,
    same_run,
    scan,
    select,
    unreadable,
    verified,
)
from ..storage.local import is_url, local_path, remote_fs

__all__ = ["ResumePolicy", "latest", "same_run", "other_run_error"]


@dataclass(frozen=True)
class ResumePolicy:
    """Which checkpoint to resume from (module doc). Build one with :meth:`for_job` or :meth:`at`.

    ``dir``: the own dir (its direct ``checkpoint-<N>`` folders; None: none). ``load_dir``: a previous
    job's folder, or the folder a user named (any layout). ``remote``: the own dir's published copy
    (a URL; its checkpoints not present locally count as own). ``accept``: complete candidates it returns
    False for are passed over. ``named``: ``load_dir`` was named by the user (:meth:`at`): a checkpoint
    itself is that checkpoint, and an empty folder raises whatever ``on_missing`` says. ``local``: the own
    node-local tier folder (:func:`btckpt.tiers.resumable_tier`), searched with the own dir. ``run``: this
    run's identity (module doc, "whose"; None: every own checkpoint counts as this run's).
    """

    dir: str | None = None
    load_dir: str | None = None
    on_missing: str = "raise"
    accept: Callable[[CheckpointInfo], bool] | None = None
    remote: str | None = None
    rank: int | None = None
    named: bool = False
    local: str | None = None
    run: str | None = None

    @classmethod
    def for_job(cls, *, dir: str | os.PathLike[str] | None, load_dir: str | os.PathLike[str] | None,
                on_missing: str = "raise", accept: Callable[[CheckpointInfo], bool] | None = None,
                remote: str | None = None, local: str | os.PathLike[str] | None = None,
                run: str | None = None) -> ResumePolicy:
        """A (re)started job's policy: its own ``dir`` first, then ``load_dir`` (both as given; see
        :func:`btckpt.config.resolve_dir` / :func:`~btckpt.config.resolve_load_dir` for the env defaults);
        ``run``: this run's identity (class doc)."""
        return cls(dir=os.fspath(dir) if dir is not None else None,
                   load_dir=os.fspath(load_dir) if load_dir else None,
                   on_missing=on_missing, accept=accept, remote=remote,
                   local=os.fspath(local) if local is not None else None, run=run)

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> ResumePolicy:
        """The policy for a folder a user names (``btckpt.load(path)``, ``btckpt show path``, Lightning's
        ``ckpt_path=<folder>``): that checkpoint, else the newest sound one at or under it (any layout)."""
        return cls(load_dir=os.fspath(path), named=True)

    # -- candidates -------------------------------------------------------------------------------------
    def target(self) -> CheckpointInfo | None:
        """For :meth:`at`: the named folder when it is a checkpoint itself (no fallback then), else None."""
        if not self.named or self.load_dir is None:
            return None
        infos = self.candidates()
        here = remote_fs(self.load_dir)[1] if is_url(self.load_dir) else str(local_path(self.load_dir))
        if len(infos) == 1 and str(infos[0].path).rstrip("/") == here.rstrip("/"):
            return infos[0]
        return None

    def candidates(self) -> list[CheckpointInfo]:
        """Every candidate in order of preference, damaged ones included (skipping names each one): the steps of
        the own dir (the tier's, the dir's, the published ones) newest first, then the load dir's; each step's
        copies together, fastest first (the tier's, the dir's, the load dir's, the published one: downloaded
        into the cache), so a damaged copy falls back to the next copy of its step before any older step."""
        sources = [scan(self.local, rank=self.rank, own=True) if self.local is not None else [],
                   resume_candidates(self.dir, None, rank=self.rank) if self.dir is not None else [],
                   resume_candidates(None, self.load_dir, rank=self.rank) if self.load_dir else [],
                   scan(self.remote, rank=self.rank, own=True) if self.remote is not None else []]
        mine = {id(i) for i in self._this_run([*sources[0], *sources[1], *sources[3]])}  # this run's own copies
        sources = [[i for i in src if n == 2 or id(i) in mine] for n, src in enumerate(sources)]
        own = sorted({i.step for src in (sources[0], sources[1], sources[3]) for i in src}, reverse=True)
        steps = own + [s for s in dict.fromkeys(i.step for i in sources[2]) if s not in own]
        rank = {s: n for n, s in enumerate(steps)}
        found = sorted(((rank[i.step], n, k, i) for n, src in enumerate(sources) for k, i in enumerate(src)),
                       key=lambda t: t[:3])
        return [i for *_, i in found if self.accept is None or not i.complete or self.accept(i)]

    def _this_run(self, own: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """The own checkpoints of this run (module doc, "whose"); raises :func:`other_run_error` when the own
        ones are all another run's."""
        if self.run is None:
            return own
        mine = [i for i in own if same_run(i, self.run)]
        if not any(i.complete for i in mine):
            others = [i for i in own if i.complete and not same_run(i, self.run)]
            if others:
                raise other_run_error(self.dir or self.local or "", others)
        return mine

    # -- choosing -----------------------------------------------------------------------------------------
    def select(self, attempt: Callable[[CheckpointInfo], Any] = verified,
               candidates: list[CheckpointInfo] | None = None) -> tuple[CheckpointInfo, Any] | None:
        """The first candidate (default :meth:`candidates`) that is complete and passes ``attempt``
        (default: checksums), with what ``attempt`` returned; None when there is none (nothing raised). A
        candidate retired while it was read (a running job's retention) makes it list the candidates again."""
        return select(self.candidates() if candidates is None else candidates, attempt, rescan=self.candidates)

    def choose(self) -> CheckpointInfo | None:
        """The checkpoint to resume from, checksums verified (for callers that hand a path on); None or
        :class:`NoCheckpointFound` per :meth:`missing` when there is none."""
        found = self.select()
        if found is None:
            self.missing()
            return None
        return found[0]

    def missing(self) -> None:
        """What happens when nothing was chosen: raises :class:`NoCheckpointFound` when a resume was asked
        for (a load dir set, or a folder named) and ``on_missing`` is ``"raise"``; returns otherwise."""
        if not self.named:
            nothing_to_resume(self.dir, self.load_dir, self.on_missing)
            return
        if self.on_missing == "raise":
            where = self.load_dir
            if where is not None and not is_url(where) and not local_path(where).exists():
                raise NoCheckpointFound(f"{local_path(where)} does not exist")
            why = None if where is None or is_url(where) else unreadable(local_path(where))
            if why:
                raise NoCheckpointFound(f"{where} cannot be read ({why}); give this process (uid {os.geteuid()}) "
                                        "read access to it")
            raise NoCheckpointFound(f"no complete, verified checkpoint at or under {where} (damaged ones are named "
                                    "in the warnings above)")


def other_run_error(dir: str | os.PathLike[str], others: list[CheckpointInfo], *, fresh: bool = False) -> ConfigError:
    """The refusal of a run that would write into ``dir`` beside ``others``, another run's checkpoints (or,
    ``fresh``: any earlier checkpoints, the run being started fresh): names the dir and the two fixes."""
    names = ", ".join(i.path.name for i in sorted(others, key=lambda i: i.step, reverse=True)[:3])
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    why = ("this run starts fresh (no resume asked for), and its saves would take the same checkpoint-<step> "
           "names" if fresh else "their run identity (btckpt.run in btckpt.json: the model's config and shapes "
           "and the key training arguments) differs from this run's, so they are not resumed")
    return ConfigError(
        f"{os.fspath(dir)} holds checkpoints of an earlier run ({names}{more}): {why}. btckpt never resumes, "
        "overwrites or skips another run's checkpoints. Either give this run a checkpoint dir of its own "
        "(HF: TrainingArguments(output_dir=...) or CheckpointCallback(dir=...); Lightning: Trainer("
        "default_root_dir=...) or ModelCheckpoint(dirpath=...); Checkpointer(dir=...)), or move the earlier "
        f"run's checkpoint-<N> folders out of {os.fspath(dir)} (or delete them)"
        + (", or resume it instead" if fresh else "; to continue that run on purpose with the changed settings, "
           "resume one of its checkpoints by path (HF: train(resume_from_checkpoint=...); Lightning: "
           "fit(ckpt_path=...))"))


def latest(path: str | os.PathLike[str], *, rank: int | None = None) -> Path | str | None:
    """``btckpt.latest``: the checkpoint the resume policy picks at or under ``path`` (any supported layout),
    the newest complete and verified one, or None (never raises for "nothing there").

    Damaged ones are skipped with a warning; checksums are checked, so this reads the files of the
    checkpoints it tries. For an fsspec URL the answer is the checkpoint's URL (a ``str``).
    """
    found = ResumePolicy(load_dir=os.fspath(path), rank=rank).select()
    if found is None:
        return None
    info = found[0]
    return info.path if info.store.local else info.where
