"""The download cache for ``s3://`` restores (issue 11, items 4 and 10): safe when local ranks share it,
and a damaged cached copy (right size, wrong bytes) is downloaded again instead of falling back forever."""

from __future__ import annotations

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
