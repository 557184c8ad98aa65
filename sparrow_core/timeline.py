"""Media-time rules of a stream: frame sampling and the caption cadence.

Kept apart from the transport so that an offline run (a file, a CaptionSession driven directly) can
apply exactly the same rules and get the same segments as the server.

Both rules are arithmetic, O(1) per frame whatever the timestamps and the cadence: segment boundaries
sit at first_ts + k * caption_every_s (k = 1, 2, ...), and a frame's segment index is a floor. A frame
is past a boundary when its index is above the last frame's; where the cadence is below the float
spacing of the timestamps (the index overflows), every strictly later frame starts a new segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPS = 1e-6


@dataclass
class FrameDecision:
    caption_before: bool  # a caption is due before this frame (its media time crossed a segment end)
    keep: bool  # the frame is sampled (goes to the model)


class Timeline:
    def __init__(self, caption_every_s: float = 0.0, sampling_fps: float = 0.0) -> None:
        if not (math.isfinite(caption_every_s) and caption_every_s >= 0):
            raise ValueError(f"caption_every_s must be a finite number >= 0, got {caption_every_s}")
        if not (math.isfinite(sampling_fps) and sampling_fps >= 0):
            raise ValueError(f"sampling_fps must be a finite number >= 0, got {sampling_fps}")
        self.caption_every_s = caption_every_s
        self.sample_period = 1.0 / sampling_fps if sampling_fps > 0 else 0.0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self._last_segment: float = 0.0  # segment index of the latest frame (0 = before the first boundary)
        self._last_kept: float | None = None

    def segment_index(self, ts: float) -> float:
        """How many boundaries lie at or before ts (within _EPS): floor((ts - first + eps) / every); inf where
        the quotient overflows. Needs the first frame seen and a cadence."""
        q = (ts - self.first_ts + _EPS) / self.caption_every_s
        return float(math.floor(q)) if math.isfinite(q) else q

    def on_frame(self, ts: float) -> FrameDecision:
        """Decide for a frame at media time ts (finite, non-decreasing)."""
        if not math.isfinite(ts):
            raise ValueError(f"frame timestamp must be finite, got {ts}")
        caption = False
        if self.first_ts is None:
            self.first_ts = ts
        elif self.caption_every_s > 0:
            seg = self.segment_index(ts)
            if seg == math.inf:  # boundaries finer than the float can tell apart: any later frame crosses one
                caption = ts > self.last_ts
            else:
                caption = seg > self._last_segment
            self._last_segment = max(self._last_segment, seg)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        keep = True
        if self.sample_period > 0:
            # the same rule as CaptionSession's sample_fps: at least one period after the last kept frame
            if self._last_kept is not None and ts - self._last_kept < self.sample_period - 1e-9:
                keep = False
            else:
                self._last_kept = ts
        return FrameDecision(caption, keep)
