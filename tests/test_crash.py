"""Crash consistency: a real training run is SIGKILLed at random instants and at injected phases of the save
(BTCKPT_FAULT=<phase>:kill), for each save path (tests/scripts/crash_paths.py): sync and async Checkpointer,
one-shot save/load, HF Trainer, Lightning, torchrun (2 ranks: DDP, FSDP1, HF Trainer under DeepSpeed ZeRO-3),
upload_to and the local (RAM) tier with its promotions. After every kill the run restarts; the harness asserts
that no incomplete checkpoint is ever listed or loaded, that the run resumes from the newest complete
checkpoint, that the older ones verify byte for byte and equal the uninterrupted run's, that no temp folder
survives the restart, each path's own invariants
(Lightning's link files; the upload's remote side never shows a manifest over incomplete files, and a restart
finishes the upload), and that the final state is bit-identical to an uninterrupted run's.

CI runs 4 x 17 kills over the core paths (every phase, the rest random) and 2-3 kills for each of the
integration paths (process starts dominate there); ``benchmarks/crash_soak.py --trials 500`` runs the long
one over every path and phase (figures in benchmarks/RESULTS_crash.md).
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from crash_harness import SAVE_PATHS, Reference, reference_run, run_chain

KILLS_PER_PATH = 17  # core paths: one per injected phase, the rest at random instants
# integration paths: one or two telling phases and a random instant each (the soak covers every phase)
CI_PHASES: dict[str, list[str | None]] = {
    "hf": ["before_rename", None],  # HF: manifest written in the temp folder, never renamed
    "lightning": ["after_rename", None],  # committed, but the link files (last.ckpt, top-k) not yet written
    "torchrun": ["write_rng", None],  # a rank (drawn by the seed) dies writing its files: nobody commits
    "torchrun-fsdp1": ["write_data", None],  # FSDP1: a rank (drawn by the seed) dies writing its shard
    "torchrun-zero3": ["write_data", None],  # ZeRO-3: a rank (drawn by the seed) dies writing its partition
    "upload": ["upload_file", None],  # the uploader takes the job down mid-file
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """save path name -> an uninterrupted run of its reference group, made when first needed."""
    work = tmp_path_factory.mktemp("ref")
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        key = SAVE_PATHS[name].ref_key
        if key not in made:
            made[key] = reference_run(SAVE_PATHS[name], work / key)
        return made[key]
    return get


def _phases(name: str) -> list[str | None]:
    if name in CI_PHASES:
        return list(CI_PHASES[name])
    path = SAVE_PATHS[name]
    phases: list[str | None] = [*path.phases, *([None] * (KILLS_PER_PATH - len(path.phases)))]
    random.Random(name).shuffle(phases)
    return phases


@pytest.mark.slow
@pytest.mark.timeout(1500)  # up to ~26 process starts; minutes on an idle 2-core machine, far more when shared
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    n == "torchrun-zero3" and importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is an optional extra (btckpt[deepspeed]); this path runs a real ZeRO-3 engine"))
    for n in sorted(SAVE_PATHS)])
def test_kill_and_resume(tmp_path: Path, name: str, reference: Callable[[str], Reference]) -> None:
    path = SAVE_PATHS[name]
    phases = _phases(name)
    assert set(p for p in phases if p) <= set(path.phases), "a CI phase the save path does not reach"
    trials = run_chain(path, tmp_path, phases=phases, seed=sum(map(ord, name)), max_delay=0.8,
                       reference=reference(name))
    assert len(trials) == len(phases)
    injected = [t for t in trials if t.kind.startswith("phase:")]
    assert all(t.killed for t in injected), [(t.kind, t.rc) for t in injected if not t.killed]
    random_kills = phases.count(None)
    assert sum(t.killed for t in trials) >= len(injected) + random_kills // 2, "too few random kills landed"


@pytest.mark.parametrize("name", ["async", "oneshot"])
def test_save_paths_agree(tmp_path: Path, reference: Callable[[str], Reference], name: str) -> None:
    """The async snapshot equals the state at save(), and the one-shot API matches too: same final bits."""
    assert reference_run(SAVE_PATHS[name], tmp_path).digest == reference("sync").digest
