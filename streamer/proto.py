"""The generated `sparrow.v1` messages and stubs (`pb`, `pb_grpc`).

The install generates them into `streamer/_proto/` (setup.py's build_py hook). In a source checkout
(an editable install) they are generated here at first import when missing or older than the .proto.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from streamer.protogen import PROTO_FILES, generate, repo_proto_root

_GENERATED = "streamer._proto.sparrow.v1"
_OUT = Path(__file__).resolve().parent / "_proto"


def _stale() -> bool:
    root = repo_proto_root()
    if not root.is_dir():  # an installed wheel: the stubs came with it
        return False
    for rel in PROTO_FILES:
        src, built = root / rel, _OUT / Path(rel).with_name(Path(rel).stem + "_pb2.py")
        if src.is_file() and (not built.is_file() or built.stat().st_mtime < src.stat().st_mtime):
            return True
    return False


def _load() -> tuple[ModuleType, ModuleType]:
    if _stale():
        generate(_OUT)
        importlib.invalidate_caches()
    return (
        importlib.import_module(f"{_GENERATED}.captioner_pb2"),
        importlib.import_module(f"{_GENERATED}.captioner_pb2_grpc"),
    )


pb, pb_grpc = _load()
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Captioner"].full_name

# The decoding method names (ModelInfo.methods, SessionConfig.decoding, the WebRTC and CLI options) and
# their DecodingMethod values: the one map between the two.
DECODING_METHODS: dict[str, int] = {
    "auto": pb.DECODING_METHOD_UNSPECIFIED,
    "ar": pb.DECODING_METHOD_AR,
    "sparrow": pb.DECODING_METHOD_SPARROW,
    "eagle": pb.DECODING_METHOD_EAGLE,
    "msd": pb.DECODING_METHOD_MSD,
    "ngram": pb.DECODING_METHOD_NGRAM,
}
