"""Build hook: generate Python code for proto/ with grpcio-tools before packaging.

The generated modules (asympo/v1/*_pb2.py, *_pb2_grpc.py and .pyi stubs) are not
kept in git; every build, editable or not, produces them from the .proto files.

setuptools discovers the packages (pyproject's ``packages.find``) when the
distribution is configured, i.e. before any command runs: in a clean checkout
``asympo/v1`` does not exist yet, so it is missing from that list and a wheel built
from it would ship without the gRPC code. ``build_py`` therefore adds the generated
package to its own list after generating it (tests/packaging/test_wheel.py builds
a wheel from a clean copy and imports every generated module from it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

GENERATED_PACKAGE = "asympo.v1"
GENERATED_DATA = ["*.pyi", "py.typed"]


class BuildWithProtos(build_py):
    """build_py that first regenerates the protobuf/gRPC modules and packages them."""

    def run(self) -> None:
        from asympo.protogen import generate

        generate(ROOT)
        packages = list(self.packages or [])
        if GENERATED_PACKAGE not in packages:
            packages.append(GENERATED_PACKAGE)
        self.packages = packages
        # Keep the distribution's list in step: metadata (top_level, RECORD) reads it.
        self.distribution.packages = packages
        self.package_data = dict(self.package_data or {})
        self.package_data.setdefault(GENERATED_PACKAGE, GENERATED_DATA)
        # build_py computes data_files lazily from packages/package_data; drop a stale copy.
        self.__dict__.pop("data_files", None)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
