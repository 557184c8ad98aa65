"""The `sparrow-caption`, `sparrow-train` and `sparrow-bench` commands (pyproject.toml entry points)."""
