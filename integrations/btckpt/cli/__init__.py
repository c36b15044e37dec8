"""The ``btckpt`` command: ``ls``, ``show``, ``verify``, ``upload``, ``browse`` on local folders and fsspec URLs.

Package: this module (commands and their output), ``report`` (what ls/show/browse tell about a checkpoint),
``browse`` (the Textual browser). May import anything of btckpt but the framework adapters.

Starts fast: never imports torch, transformers or lightning (only torch-free modules: ``storage``,
``format``, ``restore.policy``, ``publish.uploader``); ``browse`` (textual) and ``consolidate`` (torch) import what
they need when they run. Remote URLs take their options from fsspec's environment
variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``).
Exit status: 0 ok, 1 a checkpoint failed verification or is not complete (``verify DIR``: any of those it
checked; one retired while it ran is skipped, not failed), 2 usage / not found.

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); the ``btckpt`` command is public as a command line (its
arguments, output and exit status), not as an import: its modules and names may change without notice.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import CheckpointError
from ..format.checksum import CHECKSUM
from ..format.manifest import DEFAULT_MAX_SHARD_SIZE, check_relative_name
from ..names import safe, text
from ..publish.uploader import add_arguments, run_from_args
from ..restore.policy import ResumePolicy
from ..storage.discovery import RESCANS, CheckpointInfo, check, scan, verified
from ..storage.discovery import verify as check_files
from .report import checkpoint_type, human, listed_files, read_header

__all__ = ["main", "build_parser", "checkpoint_type", "list_checkpoints", "describe", "verify", "verify_all"]


# -- helpers -----------------------------------------------------------------------------------------------
def _when(created: str) -> str:
    return created[:19].replace("T", " ") if created else "-"


def _rel(info: CheckpointInfo, root: str) -> str:
    where = info.where.rstrip("/")
    base = root.rstrip("/")
    if where.startswith(base + "/"):
        return where[len(base) + 1:]
    return info.path.name


def _row(info: CheckpointInfo, root: str, *, checksums: bool) -> dict[str, Any]:
    status, reason, checked = info.status, info.reason, "-"
    if info.complete and info.manifest is not None:
        checked = "sizes"
        if checksums:
            checked = "checksums"
            problems = check_files(info)
            if problems:
                status, reason = ("retired", "deleted while listing") if _vanished(info) else \
                    ("corrupt", "; ".join(problems))
    return {"step": info.step, "name": _rel(info, root), "type": checkpoint_type(info), "size": info.size,
            "created": info.created, "status": status, "checked": checked, "reason": reason, "path": info.where}


def list_checkpoints(target: str, *, sort: str = "step", order: str = "desc",
                     checksums: bool = False) -> list[dict[str, Any]]:
    """The rows ``btckpt ls`` prints (dicts: step, name, type, size, created, status, checked, reason, path).

    ``checked`` says what ``complete`` rests on: ``sizes`` (the manifest parses and every file it lists has
    its size: no data read), ``checksums`` (``checksums=True``: every file's xxh3-64 matched too; a mismatch
    makes the row ``corrupt``), ``-`` (not complete, or a plain model folder without a manifest)."""
    rows = [_row(i, target, checksums=checksums) for i in scan(target)]
    rows.sort(key=lambda r: (r[sort], r["step"]), reverse=(order == "desc"))
    return rows


def _resolve(target: str, *, verify_checksums: bool = True) -> tuple[CheckpointInfo, str]:
    """One checkpoint: ``target`` itself, else the one the resume policy picks under it (with a note).

    Under a folder of checkpoints: the newest complete one whose checksums match (the policy's rule,
    :meth:`btckpt.restore.policy.ResumePolicy.select`; damaged ones are skipped with a warning naming the file), so
    ``btckpt show``/``verify <folder>`` name what a resume would load (``verify_checksums=False``: complete
    is enough, reading no data); when none qualifies, the newest one, so that its problems are shown.
    """
    policy = ResumePolicy.at(target)
    info = policy.target()
    if info is not None:
        return info, ""
    cands = policy.candidates()
    if not cands:
        raise CheckpointError(f"{target}: no checkpoint there (nothing in any supported layout)")
    found = policy.select(verified if verify_checksums else _as_is, cands)
    if found is not None:
        return found[0], ("newest verified checkpoint under " if verify_checksums else
                          "newest complete checkpoint under ") + target
    return cands[0], f"newest checkpoint under {target} (none is {'sound' if verify_checksums else 'complete'})"


def _as_is(info: CheckpointInfo) -> CheckpointInfo:
    return info


def _console(stream: Any = None) -> Any:
    f = stream or sys.stdout
    width = None
    if not (hasattr(f, "isatty") and f.isatty()):  # piped: never truncate columns
        width = int(os.environ.get("COLUMNS") or 0) or 200
    return Console(file=f, highlight=False, soft_wrap=False, width=width)


def _table(title: str | None, columns: list[tuple[str, str]], rows: list[list[str]]) -> Any:
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, show_edge=False)
    for name, justify in columns:
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*(text(c) for c in r))  # names from checkpoints and buckets: literal, escaped, never markup
    return t


# -- show --------------------------------------------------------------------------------------------------
def _headers(info: CheckpointInfo, names: list[str], counter: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = [n for n in names if n.endswith(".safetensors")]
    found = info.store.stat(info.path, names)  # the files' real sizes (one listing on an object store)
    for name in names:
        try:
            check_relative_name(name, where=info.where)
            e = found.get(name)
            if e is None:
                raise CheckpointError(f"{info.store.where(info.path, name)}: file is missing")
            out[name] = read_header(info, name, e.size, counter=counter)
        except (CheckpointError, OSError) as exc:
            out[name] = exc
    return out


def describe(target: str) -> dict[str, Any]:
    """What ``btckpt show`` prints: the checkpoint, its files, its tensors (headers only) and totals."""
    info, note = _resolve(target)
    sizes = listed_files(info)
    names = list(sizes)
    files = [{"name": n, "size": size,
              CHECKSUM: info.manifest.files[n][CHECKSUM] if info.manifest is not None else ""}
             for n, size in sizes.items()]
    counter = [0]
    tensors, errors = [], []
    totals: dict[str, Any] = {"tensors": 0, "parameters": 0, "bytes": 0, "by_dtype": {}}
    for fname, h in _headers(info, names, counter).items():
        if isinstance(h, Exception):
            errors.append(f"{fname}: {h}")
            continue
        for e in h.entries:
            nbytes = e.end - e.begin
            tensors.append({"file": fname, "name": e.name, "dtype": e.dtype, "shape": list(e.shape),
                            "parameters": e.numel, "bytes": nbytes})
            totals["tensors"] += 1
            totals["parameters"] += e.numel
            totals["bytes"] += nbytes
            d = totals["by_dtype"].setdefault(e.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
            d["tensors"] += 1
            d["parameters"] += e.numel
            d["bytes"] += nbytes
    return {"path": info.where, "note": note, "step": info.step, "status": info.status, "reason": info.reason,
            "type": checkpoint_type(info), "created": info.created, "size": info.size,
            "groups": sorted(info.manifest.state) if info.manifest else [],
            "world": info.manifest.world if info.manifest else {}, "files": files, "tensors": tensors,
            "totals": totals, "errors": errors, "header_bytes_read": counter[0]}


def _print_show(d: dict[str, Any], console: Any) -> None:
    console.print(Text.assemble(text(d["path"], "bold"), f"  ({safe(d['note'])})" if d["note"] else ""))
    status = d["status"] + (f": {d['reason']}" if d["reason"] else "")
    console.print(text(f"step {d['step']}  type {d['type']}  status {status}  created {_when(d['created'])}  "
                       f"size {human(d['size'])}" + (f"  groups {', '.join(d['groups'])}" if d["groups"] else "")))
    console.print(_table("Files", [("FILE", "left"), ("SIZE", "right"), ("XXH3_64", "left")],
                         [[f["name"], human(f["size"]), f[CHECKSUM] or "-"] for f in d["files"]]))
    rows = [[t["file"], t["name"], t["dtype"], str(tuple(t["shape"])) if t["shape"] else "()",
             f"{t['parameters']:,}", human(t["bytes"])] for t in d["tensors"]]
    console.print(_table("Tensors", [("FILE", "left"), ("NAME", "left"), ("DTYPE", "left"), ("SHAPE", "left"),
                                     ("PARAMS", "right"), ("BYTES", "right")], rows))
    tot = d["totals"]
    by = ", ".join(f"{k} {v['parameters']:,} ({human(v['bytes'])})" for k, v in sorted(tot["by_dtype"].items()))
    console.print(text(f"total: {tot['tensors']} tensors, {tot['parameters']:,} parameters, {human(tot['bytes'])}"
                       + (f"  [{by}]" if by else "")))
    for e in d["errors"]:
        console.print(Text.assemble(("error", "red"), " ", safe(e)))


# -- verify ------------------------------------------------------------------------------------------------
def verify(target: str) -> tuple[CheckpointInfo, list[str]]:
    """Check every file against the manifest (size and xxh3-64). Returns the checkpoint and its problems.

    Under a folder of checkpoints: the one a resume would choose (damaged ones skipped with a warning);
    ``btckpt verify DIR`` checks them all (:func:`verify_all`).
    """
    for _ in range(RESCANS):  # a pick retired while it was checked (a running job's tier) is looked for again
        info, _ = _resolve(target, verify_checksums=True)
        problems = check(info)
        if problems is not None:
            return info, problems
    return info, check_files(info)


def _vanished(info: CheckpointInfo) -> bool:
    """Whether ``info``'s folder is gone since it was listed (a running job's retention retired it)."""
    return info.store.list(info.path) is None


def verify_all(target: str, *, newest: bool = False) -> list[dict[str, Any]]:
    """What ``btckpt verify DIR`` checks: every checkpoint at or under ``target`` in any layout (the resume
    policy's candidates, in its order), or with ``newest`` only the newest one, whatever its state. One dict
    per checkpoint: path, step, ``status`` (``ok``, ``failed``, or ``retired``: its folder disappeared
    between the listing and the check, deleted by a running job's retention: skipped, not a failure),
    problems, files, size."""
    cands = ResumePolicy.at(target).candidates()
    if not cands:
        raise CheckpointError(f"{target}: no checkpoint there (nothing in any supported layout)")
    if newest:
        cands = sorted(cands, key=lambda i: i.step, reverse=True)[:1]
    out = []
    for info in cands:
        problems = check_files(info)
        status = "ok" if not problems else "retired" if _vanished(info) else "failed"
        out.append({"path": info.where, "step": info.step, "status": status,
                    "problems": problems if status == "failed" else [],
                    "files": len(info.manifest.files) if info.manifest else 0, "size": info.size})
    return out


# -- commands ----------------------------------------------------------------------------------------------
def _cmd_ls(args: argparse.Namespace) -> int:
    fmt = "json" if args.json else args.format
    rows = list_checkpoints(args.target, sort=args.sort, order=args.order, checksums=args.verify)
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["step", "name", "type", "size", "created", "status", "checked", "reason"])
        for r in rows:
            w.writerow([r["step"], safe(r["name"]), r["type"], r["size"], safe(r["created"]), r["status"],
                        r["checked"], safe(r["reason"])])
    else:
        if not rows:
            print(f"no checkpoints under {safe(args.target)}", file=sys.stderr)
            return 0
        cols = [("STEP", "right"), ("NAME", "left"), ("TYPE", "left"), ("SIZE", "right"), ("CREATED", "left"),
                ("STATUS", "left"), ("CHECKED", "left")]
        out = [[str(r["step"]), r["name"], r["type"], human(r["size"]), _when(r["created"]), r["status"],
                r["checked"]] for r in rows]
        if any(r["reason"] for r in rows):
            cols.append(("DETAIL", "left"))
            for o, r in zip(out, rows, strict=True):
                o.append(r["reason"])
        _console().print(_table(None, cols, out))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    d = describe(args.target)
    if args.json or args.format == "json":
        print(json.dumps(d, indent=1))
    else:
        _print_show(d, _console())
    return 0 if not d["errors"] else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    policy = ResumePolicy.at(args.target)
    if policy.target() is None:  # a folder of checkpoints: all of them (or the newest)
        return _verify_folder(args)
    info, problems = verify(args.target)
    if args.json or args.format == "json":
        print(json.dumps({"path": info.where, "step": info.step, "ok": not problems, "problems": problems},
                         indent=1))
    else:
        n = len(info.manifest.files) if info.manifest else 0
        where = safe(info.where)
        if problems:
            for p in problems:
                print(f"BAD {where}: {safe(p)}", file=sys.stderr)
            print(f"FAILED {where} (step {info.step}): {len(problems)} problem(s) in {n} file(s)")
        else:
            print(f"OK {where} (step {info.step}): {n} files, {human(info.size)}, checksums match")
    return 1 if problems else 0


def _verify_folder(args: argparse.Namespace) -> int:
    results = verify_all(args.target, newest=args.newest)
    scope = "newest" if args.newest else "all"
    failed = [r for r in results if r["status"] == "failed"]
    resume = next((r for r in results if r["status"] == "ok"), None) if not args.newest else None
    if args.json or args.format == "json":
        print(json.dumps({"path": args.target, "checked": scope, "ok": not failed, "checkpoints": results,
                          "resume": None if resume is None else {"path": resume["path"], "step": resume["step"]}},
                         indent=1))
        return 1 if failed else 0
    for r in results:
        where = safe(r["path"])
        if r["status"] == "ok":
            print(f"OK {where} (step {r['step']}): {r['files']} files, {human(r['size'])}, checksums match")
        elif r["status"] == "retired":
            print(f"RETIRED {where} (step {r['step']}): deleted while verifying (a running job's retention); "
                  "skipped")
        else:
            for p in r["problems"]:
                print(f"BAD {where}: {safe(p)}", file=sys.stderr)
            print(f"FAILED {where} (step {r['step']}): {len(r['problems'])} problem(s) in {r['files']} file(s)")
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "failed", "retired")}
    what = "the newest checkpoint only (--newest)" if args.newest else f"{len(results)} checkpoint(s)"
    print(f"checked {what} under {safe(args.target)}: {counts['ok']} OK, {counts['failed']} FAILED"
          + (f", {counts['retired']} retired" if counts["retired"] else "")
          + ("" if args.newest else f"; a resume loads {'step ' + str(resume['step']) if resume else 'none'}"))
    return 1 if failed else 0


def _cmd_upload(args: argparse.Namespace) -> int:
    return run_from_args(args)


def _cmd_browse(args: argparse.Namespace) -> int:
    from .browse import run  # textual (optional, ~0.5 s): only for this command

    run(args.target)
    return 0


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from ..consolidate import main as consolidate_main  # imports torch: only for this command

    argv = [args.ckpt, args.out, "--group", args.group, "--max-shard-size", str(args.max_shard_size)]
    return consolidate_main(argv)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``btckpt`` command."""
    p = argparse.ArgumentParser(prog="btckpt", description="Inspect, verify, upload and browse btckpt checkpoints "
                                "(local folders or fsspec URLs such as s3://bucket/run).")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list checkpoints: step, name, type, size, created, status")
    ls.add_argument("target", nargs="?", default=os.environ.get("BT_CHECKPOINT_DIR") or "./checkpoints",
                    metavar="DIR|URL")
    ls.add_argument("--sort", choices=["step", "size", "created"], default="step")
    ls.add_argument("--order", choices=["asc", "desc"], default="desc")
    ls.add_argument("--format", choices=["table", "json", "csv"], default="table")
    ls.add_argument("--json", action="store_true", help="same as --format json")
    ls.add_argument("--verify", action="store_true", help="also check every complete checkpoint's checksums "
                    "(reads all data); without it, CHECKED says 'sizes': complete means the files have their sizes")
    ls.set_defaults(func=_cmd_ls)
    for name, func, hlp, target_help in (
            ("show", _cmd_show, "files and tensor summary (safetensors headers only)",
             "a checkpoint folder or URL (or a folder holding them: the one a resume would load)"),
            ("verify", _cmd_verify, "check every file's size and checksum against the manifest",
             "a checkpoint folder or URL, or a folder holding them: every checkpoint in it is checked")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("target", metavar="CKPT", help=target_help)
        sp.add_argument("--format", choices=["table", "json"], default="table")
        sp.add_argument("--json", action="store_true", help="same as --format json")
        if name == "verify":
            sp.add_argument("--newest", action="store_true", help="under a folder of checkpoints, check only the "
                            "newest one (whatever its state), and say so")
        sp.set_defaults(func=func)
    up = sub.add_parser("upload", help="mirror committed checkpoints to a URL (a separate process)")
    add_arguments(up)
    up.set_defaults(func=_cmd_upload)
    co = sub.add_parser("consolidate", help="write an HF-named, from_pretrained-loadable model folder from a "
                        "(sharded) checkpoint")
    co.add_argument("ckpt", metavar="CKPT")
    co.add_argument("out", metavar="OUT")
    co.add_argument("--group", default="model")
    co.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_SIZE)
    co.set_defaults(func=_cmd_consolidate)
    br = sub.add_parser("browse", help="terminal UI: pick a checkpoint, walk files, tensor tables")
    br.add_argument("target", nargs="?", default=os.environ.get("BT_CHECKPOINT_DIR") or "./checkpoints",
                    metavar="DIR|URL")
    br.set_defaults(func=_cmd_browse)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``btckpt`` console script."""
    args = build_parser().parse_args(argv)
    where = getattr(args, "target", None) or getattr(args, "ckpt", None) or getattr(args, "src", "")
    try:
        return int(args.func(args) or 0)
    except CheckpointError as exc:
        print(f"btckpt: {safe(exc)}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"btckpt: not found: {safe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # pragma: no cover - `btckpt ls | head`
        return 0
    except Exception as exc:
        if not _storage_error(exc):
            raise  # a bug: keep its traceback
        print(f"btckpt: {safe(where)}: storage error ({type(exc).__name__}): {safe(exc)}", file=sys.stderr)
        return 2


def _storage_error(exc: BaseException) -> bool:
    """An I/O failure from the filesystem or an object store (a 500 after retries, a refused connection,
    missing credentials): reported in one line, exit 2. Anything else is a bug and keeps its traceback."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs",
                                                  "adlfs", "requests", "urllib3")


