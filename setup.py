"""Build hook: generate Python code for proto/ with grpcio-tools before packaging.

The generated modules (asympo/v1/*_pb2.py, *_pb2_grpc.py and .pyi stubs) are not
kept in git; every build, editable or not, produces them from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


class BuildWithProtos(build_py):
    """build_py that first regenerates the protobuf/gRPC modules."""

    def run(self) -> None:
        from asympo.protogen import generate

        generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
