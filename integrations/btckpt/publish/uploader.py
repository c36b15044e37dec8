"""``btckpt upload SRC URL``: mirror committed checkpoints to any fsspec URL, as a separate process.

Torch-free, so it starts fast and never competes with training for the GPU. Rules:

- only committed folders (a complete manifest); temp folders are never looked at;
- data files first, the manifest last: on an object store the manifest's presence is the commit, so a
  reader never sees a half-uploaded checkpoint as complete;
- resumable: a journal (``SRC/.btckpt-upload/<dest-hash>.jsonl``) records every verified file; after a
  kill, a restart skips remote files whose size matches and whose checksum matches (journal, or the S3
  ETag computed locally, or a read-back where neither is available) and uploads the rest;
- verified: the local file is hashed against the manifest before upload (a corrupt local file is never
  uploaded) and the remote object is checked after (S3: ETag = MD5 / multipart MD5; others: read back);
- retries with exponential backoff and jitter, bounded concurrency (``--concurrency`` files at once);
- scope: the ``checkpoint-<N>`` folders directly under SRC (or SRC itself when it is one checkpoint);
  one uploader per SRC (``SRC/.btckpt-upload.lock``);
- the bucket, not the journal, is the truth: every pass lists the destination, and a checkpoint whose
  remote files are missing or differ is uploaded again;
- ``--keep-local K``: delete local checkpoints beyond the newest K only after the remote copy was
  verified in this pass (manifest bytes, every file's size and ETag / read-back checksum);
- ``--mirror-retention``: delete a remote checkpoint only on positive knowledge: this uploader published
  it (journal), the training job's retention retired that very checkpoint (``SRC/.btckpt-upload/retired.jsonl``),
  and the remote manifest is still the one published; never because a folder is missing or a listing
  came back empty, changed shape or failed.

The URL may be given as ``env:NAME`` (read from the environment variable NAME) to keep credentials
off the command line; URLs are shown with credentials redacted.

``--watch`` keeps going until SIGTERM/SIGINT, then makes one final pass and exits (status 1 when that
pass left something not uploaded). ``Checkpointer(upload_to=URL)`` runs this module for you.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..format.manifest import MANIFEST
from ..saving.commit import delete_checkpoint
from ..saving.destination import Remote, listing_detail
from ..saving.retired import UPLOAD_DIR, manifest_hash, read_retired
from ..storage.discovery import STEP_DIR, CheckpointInfo, inspect
from ..storage.local import local_path
from ..storage.remote import join
from .journal import Journal, SourceLock, s3_etag
from .remote_copy import LocalProblem, RemoteCopy
from .supervisor import URL_ENV, UploadSupervisor

__all__ = ["Uploader", "UploadSupervisor", "PassResult", "add_arguments", "run_from_args", "main", "s3_etag", "URL_ENV"]

log = logging.getLogger("btckpt.upload")


@dataclass
class PassResult:
    """What one pass did (remote paths of checkpoints)."""

    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    bytes_sent: int = 0


class Uploader:
    """Mirrors committed checkpoints under ``src`` to ``dest`` (see the module docstring).

    Holds ``SRC/.btckpt-upload.lock`` while a pass runs (or, after :meth:`lock`, until :meth:`close`).
    """

    def __init__(self, src: str | os.PathLike[str], dest: str, *, concurrency: int = 4, retries: int = 5,
                 backoff: float = 0.5, keep_local: int | None = None, mirror_retention: bool = False,
                 part_size: int = 64 << 20, progress: bool = False) -> None:
        self.src = local_path(src)
        if not self.src.is_dir():
            raise ConfigError(f"upload source {self.src} is not a folder; give the checkpoint dir "
                              "(e.g. $BT_CHECKPOINT_DIR)")
        self.dest = dest.rstrip("/")
        self.remote = Remote(self.dest)  # the commit mechanics (manifest last); this class verifies and retries
        self.fs, self.root, self.s3 = self.remote.fs, self.remote.root, self.remote.s3
        self.concurrency, self.retries, self.backoff = max(1, concurrency), max(0, retries), backoff
        self.keep_local, self.mirror_retention = keep_local, mirror_retention
        self.part_size = max(part_size, 5 << 20) if self.s3 else part_size
        key = hashlib.sha1(self.dest.encode()).hexdigest()[:12]
        self._lock = SourceLock(self.src)
        self._held = False
        self.journal = Journal(self.src / UPLOAD_DIR / f"{key}.jsonl")
        self.progress: Any = None
        if progress:
            # rich.progress only for the progress bar (a terminal): the uploader process starts without it
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self.progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), transient=True)
        self.copy = RemoteCopy(self.remote, self.journal, retries=self.retries, backoff=self.backoff,
                               part_size=self.part_size, progress=self.progress)  # verified, journaled, retried

    # -- the one-uploader-per-source lock ----------------------------------------------------------------
    def lock(self, *, wait: bool = False) -> None:
        """Hold the source lock until :meth:`close` (raises :class:`CheckpointError` if another holds it)."""
        self._lock.acquire(wait=wait)
        self._held = True

    def close(self) -> None:
        """Release the source lock."""
        self._held = False
        self._lock.release()

    def __enter__(self) -> Uploader:
        self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one pass ----------------------------------------------------------------------------------------
    def _local(self) -> list[CheckpointInfo]:
        """This source's committed checkpoints, oldest first: the ``checkpoint-<N>`` folders directly under
        SRC (links not followed), or SRC itself when it is one checkpoint. Nothing else is in scope."""
        kids = [c for c in self.src.iterdir() if STEP_DIR.match(c.name) and c.is_dir() and not c.is_symlink()]
        if not kids and (self.src / MANIFEST).is_file():
            kids = [self.src]
        infos = (inspect(c) for c in kids)
        return sorted((i for i in infos if i.complete and i.kind == "btckpt"), key=lambda i: i.step)

    def _remote_dir(self, info: CheckpointInfo) -> str:
        return join(self.root, info.path.name)

    def run_pass(self) -> PassResult:
        """Upload everything committed and not verifiably there (oldest first), then apply keep-local and
        mirror retention. A pass that cannot see SRC or list the destination uploads and deletes nothing."""
        res = PassResult()
        if not self.src.is_dir():
            log.error("upload source %s is gone; nothing uploaded or deleted", self.src)
            res.failed.append(str(self.src))
            return res
        if not self._held:
            self._lock.acquire()
        try:
            if hasattr(self.fs, "invalidate_cache"):
                self.fs.invalidate_cache()
            try:
                local = self._local()
            except OSError as exc:  # SRC vanished or became unreadable mid-pass
                log.error("cannot read the upload source %s (%s); nothing uploaded or deleted", self.src, exc)
                res.failed.append(str(self.src))
                return res
            try:
                listing = self.remote.listing()
            except Exception as exc:  # noqa: BLE001 - logged; the next pass tries again
                log.error("cannot list %s: %s; nothing uploaded or deleted in this pass", self.dest, exc)
                res.failed.extend([self._remote_dir(i) for i in local] or [self.dest])
                return res
            self._upload_all(local, listing, res)
            verified = set(res.uploaded) | set(res.skipped)
            if self.keep_local is not None:
                self._offload(res, verified)
            if self.mirror_retention:
                self._mirror(res, listing)
            return res
        finally:
            if not self._held:
                self._lock.release()

    def _upload_all(self, local: list[CheckpointInfo], listing: dict[str, dict[str, Any]], res: PassResult) -> None:
        if self.progress is not None:
            self.progress.start()
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="btckpt-upload") as pool:
                for info in local:
                    rdir = self._remote_dir(info)
                    prefix = info.path.name + "/"
                    here = {n[len(prefix):]: v for n, v in listing.items() if n.startswith(prefix)}
                    try:
                        status = self._upload_checkpoint(info, rdir, here, pool, res)
                    except LocalProblem as exc:
                        log.warning("not uploading %s: %s", info.path, exc)
                        res.failed.append(rdir)
                        self.copy.drop_partial(rdir)
                        continue
                    except Exception as exc:  # noqa: BLE001 - logged; retried at the next pass
                        log.error("upload of %s to %s failed: %s", info.path, rdir, exc)
                        res.failed.append(rdir)
                        continue
                    (res.uploaded if status == "uploaded" else res.skipped).append(rdir)
        finally:
            if self.progress is not None:
                self.progress.stop()

    def _upload_checkpoint(self, info: CheckpointInfo, rdir: str, listing: dict[str, dict[str, Any]],
                           pool: ThreadPoolExecutor, res: PassResult) -> str:
        assert info.manifest is not None
        try:
            man_bytes = (info.path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise LocalProblem("the checkpoint was deleted locally (retention) before it was uploaded") from None
        mhash = manifest_hash(man_bytes)
        if self.copy.journal_says_there(info, rdir, mhash, len(man_bytes), listing):
            return "skipped"
        part = self.remote.part(info.step, name=info.path.name, listing=listing, expect=man_bytes, supersede=True)
        self.remote.begin(part)  # a killed uploader's temp manifest goes; a different checkpoint there is un-committed
        task = None
        total = sum(int(e["size"]) for e in info.manifest.files.values())
        if self.progress is not None:
            task = self.progress.add_task(info.path.name, total=total)
        names = sorted(info.manifest.files, key=lambda n: info.manifest.files[n]["size"])  # type: ignore[union-attr]
        futs = [pool.submit(self.copy.upload_file, part, info.path / n, join(rdir, n), info.manifest.files[n],
                            listing.get(n), task) for n in names]
        errors = []
        sent = 0
        local_problem: LocalProblem | None = None
        for n, f in zip(names, futs, strict=True):  # wait for all before acting: no upload left running
            try:
                sent += f.result()
            except LocalProblem as exc:
                local_problem = local_problem or exc
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{n}: {exc}")
        res.bytes_sent += sent
        if local_problem is not None:
            raise local_problem
        if errors:
            raise RuntimeError("; ".join(errors))
        if part.present:  # identical manifest already there
            self.journal.add(t="ckpt", remote=rdir, manifest=mhash)
            return "uploaded" if sent else "skipped"
        self.copy.retry(lambda: self.remote.commit(part, man_bytes), f"{rdir}/{MANIFEST}")
        self.journal.add(t="ckpt", remote=rdir, manifest=mhash)
        log.info("uploaded %s -> %s (%d files, %d bytes)", info.path, rdir, len(names), total)
        return "uploaded"

    # -- retention ----------------------------------------------------------------------------------------
    def _offload(self, res: PassResult, verified: set[str]) -> None:
        """``--keep-local K``: delete local checkpoints beyond the newest K whose remote copy checks out."""
        keep = max(0, self.keep_local or 0)
        for info in list(reversed(self._local()))[keep:]:  # newest first
            rdir = self._remote_dir(info)
            if rdir not in verified:
                continue  # not uploaded in this pass: never delete it
            try:
                problem = self.copy.copy_problem(info, rdir)
            except LocalProblem as exc:
                log.warning("keeping %s: %s", info.path, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the remote cannot be checked: keep the local copy
                log.warning("keeping %s: cannot verify its remote copy at %s: %s", info.path, rdir, exc)
                continue
            if problem is not None:
                self.journal.add(t="stale", remote=rdir)  # the next pass checks every file again
                log.warning("keeping %s: %s (it is uploaded again at the next pass)", info.path, problem)
                continue
            self.journal.add(t="offloaded", remote=rdir)
            try:
                delete_checkpoint(info.path, retired=False)  # an offload, not the job's retention
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not delete %s after upload: %s", info.path, exc)
                continue
            log.info("deleted local %s (remote copy at %s verified; --keep-local %d)", info.path, rdir, keep)
            res.deleted_local.append(str(info.path))

    def _mirror(self, res: PassResult, listing: dict[str, dict[str, Any]]) -> None:
        """``--mirror-retention``: delete a remote checkpoint only when this uploader published it (journal),
        the job's retention retired that very checkpoint (``.btckpt-upload/retired.jsonl``, same manifest hash),
        it is gone locally, and the remote manifest is still the one published."""
        retired = read_retired(self.src)
        for rdir, mhash in list(self.journal.ckpts.items()):
            name = rdir.rsplit("/", 1)[-1]
            if (rdir != join(self.root, name) or rdir in self.journal.offloaded
                    or mhash not in retired.get(name, ()) or os.path.lexists(self.src / name)):
                continue
            if f"{name}/{MANIFEST}" not in listing:
                continue  # not there (or not visible now): nothing to delete on positive knowledge
            try:
                if manifest_hash(self.fs.cat_file(join(rdir, MANIFEST))) != mhash:
                    log.warning("mirror retention: %s now holds a checkpoint this uploader did not publish; "
                                "leaving it", rdir)
                    continue
                published = [p[len(rdir) + 1:] for p in self.journal.files if p.startswith(rdir + "/")]
                # un-commit first (manifest), then only the files it published that are listed there
                self.remote.remove(name, files=[r for r in published if f"{name}/{r}" in listing])
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001
                log.warning("mirror retention could not delete %s: %s", rdir, exc)
                continue
            self.journal.add(t="gone", remote=rdir)
            log.info("mirror retention deleted %s (retired by the job's retention)", rdir)
            res.deleted_remote.append(rdir)

    # -- watch -------------------------------------------------------------------------------------------
    def watch(self, stop: threading.Event, *, poll: float = 1.0, wake: threading.Event | None = None) -> PassResult:
        """Pass after pass until ``stop`` is set; then one final pass. Returns that final pass.

        ``wake`` (set when the supervising Checkpointer reports a commit) starts a pass at once.
        """
        wake = wake or stop
        while not stop.is_set():
            self.run_pass()
            wake.wait(poll)
            if wake is not stop:
                wake.clear()
        log.info("stopping: final pass")
        return self.run_pass()


_listing_detail = listing_detail  # the name it had here


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The upload options (shared by ``btckpt upload`` and ``python -m btckpt.upload``)."""
    p.add_argument("src", metavar="SRC", help="local checkpoint folder (e.g. $BT_CHECKPOINT_DIR)")
    p.add_argument("dest", metavar="URL", help="destination fsspec URL, e.g. s3://bucket/run; env:NAME reads it "
                   "from the environment variable NAME (keeps credentials off the command line)")
    p.add_argument("--watch", action="store_true", help="keep uploading new checkpoints until SIGTERM/SIGINT")
    p.add_argument("--keep-local", type=int, default=None, metavar="K",
                   help="after a verified upload, delete local checkpoints beyond the newest K")
    p.add_argument("--mirror-retention", action="store_true",
                   help="delete remote checkpoints whose local folder the training job's retention removed")
    p.add_argument("--concurrency", type=int, default=4, help="files uploaded at once (default 4)")
    p.add_argument("--retries", type=int, default=5, help="retries per file on transient errors (default 5)")
    p.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds, doubled each time")
    p.add_argument("--part-size", type=int, default=64 << 20, help="multipart part size in bytes (S3: >= 5 MiB)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between passes with --watch")
    p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)  # stdin: line = pass, EOF = stop
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress bar (auto: tty)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run an upload from parsed arguments; the exit status (1 when something was left not uploaded)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s btckpt-upload[%(process)d] %(levelname)s %(message)s")
    progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        up = Uploader(args.src, _dest_of(args.dest), concurrency=args.concurrency, retries=args.retries,
                      backoff=args.backoff, keep_local=args.keep_local, mirror_retention=args.mirror_retention,
                      part_size=args.part_size, progress=progress)
        up.lock(wait=args.supervised)  # one uploader per source, for this process's whole life
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    try:
        return _run(up, args)
    finally:
        up.close()


def _dest_of(dest: str) -> str:
    if not dest.startswith("env:"):
        return dest
    value = os.environ.get(dest[4:])
    if not value:
        raise ConfigError(f"upload URL {dest}: the environment variable {dest[4:]} is not set")
    return value


def _run(up: Uploader, args: argparse.Namespace) -> int:
    if not args.watch:
        res = up.run_pass()
    else:
        stop, wake = threading.Event(), threading.Event()

        def on_stop(*_: Any) -> None:
            stop.set()
            wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        if args.supervised:
            def read_stdin() -> None:
                for _ in sys.stdin.buffer:
                    wake.set()
                on_stop()

            threading.Thread(target=read_stdin, name="btckpt-upload-stdin", daemon=True).start()
        res = up.watch(stop, poll=args.poll, wake=wake)
    log.info("done: %d uploaded, %d already there, %d failed, %d local deleted, %d remote deleted",
             len(res.uploaded), len(res.skipped), len(res.failed), len(res.deleted_local), len(res.deleted_remote))
    return 1 if res.failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m btckpt.upload SRC URL [--watch] ...``"""
    p = argparse.ArgumentParser(prog="btckpt upload", description=__doc__.split("\n")[0] if __doc__ else None)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
