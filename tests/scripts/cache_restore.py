"""One local rank restoring from a URL, several trials, all ranks starting each trial together.

``python cache_restore.py URL CACHE_BASE SYNC_DIR RANK RANKS TRIALS NUMEL``: for each trial the ranks meet at a
file barrier in SYNC_DIR, then ``btckpt.load(URL)`` with ``$BTCKPT_CACHE=CACHE_BASE/<trial>`` (shared by all
ranks). Prints one JSON line per trial: ``[trial, step, sum of model.w, error]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import btckpt
import torch
from rank_output import say


def main() -> None:
    url, cache_base, sync = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rank, ranks, trials, numel = (int(x) for x in sys.argv[4:8])
    for trial in range(trials):
        os.environ["BTCKPT_CACHE"] = str(cache_base / str(trial))
        state = {"model": {"w": torch.zeros(numel), "b": torch.zeros(7, dtype=torch.int64)}, "extra": {}}
        (sync / f"{trial}-{rank}").touch()
        while len(list(sync.glob(f"{trial}-*"))) < ranks:  # a barrier: everyone starts the trial at once
            time.sleep(0.001)
        try:
            step = btckpt.load(url, state, strict=False)
            say(json.dumps([trial, step, float(state["model"]["w"].sum()), ""]))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            say(json.dumps([trial, None, 0.0, f"{type(exc).__name__}: {exc}"]))


if __name__ == "__main__":
    main()
