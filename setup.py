"""Build hook: generate the gRPC stubs from protos/*.proto at build/install time."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    """build_py that first runs grpc_tools.protoc on protos/*.proto."""

    def run(self):
        sys.path.insert(0, str(ROOT))
        try:
            import protos  # importing regenerates stale stubs in the source tree

            protos.generate(force=True)
        finally:
            sys.path.pop(0)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
