"""The engine a server runs (`sparrow-stream serve`, each replica of `sparrow-stream cluster`), from its flags."""

from __future__ import annotations

import torch

from sparrow_core.cli.drafter_flag import parse_drafter_flags


def load_engine(model: str | None, drafters: list[str], no_drafter: bool, device: str,
                dtype: torch.dtype | None = None, tree_profile: str | None = None, kv_dtype: torch.dtype | None = None):
    """The engine `serve` runs; a bad checkpoint or drafter is a one-line SystemExit, not a traceback."""
    from sparrow_core.session import CaptionEngine

    try:
        dirs = parse_drafter_flags(drafters)
        if no_drafter and dirs:
            raise ValueError("--no-drafter and --drafter contradict each other")
        return CaptionEngine.load(model, dirs, device=device, dtype=dtype, shipped_drafters=not no_drafter,
                                  tree_profile=tree_profile, kv_dtype=kv_dtype)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"sparrow-stream: error: {exc}") from None
