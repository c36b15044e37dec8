"""Distributed runtime edges with real torchrun + gloo (issue 11, items 13, 14, 16): every agreement has keys
of its own, per-rank plain state round-trips per rank, ranks signalled at different times stop together;
and a SIGTERM that nothing can act on is passed on instead of swallowed.

Internals used: btckpt.format.manifest, btckpt.restore.reader, btckpt.storage.discovery (manifests, verified byte
reads, discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from btckpt.format.manifest import read_manifest
from btckpt.restore.reader import read_verified_bytes
from btckpt.storage.discovery import inspect, scan, verify
from dist_launch import PY, env_with, finish, kill_session, raw_ranks, torchrun, wait_for_line


def _verify(path: Path) -> None:
    assert verify(inspect(path)) == [], path


def test_agreements_have_their_own_keys_and_plain_state_is_per_rank(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    rc, out = finish(torchrun("dist_edges.py", ["agree", "--dir", str(ck)], env=env_with()), timeout=180)
    assert rc == 0, out[-4000:]
    assert "rank 0: RESTORE1 2 {'shard': 0, 'offset': 1000} None" in out, out[-4000:]
    assert "rank 1: RESTORE1 2 {'shard': 1, 'offset': 2000} {'seen': [1, 2, 3]}" in out, out[-4000:]
    # the second restore in the same session agrees anew: the newest complete step on every rank
    assert "rank 0: RESTORE2 4 {'shard': 0, 'offset': 1000}" in out, out[-4000:]
    assert "rank 1: RESTORE2 4 {'shard': 1, 'offset': 2000}" in out, out[-4000:]
    # step 4 saved again after deleting it: the manifest lists this attempt's files, which verify
    path = ck / "checkpoint-4"
    _verify(path)
    man = read_manifest(path)
    assert sorted(man.files) == ["model.safetensors", "model.safetensors.index.json", "rng_state_0.json",
                                 "rng_state_1.json", "state_1.json"]
    assert man.state["data"] == {"shard": 0, "offset": 1007}
    assert json.loads(read_verified_bytes(path, man, "state_1.json")) == {
        "data": {"shard": 1, "offset": 2007}, "only1": {"seen": [1, 2, 3]}}
    # a group holding tensors that only rank 1 has is refused, not dropped: nothing is committed
    assert "rank 0: REFUSED6 ConfigError: rank 1 saves group(s) ['mine'] holding tensors" in out, out[-4000:]
    assert "rank 1: REFUSED6 CoordinationError" in out, out[-4000:]
    assert [i.step for i in scan(ck)] == [4, 2]


def test_preemption_under_ddp_with_sigterms_half_a_second_apart(tmp_path: Path) -> None:
    ck, marker = tmp_path / "ck", tmp_path / "pids"
    job = torchrun("dist_edges.py", ["preempt", "--dir", str(ck), "--grace", "20"],
                   env=env_with(PROGRESS=str(marker)))
    wait_for_line(marker, "PID", count=2, timeout=120, proc=job)
    pids = {int(r): int(p) for r, p in re.findall(r"PID (\d) (\d+)", marker.read_text())}
    os.kill(pids[0], signal.SIGTERM)
    time.sleep(0.5)
    try:
        os.kill(pids[1], signal.SIGTERM)
    except ProcessLookupError:  # already stopped at the agreed step
        pass
    rc, out = finish(job, timeout=120)
    assert rc == 0, out[-4000:]
    stops = dict(re.findall(r"rank (\d): STOPPED (\d+)", out))
    assert set(stops) == {"0", "1"} and stops["0"] == stops["1"], out[-4000:]
    infos = scan(ck)
    assert [i.step for i in infos] == [int(stops["0"])], [(i.path.name, i.status) for i in infos]
    assert infos[0].complete
    _verify(infos[0].path)


def test_preemption_with_a_dead_peer_waits_the_grace_not_the_barrier_timeout(tmp_path: Path) -> None:
    """Rank 1 is gone when rank 0 gets SIGTERM: the final save's waits end after preemption_grace (5 s),
    not barrier_timeout (600 s); nothing is committed and rank 0 says why."""
    ck, marker = tmp_path / "ck", tmp_path / "pids"
    ranks = raw_ranks("dist_edges.py", ["preempt", "--dir", str(ck), "--grace", "5", "--no-ddp"], world=2,
                      env=env_with(PROGRESS=str(marker)))
    try:
        wait_for_line(marker, "PID", count=2, timeout=120, proc=ranks[0])
        ranks[1].kill()
        finish(ranks[1], timeout=30)
        ranks[0].send_signal(signal.SIGTERM)
        rc, out = finish(ranks[0], timeout=120)
    finally:
        for p in ranks:
            if p.poll() is None:
                kill_session(p)
                p.communicate()
    assert rc != 0, out[-4000:]
    # the save's waits end before the grace does (a tenth of it kept for the exit), so its error is the reason
    assert re.search(r"within [45]s", out) and "a peer" in out, out[-4000:]
    assert not any(i.complete for i in scan(ck))


def test_sigterm_without_maybe_save_is_passed_on(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(
        "import sys, time, btckpt\n"
        f"c = btckpt.Checkpointer(dir={str(tmp_path / 'ck')!r})\n"
        "print('READY', flush=True)\n"
        "time.sleep(60)\n"
        "print('STILL RUNNING', flush=True)\n")
    proc = subprocess.Popen([PY, str(script)], env=env_with(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, out, err)
    assert "STILL RUNNING" not in out
    assert "cannot save a final checkpoint" in err
