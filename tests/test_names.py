"""Names from checkpoints and buckets never reach a terminal or a log raw (issue 11, items 9 and 10):
markup and control characters in file and tensor names, links out of the folder in ``btckpt show``,
and credentials inside URLs.

Internals used: btckpt.cli.browse, btckpt.format.checksum, btckpt.format.manifest, btckpt.names,
btckpt.publish.staging, btckpt.upload (the escaping functions under test, the browser's screens, the uploader's
supervisor and ``finish_upload`` (their messages must redact URLs), checksums and manifests to forge hostile names).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.format.checksum import file_checksum
from btckpt.format.manifest import read_manifest
from test_upload import s3  # noqa: F401 - fixtures

TITLE, CLEAR = "\x1b]0;title\x07", "\x1b[2J"
TENSORS = ["[/]", "[blink]x", TITLE, CLEAR]
RAW = ("\x1b", "\x07")


def add_file(folder: Path, name: str, data: bytes) -> None:
    """Put a file into a committed checkpoint and re-sign its manifest, as an attacker would."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    man = read_manifest(folder)
    size, digest = file_checksum(folder / name)
    man.files[name] = {"size": size, "xxh3_64": digest}
    (folder / "btckpt.json").write_bytes(man.to_json())


def hostile_tree(root: Path) -> Path:
    """checkpoint-1: tensors and files with markup and escape sequences in their names; checkpoint-2: its
    manifest lists a file (with an escape sequence in its name) that is missing."""
    model = {n: torch.full((i + 1,), float(i)) for i, n in enumerate(TENSORS)}
    btckpt.save(root / "checkpoint-1", {"model": model}, save_rng=False)
    add_file(root / "checkpoint-1", "[/]x.json", b'{"a": 1}')
    add_file(root / "checkpoint-1", f"{TITLE}.json", b'{"b": "' + CLEAR.encode() + b'"}')
    btckpt.save(root / "checkpoint-2", {"model": {"w": torch.zeros(2)}}, save_rng=False)
    add_file(root / "checkpoint-2", f"{CLEAR}.txt", b"x")
    (root / "checkpoint-2" / f"{CLEAR}.txt").unlink()
    return root


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "btckpt.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})


def _no_raw(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    for ch in RAW:
        assert ch not in r.stdout and ch not in r.stderr, (r.stdout, r.stderr)


def _check_cli(root: str) -> None:
    ck1, ck2 = f"{root}/checkpoint-1", f"{root}/checkpoint-2"
    r = cli("show", ck1)
    _no_raw(r)
    assert r.returncode == 0
    for name in ("[/]", "[blink]x", "\\x1b]0;title\\x07", "\\x1b[2J", "[/]x.json"):
        assert name in r.stdout, r.stdout
    r = cli("verify", ck1)
    _no_raw(r)
    assert r.returncode == 0 and r.stdout.startswith("OK")
    r = cli("verify", ck2)
    _no_raw(r)
    assert r.returncode == 1 and "\\x1b[2J.txt" in r.stderr
    for fmt in ("table", "csv", "json"):
        r = cli("ls", root, "--format", fmt)
        _no_raw(r)
        assert r.returncode == 0 and "incomplete" in r.stdout
    assert "\\x1b[2J.txt" in cli("ls", root).stdout


def test_cli_escapes_names_local(tmp_path: Path):
    _check_cli(str(hostile_tree(tmp_path / "ck")))


def test_cli_escapes_names_from_a_bucket(s3: str, tmp_path: Path):  # noqa: F811
    import fsspec

    root = hostile_tree(tmp_path / "ck")
    fsspec.filesystem("s3").put(str(root) + "/", f"{s3[5:]}/run/", recursive=True)
    _check_cli(f"{s3}/run")


def test_browser_mounts_on_hostile_names(tmp_path: Path):
    from btckpt.cli.browse import BrowseApp, CheckpointScreen

    root = hostile_tree(tmp_path / "ck")

    async def drive() -> None:
        app = BrowseApp(str(root))
        async with app.run_test(size=(140, 40)) as pilot:
            await pilot.pause()
            assert app.query_one("#checkpoints").option_count == 2
            app.open(1)  # checkpoint-1 (newest first)
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, CheckpointScreen) and screen.info.step == 1
            tree = screen.query_one("#files")
            labels = [str(n.label) for n in tree.root.children]
            assert "[/" in labels and any("\\x1b]0;title\\x07.json" in x for x in labels), labels
            screen.open_file("model.safetensors")
            await pilot.pause()
            table = screen.query_one("#tensors")
            names = sorted(str(table.get_row_at(i)[0]) for i in range(table.row_count))
            assert names == sorted(n.replace("\x1b", "\\x1b").replace("\x07", "\\x07") for n in TENSORS)
            screen.open_file(f"{TITLE}.json")
            await pilot.pause()
            body = screen.query_one("#text").text
            assert "\\x1b[2J" in body and "\x1b" not in body

    asyncio.run(drive())


def test_logs_and_errors_escape_and_redact(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="btckpt"):
        logging.getLogger("btckpt").warning("skipping %s: %s", f"ck/{CLEAR}x", "s3://AKIAKEY1:SECRET99@b/x")
        logging.getLogger("btckpt.upload").info(f"upload of {TITLE} to %s", "https://h/p?X-Amz-Signature=SIG77")
    assert not any(ch in caplog.text for ch in RAW)
    assert "ck/\\x1b[2Jx" in caplog.text and "\\x1b]0;title\\x07" in caplog.text
    for secret in ("AKIAKEY1", "SECRET99", "SIG77"):
        assert secret not in caplog.text
    msg = str(btckpt.CorruptCheckpoint(f"{TITLE}.safetensors in s3://k3y0:s3cr3t@bucket/x is damaged"))
    assert "\x1b" not in msg and "s3cr3t" not in msg and "\\x1b]0;title\\x07.safetensors" in msg
    from btckpt.names import redact_url, safe

    assert redact_url("s3://bucket/run/checkpoint-3") == "s3://bucket/run/checkpoint-3"
    assert safe("gs://b/o?X-Goog-Signature=abc&X-Goog-Credential=def") == "gs://b/o?X-Goog-Signature=***&X-Goog-Credential=***"


def test_a_damaged_fallback_warning_names_the_file_escaped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A real log line: the restore falls back past a checkpoint whose listed file (hostile name) is bad."""
    root = tmp_path / "ck"
    for step in (1, 2):
        btckpt.save(root / f"checkpoint-{step}", {"model": {"w": torch.full((3,), float(step))}}, save_rng=False)
    add_file(root / "checkpoint-2", f"{CLEAR}.json", b"{}")
    (root / "checkpoint-2" / f"{CLEAR}.json").write_bytes(b"[]")  # same size, other bytes
    state = {"model": {"w": torch.zeros(3)}}
    with caplog.at_level(logging.WARNING, logger="btckpt"):
        assert btckpt.load(root, state) == 1
    assert torch.equal(state["model"]["w"], torch.ones(3))
    assert "\\x1b[2J.json" in caplog.text and not any(ch in caplog.text for ch in RAW), caplog.text


def test_show_refuses_a_link_out_of_the_folder(tmp_path: Path):
    outside = tmp_path / "secret.safetensors"
    btckpt.save(tmp_path / "other" / "checkpoint-9", {"model": {"secret_weight": torch.zeros(2)}}, save_rng=False)
    os.replace(tmp_path / "other" / "checkpoint-9" / "model.safetensors", outside)
    ck = tmp_path / "ck" / "checkpoint-1"
    btckpt.save(ck, {"model": {"w": torch.zeros(2)}}, save_rng=False)
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(outside)
    r = cli("show", str(ck))
    assert r.returncode == 1
    assert "secret_weight" not in r.stdout
    assert "outside the checkpoint folder" in r.stdout and "model.safetensors" in r.stdout
    r = cli("show", str(ck), "--json")
    assert "secret_weight" not in r.stdout and r.returncode == 1


def test_uploader_command_line_and_logs_hold_no_credentials(s3: str, tmp_path: Path,  # noqa: F811
                                                            capfd: pytest.CaptureFixture[str]):
    from btckpt.upload import UploadSupervisor

    (tmp_path / "ck").mkdir()
    bucket = s3[5:]
    dest = f"s3://AKIAQQQQ:SUPERSECRET@{bucket}/run?X-Amz-Signature=SIGNATURE1{uuid.uuid4().hex[:4]}"
    sup = UploadSupervisor(tmp_path / "ck", dest)
    sup.start()
    try:
        cmdline = Path(f"/proc/{sup.proc.pid}/cmdline").read_bytes().decode()
        env_has_it = sup.proc.pid > 0
    finally:
        rc = sup.stop(timeout=120)
    assert env_has_it and "SUPERSECRET" not in cmdline and "SIGNATURE1" not in cmdline and "AKIAQQQQ" not in cmdline
    assert rc is not None
    err = capfd.readouterr().err
    assert "SUPERSECRET" not in err and "SIGNATURE1" not in err and "AKIAQQQQ" not in err
    with pytest.raises(btckpt.CheckpointError) as ei:
        from btckpt.publish.staging import finish_upload

        class Done:
            src = tmp_path / "ck"

            def stop(self) -> int:
                return 1

        finish_upload(Done(), dest, restart=False)
    assert "SUPERSECRET" not in str(ei.value) and "SIGNATURE1" not in str(ei.value)
