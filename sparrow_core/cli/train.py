"""`sparrow-train {target,drafter} ...`: train the default target or a drafter for a target."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("target", "drafter"):
        print("usage: sparrow-train {target,drafter} [options]   (-h after the name for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "target":
        from sparrow_core.train.target import main as run
    else:
        from sparrow_core.train.drafter import main as run
    return int(run(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
