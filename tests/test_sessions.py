"""Which Checkpointer is which among ranks: the session key comes from the dir (or ``name=``), not from
the order Checkpointers are created in (real torchrun, gloo, CPU).

Internals used: btckpt.checkpointer (the session key function under test).
"""

from __future__ import annotations

import json
from pathlib import Path

import btckpt
import pytest
from btckpt import ConfigError
from btckpt.checkpointer import session_identity
from dist_launch import env_with, finish, load_st, torchrun

pytestmark = pytest.mark.slow


def _job(tmp: Path, phase: str) -> dict[int, dict]:
    out = tmp / phase
    job = torchrun("dist_sessions.py", ["--base", str(tmp / "ck"), "--phase", phase, "--out", str(out)],
                   env=env_with())
    rc, log = finish(job, timeout=240)  # a key mix-up shows as CoordinationError after barrier_timeout=20
    assert rc == 0, log[-4000:]
    return {r: json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)}


def test_checkpointers_created_in_different_order_per_rank(tmp_path: Path) -> None:
    first = _job(tmp_path, "save")
    for r in (0, 1):
        assert first[r].pop("second_open") == "ConfigError"
        assert first[r] == {d: {"step": None, "w": [0.0] * 4, "extra": {"dir": ""}} for d in ("a", "b")}
    for i, d in enumerate(("a", "b")):
        folder = tmp_path / "ck" / d
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) == [
            "checkpoint-1", "checkpoint-2"]
        assert not [p for p in folder.iterdir() if p.name.startswith(".checkpoint-")]
        man = json.loads((folder / "checkpoint-2" / "btckpt.json").read_text())
        assert man["world"]["size"] == 2 and {"rng_state_0.json", "rng_state_1.json"} <= set(man["files"])
        assert load_st(folder / "checkpoint-2" / "model.safetensors")["w"].tolist() == [100.0 * (i + 1) + 2] * 4
        assert btckpt.latest(folder) == folder / "checkpoint-2"
    again = _job(tmp_path, "restore")
    for r in (0, 1):
        assert again[r].pop("second_open") == "ConfigError"
        for i, d in enumerate(("a", "b")):
            assert again[r][d] == {"step": 2, "w": [100.0 * (i + 1) + 2] * 4, "extra": {"dir": d}}, (r, d)


def test_session_identity() -> None:
    assert session_identity("/x/ck/", None) == session_identity("/x//ck", None) != session_identity("/x/ck2", None)
    assert session_identity(Path("ck"), None) == session_identity("./ck", None)
    assert session_identity(None, None) == "env:BT_CHECKPOINT_DIR"  # every node reads its own variable
    assert session_identity("/node0/ck", "run") == session_identity("/node1/ck", "run")
    assert session_identity("s3://b/run/", None) == session_identity("s3://b/run", None)
    for bad in ("", 3):
        with pytest.raises(ConfigError, match="name="):
            session_identity(None, bad)  # type: ignore[arg-type]
