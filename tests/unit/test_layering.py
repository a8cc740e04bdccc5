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
