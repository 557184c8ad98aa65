"""`--drafter [NAME=]DIR`, repeatable: the drafters a command loads, by decoding-method name.

One definition for `sparrow-caption`, `sparrow-bench speculative` and `sparrow-stream serve`. A bare DIR
is the `sparrow` method's drafter; NAME=DIR adds (or replaces) the method NAME, e.g. `eagle=DIR`,
`msd=DIR`, or a name of one's own for an ablation. The checkpoint's shipped drafters load too, under the
names not given (`CaptionEngine.load`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from sparrow_core.decoding.decoders import AUTO, BUILT_IN

SPARROW = "sparrow"  # the method a bare DIR names
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def add_drafter_flag(parser: argparse.ArgumentParser) -> None:
    """Add --drafter and --tree-profile (how the drafters' trees are sized) to `parser`."""
    parser.add_argument(
        "--drafter", action="append", default=[], metavar="[NAME=]DIR",
        help="a drafter directory, repeatable: DIR is the sparrow drafter, NAME=DIR the method NAME "
        "(e.g. eagle=DIR, msd=DIR); the model's shipped drafters load under the names not given",
    )
    parser.add_argument(
        "--tree-profile", default=None, metavar="FILE",
        help="a `sparrow-bench calibrate` profile: the drafters it measured size their trees for this device "
        "(default: the checkpoint's tree_profile.json when it has one, else each drafter's own tree)",
    )


def parse_drafter_flags(values: Sequence[str]) -> dict[str, Path]:
    """["DIR", "msd=DIR2", ...] -> {method name: directory}; ValueError (one line) for a name given twice,
    a reserved name or a directory that does not exist."""
    dirs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not (sep and _NAME.fullmatch(name)):
            name, path = SPARROW, value  # a bare directory (which may itself contain '=')
        if name in BUILT_IN or name == AUTO:
            raise ValueError(f"--drafter {value}: {name!r} is not a drafter's name ({', '.join(BUILT_IN)} need none)")
        if name in dirs:
            raise ValueError(f"--drafter {value}: the method {name!r} was given a drafter twice")
        if not Path(path).is_dir():
            raise ValueError(f"--drafter {value}: no such directory: {path}")
        dirs[name] = Path(path)
    return dirs
