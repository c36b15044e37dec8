"""``btckpt ls / show / verify``: output snapshots (table, JSON, CSV) on a local folder and on S3 (moto).

Internals used: btckpt.cli, btckpt.format.manifest, btckpt.storage.discovery (the command's ``main`` run in-process
and one of its helpers patched; manifests read and discovery's scan to build the expected output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.cli import main
from test_upload import s3  # noqa: F401,F811 - fixtures

CREATED = "2026-01-02T03:04:05.000000Z"


def _pin_created(folder: Path) -> None:
    from btckpt.format.manifest import read_manifest

    man = read_manifest(folder)
    man.created = CREATED
    (folder / "btckpt.json").write_bytes(man.to_json())  # re-sealed with the manifest's own checksum


def make_tree(root: Path) -> Path:
    """Deterministic checkpoints of every type and status."""
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    btckpt.save(root / "checkpoint-10", {"model": {"weight": w, "bias": torch.zeros(3)}}, save_rng=False)
    btckpt.save(root / "checkpoint-20", {"model": {"weight": w, "bias": torch.ones(3)},
                                         "optimizer": {"state": {"m": torch.zeros(3, 4, dtype=torch.bfloat16)},
                                                       "lr": 0.1}}, save_rng=False)
    btckpt.save(root / "checkpoint-30", {"adapter_model": {"lora_A": torch.zeros(2, 4, dtype=torch.float16)}},
                save_rng=False)
    for s in (10, 20, 30):
        _pin_created(root / f"checkpoint-{s}")
    (root / "checkpoint-40").mkdir()
    (root / "checkpoint-40" / "model.safetensors").write_bytes(b"partial")
    return root


@pytest.fixture(autouse=True)
def _piped_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables below are what a pipe gets (200 columns): a ``COLUMNS`` some earlier code in this process set
    (a framework, another test's child setup) must not narrow them."""
    monkeypatch.delenv("COLUMNS", raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, "\n".join(line.rstrip() for line in out.splitlines()), err


LS_TABLE = """\
STEP   NAME            TYPE                SIZE   CREATED               STATUS       CHECKED   DETAIL
{rule}
  40   checkpoint-40   full                 7 B   -                     incomplete   -         no btckpt.json: never committed{tail}
  30   checkpoint-30   LoRA             4.0 KiB   2026-01-02 03:04:05   complete     sizes
  20   checkpoint-20   training-state   8.2 KiB   2026-01-02 03:04:05   complete     sizes
  10   checkpoint-10   full             4.2 KiB   2026-01-02 03:04:05   complete     sizes"""  # noqa: E501

SHOW_TABLE = """\
{path}
step 20  type training-state  status complete  created 2026-01-02 03:04:05  size 8.2 KiB  groups model, optimizer
Files
FILE                              SIZE   XXH3_64
─────────────────────────────────────────────────────────
model.safetensors              4.1 KiB   {h1}
model.safetensors.index.json     134 B   {h3}
optimizer.safetensors          4.0 KiB   {h2}
Tensors
FILE                    NAME      DTYPE   SHAPE    PARAMS   BYTES
─────────────────────────────────────────────────────────────────
model.safetensors       weight    F32     (3, 4)       12    48 B
model.safetensors       bias      F32     (3,)          3    12 B
optimizer.safetensors   state.m   BF16    (3, 4)       12    24 B
total: 3 tensors, 27 parameters, 84 B  [BF16 12 (24 B), F32 15 (60 B)]"""


def _check_outputs(capsys: pytest.CaptureFixture[str], root: str, *, remote: bool) -> None:
    rc, out, _ = run(capsys, "ls", root)
    tail = " (or upload unfinished)" if remote else ""
    assert rc == 0
    assert out == LS_TABLE.format(tail=tail, rule="─" * (126 + len(tail)))

    rc, out, _ = run(capsys, "ls", root, "--json", "--sort", "size", "--order", "asc")
    rows = json.loads(out)
    assert [(r["step"], r["type"], r["status"]) for r in rows] == [
        (40, "full", "incomplete"), (30, "LoRA", "complete"), (10, "full", "complete"), (20, "training-state",
                                                                                         "complete")]
    assert rows[1]["size"] == 4096 + 16 and rows[1]["created"] == CREATED
    rc, out, _ = run(capsys, "ls", root, "--format", "csv", "--sort", "created", "--order", "asc")
    assert out.splitlines()[0] == "step,name,type,size,created,status,checked,reason"
    assert [ln.split(",")[0] for ln in out.splitlines()[1:]] == ["40", "10", "20", "30"]

    ck = f"{root}/checkpoint-20"
    rc, out, _ = run(capsys, "show", ck)
    man = json.loads(btckpt.storage.discovery.scan(ck)[0].manifest.to_json())
    assert rc == 0
    assert out == SHOW_TABLE.format(path=ck, h1=man["files"]["model.safetensors"]["xxh3_64"],
                                    h2=man["files"]["optimizer.safetensors"]["xxh3_64"],
                                    h3=man["files"]["model.safetensors.index.json"]["xxh3_64"])
    rc, out, _ = run(capsys, "show", ck, "--json")
    d = json.loads(out)
    assert d["totals"] == {"tensors": 3, "parameters": 27, "bytes": 84,
                           "by_dtype": {"F32": {"tensors": 2, "parameters": 15, "bytes": 60},
                                        "BF16": {"tensors": 1, "parameters": 12, "bytes": 24}}}
    assert d["tensors"][2] == {"file": "optimizer.safetensors", "name": "state.m", "dtype": "BF16", "shape": [3, 4],
                               "parameters": 12, "bytes": 24}
    assert d["header_bytes_read"] <= 2 * 64 * 1024  # headers only, never the data

    rc, out, err = run(capsys, "verify", ck)
    assert rc == 0 and out == f"OK {ck} (step 20): 3 files, 8.2 KiB, checksums match"
    rc, out, _ = run(capsys, "verify", root, "--json")  # a root: every checkpoint (40 never committed: fails)
    d = json.loads(out)
    assert rc == 1 and d["ok"] is False and d["resume"] == {"path": f"{root}/checkpoint-30", "step": 30}
    assert [(c["step"], c["status"]) for c in d["checkpoints"]] == [(40, "failed"), (30, "ok"), (20, "ok"), (10, "ok")]
    rc, out, err = run(capsys, "verify", f"{root}/checkpoint-40")
    assert rc == 1 and "incomplete" in err


def test_local_outputs(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    root = make_tree(tmp_path / "ck")
    _check_outputs(capsys, str(root), remote=False)


def test_s3_outputs(capsys: pytest.CaptureFixture[str], s3: str, tmp_path: Path):  # noqa: F811
    import fsspec

    local = make_tree(tmp_path / "ck")
    fs = fsspec.filesystem("s3")
    fs.put(str(local) + "/", f"{s3[5:]}/run/", recursive=True)
    _check_outputs(capsys, f"{s3}/run", remote=True)


def test_verify_names_the_bad_file(capsys: pytest.CaptureFixture[str], s3: str, tmp_path: Path):  # noqa: F811
    import fsspec

    root = make_tree(tmp_path / "ck")
    f = root / "checkpoint-20" / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    rc, out, err = run(capsys, "verify", str(root / "checkpoint-20"))
    assert rc == 1
    assert "optimizer.safetensors: checksum mismatch" in err and "model.safetensors" not in err
    assert out.startswith("FAILED")
    fs = fsspec.filesystem("s3")
    fs.put(str(root / "checkpoint-20") + "/", f"{s3[5:]}/x/checkpoint-20/", recursive=True)
    rc, out, err = run(capsys, "verify", f"{s3}/x/checkpoint-20", "--json")
    assert rc == 1 and json.loads(out)["problems"][0].startswith("optimizer.safetensors: checksum mismatch")


def test_missing_target_and_start_up_without_torch(tmp_path: Path):
    root = make_tree(tmp_path / "ck")
    code = ("import sys; from btckpt.cli import main; rc = main(['ls', sys.argv[1]]); main(['show', sys.argv[1]]); "
            "bad = [m for m in ('torch', 'transformers', 'lightning', 'numpy') if m in sys.modules]; "
            "sys.exit(3 if bad else rc)")
    fresh = dict(os.environ, BTCKPT_TEST_ZYGOTE="0")  # a fresh interpreter: the test zygote has torch imported
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60, env=fresh)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "btckpt.cli", "show", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "no checkpoint there" in r.stderr


def _corrupt(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def test_verify_dir_checks_every_checkpoint_and_fails_on_a_corrupt_newest(capsys: pytest.CaptureFixture[str],
                                                                          tmp_path: Path):
    root = tmp_path / "ck"
    for s in (10, 20):
        btckpt.save(root / f"checkpoint-{s}", {"model": {"w": torch.full((4,), float(s))}}, save_rng=False)
    _corrupt(root / "checkpoint-20" / "model.safetensors")
    rc, out, err = run(capsys, "verify", str(root))
    assert rc == 1
    assert out.splitlines()[:2] == [f"FAILED {root}/checkpoint-20 (step 20): 1 problem(s) in 2 file(s)",
                                    f"OK {root}/checkpoint-10 (step 10): 2 files, 4.1 KiB, checksums match"]
    assert out.splitlines()[2] == f"checked 2 checkpoint(s) under {root}: 1 OK, 1 FAILED; a resume loads step 10"
    assert "checkpoint-20: model.safetensors: checksum mismatch" in err
    rc, out, _ = run(capsys, "verify", str(root), "--newest")
    assert rc == 1 and out.splitlines()[0].startswith(f"FAILED {root}/checkpoint-20 (step 20)")
    assert out.splitlines()[-1] == f"checked the newest checkpoint only (--newest) under {root}: 0 OK, 1 FAILED"
    rc, out, _ = run(capsys, "verify", str(root), "--json")
    d = json.loads(out)
    assert rc == 1 and d["ok"] is False and d["checked"] == "all" and d["resume"]["step"] == 10
    assert [(c["step"], c["status"]) for c in d["checkpoints"]] == [(20, "failed"), (10, "ok")]
    # ls: complete by size (no data read) is not verified; --verify checks and says so
    rc, out, _ = run(capsys, "ls", str(root), "--json")
    assert [(r["step"], r["status"], r["checked"]) for r in json.loads(out)] == [(20, "complete", "sizes"),
                                                                                 (10, "complete", "sizes")]
    rc, out, _ = run(capsys, "ls", str(root), "--verify")
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["CHECKED", "DETAIL"]
    assert lines[2].split()[7:10] == ["corrupt", "checksums", "model.safetensors:"]
    assert lines[3].split()[-2:] == ["complete", "checksums"]


def test_verify_dir_reports_a_checkpoint_retired_while_it_ran(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    import shutil

    import btckpt.cli as cli

    root = tmp_path / "ck"
    for s in (10, 20):
        btckpt.save(root / f"checkpoint-{s}", {"model": {"w": torch.full((4,), float(s))}}, save_rng=False)
    real = cli.check_files

    def retire_then_check(info):  # the running job's retention deletes step 10 after the listing
        if info.step == 10:
            shutil.rmtree(info.path)
        return real(info)

    monkeypatch.setattr(cli, "check_files", retire_then_check)
    rc, out, _ = run(capsys, "verify", str(root))
    assert rc == 0, out
    assert out.splitlines()[1] == (f"RETIRED {root}/checkpoint-10 (step 10): deleted while verifying (a running "
                                   "job's retention); skipped")
    assert out.splitlines()[2].endswith("1 OK, 0 FAILED, 1 retired; a resume loads step 20")
