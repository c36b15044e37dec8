"""``install(seconds)``: btckpt's writer sleeps that long before each commit's manifest (a slowed writer, so a
test's kill lands while a save is still being written, after the call that started it returned)."""

from __future__ import annotations

import time


def install(seconds: float) -> None:
    from btckpt.testing import faults

    point = faults.point

    def slow_point(phase: str) -> None:
        if phase == "before_manifest":
            time.sleep(seconds)
        point(phase)

    faults.point = slow_point  # type: ignore[assignment]
