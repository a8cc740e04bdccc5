"""Generate the Python protobuf/gRPC modules for everything under ``proto/``.

Run by the build (``setup.py``) and by ``python -m asympo.protogen``. Output lands
in ``asympo/v1/`` because the .proto package is ``asympo.v1``; the directory is
build output and is not kept in git.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_SUBDIR = Path("proto")
OUT_SUBDIR = Path("asympo") / "v1"


def proto_files(root: Path) -> list[Path]:
    """All .proto files under ``root/proto``, sorted for a stable build."""
    return sorted((root / PROTO_SUBDIR).rglob("*.proto"))


def _find_plugin(name: str) -> str | None:
    """A protoc plugin from PATH or beside this interpreter (a venv's bin is often not on PATH)."""
    import shutil

    local = Path(sys.executable).parent / name
    return shutil.which(name) or (str(local) if local.exists() else None)


def generate(root: Path, out_root: Path | None = None) -> list[Path]:
    """Run grpc_tools.protoc over ``root/proto`` writing into ``out_root`` (default ``root``).

    Returns the generated files. Raises RuntimeError if protoc fails.
    """
    from grpc_tools import protoc  # build-time dependency only

    out_root = out_root or root
    files = proto_files(root)
    if not files:
        raise RuntimeError(f"no .proto files under {root / PROTO_SUBDIR}")
    out_dir = out_root / OUT_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root / PROTO_SUBDIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
    ]
    plugins = {name: _find_plugin(name) for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc")}
    if all(plugins.values()):  # .pyi stubs are for type checking only
        args += [f"--plugin={name}={path}" for name, path in plugins.items()]
        args += [f"--mypy_out={out_root}", f"--mypy_grpc_out={out_root}"]
    args += [str(f.relative_to(root / PROTO_SUBDIR)) for f in files]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    init = out_dir / "__init__.py"
    init.write_text('"""Generated from proto/asympo/v1 by asympo.protogen; do not edit."""\n')
    (out_dir / "py.typed").touch()
    return sorted(p for p in out_dir.iterdir() if p.is_file())


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    for path in generate(root):
        print(path)
