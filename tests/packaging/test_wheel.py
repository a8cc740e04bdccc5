"""The project wheel, built from a clean copy and installed without ``-e``, runs.

``make test`` uses an editable install, which finds ``asympo/v1`` in the source tree
even when the wheel leaves it out; the images install the wheel, so a wheel without
the generated gRPC code crashes every service at import. This test reproduces what
the Dockerfile does, minus the container:

1. copy the files git tracks (and untracked, not-ignored ones) into a temporary
   folder: no ``asympo/v1``, no ``*.egg-info``, no build output;
2. ``python -m build --wheel --no-isolation`` there (the Dockerfile builds with
   isolation; here the build requirements are already in the venv, and PyPI is not
   asked again);
3. a new venv *without* system site-packages; the wheel installed into it with
   ``pip install --no-deps`` (a real, non-editable install);
4. the dependencies (torch, transformers, grpc, …: GBs, minutes to install) are made
   visible by one ``.pth`` line naming the test venv's site-packages. A path added by
   a ``.pth`` line is appended after the new venv's own site-packages and its own
   ``.pth`` files are not processed, so the editable finder of the test venv never
   runs: ``asympo`` and ``services`` can only come from the wheel, which the test
   asserts before importing every generated module and every service's ``main``, and
   running ``asympo serve --help``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from asympo import protogen

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("weights", "reward", "rollout", "learner")


def _clean_copy(dest: Path) -> None:
    """Copy the checkout's source files as a fresh clone would have them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail(f"{ROOT} is not a git checkout: cannot tell source from build output")
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True, timeout=60,
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree, not yet in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    assert not (dest / "asympo" / "v1").exists(), "generated code leaked into the clean copy"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: int = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a clean copy of the checkout."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist = base / "src", base / "dist"
    _clean_copy(src)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
          "."], cwd=src)
    wheels = sorted(dist.glob("asympo-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


def test_wheel_contains_every_generated_module(wheel: Path) -> None:
    """One ``_pb2`` and one ``_pb2_grpc`` module (and stubs) per .proto file."""
    names = set(zipfile.ZipFile(wheel).namelist())
    protos = protogen.proto_files(ROOT)
    assert protos
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            member = f"asympo/v1/{proto.stem}{suffix}"
            assert member in names, f"{member} is missing from {wheel.name}"
    assert "asympo/v1/__init__.py" in names
    assert "asympo/v1/py.typed" in names


def test_wheel_installed_without_editable_imports_and_serves_help(
    wheel: Path, tmp_path: Path
) -> None:
    """A non-editable install imports every generated module and every service."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--no-deps", "--no-compile", str(wheel)], cwd=tmp_path)
    new_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path"
                          "('purelib'))"], cwd=tmp_path).stdout.strip())
    deps_site = sysconfig.get_path("purelib")
    (new_site / "zz_asympo_test_deps.pth").write_text(deps_site + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    generated = sorted(
        Path(n).stem for n in zipfile.ZipFile(wheel).namelist()
        if n.startswith("asympo/v1/") and n.endswith(".py") and "__init__" not in n
    )
    probe = (
        "import importlib, json, asympo, services\n"
        f"mods = {['asympo.v1.' + m for m in generated]!r}\n"
        f"mods += {[f'services.{s}.main' for s in SERVICES]!r}\n"
        "files = {m: importlib.import_module(m).__file__ for m in mods}\n"
        "files['asympo'] = asympo.__file__\n"
        "files['services'] = services.__file__\n"
        "print(json.dumps(files))\n"
    )
    files = json.loads(_run([str(python), "-c", probe], cwd=tmp_path, env=env).stdout
                       .strip().splitlines()[-1])
    assert len(files) == len(generated) + len(SERVICES) + 2
    outside = {m: f for m, f in files.items() if not f.startswith(str(new_site))}
    assert not outside, f"imported from outside the installed wheel: {outside}"
    help_text = _run([str(venv / "bin" / "asympo"), "serve", "--help"], cwd=tmp_path,
                     env=env).stdout
    for service in SERVICES:
        assert service in help_text, f"`asympo serve --help` does not list {service}"
