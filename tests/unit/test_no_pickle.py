"""No pickle anywhere, no unsafe torch.load, no eval/exec (issue 12, security).

Pickle executes code on load, so a record, checkpoint or request that is unpickled is a
remote-code-execution hole. Weights travel as safetensors and records as protobuf; this
test scans the code base's syntax trees (not its text, so comments and strings do not
count) and fails on any of:

* importing pickle or a pickle-based serialiser (cPickle, _pickle, dill, cloudpickle,
  joblib, shelve, marshal, pandas' read_pickle/to_pickle);
* ``torch.load`` (however imported) without ``weights_only=True``;
* ``allow_pickle=True`` (numpy.load and friends);
* the builtins ``eval`` / ``exec`` (verifiers must parse model output, never run it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("asympo", "services", "bench")
GENERATED = (Path("asympo") / "v1",)

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLE_MODULES |= {"marshal"}
PICKLE_ATTRIBUTES = {"read_pickle", "to_pickle"}
CODE_BUILTINS = {"eval", "exec"}


def findings(source: str, filename: str = "<string>") -> list[str]:
    """Every forbidden use in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename=filename)
    torch_names = {"torch"}  # names bound to the torch module
    torch_load_names: set[str] = set()  # names bound to torch.load itself
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in PICKLE_MODULES:
                    report(node, f"imports {alias.name}")
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            root = node.module.split(".")[0]
            if root in PICKLE_MODULES:
                report(node, f"imports from {node.module}")
            for alias in node.names:
                if alias.name in PICKLE_ATTRIBUTES:
                    report(node, f"imports {alias.name}")
                if node.module == "torch" and alias.name == "load":
                    torch_load_names.add(alias.asname or "load")
        elif isinstance(node, ast.Attribute) and node.attr in PICKLE_ATTRIBUTES:
            report(node, f"uses .{node.attr}")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in CODE_BUILTINS:
            report(node, f"calls {func.id}()")
        is_torch_load = (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id in torch_names
        ) or (isinstance(func, ast.Name) and func.id in torch_load_names)
        if is_torch_load and not _keyword_is_true(node, "weights_only"):
            report(node, "calls torch.load without weights_only=True")
        for keyword in node.keywords:
            if keyword.arg == "allow_pickle" and not _is_false(keyword.value):
                report(node, "passes allow_pickle")
    return found


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _is_false(value: ast.expr) -> bool:
    return isinstance(value, ast.Constant) and value.value is False


def python_files() -> Iterator[Path]:
    """The code base's own Python files (generated protobuf modules excluded)."""
    for top in SCANNED:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT)
            if any(relative.is_relative_to(g) for g in GENERATED):
                continue
            yield path


def test_code_base_has_no_pickle_unsafe_torch_load_or_eval() -> None:
    files = list(python_files())
    assert any(p.name == "codec.py" for p in files), "scan found no sources"
    problems = [
        problem
        for path in files
        for problem in findings(path.read_text(), str(path.relative_to(REPO_ROOT)))
    ]
    assert not problems, "forbidden deserialisation or code execution:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from joblib import load",
        "import torch\ntorch.load('x.pt')",
        "import torch as th\nth.load('x.pt', weights_only=False)",
        "from torch import load as tl\ntl('x.pt')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x')",
        "eval(answer)",
        "exec(code, {})",
    ],
)
def test_scanner_flags_forbidden_code(source: str) -> None:
    assert findings(source), f"not flagged: {source!r}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('x.pt', weights_only=True, map_location='cpu')",
        "model.eval()",
        "import asyncio\nasyncio.create_subprocess_exec('ls')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
        "# import pickle\ntext = 'eval(x)'",
        "from safetensors.torch import load_file\nload_file('x.safetensors')",
    ],
)
def test_scanner_allows_safe_code(source: str) -> None:
    assert findings(source) == []
