"""World streams as training/evaluation material: consecutive segments of frames with one caption each."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np

from sparrow_core.world.captions import sample_caption
from sparrow_core.world.episode import Segment, iter_segments


@dataclass(frozen=True)
class WorldStreamSpec:
    seed: int
    segments: int
    segment_seconds: float = 4.0
    fps: float = 2.0
    start_seconds: float = 0.0  # skip this much of the world first (later segments reference earlier events)
    size: int = 64


@dataclass(frozen=True)
class CaptionedSegment:
    frames: np.ndarray  # [n, H, W, 3] uint8
    times: np.ndarray  # [n] seconds
    caption: str
    segment: Segment


def world_segments(spec: WorldStreamSpec, rng: np.random.Generator | None = None) -> list[CaptionedSegment]:
    """`spec.segments` segments after `start_seconds`; captions resampled with `rng` when given."""
    skip = int(spec.start_seconds // spec.segment_seconds)
    seconds = (skip + spec.segments) * spec.segment_seconds
    it = iter_segments(spec.seed, seconds, spec.fps, spec.size, spec.segment_seconds)
    out = []
    for seg in islice(it, skip, skip + spec.segments):
        caption = sample_caption(seg.facts, rng) if rng is not None else seg.caption
        out.append(CaptionedSegment(seg.frames, seg.times, caption, seg))
    return out
