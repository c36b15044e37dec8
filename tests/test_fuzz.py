"""Fuzz the reading side (issue 11): mutate a committed checkpoint as an attacker would, re-sign it, and
check that every entry point either succeeds on a verified checkpoint or raises a CheckpointError.

Each case copies a pristine tree (``ck/checkpoint-1``, good and older; ``ck/checkpoint-2``, the target: model,
optimizer and plain state, in a plain, a sharded and a DCP-resharded variant), applies 1-3 mutations to
checkpoint-2 (manifest fields, types and values; tensor references; index and RNG JSON; safetensors headers:
dtype, shape, offsets, header length; file kinds: directory, FIFO, socket, links in and out; hostile names;
truncation and trailing bytes) and, most of the time, re-signs it (every listed file's size and xxh3-64, and
the manifest's own checksum, recomputed: checksums are not signatures). Then, in a worker thread with a
timeout, it runs ``discovery.scan``, ``btckpt.latest``, ``btckpt.load`` (the folder, and the parent),
``Checkpointer.restore`` and the CLI's ``ls``/``verify``/``show`` (in process, JSON output).

Invariant per case: no exception other than a ``CheckpointError`` subclass; no hang; restore from the parent
returns 2 or falls back to 1 (with checkpoint-1's weights loaded); a successful load of checkpoint-2 is of a
checkpoint whose files verify; nothing in the tree changes (no write anywhere, the older checkpoint and the
file outside untouched) except the Checkpointer's own lock file.

CI runs ``BTCKPT_FUZZ_EXAMPLES`` cases (default 1,000) in ``SHARDS`` tests of a fixed seed each (the same cases
every run; pytest-xdist runs the shards side by side); ``BTCKPT_FUZZ_EXAMPLES=10000`` is the long run (about 12
minutes here on one worker; lift the suite's 300 s limit with ``-o timeout=1500``). ``BTCKPT_FUZZ_REPORT=<file>``
writes the outcome counts of all shards as JSON (each shard adds its own under a lock).

Internals used: btckpt.cli, btckpt.format.manifest, btckpt.storage.discovery (the manifest's digest helpers to
re-sign a mutated checkpoint, the command's ``verify``, discovery to judge the folders on disk (complete, verified),
which no public name reports).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import stat
import struct
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import btckpt
import pytest
import torch
from btckpt import CheckpointError
from btckpt.format.manifest import _ZERO, MANIFEST, _digest, _needle
from btckpt.storage.discovery import scan

pytest.importorskip("hypothesis", reason="hypothesis: a dev dependency (btckpt[dev]), not in the lowest-versions venv")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("BTCKPT_FUZZ_EXAMPLES", "1000"))
SHARDS = 4  # tests of EXAMPLES / SHARDS cases each, one seed per shard
CASE_TIMEOUT = 60.0
VARIANTS = ("plain", "sharded", "dcp", "zero")  # zero: a flat partition's boxes (distributed/zero.py's layout)

HOSTILE_STRINGS = [".", "..", "", "/", "/etc/passwd", "../outside/secret.safetensors", "a/../../x", "a//b",
                   "./model.safetensors", "\x1b]0;pwn\x07", "\x1b[2J", "[/]", "[blink]x", "x\x00y", "C:/x",
                   "\\\\srv\\share", "model.safetensors", "optimizer.safetensors", MANIFEST, "rng_state_0.json",
                   "sub/model.safetensors", "nope.safetensors", "model-rank00000.safetensors", "weight", "bias",
                   "state", "param_groups", "F32", "I64", "BOOL", "F8_E8M0", "\u202e", "model", "optimizer", "extra"]
HOSTILE_INTS = [0, 1, -1, 2, 3, 4, 8, 12, 2**31, 2**32, 2**53, 2**62, 2**63, 2**64, 2**70, -(2**63)]
KEYS = ["file", "key", "sharded", "shape", "dtype", "chunks", "offsets", "sizes", "node", "size", "xxh3_64",
        "__tensor__", "__tuple__", "__dict__", "__float__", "data_offsets", "__metadata__", "weight_map",
        "btckpt.sharded", "nodes", "node_rank", "python", "torch", "numpy", "state", "param_groups", "params"]

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(HOSTILE_INTS), st.integers(-3, 100),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from(HOSTILE_STRINGS),
                    st.text(max_size=6))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), c, max_size=4), max_leaves=8)
shapes = st.lists(st.sampled_from(HOSTILE_INTS) | st.integers(0, 6), max_size=4)
DTYPES = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64", "F8_E8M0", "C64", "U64", "X9", "f32", ""]


# -- the pristine trees -----------------------------------------------------------------------------------------
def make_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "extra": {"epoch": seed, "t": (1, 2.5), "inf": float("inf")}}


def fresh_state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters()), "extra": {}}


def st_bytes(entries: dict[str, Any]) -> bytes:
    hdr, data, pos = {}, b"", 0
    for k, t in entries.items():
        raw = t.contiguous().numpy().tobytes()
        hdr[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        data, pos = data + raw, pos + len(raw)
    h = json.dumps(hdr).encode()
    return struct.pack("<Q", len(h)) + h + data


def to_sharded(folder: Path, *, dcp: bool, zero: bool = False) -> None:
    """Checkpoint-2's first weight as a sharded tensor in ``model-rank00000.safetensors``: two row chunks (FSDP2's
    and FSDP1's row blocks), or with ``zero`` the three boxes a flat ZeRO partition boundary two elements into
    the first row cuts it into (the rest of row 0 and the rows after it)."""
    from safetensors.torch import load_file

    w = next(v for k, v in load_file(str(folder / "model.safetensors")).items() if k.endswith("0.weight"))
    rows, cols = w.shape
    name = "model-rank00000.safetensors"
    if zero:
        parts = {"c0": ([0, 0], w[:1, :2]), "c1": ([0, 2], w[:1, 2:]), "c2": ([1, 0], w[1:])}
    else:
        parts = {"c0": ([0, 0], w[:1]), "c1": ([1, 0], w[1:])}
    (folder / name).write_bytes(st_bytes({k: t.contiguous() for k, (_, t) in parts.items()}))
    man = json.loads((folder / MANIFEST).read_bytes())
    man["state"]["model"]["0.weight"] = {"__tensor__": {"sharded": {
        "key": "0.weight", "shape": [rows, cols], "dtype": "F32",
        "chunks": [{"offsets": off, "sizes": list(t.shape), "file": name, "key": k, "node": 0}
                   for k, (off, t) in parts.items()]}}}
    man["files"]["model-rank00000.safetensors"] = {}
    if dcp:
        man["meta"] = {"btckpt.sharded": {"model": "model"}}
    write_manifest(folder, man)
    resign(folder)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz-pristine")
    out = {}
    for variant in VARIANTS:
        root = base / variant
        (root / "outside").mkdir(parents=True)
        (root / "outside" / "secret.safetensors").write_bytes(st_bytes({"w": torch.ones(3, 4)}))
        with btckpt.Checkpointer(dir=str(root / "ck"), async_save=False, keep_last=None, max_shard_size=120,
                                 handle_sigterm=False) as ck:
            for step in (1, 2):
                ck.save(step, make_state(step), extra_files={"config.json": b'{"hidden": 4}'})
        if variant != "plain":
            to_sharded(root / "ck" / "checkpoint-2", dcp=variant == "dcp", zero=variant == "zero")
        out[variant] = root
    c2 = out["plain"] / "ck" / "checkpoint-2"
    assert any(n.endswith(".index.json") for n in os.listdir(c2)), os.listdir(c2)  # sharded files + index
    for variant, root in out.items():  # each variant restores as is
        s = fresh_state()
        assert btckpt.load(root / "ck" / "checkpoint-2", s) == 2, variant
        assert torch.equal(s["model"][0].weight, make_state(2)["model"][0].weight), variant
    return out


# -- re-signing: what an attacker does after editing ------------------------------------------------------------
def write_manifest(folder: Path, obj: Any, *, sign: bool = True) -> None:
    if read_plain(folder / MANIFEST) is None:  # a FIFO, a directory, a link: left as the mutation made it
        return
    if not (isinstance(obj, dict) and sign):
        (folder / MANIFEST).write_bytes(json.dumps(obj, indent=1).encode())
        return
    obj = {k: v for k, v in obj.items() if k != "checksum"}
    obj["checksum"] = _ZERO
    raw = json.dumps(obj, indent=1).encode()
    pos = raw.rfind(_needle(_ZERO))
    digest = _digest(raw)
    (folder / MANIFEST).write_bytes(raw[:pos] + _needle(digest) + raw[pos + len(_needle(digest)):])


def read_plain(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (never opens a FIFO: the fuzzer must not hang itself)."""
    try:
        return path.read_bytes() if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None


def read_json(path: Path) -> Any:
    raw = read_plain(path)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


def _sum(path: Path) -> tuple[int, str]:
    """(size, xxh3-64) as the scan will see them, without ever opening a non-regular file."""
    import xxhash

    try:
        st_ = os.stat(path) if path.is_symlink() else os.lstat(path)
    except OSError:
        return 0, _ZERO
    if not stat.S_ISREG(st_.st_mode):
        return os.lstat(path).st_size, _ZERO
    data = path.read_bytes()
    return len(data), xxhash.xxh3_64(data).hexdigest()


def resign(folder: Path) -> None:
    """Recompute every listed file's size and checksum, and the manifest's checksum."""
    obj = read_json(folder / MANIFEST)
    if obj is None:
        return
    files = obj.get("files") if isinstance(obj, dict) else None
    if isinstance(files, dict):
        for name in list(files):
            p = folder / name
            inside = name and "\x00" not in name and os.path.abspath(p).startswith(str(folder.parent.parent) + "/")
            size, digest = _sum(p) if inside else (0, _ZERO)
            entry = files[name] if isinstance(files[name], dict) else {}
            files[name] = dict(entry, size=size, xxh3_64=digest)
    write_manifest(folder, obj)


# -- mutations --------------------------------------------------------------------------------------------------
def json_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, path + (i,))
    return out


def edit_json(data: st.DataObject, obj: Any, *, prefer: tuple = ()) -> Any:
    """Set, add or delete one value somewhere in ``obj`` (paths under ``prefer`` drawn first half the time)."""
    paths = json_paths(obj)
    preferred = [p for p in paths if p[:len(prefer)] == prefer and len(p) > len(prefer)] if prefer else []
    path = data.draw(st.sampled_from(preferred if preferred and data.draw(st.booleans()) else paths))
    if not path:
        return data.draw(values)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    how = data.draw(st.sampled_from(["set", "set", "delete", "add"]))
    if how == "delete":
        del parent[path[-1]]
    elif how == "add" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from(KEYS + HOSTILE_STRINGS))] = data.draw(values)
    elif how == "add" and isinstance(parent, list):
        parent.append(data.draw(values))
    else:
        parent[path[-1]] = data.draw(values)
    return obj


def listed(folder: Path) -> list[str]:
    obj = read_json(folder / MANIFEST)
    files = obj.get("files") if isinstance(obj, dict) else None
    return sorted(n for n in files if isinstance(n, str)) if isinstance(files, dict) else []


def mutate(data: st.DataObject, folder: Path, outside: Path, sockets: list[socket.socket]) -> str:
    names = sorted(os.listdir(folder)) or [MANIFEST]
    kind = data.draw(st.sampled_from(["manifest", "manifest", "manifest_ref", "files_entry", "st_header",
                                      "st_header", "st_field", "json_file", "file_kind", "bytes", "header_len"]))
    if kind in ("manifest", "manifest_ref", "files_entry"):
        obj = read_json(folder / MANIFEST)
        if obj is None:
            return "manifest unreadable already"
        if kind == "files_entry" and isinstance(obj, dict) and isinstance(obj.get("files"), dict):
            files = obj["files"]
            name = data.draw(st.sampled_from(HOSTILE_STRINGS + [n for n in files]))
            if files and data.draw(st.booleans()):  # rename an entry (and maybe its references stay)
                old = data.draw(st.sampled_from(sorted(files)))
                files[name] = files.pop(old)
                if data.draw(st.booleans()):
                    raw = json.dumps(obj).replace(json.dumps(old), json.dumps(name))
                    obj = json.loads(raw)
            else:
                files[name] = data.draw(values | st.just({"size": 0, "xxh3_64": _ZERO}))
            what = f"files entry {name!r}"
        else:
            prefer = ("state",) if kind == "manifest_ref" else ()
            obj = edit_json(data, obj, prefer=prefer)
            what = f"manifest {kind}"
        write_manifest(folder, obj)
        return what
    st_names = [n for n in names if n.endswith(".safetensors") and (folder / n).is_file()]
    if kind in ("st_header", "st_field", "header_len") and st_names:
        name = data.draw(st.sampled_from(st_names))
        raw = (folder / name).read_bytes()
        if len(raw) < 8:
            return f"{name} too short already"
        (n,) = struct.unpack("<Q", raw[:8])
        if kind == "header_len":
            new = data.draw(st.sampled_from(HOSTILE_INTS + [n - 1, n + 1, n + 8, len(raw), len(raw) - 8]))
            (folder / name).write_bytes(struct.pack("<Q", new % 2**64) + raw[8:])
            return f"{name} header length {new}"
        try:
            hdr, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        except ValueError:
            return f"{name} header unparsable already"
        if kind == "st_field" and isinstance(hdr, dict) and [k for k in hdr if k != "__metadata__"]:
            t = data.draw(st.sampled_from(sorted(k for k in hdr if k != "__metadata__")))
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "reshape", "rename"]))
            if not isinstance(hdr[t], dict):
                hdr[t] = {}
            if field == "dtype":
                hdr[t]["dtype"] = data.draw(st.sampled_from(DTYPES) | values)
            elif field == "shape":
                hdr[t]["shape"] = data.draw(shapes | values)
            elif field == "data_offsets":
                hdr[t]["data_offsets"] = data.draw(st.lists(st.sampled_from(HOSTILE_INTS) | st.integers(0, 200),
                                                            max_size=3) | values)
            elif field == "reshape":  # same bytes, another shape: parses, then must not fit
                try:
                    numel = (hdr[t]["data_offsets"][1] - hdr[t]["data_offsets"][0]) // 4
                except (TypeError, KeyError, IndexError):
                    numel = 1
                hdr[t]["shape"] = data.draw(st.sampled_from([[numel], [1, numel], [numel, 1], [0, 2**70], []]))
            else:
                hdr[data.draw(st.sampled_from(HOSTILE_STRINGS))] = hdr.pop(t)
        else:
            hdr = edit_json(data, hdr)
        h = json.dumps(hdr).encode()
        (folder / name).write_bytes(struct.pack("<Q", len(h)) + h + body)
        return f"{name} header {kind}"
    if kind == "json_file":
        js = [n for n in names if n.endswith(".json") and n != MANIFEST and (folder / n).is_file()]
        if js:
            name = data.draw(st.sampled_from(js))
            obj = read_json(folder / name)
            (folder / name).write_bytes(json.dumps(edit_json(data, obj)).encode())
            return f"{name} edited"
    if kind == "file_kind":
        name = data.draw(st.sampled_from(sorted(set(names) | set(listed(folder)) | {MANIFEST})))
        if "\x00" in name or not name or name.startswith("/") or ".." in name.split("/") or name in (".", "/"):
            return "no-op"
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        p.parent.mkdir(parents=True, exist_ok=True)
        what = data.draw(st.sampled_from(["dir", "fifo", "socket", "link_out", "link_in", "dangling", "empty",
                                          "link_dir"]))
        if what == "dir":
            p.mkdir()
        elif what == "fifo":
            os.mkfifo(p)
        elif what == "socket":
            s = socket.socket(socket.AF_UNIX)
            fd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)  # a short path: tmp_path may exceed AF_UNIX's 108
            try:
                s.bind(f"/proc/self/fd/{fd}/{p.name}")
            finally:
                os.close(fd)
            sockets.append(s)
        elif what == "link_out":
            p.symlink_to(outside / "secret.safetensors")
        elif what == "link_in":
            p.symlink_to(data.draw(st.sampled_from(sorted(n for n in os.listdir(folder) if n != p.name) or ["x"])))
        elif what == "link_dir":
            p.symlink_to(outside)
        elif what == "dangling":
            p.symlink_to(folder / "nothing-here")
        else:
            p.write_bytes(b"")
        return f"{name} -> {what}"
    files = [n for n in names if (folder / n).is_file() and not (folder / n).is_symlink()]
    if not files:
        return "no-op"
    name = data.draw(st.sampled_from(files))
    raw = (folder / name).read_bytes()
    how = data.draw(st.sampled_from(["truncate", "append", "flip"]))
    if how == "truncate":
        (folder / name).write_bytes(raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))])
    elif how == "append":
        (folder / name).write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64)))
    elif raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        (folder / name).write_bytes(raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:])
    return f"{name} {how}"


# -- the invariant ----------------------------------------------------------------------------------------------
def tree_snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            out[rel] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns,
                        os.readlink(p) if stat.S_ISLNK(st_.st_mode) else None)
    return out


def referenced(folder: Path) -> set[str]:
    """File names the manifest's state refers to (files a load reads)."""
    out: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("file"), str):
                out.add(x["file"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    obj = read_json(folder / MANIFEST)
    walk(obj.get("state") if isinstance(obj, dict) else None)
    return out


def cli(*argv: str) -> int:
    from btckpt.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(list(argv))


def operations(ck: Path, c2: Path, want1: torch.Tensor) -> list[tuple[str, Any]]:
    def load_dir() -> int:
        s = fresh_state()
        step = btckpt.load(ck, s)
        assert step in (1, 2), step
        if step == 1:
            assert torch.equal(s["model"][0].weight, want1), "fell back to step 1 with other weights"
        return step

    def restore() -> int:
        s = fresh_state()
        with btckpt.Checkpointer(dir=str(ck), keep_last=None, async_save=False, handle_sigterm=False) as c:
            step = c.restore(s)
        assert step in (1, 2), step
        if step == 1:
            assert torch.equal(s["model"][0].weight, want1), "fell back to step 1 with other weights"
        return step

    def load_folder() -> int:
        step = btckpt.load(c2, fresh_state())
        problems = [p for p in _verify(c2) if p.split(":")[0] in referenced(c2) or not p.endswith("safetensors")]
        assert not problems, f"loaded a checkpoint that does not verify: {problems}"
        return step

    return [("scan", lambda: scan(ck)), ("latest", lambda: btckpt.latest(ck)), ("load_folder", load_folder),
            ("load_dir", load_dir), ("restore", restore), ("ls", lambda: cli("ls", str(ck), "--json")),
            ("verify", lambda: cli("verify", str(c2), "--json")), ("show", lambda: cli("show", str(c2), "--json"))]


def _verify(c2: Path) -> list[str]:
    from btckpt.cli import verify

    return verify(str(c2))[1]


STATS: Counter[str] = Counter()
TIMES: list[float] = []


def run_case(ck: Path, c2: Path, want1: torch.Tensor, what: list[str]) -> None:
    errors: list[str] = []

    def work() -> None:
        for name, op in operations(ck, c2, want1):
            try:
                out = op()
                STATS[f"{name}: ok" + (f" {out}" if name in ("load_dir", "restore") else "")] += 1
            except CheckpointError as exc:
                STATS[f"{name}: {type(exc).__name__}"] += 1
            except BaseException as exc:  # noqa: BLE001 - the invariant: nothing else escapes
                STATS[f"{name}: VIOLATION {type(exc).__name__}"] += 1
                errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    t0 = time.monotonic()
    th = threading.Thread(target=work, name="fuzz-case", daemon=True)
    th.start()
    th.join(CASE_TIMEOUT)
    if th.is_alive():  # unblock a reader stuck on a FIFO, then report the hang
        STATS["HANG"] += 1
        for dirpath, _, filenames in os.walk(ck):
            for n in filenames:
                p = os.path.join(dirpath, n)
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    with contextlib.suppress(OSError):
                        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        th.join(30)
        raise AssertionError(f"hang (> {CASE_TIMEOUT}s) after {what}")
    TIMES.append(time.monotonic() - t0)
    if errors:
        raise AssertionError(f"after {what}:\n" + "\n".join(errors))


@pytest.fixture
def quiet() -> Any:
    log = logging.getLogger("btckpt")
    old = log.level
    log.setLevel(logging.CRITICAL)
    yield
    log.setLevel(old)


@pytest.mark.parametrize("shard", range(SHARDS))
def test_fuzz_reading(pristine: dict[str, Path], tmp_path: Path, quiet: None, shard: int) -> None:
    STATS.clear()
    TIMES.clear()
    want1 = make_state(1)["model"][0].weight.detach().clone()
    count = [0]
    t_start = time.monotonic()

    examples = -(-EXAMPLES // SHARDS)

    @seed(shard)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              phases=(Phase.generate,), report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        count[0] += 1
        variant = data.draw(st.sampled_from(VARIANTS))
        work = tmp_path / "case"
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(pristine[variant], work, symlinks=True)
        ck, c2 = work / "ck", work / "ck" / "checkpoint-2"
        sockets: list[socket.socket] = []
        try:
            what = [mutate(data, c2, work / "outside", sockets) for _ in range(data.draw(st.integers(1, 3)))]
            if data.draw(st.integers(0, 7)) != 0:  # usually re-signed, as an attacker would
                resign(c2)
                what.append("re-signed")
            before = tree_snapshot(work)
            run_case(ck, c2, want1, what)
            after = tree_snapshot(work)
            after.pop(os.path.join("ck", ".btckpt.lock"), None)
            before.pop(os.path.join("ck", ".btckpt.lock"), None)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            assert not changed, f"the tree changed after {what}: {changed}"
        finally:
            for s in sockets:
                s.close()
            shutil.rmtree(work)

    case()
    elapsed = time.monotonic() - t_start
    report = {"shard": shard, "cases": count[0], "seconds": round(elapsed, 1), "hangs": STATS["HANG"],
              "violations": sum(v for k, v in STATS.items() if "VIOLATION" in k),
              "slowest_case_s": round(max(TIMES, default=0.0), 2), "outcomes": dict(sorted(STATS.items()))}
    print(json.dumps(report, indent=1))
    if os.environ.get("BTCKPT_FUZZ_REPORT"):
        _add_report(Path(os.environ["BTCKPT_FUZZ_REPORT"]), report)
    assert count[0] >= min(examples, 1000 // SHARDS) * 0.9, count[0]
    assert report["violations"] == 0 and report["hangs"] == 0


def _add_report(path: Path, report: dict[str, Any]) -> None:
    """Merge one shard's ``report`` into the JSON at ``path`` (the shards may run in parallel workers): the
    totals of cases, hangs, violations and outcomes, the longest ``seconds`` and ``slowest_case_s``."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() and path.stat().st_size else {}
        shards = sorted({*old.get("shards", []), report["shard"]})
        outcomes = Counter(old.get("outcomes", {}))
        outcomes.update(report["outcomes"])
        merged = {"shards": shards, "cases": old.get("cases", 0) + report["cases"],
                  "seconds": max(old.get("seconds", 0.0), report["seconds"]),
                  "hangs": old.get("hangs", 0) + report["hangs"],
                  "violations": old.get("violations", 0) + report["violations"],
                  "slowest_case_s": max(old.get("slowest_case_s", 0.0), report["slowest_case_s"]),
                  "outcomes": dict(sorted(outcomes.items()))}
        path.write_text(json.dumps(merged, indent=1))
