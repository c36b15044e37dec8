"""Crash consistency: a real training script (tests/scripts/crash_train.py) is SIGKILLed at random
instants and at every injected phase of the save (BTCKPT_FAULT=<phase>:kill), for each save path.
After every kill the run restarts; the harness asserts that no incomplete checkpoint is ever listed or
loaded, that the run resumes from the newest complete checkpoint, that the older ones verify byte for
byte, that no temp folder survives the restart, and that the final state is bit-identical to an
uninterrupted run's. CI runs 3 x 17 kills (sync and async Checkpointer, one-shot save/load);
``benchmarks/crash_soak.py --trials 500`` runs the long one.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from crash_harness import SAVE_PATHS, reference_digest, run_chain  # noqa: E402

KILLS_PER_PATH = 17  # one per injected phase, the rest at random instants: 51 kills over 3 save paths


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    work = tmp_path_factory.mktemp("ref")
    return reference_digest(SAVE_PATHS["sync"], work), work / "ref-ckpt"


@pytest.fixture(scope="module")
def reference(reference_run: tuple[str, Path]) -> str:
    return reference_run[0]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~26 process starts; about 2 min on an idle 2-core machine, far more when shared
@pytest.mark.parametrize("name", sorted(SAVE_PATHS))
def test_kill_and_resume(tmp_path: Path, name: str, reference_run: tuple[str, Path]) -> None:
    reference, ref_dir = reference_run
    path = SAVE_PATHS[name]
    random_kills = KILLS_PER_PATH - len(path.phases)
    phases: list[str | None] = [*path.phases, *([None] * random_kills)]
    random.Random(name).shuffle(phases)
    trials = run_chain(path, tmp_path, phases=phases, seed=hash(name) & 0xFFFF, max_delay=0.8,
                       expect_digest=reference, ref_dir=ref_dir)
    assert len(trials) == len(phases)
    injected = [t for t in trials if t.kind.startswith("phase:")]
    assert all(t.killed for t in injected), [(t.kind, t.rc) for t in injected if not t.killed]
    assert sum(t.killed for t in trials) >= len(injected) + random_kills // 2, "too few random kills landed"


@pytest.mark.parametrize("name", ["async", "oneshot"])
def test_save_paths_agree(tmp_path: Path, reference: str, name: str) -> None:
    """The async snapshot equals the state at save(), and the one-shot API matches too: same final bits."""
    assert reference_digest(SAVE_PATHS[name], tmp_path) == reference
