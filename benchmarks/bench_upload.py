"""Upload and remote-read benchmark against a local S3 server (moto on 127.0.0.1), and ``show`` bytes read.

1. Upload throughput: btckpt's Uploader (verified, journaled, manifest last) vs ``fs.put(recursive=True)``
   of the same folder, alternating round by round, each round into a fresh prefix. Ratio = median/median.
2. Remote restore: download to the local cache then load (``remote.fetch`` + reader) vs reading the
   objects directly into memory (``cat_file`` + xxh3 + safetensors parse), alternating.
3. ``btckpt show`` on a 10 GiB sparse safetensors file: bytes read (self-count and /proc/self/io rchar),
   and the range-request bytes for a remote show.

Run: PYTHONPATH=integrations python benchmarks/bench_upload.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f}s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="checkpoint size in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparse-gib", type=int, default=10)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_upload_"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "BTCKPT_CACHE": str(work / "cache")})
        import boto3
        import fsspec

        fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        fs = fsspec.filesystem("s3")
        import btckpt
        import torch
        from btckpt.upload import Uploader

        n = args.mib * 2**20 // 4 // 4
        state = {"model": {f"layer{i}.weight": torch.randn(n) for i in range(2)},
                 "optimizer": {f"m{i}": torch.randn(n) for i in range(2)}}
        src = work / "ck"
        btckpt.save(src / "checkpoint-1", state, max_shard_size=64 << 20, save_rng=False)
        total = sum(f.stat().st_size for f in (src / "checkpoint-1").iterdir())
        nfiles = len(list((src / "checkpoint-1").iterdir()))
        print(f"checkpoint: {total / 2**20:.0f} MiB in {nfiles} files; moto at {endpoint}")

        up_t, put_t = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            res = Uploader(src, f"s3://bench/up{r}", concurrency=4).run_pass()
            up_t.append(time.perf_counter() - t0)
            assert res.uploaded and not res.failed
            t0 = time.perf_counter()
            fs.put(str(src / "checkpoint-1") + "/", f"bench/put{r}/checkpoint-1/", recursive=True)
            put_t.append(time.perf_counter() - t0)
            fs.invalidate_cache()
            mib = total / 2**20
            print(f"round {r}: uploader {mib / up_t[-1]:.0f} MiB/s, fs.put {mib / put_t[-1]:.0f} MiB/s")
        ratio = statistics.median(put_t) / statistics.median(up_t)
        print(f"upload: uploader {spread(up_t)}; fs.put {spread(put_t)}")
        print(f"upload throughput ratio uploader/fs.put = {ratio:.2f}x "
              f"({mib / statistics.median(up_t):.0f} vs {mib / statistics.median(put_t):.0f} MiB/s)")

        # remote restore: cache download + verified load vs direct in-memory read
        from btckpt.format.checksum import new_hasher
        from btckpt.restore.reader import CheckpointReader
        from btckpt.storage.discovery import scan
        from btckpt.storage.remote import fetch
        from safetensors.torch import load as st_load

        info = scan("s3://bench/up0/checkpoint-1")[0]
        fetch_t, direct_t = [], []
        for _ in range(args.rounds):
            shutil.rmtree(work / "cache", ignore_errors=True)
            t0 = time.perf_counter()
            local = fetch(info)
            rd = CheckpointReader(local.path, local.manifest)
            for g in rd.groups:
                rd.load_group(g)
            fetch_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for name, entry in info.manifest.files.items():
                data = fs.cat_file(f"bench/up0/checkpoint-1/{name}")
                h = new_hasher()
                h.update(data)
                assert h.hexdigest() == entry["xxh3_64"]
                if name.endswith(".safetensors"):
                    st_load(data)
            direct_t.append(time.perf_counter() - t0)
        print(f"remote restore: download-to-cache+load {spread(fetch_t)}; direct read {spread(direct_t)}; "
              f"direct/cache time ratio {statistics.median(direct_t) / statistics.median(fetch_t):.2f}")

        # show: header bytes only
        from btckpt.cli import describe
        from btckpt.format.header import TensorEntry, build_header
        from btckpt.format.manifest import Manifest

        size = args.sparse_gib * 2**30
        big = work / "big" / "checkpoint-1"
        big.mkdir(parents=True)
        head = build_header([TensorEntry("w", "BF16", (size // 2,), 0, size)])
        with open(big / "model.safetensors", "wb") as f:
            f.write(head)
            f.truncate(len(head) + size)
        fsize = (big / "model.safetensors").stat().st_size
        man = Manifest(step=1, files={"model.safetensors": {"size": fsize, "xxh3_64": "0" * 16}},
                       state={"model": {"w": {"__tensor__": {"file": "model.safetensors", "key": "w"}}}})
        (big / "btckpt.json").write_bytes(man.to_json())
        r0 = rchar()
        t0 = time.perf_counter()
        d = describe(str(big))
        dt = time.perf_counter() - t0
        r1 = rchar()
        print(f"show on a {fsize / 2**30:.1f} GiB sparse file: header bytes read {d['header_bytes_read']}, "
              f"rchar delta {r1 - r0} bytes (manifest included), {dt * 1000:.1f} ms")
        t0 = time.perf_counter()
        d = describe("s3://bench/up0/checkpoint-1")
        dt = time.perf_counter() - t0
        print(f"remote show of the {total / 2**20:.0f} MiB checkpoint: range-request bytes {d['header_bytes_read']} "
              f"for {len([f for f in d['files'] if f['name'].endswith('.safetensors')])} safetensors files, "
              f"{dt * 1000:.0f} ms")
        r = subprocess.run([sys.executable, "-c", "import time,sys; t=time.perf_counter(); "
                            "from btckpt.cli import main; main(['show', sys.argv[1], '--json']); "
                            "print(time.perf_counter()-t, file=sys.stderr)", str(big)],
                           capture_output=True, text=True)
        print(f"`btckpt show` process (import + run): {float(r.stderr.strip().splitlines()[-1]) * 1000:.0f} ms; "
              f"bytes read per its JSON: {json.loads(r.stdout)['header_bytes_read']}")
    finally:
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
