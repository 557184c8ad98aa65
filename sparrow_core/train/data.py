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


def world_segments(spec: WorldStreamSpec, rng: np.random.Generator | None = None,
                   captions_from: int = 0) -> list[CaptionedSegment]:
    """`spec.segments` segments after `start_seconds`; captions resampled with `rng` when given (else
    each segment's own caption draw). A caption refers back only to an event whose own caption the
    sequence holds before it: the stream starts at its first segment, so a stream cut mid-world never
    mentions what came before its start, and `captions_from` is the first of its segments whose caption
    turn a training sequence keeps (the older turns evicted, as a session's caption history evicts them).
    Frames alone do not count: a reference backed only by frames far back in view, or by another caption's
    reference, is one a model learns to make without support, and to copy from its own caption history."""
    skip = int(spec.start_seconds // spec.segment_seconds)
    context_from = skip + captions_from  # world segment index: references stay at or after it
    seconds = (skip + spec.segments) * spec.segment_seconds
    it = iter_segments(spec.seed, seconds, spec.fps, spec.size, spec.segment_seconds, spec.config)
    out = []
    for seg in islice(it, skip, skip + spec.segments):
        draw = rng if rng is not None else caption_rng(spec.seed, seg.index)
        caption = (sample_caption(seg.facts, draw, context_from=context_from) if rng is not None or context_from
                   else seg.caption)
        out.append(CaptionedSegment(seg.frames, seg.times, caption, seg))
    return out
