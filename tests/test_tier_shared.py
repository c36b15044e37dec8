"""Shared places and tier identity (DESIGN.md "Shared places", issue 22 sections 2 and 3).

/dev/shm is shared with every local user: the attacker's actions here run for real as another uid (nobody,
65534, through ``setpriv``), in a folder of this test that stands in for /dev/shm (sticky, 1777, like it),
so a second user's folder never touches the real /dev/shm that other tests share. CI runs as root.

Internals used: btckpt.cli, btckpt.format.manifest, btckpt.publish.uploader, btckpt.saving.commit,
btckpt.storage.discovery, btckpt.tiers, btckpt.tiers.local (the tier's folder, identity file and resume search, the
uploader object, the commit's delete, manifests, the command's ``main``, discovery to judge the folders on disk
(complete, verified), which no public name reports).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.format.manifest import MANIFEST
from btckpt.storage.discovery import inspect, verify
from btckpt.tiers import IDENTITY, default_tier_dir, resumable_tier
from btckpt.tiers import local as tier_local
from test_tiers import _steps, _train  # the tier tests' helpers

NOBODY = 65534
SETPRIV = shutil.which("setpriv")
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                                reason="a second local user is simulated by switching uid: needs root and setpriv")


def as_other(code: str, **values: object) -> None:
    """Run ``code`` (Python, with ``values`` as variables) as the other local user (uid/gid 65534)."""
    prelude = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    r = subprocess.run([SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        sys.executable, "-I", "-c", "import json, os, shutil\nos.umask(0)\n" + prelude + code],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr


@pytest.fixture
def shm(monkeypatch: pytest.MonkeyPatch):
    """A stand-in for /dev/shm (root's, 1777 like it) that the default tier path is under."""
    base = Path("/dev/shm") / f"btckpt-test-{secrets.token_hex(6)}"
    base.mkdir()
    os.chmod(base, 0o1777)
    monkeypatch.setattr(tier_local, "SHARED_BASE", base, raising=False)
    monkeypatch.setattr(tier_local, "DEFAULT_BASE", base / "btckpt", raising=False)  # the code before the fix
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(16, 16), "extra": {"step": 0}}


def _ck(d: Path, **kw) -> btckpt.Checkpointer:
    opts = dict(dir=d, local_every_steps=2, every_steps=6, keep_last=None, handle_sigterm=False)
    opts.update(kw)
    return btckpt.Checkpointer(**opts)


def _crash(ck: btckpt.Checkpointer) -> None:
    """End ``ck`` as a killed run would for its tier: the tier stays as it is (lock released)."""
    ck.wait()
    ck._tier.close(remove=False)  # noqa: SLF001
    ck._tier = None  # noqa: SLF001
    ck.close()


def _planted(shm: Path, d: Path, step: int) -> tuple[Path, torch.Tensor]:
    """A valid tier checkpoint of ``step`` for the job of ``d`` (an identity record naming ``d`` and its current
    incarnation), readable by anyone under ``shm``: what the other user copies into place. Its weights."""
    src = shm / f"src-{secrets.token_hex(4)}"
    evil = _state(seed=7)
    with torch.no_grad():
        evil["model"].weight.fill_(666.0)
    with btckpt.Checkpointer(dir=src, keep_last=None, handle_sigterm=False, async_save=False) as ck:
        ck.save(step, evil)
    rec = {"format": "btckpt-tier/1", "dir": str(d.resolve())}
    idfile = d / ".btckpt-dir.json"
    if idfile.is_file():  # the dir's incarnation id is no secret (the dir is often world-readable)
        rec["incarnation"] = json.loads(idfile.read_text())["id"]
    (src / IDENTITY).write_text(json.dumps(rec))
    (src / ".btckpt.lock").unlink()
    for p in [src, *src.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return src, evil["model"].weight.detach().clone()


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


# -- 22 §2: shared places ---------------------------------------------------------------------------------------
def test_a_planted_lock_link_is_never_written_through(shm: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"  # a file of the job's user (root: could be any file on the machine)
    victim.write_text("precious")
    tier = shm / "tier"
    as_other("os.mkdir(tier, 0o777); os.symlink(victim, os.path.join(tier, '.btckpt.lock'))",
             tier=str(tier), victim=str(victim))
    with pytest.raises(btckpt.CheckpointError) as err:
        _ck(tmp_path / "d", local_tier_dir=tier)
    assert victim.read_text() == "precious"
    assert str(tier) in str(err.value) and f"uid {NOBODY}" in str(err.value)
    # the durable dir's lock does not follow a link either
    d2 = tmp_path / "d2"
    d2.mkdir()
    (d2 / ".btckpt.lock").symlink_to(victim)
    with pytest.raises(btckpt.CheckpointError, match="symbolic link"):
        btckpt.Checkpointer(dir=d2, handle_sigterm=False)
    assert victim.read_text() == "precious"


def test_a_planted_tier_is_neither_resumed_nor_promoted(shm: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "d"
    with _ck(d, local_tier_dir=tmp_path / "ram") as ck:  # an earlier run: the dir exists (and has its id)
        _train(ck, _state(), range(1, 7))
    assert _steps(d) == [6]
    src, evil = _planted(shm, d, 100)
    target = default_tier_dir(d)
    as_other("os.makedirs(os.path.dirname(target), 0o777, exist_ok=True); shutil.copytree(src, target)",
             src=str(src), target=str(target))
    assert target.stat().st_uid == NOBODY
    assert resumable_tier(d, None) is None  # the frameworks' resume search does not take it
    state = _state(seed=1)
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        with btckpt.Checkpointer(dir=d, keep_last=None, handle_sigterm=False) as plain:  # no tier of its own
            assert plain.restore(state) == 6
        ck = _ck(d)  # the job still starts (another user cannot stop it), with a fresh private tier
    try:
        assert ck.restore(state) == 6
        assert not torch.equal(state["model"].weight, evil)
        _train(ck, state, range(7, 9))
    finally:
        ck.close()
    assert _steps(d) == [6, 8]  # step 100 never reached the durable dir
    assert json.loads((target / IDENTITY).read_text())["dir"] == str(d.resolve())  # theirs: left alone
    said = [r.getMessage() for r in caplog.records if "owned by" in r.getMessage()]
    assert said and f"uid {NOBODY}" in said[-1] and str(target.parent) in said[-1]
    assert not [p for p in shm.iterdir() if p.name.startswith(f"btckpt-{os.geteuid()}-")]  # fresh tier removed


def test_tier_folders_and_files_are_private(shm: Path, tmp_path: Path) -> None:
    d, tier = tmp_path / "d", shm / "tier"
    old = os.umask(0o022)
    try:
        ck = _ck(d, local_tier_dir=tier)
        try:
            _train(ck, _state(), range(1, 7))
            ck.wait()
            modes = _modes(tier)
            assert f"checkpoint-6/{MANIFEST}" in modes and IDENTITY in modes and ".btckpt.lock" in modes
            wrong = {k: oct(m) for k, m in modes.items() if m != (0o700 if (tier / k).is_dir() else 0o600)}
            assert not wrong
            victim = max((tier / "checkpoint-6").iterdir(), key=lambda p: p.stat().st_size)  # the weights
            as_other("""
try:
    open(path, 'rb').read(1)
except PermissionError:
    pass
else:
    raise SystemExit('read the tier')
""", path=str(victim))
        finally:
            ck.close()
        # the durable dir keeps following the umask (the platform uploads it)
        assert {m for k, m in _modes(d / "checkpoint-6").items() if k != "."} == {0o644}
    finally:
        os.umask(old)


def test_another_users_folder_at_the_default_path_does_not_stop_the_job(shm: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "d"
    target = default_tier_dir(d)
    as_other("os.makedirs(target, 0o777); open(os.path.join(target, 'x'), 'w').close()", target=str(target))
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        ck = _ck(d)
    try:
        assert ck._tier.root != target and ck._tier.root.stat().st_uid == os.geteuid()  # noqa: SLF001
        assert stat.S_IMODE(ck._tier.root.stat().st_mode) == 0o700  # noqa: SLF001
        _train(ck, _state(), range(1, 7))
    finally:
        ck.close()
    assert _steps(d) == [6]
    said = [r.getMessage() for r in caplog.records if f"uid {NOBODY}" in r.getMessage()]
    assert len(said) == 1 and str(target.parent) in said[0] and "fresh private folder" in said[0]
    assert sorted(os.listdir(target)) == ["x"]  # nothing written into theirs


@pytest.mark.parametrize("with_tier", [True, False], ids=["restart-with-tier", "restart-without-tier"])
def test_a_crashed_sessions_fresh_private_folder_is_removed_by_the_next_start(shm: Path, tmp_path: Path,
                                                                             with_tier: bool) -> None:
    """The default path taken, a session uses a fresh private folder; killed, nothing could find that folder
    again and it stayed in RAM for good. The next start of the job removes it (DESIGN.md "Lifetimes")."""
    d = tmp_path / "d"
    target = default_tier_dir(d)
    as_other("os.makedirs(target, 0o777)", target=str(target))
    ck = _ck(d)
    _train(ck, _state(), range(1, 5))
    fresh = ck._tier.root  # noqa: SLF001
    _crash(ck)
    assert fresh.is_dir() and fresh != target and _steps(fresh) == [4]
    again = _ck(d) if with_tier else _ck(d, local_every_steps=None, every_steps=None)
    try:
        assert again.restore(_state()) is None  # the dir holds nothing; the orphan was never resumable
        assert not fresh.exists()
        if with_tier:
            assert again._tier.root.is_dir()  # noqa: SLF001  - its own fresh folder, kept while it runs
    finally:
        again.close()
    assert sorted(os.listdir(target)) == []  # theirs, untouched


def test_an_explicit_tier_dir_of_another_user_is_refused(shm: Path, tmp_path: Path) -> None:
    tier = shm / "theirs"
    as_other("os.mkdir(tier, 0o755)", tier=str(tier))
    with pytest.raises(btckpt.TierMismatch) as err:
        _ck(tmp_path / "d", local_tier_dir=tier)
    msg = str(err.value)
    assert str(tier) in msg and f"uid {NOBODY}" in msg and "local_tier_dir" in msg
    assert os.listdir(tier) == []  # nothing written into it


# -- 22 §3: identity and ownership --------------------------------------------------------------------------------
def test_a_recreated_dir_never_resumes_the_dead_runs_tier(shm: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "d"
    ck = _ck(d)
    _train(ck, _state(), range(1, 9))
    _crash(ck)
    tier = default_tier_dir(d)
    assert _steps(tier) == [8] and _steps(d) == [6]
    shutil.rmtree(d)  # the user starts over at the same path
    d.mkdir()
    fresh = _state(seed=5)
    before = fresh["model"].weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        with btckpt.Checkpointer(dir=d, handle_sigterm=False) as plain:  # without a tier
            assert plain.restore(fresh) is None
        assert resumable_tier(d, None) is None
        ck = _ck(d)  # with one: the old tier is discarded
    try:
        assert ck.restore(fresh) is None
        assert torch.equal(fresh["model"].weight, before)
        assert _steps(tier) == []
    finally:
        ck.close()
    assert any("earlier incarnation" in r.getMessage() for r in caplog.records)
    assert _steps(d) == []


def test_a_restart_without_a_tier_owns_the_tier_it_resumed_from(shm: Path, tmp_path: Path) -> None:
    d = tmp_path / "d"
    ck = _ck(d)
    state = _state()
    _train(ck, state, range(1, 9))
    want = state["model"].weight.detach().clone()
    _crash(ck)
    tier = default_tier_dir(d)
    assert _steps(tier) == [8] and _steps(d) == [6]
    got = _state(seed=2)
    with btckpt.Checkpointer(dir=d, keep_last=None, handle_sigterm=False) as plain:
        assert plain.restore(got) == 8
        assert torch.equal(got["model"].weight, want)
    assert _steps(d) == [6, 8]  # the resumed step became durable
    assert verify(inspect(d / "checkpoint-8")) == []
    assert not tier.exists()  # and the tier left RAM at the clean close
    with btckpt.Checkpointer(dir=d, handle_sigterm=False) as again:
        assert again.restore(_state(seed=3)) == 8


def test_the_uploader_never_writes_through_a_planted_state_folder(shm: Path, tmp_path: Path) -> None:
    import fsspec
    from btckpt.publish.uploader import Uploader

    src = shm / "ck"  # a checkpoint dir in a place others can write (group-shared scratch, /tmp)
    with btckpt.Checkpointer(dir=src, keep_last=None, handle_sigterm=False, async_save=False) as ck:
        ck.save(1, _state())
    os.chmod(src, 0o1777)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.jsonl").write_text("mine\n")
    as_other("os.symlink(target, os.path.join(src, '.btckpt-upload'))", src=str(src), target=str(elsewhere))
    dest = f"memory://m{secrets.token_hex(4)}/run"
    with pytest.raises(btckpt.ConfigError) as err:
        Uploader(src, dest, retries=0)
    assert ".btckpt-upload" in str(err.value) and "symbolic link" in str(err.value)
    assert sorted(os.listdir(elsewhere)) == ["keep.jsonl"]
    # retention's record of a retired checkpoint does not go through it either
    btckpt.saving.commit.delete_checkpoint(src / "checkpoint-1")
    assert sorted(os.listdir(elsewhere)) == ["keep.jsonl"]
    assert not fsspec.filesystem("memory").exists(dest[len("memory://"):])


def test_the_dir_id_is_ignored_by_ls_verify_and_the_uploader(shm: Path, tmp_path: Path) -> None:
    import fsspec
    from btckpt.cli import main as cli_main
    from btckpt.publish.uploader import Uploader

    d = tmp_path / "d"
    with _ck(d) as ck:
        _train(ck, _state(), range(1, 7))
    assert (d / ".btckpt-dir.json").is_file() and _steps(d) == [6]
    assert cli_main(["ls", str(d)]) == 0 and cli_main(["verify", str(d)]) == 0
    dest = f"memory://m{secrets.token_hex(4)}/run"
    fs = fsspec.filesystem("memory")
    try:
        res = Uploader(d, dest, retries=0).run_pass()
        assert len(res.uploaded) == 1 and not res.failed
        assert not [p for p in fs.find(dest[len("memory://"):]) if "btckpt-dir" in p]
    finally:
        if fs.exists(dest[len("memory://"):]):
            fs.rm(dest[len("memory://"):], recursive=True)
