"""`sparrow-bench NAME ...`: one dispatcher for the benchmarks.

Model-side benchmarks live in `sparrow_core.bench.<name>`; other packages (the service's load test)
add theirs through the `sparrow.bench` entry-point group, so sparrow_core never imports them.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

CORE_BENCHMARKS = {
    "ingest": "sparrow_core.bench.ingest",
    "speculative": "sparrow_core.bench.speculative",
    "kernels": "sparrow_core.bench.kernels",
    "accuracy": "sparrow_core.bench.accuracy",
    "device-check": "sparrow_core.bench.device_check",
    "calibrate": "sparrow_core.bench.calibrate",
}


def _registry() -> dict[str, object]:
    found: dict[str, object] = dict(CORE_BENCHMARKS)
    for ep in entry_points(group="sparrow.bench"):
        found[ep.name] = ep
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    registry = _registry()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sparrow-bench {" + ",".join(sorted(registry)) + "} [options]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in registry:
        print(f"unknown benchmark {name!r}; choose from {', '.join(sorted(registry))}", file=sys.stderr)
        return 2
    entry = registry[name]
    fn = importlib.import_module(entry).main if isinstance(entry, str) else entry.load()
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
