"""The download cache for ``s3://`` restores (issue 11, items 4 and 10): safe when local ranks share it,
and a damaged cached copy (right size, wrong bytes) is downloaded again instead of falling back forever.

Internals used: btckpt.storage.discovery, btckpt.storage.remote (``fetch`` driven directly, with a rival process
committing during the download or before the rename, and discovery to judge the cache entry (complete, verified),
which no public name reaches).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import btckpt
import pytest
import torch
from test_upload import make_ckpts, s3  # noqa: F401 - fixtures

SCRIPT = Path(__file__).parent / "scripts" / "cache_restore.py"
TRIALS, RANKS, NUMEL = 6, 4, 200_000


def test_local_ranks_share_the_download_cache(s3: str, tmp_path: Path):  # noqa: F811
    """Four real processes restore the same ``s3://`` checkpoint at once through one ``$BTCKPT_CACHE``,
    several trials: every one restores step 4 exactly; one copy is left in the cache, no temp folder."""
    import fsspec

    src = tmp_path / "ck"
    states = make_ckpts(src, [4], numel=NUMEL)
    dest = f"{s3}/run"
    fsspec.filesystem("s3").put(str(src) + "/", f"{dest[5:]}/", recursive=True)
    (tmp_path / "sync").mkdir()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), dest, str(tmp_path / "cache"), str(tmp_path / "sync"),
                               str(r), str(RANKS), str(TRIALS), str(NUMEL)], stdout=subprocess.PIPE, text=True)
             for r in range(RANKS)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    want = float(states[4]["model"]["w"].sum())
    rows = [json.loads(line) for out in outs for line in out.splitlines()]
    assert len(rows) == RANKS * TRIALS, outs
    assert [r for r in rows if r[1:] != [4, want, ""]] == []
    for trial in range(TRIALS):
        entries = list((tmp_path / "cache" / str(trial)).glob("*/*"))
        assert [e.name for e in entries if not e.name.endswith(".lock")] == ["checkpoint-4"]


def test_a_damaged_cached_copy_is_downloaded_again(s3: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):  # noqa: F811
    src = tmp_path / "ck"
    states = make_ckpts(src, [1, 2])
    dest = f"{s3}/run"
    import fsspec

    fsspec.filesystem("s3").put(str(src) + "/", f"{dest[5:]}/", recursive=True)

    def restore() -> tuple[int | None, dict]:
        state = {"model": {"w": torch.zeros(1000), "b": torch.zeros(7, dtype=torch.int64)}, "extra": {}}
        return btckpt.load(dest, state), state

    step, state = restore()
    assert step == 2 and torch.equal(state["model"]["w"], states[2]["model"]["w"])
    cached = list(Path(os.environ["BTCKPT_CACHE"]).glob("*/checkpoint-2/model.safetensors"))
    assert len(cached) == 1
    data = bytearray(cached[0].read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte (bit rot, a torn write)
    cached[0].write_bytes(bytes(data))
    for _ in range(2):  # and again: never a permanent fall back to checkpoint-1
        step, state = restore()
        assert step == 2 and torch.equal(state["model"]["w"], states[2]["model"]["w"])
    assert "downloading it again" in caplog.text
    assert cached[0].read_bytes() != bytes(data)


def _remote_step(s3: str, tmp_path: Path, step: int = 3):  # noqa: F811
    """One checkpoint put in the bucket; its remote CheckpointInfo."""
    import fsspec
    from btckpt.storage.discovery import scan

    src = tmp_path / "ck"
    make_ckpts(src, [step])
    fsspec.filesystem("s3").put(str(src) + "/", f"{s3[5:]}/run/", recursive=True)
    (info,) = [i for i in scan(f"{s3}/run") if i.complete]
    return info


def _no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    from btckpt.storage import remote

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(remote.fcntl, "flock", no_flock)


def _entries(cache: Path) -> list[str]:
    return sorted(e.name for e in cache.glob("*/*") if not e.name.endswith(".lock"))


@pytest.mark.parametrize("when", ["during the download", "just before the rename"])
def test_without_flock_two_fetches_at_once_both_end_with_a_verified_copy(
        s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str):  # noqa: F811
    """No working lock (some NFS): the other process commits the same entry while this one downloads, or between
    this one's last check and its rename. Both end with a verified copy, one entry, no temp folder."""
    from btckpt.storage import remote
    from btckpt.storage.discovery import verify
    from btckpt.testing import faults

    info, cache = _remote_step(s3, tmp_path), tmp_path / "c"
    _no_flock(monkeypatch)
    other: list = []

    def race() -> None:
        if not other:
            other.append(None)  # once: the other process's fetch runs to its end right here
            other[0] = remote.fetch(info, cache=cache)

    if when == "during the download":
        real = remote._download
        monkeypatch.setattr(remote, "_download", lambda *a, **k: (real(*a, **k), race()))
    else:
        real_point = faults.point
        monkeypatch.setattr(faults, "point", lambda phase: (race() if phase == "before_rename" else None,
                                                            real_point(phase)))
    mine = remote.fetch(info, cache=cache)
    assert other and other[0] is not None and other[0].path == mine.path
    for got in (mine, other[0]):
        again = remote.inspect(got.path)
        assert again.complete and verify(again) == []
    assert _entries(cache) == ["checkpoint-3"]


def test_a_failed_download_leaves_no_cache_entry(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """A download that fails after some files landed (a crash in the middle) leaves no entry and no temp folder;
    the next fetch downloads it whole."""
    from btckpt.storage import remote
    from btckpt.storage.discovery import verify

    info, cache = _remote_step(s3, tmp_path), tmp_path / "c"
    real = remote._download

    def half(fs, src, dst, files, *, where):
        first = dict(list(files.items())[:1])
        real(fs, src, dst, first, where=where)
        raise ConnectionError("the link went down")

    monkeypatch.setattr(remote, "_download", half)
    with pytest.raises(ConnectionError):
        remote.fetch(info, cache=cache)
    assert _entries(cache) == [] and not [e for e in cache.glob("*/.*") if not e.name.endswith(".lock")]
    monkeypatch.setattr(remote, "_download", real)
    got = remote.fetch(info, cache=cache)
    assert got.complete and verify(got) == [] and _entries(cache) == ["checkpoint-3"]
