"""The record of checkpoints that the job's own retention deleted: ``<dir>/.btckpt-upload/retired.jsonl``.

Remote deletion (the uploader's ``--mirror-retention``) acts only on positive knowledge: this uploader
published the folder (its journal) *and* the job's retention retired that very checkpoint (this record,
matched by the manifest's hash). A folder that is merely missing locally (a cleaned cache, a scan that
changed shape, a ``--keep-local`` offload, a person's ``rm``) is never taken as retired.

One JSON object a line: ``{"name": "checkpoint-3", "manifest": "<xxh3-64 of btckpt.json>"}``. Written by
:func:`btckpt.saving.commit.delete_checkpoint` before the folder is renamed away, only in a dir that an uploader
works on (it has ``.btckpt-upload/``: a checkpoint retired before any uploader started was never published
by one); read by the uploader.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..format.checksum import new_hasher
from ..format.manifest import MANIFEST
from ..storage.local import open_nofollow, read_nofollow, unsafe_dir

__all__ = ["UPLOAD_DIR", "RETIRED", "manifest_hash", "record_retired", "read_retired"]

UPLOAD_DIR = ".btckpt-upload"  # the uploader's state inside SRC (journals, this record)
RETIRED = "retired.jsonl"
log = logging.getLogger("btckpt")


def manifest_hash(raw: bytes) -> str:
    """The identity of one committed checkpoint: xxh3-64 of its manifest's bytes."""
    h = new_hasher()
    h.update(raw)
    return str(h.hexdigest())


def record_retired(folder: Path) -> None:
    """Note that retention is about to delete ``folder`` (a committed checkpoint). Never raises: without
    the record the remote copy is simply kept (the safe side)."""
    state = folder.parent / UPLOAD_DIR
    if not state.is_dir():
        return  # no uploader works on this dir
    problem = unsafe_dir(state, private=False)
    if problem is not None:
        log.warning("btckpt: not recording the retirement of %s: %s (its uploaded copy, if any, is kept)", folder,
                    problem)
        return
    try:
        raw = (folder / MANIFEST).read_bytes()
        line = json.dumps({"name": folder.name, "manifest": manifest_hash(raw)}) + "\n"
        fd = open_nofollow(state / RETIRED, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode=0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("btckpt: could not record the retirement of %s (%s); its uploaded copy, if any, is kept",
                    folder, exc)


def read_retired(root: Path) -> dict[str, set[str]]:
    """Folder name -> manifest hashes that the job's retention retired under ``root`` (empty if none)."""
    out: dict[str, set[str]] = {}
    try:
        lines = read_nofollow(root / UPLOAD_DIR / RETIRED).decode(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
            out.setdefault(str(r["name"]), set()).add(str(r["manifest"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    return out
