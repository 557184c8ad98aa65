"""The generated `sparrow.v1` messages and stubs (`pb`, `pb_grpc`).

The install generates them into `streamer/_proto/` (setup.py's build_py hook). In a checkout that has
not been installed since the .proto changed, they are generated here at first import.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

_GENERATED = "streamer._proto.sparrow.v1"


def _load() -> tuple[ModuleType, ModuleType]:
    try:
        return (
            importlib.import_module(f"{_GENERATED}.captioner_pb2"),
            importlib.import_module(f"{_GENERATED}.captioner_pb2_grpc"),
        )
    except ModuleNotFoundError:
        from streamer.protogen import generate, repo_proto_root

        if not repo_proto_root().is_dir():
            raise
        generate(Path(__file__).resolve().parent / "_proto")
        importlib.invalidate_caches()
        return (
            importlib.import_module(f"{_GENERATED}.captioner_pb2"),
            importlib.import_module(f"{_GENERATED}.captioner_pb2_grpc"),
        )


pb, pb_grpc = _load()
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Captioner"].full_name
