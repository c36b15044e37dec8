"""Crash-consistency soak: many SIGKILLs of a real training run, at random instants and at injected phases.

    PYTHONPATH=integrations python benchmarks/crash_soak.py --trials 500

Each trial kills one run of a save path (tests/scripts/crash_paths.py: sync, async, oneshot, hf, lightning,
torchrun, torchrun-fsdp1, torchrun-zero3, tier, upload; ``--paths`` picks some), then checks the restart
invariants (no temp folder survives the restart, every listed checkpoint is complete, verifies and equals the
uninterrupted run's, the run resumes from the newest complete one, plus each path's own: Lightning's link
files, the upload's remote side).
Every ``--chain`` kills the run is allowed to finish and its final state is compared bit for bit with an
uninterrupted run of the same path. Prints totals, kills per path and per phase, and every violation
(exit status 1 if any).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
from crash_harness import SAVE_PATHS, Reference, reference_run, run_chain  # noqa: E402
from crash_paths import FINDINGS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=500, help="kills in total, spread over the save paths")
    runnable = [p for p in sorted(SAVE_PATHS) if p != "torchrun-zero3" or importlib.util.find_spec("deepspeed")]
    ap.add_argument("--paths", default=",".join(runnable),
                    help="comma-separated save paths (default: all; torchrun-zero3 only with deepspeed installed)")
    ap.add_argument("--chain", type=int, default=25, help="kills before a run is let finish and compared")
    ap.add_argument("--phase-share", type=float, default=0.5, help="share of kills at an injected phase")
    ap.add_argument("--max-delay", type=float, default=0.8,
                    help="random kills land within this many s of TRAINING (paths that set their own keep it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="chains run in parallel (each in its own folder)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--keep-failed", type=Path, help="copy a failing chain's folder here")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    paths = [SAVE_PATHS[p] for p in args.paths.split(",")]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="btckpt-soak-") as tmp:
        work = Path(tmp)
        refs: dict[str, Reference] = {}  # one uninterrupted run per reference group
        for sp in paths:
            if sp.ref_key not in refs:
                refs[sp.ref_key] = reference_run(sp, work / f"ref-{sp.ref_key}")
        plan = []  # (chain id, save path, phases): save paths alternate chain by chain
        done = 0
        decks: dict[str, list[str]] = {}  # each path's phases dealt in shuffled rounds: every phase gets its turn

        def deal(sp) -> str:
            deck = decks.setdefault(sp.name, [])
            if not deck:
                deck.extend(rng.sample(sp.phases, len(sp.phases)))
            return deck.pop()

        while done < args.trials:
            for sp in paths:
                n = min(args.chain, args.trials - done)
                if n > 0:
                    phases = [deal(sp) if rng.random() < args.phase_share else None for _ in range(n)]
                    plan.append((len(plan), sp, phases, rng.randrange(1 << 30)))
                    done += n
        trials = []
        failures: list[str] = []
        per_path: Counter[str] = Counter()
        lock = threading.Lock()
        progress = [0]

        def one(item: tuple) -> None:
            cid, sp, phases, seed = item
            wd = work / f"chain-{cid}-{sp.name}"
            wd.mkdir(parents=True)
            try:
                got = run_chain(sp, wd, phases=phases, seed=seed, max_delay=args.max_delay,
                                reference=refs[sp.ref_key])
                with lock:
                    trials.extend((sp.name, t) for t in got)
            except AssertionError as exc:
                with lock:
                    failures.append(f"chain {cid} ({sp.name}): {exc}")
                print(f"VIOLATION chain {cid} ({sp.name}): {exc}", flush=True)
                if args.keep_failed:
                    kept = args.keep_failed / wd.name
                    shutil.copytree(wd, kept, symlinks=True)
                    print(f"kept {kept}", flush=True)
            shutil.rmtree(wd, ignore_errors=True)
            with lock:
                per_path[sp.name] += len(phases)
                progress[0] += len(phases)
                print(f"{progress[0]}/{args.trials} kills, {len(failures)} violations, "
                      f"{time.monotonic() - t_start:.0f}s", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, plan))
        chains = len(plan)
    landed = [t for _, t in trials if t.killed]
    kinds = Counter(t.kind for _, t in trials if t.killed)
    by_path: dict[str, Counter[str]] = {}
    for name, t in trials:
        if t.killed:
            by_path.setdefault(name, Counter())[t.kind] += 1
    fault_values = Counter(t.fault.split(":", 1)[1] for _, t in trials if t.killed and t.fault)
    resumed = Counter("fresh" if t.restored == "none" else "resumed" for _, t in trials)
    secs = [t.seconds for _, t in trials]
    fig = {
        "kills_requested": args.trials, "kills_landed": len(landed),
        "runs_finished_before_kill": sum(1 for _, t in trials if not t.killed),
        "random_kills": kinds.get("random", 0), "phase_kills": {k[6:]: v for k, v in sorted(kinds.items())
                                                                 if k.startswith("phase:")},
        "per_path": dict(per_path),
        "landed_per_path": {n: {"random": c.get("random", 0), "phase": sum(v for k, v in c.items() if k != "random"),
                                "phases": {k[6:]: v for k, v in sorted(c.items()) if k != "random"}}
                            for n, c in sorted(by_path.items())},
        "fault_actions": dict(fault_values), "chains": chains, "jobs": args.jobs, "final_state_compared": chains,
        "restarts_checked": len(trials), "starts": dict(resumed),
        "violations": len(failures), "findings": len(FINDINGS), "seconds_total": round(time.monotonic() - t_start, 1),
        "seconds_per_trial_median": round(statistics.median(secs), 2) if secs else None,
    }
    print(json.dumps(fig, indent=1))
    for f in failures:
        print("VIOLATION:", f)
    for name, what in FINDINGS:
        print(f"FINDING ({name}): {what}")
    if args.json:
        args.json.write_text(json.dumps({"figures": fig, "violations": failures,
                                         "findings": [f"{n}: {w}" for n, w in FINDINGS]}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
