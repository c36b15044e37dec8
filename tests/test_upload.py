"""The uploader against a real S3-protocol server (moto in server mode on 127.0.0.1), plus memory://.

Fixture ``s3`` (a fresh bucket per test on the session's one ``moto`` server, tests/conftest.py; fsspec
configured in-process and through the environment for subprocesses) is reused by test_cli and others.

Internals used: btckpt.publish.staging, btckpt.saving.commit, btckpt.storage.discovery, btckpt.upload (the uploader
object run pass by pass, staging's folder, the commit's delete, discovery to judge the folders on disk (complete,
verified), which no public name reports).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import btckpt
import pytest
import torch
from btckpt.upload import Uploader

PY = sys.executable


@pytest.fixture
def s3(moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh bucket; returns ``s3://<bucket>``. Subprocesses find the server through the environment."""
    import boto3
    import fsspec

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": moto, "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing"}
    env["BTCKPT_CACHE"] = str(tmp_path / "cache")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": moto, "key": "testing", "secret": "testing"})
    bucket = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    yield f"s3://{bucket}"
    fs.invalidate_cache()


def make_ckpts(root: Path, steps: list[int], *, numel: int = 1000, seed: int = 0) -> dict[int, dict]:
    """Committed checkpoints with deterministic contents; returns the states saved."""
    states = {}
    for s in steps:
        g = torch.Generator().manual_seed(seed + s)
        state = {"model": {"w": torch.randn(numel, generator=g), "b": torch.arange(7, dtype=torch.int64) + s},
                 "extra": {"step": s}}
        btckpt.save(root / f"checkpoint-{s}", state, save_rng=False, extra_files={"config.json": b'{"n": %d}' % s})
        states[s] = state
    return states


def upload_cli(src: Path, dest: str, *args: str, env: dict | None = None, timeout: float = 120):
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([PY, "-m", "btckpt.upload", str(src), dest, "--progress", "off", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def btckpt_cli(*args: str, timeout: float = 60):
    return subprocess.run([PY, "-m", "btckpt.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_kill_mid_file_then_resume_and_restore(s3, tmp_path: Path):
    import fsspec

    src = tmp_path / "ck"
    states = make_ckpts(src, [5], numel=3 * 2**20)  # 12 MiB model file: three 5 MiB parts
    dest = f"{s3}/run"
    r = upload_cli(src, dest, "--part-size", str(5 << 20), "--concurrency", "1",
                   env={"BTCKPT_FAULT": "upload_file:kill"})
    assert r.returncode == -9, r.stderr
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    rdir = f"{s3[5:]}/run/checkpoint-5"
    assert not fs.exists(f"{rdir}/btckpt.json")
    assert not fs.exists(f"{rdir}/model.safetensors")  # the multipart upload never completed
    # the remote folder without its manifest is never listed complete
    assert btckpt.latest(dest) is None
    ls = json.loads(btckpt_cli("ls", dest, "--json").stdout)
    assert [(x["step"], x["status"]) for x in ls] == [(5, "incomplete")]
    journal = next((src / ".btckpt-upload").glob("*.jsonl")).read_text().splitlines()
    done_before = [json.loads(x)["remote"] for x in journal if json.loads(x)["t"] == "file"]
    assert done_before == [f"{rdir}/model.safetensors.index.json"] or len(done_before) >= 1
    before = {p: fs.info(p)["LastModified"] for p in done_before}

    r = upload_cli(src, dest, "--part-size", str(5 << 20))
    assert r.returncode == 0, r.stderr
    fs.invalidate_cache()
    assert {p: fs.info(p)["LastModified"] for p in done_before} == before  # not uploaded twice
    assert btckpt.latest(dest) == f"s3://{rdir}"
    v = btckpt_cli("verify", f"s3://{rdir}")
    assert v.returncode == 0, v.stderr
    got = {"model": {"w": torch.zeros(3 * 2**20), "b": torch.zeros(7, dtype=torch.int64)}, "extra": {}}
    assert btckpt.load(dest, got) == 5
    assert torch.equal(got["model"]["w"], states[5]["model"]["w"])
    assert torch.equal(got["model"]["b"], states[5]["model"]["b"])
    assert got["extra"] == {"step": 5}
    # a third run finds everything done and sends nothing
    r = upload_cli(src, dest)
    assert r.returncode == 0 and "0 uploaded, 1 already there" in r.stderr


def test_remote_without_manifest_is_never_complete(s3, tmp_path: Path):
    import fsspec

    src = tmp_path / "ck"
    make_ckpts(src, [1, 2])
    dest = f"{s3}/run"
    assert upload_cli(src, dest).returncode == 0
    fs = fsspec.filesystem("s3")
    fs.rm_file(f"{dest[5:]}/checkpoint-2/btckpt.json")  # every data file present, the commit marker gone
    infos = btckpt.storage.discovery.scan(dest)
    assert [(i.step, i.status) for i in infos] == [(2, "incomplete"), (1, "complete")]
    assert btckpt.latest(dest) == f"{dest}/checkpoint-1"
    fs.pipe_file(f"{dest[5:]}/checkpoint-1/model.safetensors", b"short")  # wrong size: incomplete too
    assert btckpt.latest(dest) is None
    v = btckpt_cli("verify", f"{dest}/checkpoint-2")
    assert v.returncode == 1 and "incomplete" in v.stderr


def test_keep_local_never_deletes_unuploaded(s3, tmp_path: Path):
    src = tmp_path / "ck"
    make_ckpts(src, [1, 2])
    dest = f"{s3}/run"
    assert upload_cli(src, dest).returncode == 0
    make_ckpts(src, [3, 4])
    r = upload_cli(src, dest, "--keep-local", "1", "--retries", "1", "--backoff", "0.01",
                   env={"BTCKPT_FAULT": "upload_manifest:raise"})
    assert r.returncode == 1
    assert "injected I/O error" in r.stderr
    assert sorted(p.name for p in src.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert btckpt.latest(dest) == f"{dest}/checkpoint-2"
    # every upload failing: nothing at all is deleted
    src2 = tmp_path / "ck2"
    make_ckpts(src2, [1, 2, 3])
    r = upload_cli(src2, f"{s3}/other", "--keep-local", "1", "--retries", "0",
                   env={"BTCKPT_FAULT": "upload_manifest:raise"})
    assert r.returncode == 1
    assert sorted(p.name for p in src2.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # once the upload works, keep-local offloads all but the newest
    assert upload_cli(src, dest, "--keep-local", "1").returncode == 0
    assert sorted(p.name for p in src.glob("checkpoint-*")) == ["checkpoint-4"]
    assert btckpt.latest(dest) == f"{dest}/checkpoint-4"


def test_checkpointer_upload_to(s3, tmp_path: Path):
    model = torch.nn.Linear(8, 4)
    dest = f"{s3}/job"
    with btckpt.Checkpointer(dir=tmp_path / "ck", upload_to=dest, async_save=False, keep_last=2) as ck:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.save(step, {"model": model})
    assert btckpt.latest(dest) == f"{dest}/checkpoint-3"
    fresh = torch.nn.Linear(8, 4)
    with btckpt.Checkpointer(dir=tmp_path / "other", load_dir=dest, async_save=False) as ck2:
        assert ck2.restore({"model": fresh}) == 3
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_memory_resume_journal_and_mirror_retention(tmp_path: Path):
    import fsspec

    src = tmp_path / "ck"
    make_ckpts(src, [1, 2, 3])
    dest = f"memory://m{uuid.uuid4().hex[:8]}/run"
    fs = fsspec.filesystem("memory")
    try:
        up = Uploader(src, dest, concurrency=2, retries=0, mirror_retention=True)
        res = up.run_pass()
        assert len(res.uploaded) == 3 and not res.failed
        assert up.run_pass().uploaded == []  # journal: nothing sent again
        # a remote file damaged behind the uploader's back, journal lost: read-back catches it
        (src / ".btckpt-upload").rename(tmp_path / "old-journal")
        path = dest[len("memory://"):] + "/checkpoint-2/model.safetensors"
        data = bytearray(fs.cat_file(path))
        data[-1] ^= 1
        fs.pipe_file(path, bytes(data))
        up2 = Uploader(src, dest, retries=0, mirror_retention=True)
        res = up2.run_pass()
        assert res.uploaded == [f"{up2.root}/checkpoint-2"] and res.bytes_sent == len(data)  # only that file
        assert fs.cat_file(path)[-1] == data[-1] ^ 1
        # mirror retention: the training job's retention removed checkpoint-1 locally
        btckpt.saving.commit.delete_checkpoint(src / "checkpoint-1")
        res = up2.run_pass()
        assert res.deleted_remote == [f"{up2.root}/checkpoint-1"]
        assert not fs.exists(f"{up2.root}/checkpoint-1")
        assert [i.step for i in btckpt.storage.discovery.scan(dest) if i.complete] == [3, 2]
    finally:
        if fs.exists(dest[len("memory://"):]):
            fs.rm(dest[len("memory://"):], recursive=True)


def test_checkpointer_dir_is_a_url(s3, tmp_path: Path):
    """``dir=s3://...``: commits stage locally, wait() publishes them (manifest last), retention is mirrored,
    and a restarted job on a machine without the staging folder resumes from the bucket."""
    import fsspec
    from btckpt.publish.staging import staging_root
    from btckpt.storage.discovery import inspect, verify

    model = torch.nn.Linear(8, 4)
    dest = f"{s3}/urljob"
    with btckpt.Checkpointer(dir=dest, keep_last=2) as ck:
        assert ck.remote == dest and ck.root == staging_root(dest)
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.save(step, {"model": model})
        ck.wait()  # every save so far is published, not only committed locally
        fs = fsspec.filesystem("s3")
        fs.invalidate_cache()
        published = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(dest.removeprefix("s3://")))
        assert btckpt.latest(dest) == f"{dest}/checkpoint-3"
        staging = ck.root
    assert [p for p in published if p.startswith("checkpoint-")] == ["checkpoint-2", "checkpoint-3"]
    assert verify(inspect(f"{dest}/checkpoint-3")) == []  # published bytes match the manifest
    shutil.rmtree(staging)  # a fresh machine: nothing local, the bucket is the only copy
    fresh = torch.nn.Linear(8, 4)
    with btckpt.Checkpointer(dir=dest) as ck2:
        assert ck2.restore({"model": fresh}) == 3
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_dir_url_and_upload_to_together_is_refused(tmp_path: Path):
    with pytest.raises(btckpt.ConfigError, match="upload_to"):
        btckpt.Checkpointer(dir="s3://bucket/run", upload_to="s3://bucket/other")


def test_a_killed_uploaders_manifest_temp_is_removed_and_never_counts(tmp_path: Path):
    """On a non-S3 destination the manifest goes up as a temp object then a move; a kill between the two
    leaves the temp behind: the checkpoint is not complete there, and the next pass removes the temp."""
    import fsspec

    src = tmp_path / "ck"
    make_ckpts(src, [1])
    dest = f"memory://m{uuid.uuid4().hex[:8]}/run"
    fs = fsspec.filesystem("memory")
    rdir = dest[len("memory://"):] + "/checkpoint-1"
    try:
        fs.pipe_file(f"{rdir}/.btckpt.json.tmp-4242", (src / "checkpoint-1" / "btckpt.json").read_bytes())
        assert [i for i in btckpt.storage.discovery.scan(dest) if i.complete] == []  # a temp manifest never commits
        res = Uploader(src, dest, retries=0).run_pass()
        assert len(res.uploaded) == 1 and not res.failed
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(rdir)) == sorted(
            p.name for p in (src / "checkpoint-1").iterdir())
        assert [i.step for i in btckpt.storage.discovery.scan(dest) if i.complete] == [1]
    finally:
        if fs.exists(dest[len("memory://"):]):
            fs.rm(dest[len("memory://"):], recursive=True)
