"""Caption a sequence of frames offline with the same segment rule as the service (`Timeline`).

A caption covers the media since the previous one; it is due when a frame at or past the segment end
arrives, and once more at the end; its span ends where `Timeline` says (its segment span rule). The service applies exactly this rule to a replayed stream, so its
greedy finals equal these captions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from sparrow_core.session import CaptionSession
from sparrow_core.subtitles import Cue
from sparrow_core.timeline import Timeline


def caption_frames(
    session: CaptionSession,
    frames: Iterable[tuple[np.ndarray, float]],
    caption_every_s: float,
    sampling_fps: float = 0.0,
) -> Iterator[Cue]:
    """Feed (frame [H, W, 3] uint8, media seconds) pairs; yield each final caption as it is decoded."""
    timeline = Timeline(caption_every_s, sampling_fps)
    pending = False  # frames ingested since the last caption
    segment = 0
    for rgb, ts in frames:
        decision = timeline.on_frame(ts)
        if decision.caption_before and pending:
            p = session.caption(decision.caption_end_s)
            yield Cue(p.start_s, p.end_s, p.text, segment)
            segment += 1
            pending = False
        if decision.keep:
            session.ingest(rgb[None], [ts])
            pending = True
    if pending:
        p = session.caption(timeline.end_now())
        yield Cue(p.start_s, p.end_s, p.text, segment)
