"""The package's modules import each other without cycles (issue 14: dependencies point down only).

Every module of the installed ``btckpt`` package is found with ``pkgutil.walk_packages`` (so subfolders
count too) and parsed, not imported; every ``import`` statement counts, at the top of a module or inside a
function (an import moved into a function hides a cycle from Python, not from this test). Only imports for
type checkers (``if TYPE_CHECKING:``), which never run, are left out.

The public surface (issue 26 item 5): every internal folder and top-level module says it is internal in its
docstring, and every test file names the internal modules it uses, and why (``Internals used: ...``), and
imports no public name from its internal home (``PUBLIC_MODULES`` and below); tests/scripts and conftest.py too.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import re
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
    {"config", "stats", "streams"},
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
    bad: list[str] = []
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


# What is public (issue 26 item 5): ``btckpt`` (its ``__all__``), ``btckpt.hf`` and ``btckpt.lightning``; for tests
# also ``btckpt.testing.faults``. Everything else is internal and says so in its docstring, once per folder (the
# subpackage's ``__init__``) and per top-level module, in one of two fixed forms: ``INTERNAL_NOTE`` where the
# module has no public name, ``PUBLIC_THROUGH`` where ``btckpt`` re-exports names it defines. A test file that
# imports an internal module names each one, and why, in its docstring: ``Internals used: <module>[, ...] (why)``.
PUBLIC_MODULES = {"btckpt", "btckpt.hf", "btckpt.lightning", "btckpt.testing.faults"}
INTERNAL_NOTE = ("Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and "
                 "``btckpt.lightning``)")
PUBLIC_THROUGH = "Public through ``btckpt``:"
TESTS = Path(__file__).resolve().parent


def _docstring(path: Path) -> str:
    """``path``'s module docstring with its whitespace runs made single spaces."""
    return " ".join((ast.get_docstring(ast.parse(path.read_text()), clean=True) or "").split())


def _public_homes() -> dict[str, set[str]]:
    """``{module: the names of btckpt.__all__ it defines}`` (``__version__`` aside)."""
    homes: dict[str, set[str]] = {}
    for name in btckpt.__all__:
        if name != "__version__":
            homes.setdefault(getattr(btckpt, name).__module__, set()).add(name)
    return homes


def note_problems(mods: dict[str, tuple[Path, bool]], homes: dict[str, set[str]]) -> list[str]:
    """Every internal folder or top-level module whose docstring lacks its fixed note (or has the wrong one)."""
    bad = []
    for name, (src, is_pkg) in sorted(mods.items()):
        parts = name.split(".")
        if name in PUBLIC_MODULES or parts[:2] in (["btckpt", "hf"], ["btckpt", "lightning"]):
            continue
        if len(parts) > 2 and not is_pkg:
            continue  # a module inside a folder: its folder's note covers it
        doc = _docstring(src)
        want, other = (PUBLIC_THROUGH, INTERNAL_NOTE) if name in homes else (INTERNAL_NOTE, PUBLIC_THROUGH)
        if want not in doc or other in doc:
            bad.append(f"{name}: wants {want!r}" + (f" and not {other!r}" if other in doc else ""))
    return bad


def test_internal_folders_and_modules_say_so() -> None:
    mods = _modules()
    homes = _public_homes()
    assert {"btckpt.errors", "btckpt.checkpointer", "btckpt.oneshot", "btckpt.config"} <= set(homes)
    assert note_problems(mods, homes) == []
    # the check itself: a folder without the note, and a module with the wrong one, are caught
    init = mods["btckpt"][0]
    fake = {"btckpt.saving": (init, True), "btckpt.saving.job": (init, False), "btckpt.names": (init, False),
            "btckpt.hf.sharded": (init, False), "btckpt.testing.faults": (init, False)}
    assert note_problems(fake, {}) == [f"btckpt.names: wants {INTERNAL_NOTE!r}",
                                       f"btckpt.saving: wants {INTERNAL_NOTE!r}"]
    assert note_problems({"btckpt.cli": mods["btckpt.cli"]}, {"btckpt.cli": {"x"}}) == [
        f"btckpt.cli: wants {PUBLIC_THROUGH!r} and not {INTERNAL_NOTE!r}"]


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _code_in_strings(tree: ast.AST) -> list[ast.AST]:
    """The import statements of the Python code in ``tree``'s string constants (a child's ``-c`` program, a script
    written to a file): each line that starts with ``import``/``from`` and names btckpt, split at ``;``."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and "btckpt" in node.value):
            continue
        for line in node.value.splitlines():
            for part in line.split(";"):
                part = part.strip()
                if part.startswith(("import ", "from ")) and "btckpt" in part:
                    try:
                        found.extend(ast.parse(part).body)
                    except SyntaxError:
                        pass  # prose that starts with "from"
    return found


def internal_uses(source: Path, known: set[str]) -> set[str]:
    """The non-public btckpt modules a test file uses: its imports anywhere (functions included), the imports of
    the child programs in its strings, ``btckpt.x.y`` attribute chains, and ``setattr("btckpt.x.y", ...)`` targets
    (``monkeypatch``)."""
    tree = ast.parse(source.read_text(), str(source))
    names: set[str] = set()
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # ``a.b`` of ``a.b.c``
    for node in [*ast.walk(tree), *_code_in_strings(tree)]:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                         for a in node.names)
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            names.add(_dotted(node) or "")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    out = set()
    for n in names:
        if not n.startswith("btckpt."):
            continue
        while n and n not in known:  # ``btckpt.a.b.Name`` -> the module ``btckpt.a.b``
            n = n.rpartition(".")[0]
        if n and n not in PUBLIC_MODULES:
            out.add(n)
    return out


INTERNALS_LINE = re.compile(r"Internals used: (btckpt[\w.]*(?:, btckpt[\w.]*)*) \((.+)\)\.?")


def internals_problems(source: Path, known: set[str]) -> list[str]:
    """What is wrong with ``source``'s ``Internals used:`` line, given the internal modules it uses."""
    uses = internal_uses(source, known)
    doc = ast.get_docstring(ast.parse(source.read_text())) or ""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if "Internals used:" in p]
    if not paragraphs:
        return [f"{source.name}: uses {', '.join(sorted(uses))}; say why in its docstring: "
                f"'Internals used: <module>[, <module>...] (<why>)'"] if uses else []
    m = INTERNALS_LINE.fullmatch(paragraphs[0][paragraphs[0].index("Internals used:"):])
    if len(paragraphs) > 1 or m is None or not m.group(2).strip():
        return [f"{source.name}: one paragraph 'Internals used: <module>[, <module>...] (<why>)' please"]
    named = set(m.group(1).split(", "))
    bad = [f"{source.name}: uses {n}, not named in 'Internals used:'" for n in sorted(uses - named)]
    bad += [f"{source.name}: names {n} in 'Internals used:' but does not use it" for n in sorted(named - uses)]
    return bad


def public_spellings() -> dict[tuple[str, str], str]:
    """``{(the module that defines or imports it, name): its public spelling}`` for every name of ``btckpt.__all__``,
    ``btckpt.hf.__all__`` and ``btckpt.lightning.__all__`` (the adapters' read from source: no framework imported)."""
    out = {(mod, n): f"btckpt.{n}" for mod, names in _public_homes().items() for n in names}
    for pkg in ("hf", "lightning"):
        tree = ast.parse((Path(btckpt.__file__).parent / pkg / "__init__.py").read_text())
        exported = {e.value for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", "") == "__all__" for t in node.targets)
                    for e in getattr(node.value, "elts", ()) if isinstance(e, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ["btckpt", pkg][:3 - node.level] if node.level <= 2 else []
                mod = ".".join(base + ([node.module] if node.module else []))
                out.update({(mod, a.name): f"btckpt.{pkg}.{a.name}" for a in node.names if a.name in exported})
    return out


def public_name_problems(source: Path, spellings: dict[tuple[str, str], str]) -> list[str]:
    """Every import in ``source`` (functions and child programs included) of a public name from its internal home."""
    tree = ast.parse(source.read_text(), str(source))
    return [f"{source.name}: imports {a.name} from {node.module}; use {spellings[(node.module, a.name)]}"
            for node in [*ast.walk(tree), *_code_in_strings(tree)]
            if isinstance(node, ast.ImportFrom) and not node.level and node.module
            for a in node.names if (node.module, a.name) in spellings]


def test_tests_use_public_names_or_say_which_internals_and_why() -> None:
    known = set(_modules())
    spellings = public_spellings()
    assert {("btckpt.errors", "ConfigError"), ("btckpt.config", "CheckpointConfig"),
            ("btckpt.lightning.strategies", "ModelParallelStrategy")} <= set(spellings)
    # this file parses the package and imports none of it; the sources in its strings are fixtures. The helpers
    # the tests run (tests/scripts: training scripts, the crash harness) and conftest.py follow the same rule.
    files = [f for f in sorted(TESTS.glob("test_*.py")) if f.name != Path(__file__).name]
    assert len(files) > 40
    files += [*sorted((TESTS / "scripts").glob("*.py")), TESTS / "conftest.py"]
    problems = [p for f in files for p in internals_problems(f, known) + public_name_problems(f, spellings)]
    assert problems == [], "\n".join(problems)


def test_the_internals_rule_sees_every_kind_of_use(tmp_path: Path) -> None:
    """The check itself: imports in functions and child programs, attribute chains and setattr targets count;
    public modules do not; a stale or missing name, or a missing reason, is reported."""
    known = set(_modules())
    src = tmp_path / "test_fake.py"
    src.write_text('"""Fake.\n\nInternals used: btckpt.saving.job, btckpt.names (why\nnot).\n"""\n'
                   "import btckpt\nimport btckpt.lightning\nfrom btckpt import Checkpointer\n"
                   "from btckpt.testing import faults\nfrom btckpt.format import manifest\n"
                   "def f(monkeypatch):\n    from btckpt.storage.discovery import scan\n"
                   "    monkeypatch.setattr('btckpt.oneshot.run_save', None)\n    btckpt.tiers.local.X\n"
                   "CHILD = 'import sys; from btckpt.cli import main; main()'\n")
    assert internal_uses(src, known) == {"btckpt.format.manifest", "btckpt.storage.discovery", "btckpt.oneshot",
                                         "btckpt.tiers.local", "btckpt.cli"}
    assert internals_problems(src, known) == [f"test_fake.py: uses {m}, not named in 'Internals used:'" for m in
                                              ("btckpt.cli", "btckpt.format.manifest", "btckpt.oneshot",
                                               "btckpt.storage.discovery", "btckpt.tiers.local")] + [
        f"test_fake.py: names {m} in 'Internals used:' but does not use it" for m in ("btckpt.names",
                                                                                     "btckpt.saving.job")]
    src.write_text('"""Fake.\n\nInternals used: btckpt.names.\n"""\nfrom btckpt.names import printable\n')
    assert internals_problems(src, known) == ["test_fake.py: one paragraph 'Internals used: <module>[, <module>...] "
                                              "(<why>)' please"]
    src.write_text('"""Fake."""\nfrom btckpt.names import printable\n')
    assert internals_problems(src, known)[0].startswith("test_fake.py: uses btckpt.names; say why")
    src.write_text("from btckpt import save\nimport btckpt.hf\n")
    assert internals_problems(src, known) == []
    # a public name imported from its internal home is caught, in a function or a child program too
    src.write_text("from btckpt import ConfigError\ndef f():\n    from btckpt.errors import CheckpointError\n"
                   "CHILD = 'from btckpt.lightning.strategies import ModelParallelStrategy'\n")
    assert public_name_problems(src, public_spellings()) == [
        "test_fake.py: imports CheckpointError from btckpt.errors; use btckpt.CheckpointError",
        "test_fake.py: imports ModelParallelStrategy from btckpt.lightning.strategies; use "
        "btckpt.lightning.ModelParallelStrategy"]
