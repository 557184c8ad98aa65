"""Media-time rules of a stream: frame sampling and the caption cadence.

Kept apart from the transport so that an offline run (a file, a CaptionSession driven directly) can
apply exactly the same rules and get the same segments as the server.

Both rules are arithmetic, O(1) per frame whatever the timestamps and the cadence: segment boundaries
sit at first_ts + k * caption_every_s (k = 1, 2, ...), and a frame's segment index is a floor. A frame
is past a boundary when its index is above the last frame's; where the cadence is below the float
spacing of the timestamps (the index overflows), every strictly later frame starts a new segment.

The segment span rule, the one place it lives (the offline CLI and the service both take their spans from
here, and `CaptionSession` records what it is given): segments tile the media, each starting where the
previous one ended (the first at 0). A segment ends
- closed by the cadence (a frame crossed a boundary): at that boundary, first_ts + k * caption_every_s for
  the last frame's k + 1 (never past the crossing frame, where the index overflows): `caption_end_s`;
- closed otherwise (end of stream, FLUSH, CAPTION_NOW): at the last frame's timestamp plus one frame
  duration, not past the open segment's boundary: `end_now`.
A frame covers the media up to the next frame, as the world's own segments [i L, (i + 1) L) do, so on an
8 s clip at 8 fps with a 4 s cadence the spans are 0-4 and 4-8, not 0-3.875 and 4-7.875. The frame
duration is the spacing of the last two distinct timestamps received (every frame, sampled or not): the
service gets timestamps only, no frame rate, and a file replayed to it must get the spans the offline CLI
gives; a variable-rate source gets its local duration. A lone frame has no duration: its span ends at it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPS = 1e-6


@dataclass
class FrameDecision:
    caption_before: bool  # a caption is due before this frame (its media time crossed a segment end)
    keep: bool  # the frame is sampled (goes to the model)
    caption_end_s: float | None = None  # where the caption due before this frame ends (its boundary)


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
        self.frame_s = 0.0  # duration of the latest frame: the spacing of the last two distinct timestamps
        self._last_segment: float = 0.0  # segment index of the latest frame (0 = before the first boundary)
        self._last_kept: float | None = None

    def resume_at(self, first_ts: float, start_s: float) -> None:
        """Go on with a stream that an earlier timeline began at `first_ts` and captioned up to `start_s` (a
        resumed stream): the same boundaries, first_ts + k * caption_every_s, and the next frame, at or after
        start_s, in start_s's segment. Call before any frame."""
        if self.first_ts is not None:
            raise RuntimeError("resume_at must come before the first frame")
        if not (math.isfinite(first_ts) and math.isfinite(start_s)):
            raise ValueError(f"resume points must be finite, got {first_ts} and {start_s}")
        self.first_ts = first_ts
        if self.caption_every_s > 0 and start_s > first_ts:
            self._last_segment = self.segment_index(start_s)

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
        caption_end = None
        if self.first_ts is None:
            self.first_ts = ts
        elif self.caption_every_s > 0:
            seg = self.segment_index(ts)
            if seg == math.inf:  # boundaries finer than the float can tell apart: any later frame crosses one
                caption = self.last_ts is not None and ts > self.last_ts  # (None: the first frame resumed)
            else:
                caption = seg > self._last_segment
            if caption:
                caption_end = min(self._boundary_after_last(), ts)
            self._last_segment = max(self._last_segment, seg)
        if self.last_ts is not None and ts > self.last_ts:
            self.frame_s = ts - self.last_ts
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        keep = True
        if self.sample_period > 0:
            # keep a frame at least one sampling period after the last kept one (the only frame-sampling rule)
            if self._last_kept is not None and ts - self._last_kept < self.sample_period - 1e-9:
                keep = False
            else:
                self._last_kept = ts
        return FrameDecision(caption, keep, caption_end)

    def _boundary_after_last(self) -> float:
        """The end of the segment the latest frame lies in: first_ts + (k + 1) * caption_every_s (inf with no
        cadence, or where the index overflowed)."""
        if self.caption_every_s <= 0 or self.first_ts is None:
            return math.inf
        return self.first_ts + (self._last_segment + 1) * self.caption_every_s

    def end_now(self) -> float:
        """Where a segment closed now, before any further frame (end of stream, FLUSH, CAPTION_NOW), ends: the
        latest frame's timestamp plus its duration, not past its segment's boundary (0 before any frame)."""
        if self.last_ts is None:
            return 0.0
        return min(self.last_ts + self.frame_s, max(self.last_ts, self._boundary_after_last()))
