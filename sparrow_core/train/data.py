"""World streams as training/evaluation material: consecutive segments of frames with one caption each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from sparrow_core.world.caption_parse import parse_caption
from sparrow_core.world.captions import sample_caption
from sparrow_core.world.config import WorldConfig
from sparrow_core.world.episode import Segment, caption_rng, iter_segments
from sparrow_core.world.facts import SegmentFacts, reference_supported


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
    refers_from: int = 0  # world segment index: the caption refers back only to events of this segment or later


def world_segments(spec: WorldStreamSpec, rng: np.random.Generator | None = None,
                   caption_history: int | None = None) -> list[CaptionedSegment]:
    """`spec.segments` segments after `start_seconds`; captions resampled with `rng` when given (else
    each segment's own caption draw). A caption refers back only to an event whose own caption turn the
    session writing it holds: the stream starts at its first segment, so a stream cut mid-world never
    mentions what came before its start, and a session keeping the `caption_history` newest earlier turns
    (None: all) holds, when it writes caption j, the turns of segments j - caption_history .. j - 1. So an
    earlier caption a session still holds may refer to an event whose own turn it has evicted since, as a
    live stream's do; `backed_by` tells which. Frames alone do not count: a reference backed only by
    frames far back in view, or by another caption's reference, is one a model learns to make without
    support, and to copy from its own caption history."""
    skip = int(spec.start_seconds // spec.segment_seconds)
    seconds = (skip + spec.segments) * spec.segment_seconds
    it = iter_segments(spec.seed, seconds, spec.fps, spec.size, spec.segment_seconds, spec.config)
    out = []
    for j, seg in enumerate(islice(it, skip, skip + spec.segments)):
        context_from = skip + (0 if caption_history is None else max(0, j - caption_history))  # world index
        draw = rng if rng is not None else caption_rng(spec.seed, seg.index)
        caption = (sample_caption(seg.facts, draw, context_from=context_from) if rng is not None or context_from
                   else seg.caption)
        out.append(CaptionedSegment(seg.frames, seg.times, caption, seg, context_from))
    return out


def backed_by(seg: CaptionedSegment, held: Sequence[SegmentFacts]) -> bool:
    """Whether every reference of `seg`'s caption to the past is to an event of a segment in `held` (those
    whose caption turn a training sequence holds before it): `sparrow-bench accuracy`'s invented-reference
    count with the caption turns alone as context (`facts.reference_supported`)."""
    return all(reference_supported(r, seg.segment.facts, held) for r in parse_caption(seg.caption).references)
