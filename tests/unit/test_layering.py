"""The import rules of docs/architecture.md, checked on the source (not on a running import).

* ``asympo`` is the library: importable with no service around, so it never imports
  ``services``.
* A service talks to another service only through the ``proto/`` contracts, so
  ``services/<a>`` never imports ``services/<b>``.
* The library does not import the command-line tools (they sit on top of it).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("asympo.cli", "asympo.eval_cli", "asympo.plan_cli", "asympo.launcher",
         "asympo.config_doc", "asympo.protogen")  # fmt: skip


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import under ``root``/asympo and ``root``/services that breaks a rule."""
    found = []
    for path in sorted((root / "asympo").rglob("*.py")):
        mod = module_name(root, path)
        if is_under(mod, "asympo.v1"):  # generated
            continue
        tool = any(is_under(mod, t) for t in TOOLS)
        for imp in sorted(imports(path)):
            if is_under(imp, "services"):
                found.append(f"{mod} (library) imports {imp}")
            elif not tool and any(is_under(imp, t) for t in TOOLS):
                found.append(f"{mod} (library) imports the tool {imp}")
    for path in sorted((root / "services").rglob("*.py")):
        mod = module_name(root, path)
        own = ".".join(mod.split(".")[:2])
        for imp in sorted(imports(path)):
            if is_under(imp, "services") and imp != "services" and not is_under(imp, own):
                found.append(f"{mod} imports another service: {imp}")
    return found


def test_library_services_and_tools_import_only_downwards() -> None:
    assert len(list((REPO / "asympo").rglob("*.py"))) > 30  # the walk sees the code
    assert violations(REPO) == []


def test_each_rule_catches_its_violation(tmp_path: Path) -> None:
    (tmp_path / "asympo").mkdir()
    (tmp_path / "asympo" / "lib.py").write_text(
        "def f():\n    from services.reward import worker\n    import asympo.cli\n"
    )
    (tmp_path / "asympo" / "cli.py").write_text("from asympo.launcher import live\n")
    (tmp_path / "services" / "rollout").mkdir(parents=True)
    (tmp_path / "services" / "rollout" / "main.py").write_text(
        "from services.rollout import worker\nfrom services.learner.metrics import X\n"
    )
    assert violations(tmp_path) == [
        "asympo.lib (library) imports the tool asympo.cli",
        "asympo.lib (library) imports services.reward",
        "services.rollout.main imports another service: services.learner.metrics",
    ]


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module-level (import-time) dependencies between the project's modules.

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those count too,
    except a module's own ancestors (a package importing its submodules is the normal
    direction, and Python handles a submodule importing a sibling through the package).
    Imports inside functions and under ``if TYPE_CHECKING`` do not run at import time.
    """
    paths = {
        module_name(root, p): p
        for pkg in ("asympo", "services")
        for p in sorted((root / pkg).rglob("*.py"))
        if "v1" not in p.relative_to(root).parts
    }
    graph: dict[str, set[str]] = {}
    for mod, path in paths.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in paths and dep != mod and not is_under(mod, dep):
                        deps.add(dep)
        graph[mod] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's modules (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_at_import_time() -> None:
    # A cycle works or breaks depending on which module a program imports first
    # (evaluation -> eval mode -> model package -> warm start -> evaluation once broke
    # `import asympo.evaluation` while the whole test suite, importing in another order,
    # passed).
    graph = module_graph(REPO)
    assert graph.get("asympo.evaluation")
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_package(tmp_path: Path) -> None:
    pkg = tmp_path / "asympo" / "model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from asympo.model.tiny import build\n")
    (pkg / "tiny.py").write_text("from asympo.evaluation import greedy\n")
    (pkg / "modes.py").write_text("import torch\n")
    (tmp_path / "asympo" / "evaluation.py").write_text("from asympo.model.modes import m\n")
    (tmp_path / "services").mkdir()
    assert import_cycles(module_graph(tmp_path)) == [
        ["asympo.evaluation", "asympo.model", "asympo.model.tiny"]  # modes: not in it
    ]
