"""``btckpt browse [DIR|URL]``: a terminal UI (Textual) to look inside checkpoints, local or remote.

Pick a checkpoint (type to filter, fuzzy), walk its folders, see a tensor table for ``.safetensors``
files (name, dtype, shape, parameters, bytes: from the header only, a range request on URLs), page
through text files (JSON pretty-printed). ``s`` on a safetensors file adds min/max/mean/NaN columns:
that reads the file and imports torch, only then. ``escape`` goes back, ``q`` quits.
"""

from __future__ import annotations

import json
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import ContentSwitcher, DataTable, Footer, Header, Input, OptionList, Static, TextArea, Tree
from textual.widgets.option_list import Option

from ..names import printable, safe, text
from ..storage.discovery import CheckpointInfo, scan
from ..storage.store import walk
from .report import checkpoint_type, human, read_header

__all__ = ["BrowseApp", "CheckpointScreen", "fuzzy_score", "run"]

TEXT_LIMIT = 4 << 20


def fuzzy_score(query: str, text: str) -> int | None:
    """Subsequence match: None when ``query``'s letters do not appear in order in ``text``; else a score
    (higher is better: consecutive letters and an early start count)."""
    q, t = query.lower().replace(" ", ""), text.lower()
    if not q:
        return 0
    score, pos, run = 0, 0, 0
    for ch in q:
        i = t.find(ch, pos)
        if i < 0:
            return None
        run = run + 1 if i == pos else 0
        score += 1 + 2 * run - (i - pos) // 8
        pos = i + 1
    return score


def _files(info: CheckpointInfo) -> dict[str, int]:
    return {n: e.size for n, e in walk(info.store, info.path).items()}


def _read(info: CheckpointInfo, name: str, *, limit: int | None = None) -> bytes:
    # regular files inside the folder only (a FIFO would hang the UI): the Store's safe-open rules
    return info.store.read(info.path, name, 0, limit if limit is not None else 1 << 62)


def _cells(e: Any) -> list[Any]:
    """A tensor's table cells; its name (from the file's header) literal and escaped, never markup."""
    return [text(e.name), text(e.dtype), str(list(e.shape)), f"{e.numel:,}", human(e.end - e.begin)]


class CheckpointScreen(Screen[None]):
    """One checkpoint: a file tree on the left, the selected file on the right."""

    BINDINGS = [Binding("escape", "app.pop_screen", "back"), Binding("s", "stats", "tensor stats")]

    def __init__(self, info: CheckpointInfo) -> None:
        super().__init__()
        self.info = info
        self.sizes = _files(info)
        self.current: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        where = self.info.where
        yield Static(text(f"{where}  step {self.info.step}  {checkpoint_type(self.info)}  {self.info.status}  "
                          f"{human(self.info.size)}"), id="title")
        with Horizontal():
            tree: Tree[str] = Tree(text(self.info.path.name or where), id="files")
            tree.styles.width = "35%"
            yield tree
            with ContentSwitcher(initial="tensors", id="view"):
                yield DataTable(id="tensors", zebra_stripes=True)
                yield TextArea("", id="text", read_only=True, soft_wrap=False)
        yield Footer()

    def on_mount(self) -> None:
        tree = self.query_one("#files", Tree)
        tree.root.expand()
        nodes: dict[str, Any] = {"": tree.root}
        for name in sorted(self.sizes):
            parts = name.split("/")
            for i in range(1, len(parts)):
                key = "/".join(parts[:i])
                if key not in nodes:
                    nodes[key] = nodes["/".join(parts[:i - 1])].add(text(parts[i - 1] + "/"), expand=True)
            nodes["/".join(parts[:-1])].add_leaf(text(f"{parts[-1]}  ({human(self.sizes[name])})"), data=name)
        tree.focus()

    @on(Tree.NodeSelected, "#files")
    def _selected(self, event: Tree.NodeSelected[str]) -> None:
        if event.node.data:
            self.open_file(event.node.data)

    def open_file(self, name: str) -> None:
        """Show ``name``: a tensor table for safetensors, text (JSON pretty-printed) otherwise."""
        self.current = name
        switcher = self.query_one("#view", ContentSwitcher)
        if name.endswith(".safetensors"):
            table = self.query_one("#tensors", DataTable)
            table.clear(columns=True)
            table.add_columns("name", "dtype", "shape", "params", "bytes")
            try:
                h = read_header(self.info, name, self.sizes[name])
            except Exception as exc:  # noqa: BLE001 - shown to the user
                table.add_row(text(f"cannot read the header: {exc}"), "", "", "", "")
            else:
                for e in h.entries:
                    table.add_row(*_cells(e), key=e.name)
            switcher.current = "tensors"
            return
        area = self.query_one("#text", TextArea)
        try:
            raw = _read(self.info, name, limit=TEXT_LIMIT)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            raw = f"cannot read {name}: {exc}".encode()
        try:
            body = raw.decode()
        except UnicodeDecodeError:
            body = f"(binary file, {human(self.sizes.get(name, len(raw)))})"
        else:
            if name.endswith(".json"):
                try:
                    body = json.dumps(json.loads(body), indent=2)
                except ValueError:
                    pass
            if len(raw) == TEXT_LIMIT:
                body += f"\n... (first {human(TEXT_LIMIT)} shown)"
        area.load_text(printable(body, keep_newlines=True))  # no raw escape sequence reaches the terminal
        switcher.current = "text"

    def action_stats(self) -> None:
        """Add min/max/mean/NaN columns for the open safetensors file (reads it; imports torch lazily)."""
        if self.current and self.current.endswith(".safetensors"):
            self.notify(f"reading {safe(self.current)} for statistics ...", markup=False)
            self._stats(self.current)

    @work(thread=True, exclusive=True)
    def _stats(self, name: str) -> None:
        import torch  # only when statistics are asked for: browsing stays torch-free
        from safetensors.torch import load

        tensors = load(_read(self.info, name))
        rows = {}
        for key, t in tensors.items():
            x = (t.abs() if t.is_complex() else t).to(torch.float64)
            nan = int(torch.isnan(x).sum()) if x.is_floating_point() else 0
            finite = x[~torch.isnan(x)] if x.is_floating_point() else x
            if finite.numel():
                rows[key] = (f"{finite.min().item():.4g}", f"{finite.max().item():.4g}",
                             f"{finite.mean().item():.4g}", str(nan))
            else:
                rows[key] = ("-", "-", "-", str(nan))
        self.app.call_from_thread(self._show_stats, name, rows)

    def _show_stats(self, name: str, rows: dict[str, tuple[str, str, str, str]]) -> None:
        if self.current != name:
            return
        table = self.query_one("#tensors", DataTable)
        h = read_header(self.info, name, self.sizes[name])
        table.clear(columns=True)
        table.add_columns("name", "dtype", "shape", "params", "bytes", "min", "max", "mean", "NaN")
        for e in h.entries:
            table.add_row(*_cells(e), *rows.get(e.name, ("-",) * 4), key=e.name)


class BrowseApp(App[None]):
    """Pick a checkpoint under a folder or URL, then browse it."""

    TITLE = "btckpt browse"
    BINDINGS = [Binding("q", "quit", "quit")]

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.infos: list[CheckpointInfo] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter checkpoints (fuzzy)", id="filter")
        yield OptionList(id="checkpoints")
        yield Footer()

    def on_mount(self) -> None:
        self.infos = scan(self.target)
        self._fill("")
        self.query_one("#filter", Input).focus()

    def _ckpt_name(self, info: CheckpointInfo) -> str:
        where = info.where.rstrip("/")
        base = self.target.rstrip("/").removeprefix("file://")
        return where[len(base) + 1:] if where.startswith(base + "/") else info.path.name

    def _label(self, info: CheckpointInfo) -> Any:
        return text(f"{safe(self._ckpt_name(info)):<28} step {info.step:<8} {checkpoint_type(info):<15} "
                    f"{human(info.size):>10}  {info.status}")

    def _fill(self, query: str) -> None:
        ol = self.query_one("#checkpoints", OptionList)
        ol.clear_options()
        scored = [(fuzzy_score(query, self._ckpt_name(i)), n, i) for n, i in enumerate(self.infos)]
        hits = sorted((s for s in scored if s[0] is not None), key=lambda s: (-(s[0] or 0), s[1]))
        ol.add_options([Option(self._label(i), id=str(n)) for _, n, i in hits])
        if hits:
            ol.highlighted = 0

    @on(Input.Changed, "#filter")
    def _filter(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(Input.Submitted, "#filter")
    def _submit(self) -> None:
        ol = self.query_one("#checkpoints", OptionList)
        if ol.highlighted is not None:
            self.open(int(ol.get_option_at_index(ol.highlighted).id or 0))

    @on(OptionList.OptionSelected, "#checkpoints")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.open(int(event.option.id or 0))

    def open(self, index: int) -> None:
        """Open the checkpoint at ``index`` of the scan."""
        self.push_screen(CheckpointScreen(self.infos[index]))


def run(target: str) -> None:
    """Run the browser on a folder or URL."""
    BrowseApp(target).run()
