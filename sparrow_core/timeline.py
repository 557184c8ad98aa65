"""Media-time rules of a stream: frame sampling and the caption cadence.

Kept apart from the transport so that an offline run (a file, a CaptionSession driven directly) can
apply exactly the same rules and get the same segments as the server.
"""

from __future__ import annotations

from dataclasses import dataclass

_EPS = 1e-6


@dataclass
class FrameDecision:
    caption_before: bool  # a caption is due before this frame (its media time crossed a segment end)
    keep: bool  # the frame is sampled (goes to the model)


class Timeline:
    def __init__(self, caption_every_s: float = 0.0, sampling_fps: float = 0.0) -> None:
        self.caption_every_s = caption_every_s
        self.sample_period = 1.0 / sampling_fps if sampling_fps > 0 else 0.0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self._next_boundary: float | None = None
        self._last_kept: float | None = None

    def on_frame(self, ts: float) -> FrameDecision:
        """Decide for a frame at media time ts (non-decreasing)."""
        if self.first_ts is None:
            self.first_ts = ts
            if self.caption_every_s > 0:
                self._next_boundary = ts + self.caption_every_s
        self.last_ts = ts
        caption = False
        if self._next_boundary is not None and ts >= self._next_boundary - _EPS:
            caption = True
            while self._next_boundary <= ts + _EPS:
                self._next_boundary += self.caption_every_s
        keep = True
        if self.sample_period > 0:
            # the same rule as CaptionSession's sample_fps: at least one period after the last kept frame
            if self._last_kept is not None and ts - self._last_kept < self.sample_period - 1e-9:
                keep = False
            else:
                self._last_kept = ts
        return FrameDecision(caption, keep)
