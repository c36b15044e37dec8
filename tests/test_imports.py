"""The package's modules import each other without cycles (issue 14: dependencies point down only).

Every module of the installed ``btckpt`` package is found with ``pkgutil.walk_packages`` (so subfolders
count too) and parsed, not imported; every ``import`` statement counts, at the top of a module or inside a
function (an import moved into a function hides a cycle from Python, not from this test). Only imports for
type checkers (``if TYPE_CHECKING:``), which never run, are left out.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import btckpt


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{module name: (source file, is a package)}`` for btckpt and everything under it."""
    found = {"btckpt": (Path(btckpt.__file__), True)}
    for m in pkgutil.walk_packages(btckpt.__path__, "btckpt."):
        spec = importlib.util.find_spec(m.name)
        assert spec is not None and spec.origin, m.name
        found[m.name] = (Path(spec.origin), m.ispkg)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(name: str, source: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The btckpt modules that ``name`` imports anywhere in its source (at run time)."""
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the module ``pkg.sub``; ``from mod import name`` the module ``mod``
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # ``import btckpt.a.b`` where only ``btckpt.a.b`` is known, etc.
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: the btckpt modules it imports}``."""
    mods = _modules()
    return {n: _imports(n, src, pkg, set(mods)) for n, (src, pkg) in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    """The walker itself: a cycle hidden in a function is a cycle, and a clean graph has none."""
    graph = import_graph()
    assert "btckpt.cli" in graph and "btckpt.format.manifest" in graph["btckpt.storage.discovery"]
    assert "btckpt.consolidate" in graph["btckpt.cli"]  # imported inside a function (torch-free start-up)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_distributed_does_not_import_discovery() -> None:
    """``distributed.world()`` reads the node rank itself; it never reaches into checkpoint discovery."""
    assert "btckpt.storage.discovery" not in import_graph()["btckpt.distributed.world"]


# The layers of btckpt/__init__.py's docstring, lowest first. A module may import its own folder and
# anything in a lower layer; folders in one layer never import each other (saving <-> restore; the
# adapters and the CLI), top-level modules of one layer may.
LAYERS = [
    {"errors", "names", "testing"},
    {"format"},
    {"storage"},
    {"distributed"},
    {"config", "stats"},
    {"saving", "restore"},
    {"tiers"},
    {"publish"},
    {"policies"},
    {"checkpointer", "oneshot", "consolidate", "adapters", "upload", ""},
    {"hf", "lightning", "cli"},
]
FOLDERS = {"format", "storage", "distributed", "saving", "restore", "tiers", "publish", "policies", "hf", "lightning",
           "cli", "testing"}


def _unit(module: str) -> str:
    """The layer unit of a module: its folder, or its own name at the top level ("" for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up, or sideways between two folders of one layer."""
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    bad = []
    for a, targets in sorted(graph.items()):
        ua = _unit(a)
        assert ua in rank, f"{a}: not in any layer of LAYERS; place it (and say so in btckpt/__init__.py)"
        for b in sorted(targets):
            ub = _unit(b)
            if ua == ub or rank[ub] < rank[ua]:
                continue
            if rank[ub] == rank[ua] and not (ua in FOLDERS or ub in FOLDERS):
                continue
            bad.append(f"{a} -> {b}")
    return bad


def test_layers_point_down() -> None:
    assert layer_violations(import_graph()) == []
    # the check itself: an upward import and a sibling import are both caught
    fake = {"btckpt.format.manifest": {"btckpt.storage.discovery"}, "btckpt.saving.job": {"btckpt.restore.rng"},
            "btckpt.checkpointer": {"btckpt.oneshot"}}
    assert layer_violations(fake) == ["btckpt.format.manifest -> btckpt.storage.discovery",
                                      "btckpt.saving.job -> btckpt.restore.rng"]


# The adapter seam (issue 26): a framework adapter reaches the core through one door. Besides its own
# subpackage (and its framework, torch, the stdlib), ``btckpt.hf`` / ``btckpt.lightning`` import only these.
ADAPTER_DOORS = {"btckpt.adapters", "btckpt.errors", "btckpt.config"}
ADAPTERS = {"hf", "lightning"}


def seam_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every runtime import of a btckpt module by a framework adapter that is not one of ``ADAPTER_DOORS`` and
    not inside the adapter's own subpackage."""
    bad = []
    for a, targets in sorted(graph.items()):
        ua = _unit(a)
        if ua not in ADAPTERS:
            continue
        bad.extend(f"{a} -> {b}" for b in sorted(targets) if b not in ADAPTER_DOORS and _unit(b) != ua)
    return bad


def test_adapters_import_the_core_through_btckpt_adapters() -> None:
    graph = import_graph()
    assert {"btckpt.hf", "btckpt.hf.deepspeed", "btckpt.lightning", "btckpt.lightning.strategies"} <= set(graph)
    assert seam_violations(graph) == [], ("an adapter reaches past btckpt.adapters (add what it needs there, "
                                          "documented): " + ", ".join(seam_violations(graph)))
    # the check itself: a core module, the package, and the other adapter are caught; the doors and the own
    # subpackage are not
    fake = {"btckpt.hf": {"btckpt.adapters", "btckpt.errors", "btckpt.config", "btckpt.hf.sharded",
                          "btckpt.checkpointer"},
            "btckpt.lightning.state": {"btckpt.lightning", "btckpt.storage.discovery", "btckpt"},
            "btckpt.lightning.rng": {"btckpt.hf.deepspeed"},
            "btckpt.checkpointer": {"btckpt.saving.commit"}}
    assert seam_violations(fake) == ["btckpt.hf -> btckpt.checkpointer", "btckpt.lightning.rng -> btckpt.hf.deepspeed",
                                     "btckpt.lightning.state -> btckpt", "btckpt.lightning.state -> "
                                     "btckpt.storage.discovery"]
