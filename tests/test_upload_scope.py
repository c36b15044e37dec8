"""Scope of the uploader's deletions (issue 11, items 1 and 17), against moto S3 and memory://.

Remote deletion happens only on positive knowledge (this uploader published the checkpoint and the job's
retention retired that very checkpoint); local deletion (``--keep-local``) only after the bucket, not the
journal, shows a verified copy; one uploader per source.

Internals used: btckpt.saving.commit, btckpt.storage.discovery, btckpt.upload (the uploader object run pass by pass,
the commit's delete, discovery to judge the folders on disk (complete, verified), which no public name reports).
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import btckpt
import pytest
from btckpt.saving.commit import delete_checkpoint
from btckpt.storage.discovery import inspect, verify
from btckpt.upload import Uploader
from test_upload import make_ckpts, s3, upload_cli  # noqa: F401 - fixtures


def _remote_steps(dest: str) -> list[int]:
    return sorted(i.step for i in btckpt.storage.discovery.scan(dest) if i.complete)


@pytest.fixture
def mem():
    import fsspec

    dest = f"memory://m{uuid.uuid4().hex[:8]}/run"
    fs = fsspec.filesystem("memory")
    yield dest
    if fs.exists(dest[len("memory://"):]):
        fs.rm(dest[len("memory://"):], recursive=True)


def test_a_model_at_the_top_of_src_changes_nothing_remote(tmp_path: Path, mem: str):
    """``model.safetensors`` + ``config.json`` at SRC's top made the scan return SRC itself, and mirror
    retention then deleted every remote checkpoint. Only ``checkpoint-<N>`` under SRC are in scope."""
    src = tmp_path / "ck"
    make_ckpts(src, [1, 2, 3])
    up = Uploader(src, mem, retries=0, mirror_retention=True)
    assert len(up.run_pass().uploaded) == 3
    shutil.copy(src / "checkpoint-3" / "model.safetensors", src / "model.safetensors")
    (src / "config.json").write_text("{}")
    res = up.run_pass()
    assert res.deleted_remote == [] and res.uploaded == [] and not res.failed
    assert _remote_steps(mem) == [1, 2, 3]
    # the job's own retention still mirrors, model file or not
    delete_checkpoint(src / "checkpoint-1")
    assert up.run_pass().deleted_remote == [f"{up.root}/checkpoint-1"]
    assert _remote_steps(mem) == [2, 3]


def test_a_vanished_or_reshaped_source_deletes_nothing_remote(tmp_path: Path, mem: str):
    """A cleaned staging folder, a folder removed by hand, or a tree that changed layout is not the job's
    retention: nothing remote is deleted."""
    src = tmp_path / "ck"
    make_ckpts(src, [1, 2, 3])
    up = Uploader(src, mem, retries=0, mirror_retention=True)
    assert len(up.run_pass().uploaded) == 3
    shutil.rmtree(src / "checkpoint-1")  # a person's rm, not retention
    (src / "rank-0").mkdir()
    (src / "checkpoint-2").rename(src / "rank-0" / "checkpoint-2")  # the layout changed shape
    res = up.run_pass()
    assert res.deleted_remote == []
    shutil.rmtree(src)  # the whole staging folder vanished (a cleaned cache)
    res = up.run_pass()
    assert res.deleted_remote == [] and res.failed
    assert _remote_steps(mem) == [1, 2, 3]
    # a fresh uploader on the vanished source refuses instead of re-creating it
    with pytest.raises(btckpt.ConfigError, match="not a folder"):
        Uploader(src, mem)
    assert not src.exists()


def test_mirror_never_deletes_what_keep_local_offloaded(s3: str, tmp_path: Path):  # noqa: F811
    """Two uploaders on one source, one after the other: a ``--keep-local`` offload to bucket A is no
    retirement, so a ``--mirror-retention`` uploader to bucket B keeps its copies."""
    src = tmp_path / "ck"
    make_ckpts(src, [1, 2, 3])
    mirror_dest, offload_dest = f"{s3}/mirror", f"{s3}/offload"
    assert upload_cli(src, mirror_dest, "--mirror-retention").returncode == 0
    r = upload_cli(src, offload_dest, "--keep-local", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in src.glob("checkpoint-*")) == ["checkpoint-3"]
    r = upload_cli(src, mirror_dest, "--mirror-retention")
    assert r.returncode == 0, r.stderr
    assert "0 remote deleted" in r.stderr
    assert _remote_steps(mirror_dest) == [1, 2, 3] and _remote_steps(offload_dest) == [1, 2, 3]


def test_keep_local_verifies_the_bucket_not_the_journal(s3: str, tmp_path: Path):  # noqa: F811
    """A data file deleted in the bucket: the re-run uploads it again (not "already there"); while that
    upload fails, ``--keep-local`` keeps the local copy, the only complete one."""
    import fsspec

    src = tmp_path / "ck"
    make_ckpts(src, [1, 2], numel=3 * 2**20)  # 12 MiB files: the upload_file fault fires mid-file
    dest = f"{s3}/run"
    assert upload_cli(src, dest, "--part-size", str(5 << 20)).returncode == 0
    fs = fsspec.filesystem("s3")
    fs.rm_file(f"{dest[5:]}/checkpoint-1/model.safetensors")
    r = upload_cli(src, dest, "--keep-local", "1", "--retries", "0", "--part-size", str(5 << 20),
                   env={"BTCKPT_FAULT": "upload_file:raise"})
    assert r.returncode == 1, r.stderr
    assert "1 already there, 1 failed, 0 local deleted" in r.stderr
    assert sorted(p.name for p in src.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    r = upload_cli(src, dest, "--keep-local", "1", "--part-size", str(5 << 20))
    assert r.returncode == 0, r.stderr
    assert "1 uploaded, 1 already there, 0 failed, 1 local deleted" in r.stderr
    assert sorted(p.name for p in src.glob("checkpoint-*")) == ["checkpoint-2"]
    assert verify(inspect(f"{dest}/checkpoint-1")) == []


def test_one_uploader_per_source(tmp_path: Path, mem: str):
    src = tmp_path / "ck"
    make_ckpts(src, [1])
    first = Uploader(src, mem)
    first.lock()
    try:
        r = subprocess.run([sys.executable, "-m", "btckpt.upload", str(src), "memory://x/y", "--progress", "off"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"another uploader (pid {__import__('os').getpid()})" in r.stderr and "Traceback" not in r.stderr
        with pytest.raises(btckpt.CheckpointError, match="one uploader per source"):
            Uploader(src, mem).run_pass()
    finally:
        first.close()
    assert len(Uploader(src, mem).run_pass().uploaded) == 1


class _Always500(http.server.BaseHTTPRequestHandler):
    def _fail(self) -> None:
        body = b"<Error><Code>InternalError</Code><Message>boom</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _fail

    def log_message(self, *a: object) -> None:
        pass


def test_ls_under_a_persistent_server_error_exits_2(tmp_path: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always500)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        env = {**__import__("os").environ, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_MAX_ATTEMPTS": "1",
               "AWS_DEFAULT_REGION": "us-east-1"}
        r = subprocess.run([sys.executable, "-m", "btckpt.cli", "ls", "s3://bucket/run"], capture_output=True,
                           text=True, timeout=180, env=env)
        make_ckpts(tmp_path / "ck", [1])
        up = subprocess.run([sys.executable, "-m", "btckpt.upload", str(tmp_path / "ck"), "s3://bucket/run",
                             "--keep-local", "0", "--progress", "off"], capture_output=True, text=True, timeout=180,
                            env=env)
    finally:
        server.shutdown()
        server.server_close()
        t.join()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "s3://bucket/run" in r.stderr
    # the uploader: one error line for the pass, exit 1 (not uploaded), the local copy kept
    assert up.returncode == 1 and "cannot list s3://bucket/run" in up.stderr and "Traceback" not in up.stderr
    assert (tmp_path / "ck" / "checkpoint-1").is_dir()


def test_keep_local_reads_back_a_changed_remote_file(tmp_path: Path, mem: str):
    """Where there is no ETag (memory://, file://), a remote file replaced by other bytes of the same size
    is caught by a read-back before the local copy is deleted; the next pass uploads it again."""
    import fsspec

    src = tmp_path / "ck"
    make_ckpts(src, [1, 2])
    assert len(Uploader(src, mem, retries=0).run_pass().uploaded) == 2
    fs = fsspec.filesystem("memory")
    path = mem[len("memory://"):] + "/checkpoint-1/model.safetensors"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    up = Uploader(src, mem, retries=0, keep_local=1)
    res = up.run_pass()
    assert res.deleted_local == [] and (src / "checkpoint-1").is_dir()
    res = up.run_pass()
    assert res.uploaded == [f"{up.root}/checkpoint-1"] and res.deleted_local == [str(src / "checkpoint-1")]
    assert fs.cat_file(path) != bytes(data)
    assert verify(inspect(f"{mem}/checkpoint-1")) == []
