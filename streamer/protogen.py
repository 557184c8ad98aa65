"""Generate the gRPC stubs for `protos/` into `streamer/_proto/` (git-ignored).

Used by the install (`setup.py`'s build_py hook) and, as a fallback, at first import by
`streamer.proto`. Depends only on grpc_tools, so setup.py can load this file by path.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_FILES = ("sparrow/v1/captioner.proto",)


def repo_proto_root() -> Path:
    """`protos/` beside the `streamer/` package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "protos"


def generate(out_dir: Path, proto_root: Path | None = None) -> list[Path]:
    """Run protoc on PROTO_FILES into out_dir (python, pyi and grpc modules); return the files written."""
    from grpc_tools import protoc  # imported late: a build dependency, not a runtime one for readers

    proto_root = Path(proto_root or repo_proto_root())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    for rel in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_root / rel),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root / rel}")
    written = []
    for rel in PROTO_FILES:
        pkg_dir = out_dir / Path(rel).parent
        # Every directory from out_dir down to the generated modules is a package.
        d = out_dir
        for part in ("", *Path(rel).parent.parts):
            d = d / part if part else d
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
        stem = Path(rel).stem
        grpc_file = pkg_dir / f"{stem}_pb2_grpc.py"
        # protoc writes `from sparrow.v1 import captioner_pb2`; make it relative to the package.
        src = grpc_file.read_text()
        src = re.sub(rf"^from [\w.]+ import ({stem}_pb2 as )", r"from . import \1", src, flags=re.M)
        grpc_file.write_text(src)
        written += [pkg_dir / f"{stem}_pb2.py", pkg_dir / f"{stem}_pb2.pyi", grpc_file]
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "_proto"
    for path in generate(out):
        print(path)
