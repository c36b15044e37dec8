"""The on-disk bytes are fixed: a state exercising every path of the flattening and the layout (tied and
non-contiguous tensors, zero-element and 0-d tensors, mixed element sizes, key collisions, tuples, non-string
keys, non-finite floats, an optimizer, shards with an index) gives the same files, byte for byte, as the
format has always had (digests recorded from the code before the vectorized first save, 2ca7714), whether
written by ``btckpt.save`` (sync, direct) or by a Checkpointer's first and second (plan-reusing) async saves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import btckpt
import torch

# sha256 of each file; the manifest's with ``created`` and ``checksum`` dropped (see _fingerprint)
EXPECTED = {
    "btckpt.json": "a1e6672a8a4d8ec09d70346154f1003a8c927fb309cea0a6777c626a7e92984c",
    "extra.safetensors": "16e53fd9ee320cfc5fe37f3ae83433d39b07706b8941edeb852e18c4708120cc",
    "extra2-00001-of-00002.safetensors": "0894185636c74d9ea74dea5e1f1bf6c67b7873bf3043cb2c880396e23f65d9fd",
    "extra2-00002-of-00002.safetensors": "defd02a816e3b5b44a132e244985a36a8e1aebaabb65f4f36639d40c1d7bf053",
    "extra2.safetensors.index.json": "aad2302591199de959c02f002b6e91deb61425c249d8ea4fa5ead92ce9be4ca0",
    "model-00001-of-00002.safetensors": "b7c555da48a618e568220aef7befd3415f86a96bbe4266b2bb4914488a536bbd",
    "model-00002-of-00002.safetensors": "8c2d0e333606e94e2bf1cecc609e4f5cd43bf5a279a1b962d1132ffb033b6204",
    "model.safetensors.index.json": "c26dd5889a60bca949a7bf0dd4bb132be4bdc6980253bdf0165bef6fd50d18eb",
    "optimizer-00001-of-00004.safetensors": "4f48ce5acf5e0d9e6dc33f17af72a15d354f63805e47250bb31336f0aa730b14",
    "optimizer-00002-of-00004.safetensors": "0ac76d2eb18db784edf9f21f30fb17e0354808173f1a1dbe9c0a3a8d70d6358c",
    "optimizer-00003-of-00004.safetensors": "20d8ea7d5d73213043344c24e3d49f2629d250d1df2a84fe52ce8e3cd1b44ead",
    "optimizer-00004-of-00004.safetensors": "6e311c31ce951d7e1cdd468ca8d857bc9963ed853eca1a6a15dd2e775d80fb27",
    "optimizer.safetensors.index.json": "97a35539a63ae07a8decb841d717d6e01d521bb8654ba44797e277d0441174ba",
}


def _state() -> dict:
    g = torch.Generator().manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.LayerNorm(5),
                                torch.nn.Linear(5, 11, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model[3].weight = model[0].weight  # tied: stored once, referenced twice
    model.register_buffer("counter", torch.tensor(7, dtype=torch.int64))
    model.register_buffer("halfbuf", torch.randn(3, 4, generator=g).to(torch.bfloat16))
    model.register_buffer("nothing", torch.zeros(0, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.randn(5, 3, generator=g)
    extra = {"t": base.t(), "s": base[:, ::2], "z": torch.tensor(3.5), "a": shared, "b": shared,
             "a.b": torch.ones(2, dtype=torch.int32), "n": {"x": torch.ones(3, dtype=torch.int8)},
             "lst": [torch.full((2,), 2.0, dtype=torch.float64), 3, "s", None, (1.5, float("inf"))],
             "keys": {1: torch.zeros(2, dtype=torch.int16), (2, "x"): 4.0, "plain": True},
             "empty": torch.zeros(0), "u8": torch.arange(5, dtype=torch.uint8)}
    # "a" then {"a": {"b"}}: the dotted key "a.b" collides; the second gets "a.b#2"
    extra2 = {"a.b": torch.ones(3), "a": {"b": torch.zeros(3)}, "big": torch.randn(300, generator=g)}
    return {"model": model, "optimizer": opt, "extra": extra, "extra2": extra2, "step": {"n": 3, "lr": [0.1, 0.2]}}


def _fingerprint(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        raw = p.read_bytes()
        if p.name == "btckpt.json":
            obj = json.loads(raw)
            obj.pop("created"), obj.pop("checksum")
            raw = json.dumps(obj).encode()
        out[p.name] = hashlib.sha256(raw).hexdigest()
    return out


SHARD = 300  # bytes: the model, optimizer and extra2 groups split into several files (with an index)


def test_sync_save_bytes_are_the_formats(tmp_path: Path) -> None:
    path = btckpt.save(tmp_path / "checkpoint-3", _state(), save_rng=False, max_shard_size=SHARD)
    assert _fingerprint(path) == EXPECTED


def test_async_first_and_reused_saves_bytes_are_the_formats(tmp_path: Path) -> None:
    state = _state()
    with btckpt.Checkpointer(dir=tmp_path / "run", save_rng=False, handle_sigterm=False, max_shard_size=SHARD,
                             keep_last=3) as ck:
        ck.save(3, state)
        ck.wait()
        ck.save(4, state)
        ck.wait()
        assert ck.stats.plan_reuses >= 1
    first = _fingerprint(tmp_path / "run" / "checkpoint-3")
    assert first == EXPECTED
    second = _fingerprint(tmp_path / "run" / "checkpoint-4")
    assert second.keys() == EXPECTED.keys()
    assert {k: v for k, v in second.items() if k != "btckpt.json"} == {k: v for k, v in EXPECTED.items()
                                                                      if k != "btckpt.json"}


if __name__ == "__main__":  # print the fingerprint (to record EXPECTED from a known-good checkout)
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(_fingerprint(btckpt.save(Path(d) / "checkpoint-3", _state(), save_rng=False,
                                                  max_shard_size=int(sys.argv[1]) if len(sys.argv) > 1 else SHARD)),
                         indent=4))
