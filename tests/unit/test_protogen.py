"""The generated code in use (asympo/v1) is exactly what proto/ generates now.

asympo/v1 is build output (not in git), produced from proto/ by asympo.protogen at install
time. If someone edits a .proto and forgets to rebuild, the running code would speak an
older wire contract than the one in the repository; this test catches that.
"""

from __future__ import annotations

from pathlib import Path

import asympo.v1
from asympo import protogen

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALLED = Path(asympo.v1.__file__).resolve().parent


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_every_proto_generates_modules() -> None:
    protos = protogen.proto_files(REPO_ROOT)
    assert protos, "no .proto files found"
    for proto in protos:
        assert (INSTALLED / f"{proto.stem}_pb2.py").is_file(), f"{proto} not generated"


def test_installed_generated_code_equals_a_fresh_generation(tmp_path: Path) -> None:
    fresh = protogen.generate(REPO_ROOT, tmp_path)
    assert fresh, "protogen generated nothing"
    expected = _files(tmp_path / protogen.OUT_SUBDIR)
    installed = _files(INSTALLED)
    assert sorted(installed) == sorted(expected), "generated file sets differ: re-run protogen"
    stale = [name for name in expected if installed[name] != expected[name]]
    assert not stale, (
        f"asympo/v1 is out of date with proto/ for {stale}: run `python -m asympo.protogen`"
    )
