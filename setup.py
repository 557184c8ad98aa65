"""Build hook: generate the gRPC stubs from protos/ into streamer/_proto/ on every install.

Works for `pip install .` (the stubs go into the wheel) and `pip install -e .` (they are written into
the source tree, which the editable install points at). Everything else is in pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protogen():
    spec = importlib.util.spec_from_file_location("_sparrow_protogen", ROOT / "streamer" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        _protogen().generate(ROOT / "streamer" / "_proto", ROOT / "protos")
        # Package discovery ran before the stubs existed: add their packages.
        generated = ["streamer._proto", "streamer._proto.sparrow", "streamer._proto.sparrow.v1"]
        self.packages = list(self.packages or []) + [p for p in generated if p not in (self.packages or [])]
        for pkg in generated:
            self.package_data.setdefault(pkg, ["*.pyi"])
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
