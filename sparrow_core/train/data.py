"""World streams as training/evaluation material: consecutive segments of frames with one caption each."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np

from sparrow_core.world.captions import sample_caption
from sparrow_core.world.config import WorldConfig
from sparrow_core.world.episode import Segment, caption_rng, iter_segments


@dataclass(frozen=True)
class WorldStreamSpec:
    seed: int
    segments: int
    segment_seconds: float = 4.0
    fps: float = 2.0
    start_seconds: float = 0.0  # skip this much of the world first: the stream starts mid-world
    size: int | tuple[int, int] = 64  # frame side, or (height, width)
    config: WorldConfig | None = None  # None: the default world


@dataclass(frozen=True)
class CaptionedSegment:
    frames: np.ndarray  # [n, H, W, 3] uint8
    times: np.ndarray  # [n] seconds
    caption: str
    segment: Segment


def world_segments(spec: WorldStreamSpec, rng: np.random.Generator | None = None) -> list[CaptionedSegment]:
    """`spec.segments` segments after `start_seconds`; captions resampled with `rng` when given (else
    each segment's own caption draw). The stream starts at its first segment, so its captions refer back
    only to events inside it: a stream cut mid-world never mentions what came before its start."""
    skip = int(spec.start_seconds // spec.segment_seconds)
    seconds = (skip + spec.segments) * spec.segment_seconds
    it = iter_segments(spec.seed, seconds, spec.fps, spec.size, spec.segment_seconds, spec.config)
    out = []
    for seg in islice(it, skip, skip + spec.segments):
        draw = rng if rng is not None else caption_rng(spec.seed, seg.index)
        caption = sample_caption(seg.facts, draw, context_from=skip) if rng is not None or skip else seg.caption
        out.append(CaptionedSegment(seg.frames, seg.times, caption, seg))
    return out
