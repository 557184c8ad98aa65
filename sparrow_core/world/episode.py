"""Lazy frame / segment streams over the simulation, and the in-memory `episode` API."""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sparrow_core.world.captions import sample_caption
from sparrow_core.world.config import WorldConfig
from sparrow_core.world.facts import PastEvent, SegmentFacts, build_segment
from sparrow_core.world.physics import advance
from sparrow_core.world.render import render_frame
from sparrow_core.world.scene import simulate
from sparrow_core.world.state import Event, Tick

EPS = 1e-9


@dataclass(frozen=True)
class Segment:
    index: int
    t0: float
    t1: float
    frames: np.ndarray  # [n, H, W, 3] uint8 (n = 0 when not rendered)
    times: np.ndarray  # [n] float64 seconds
    facts: SegmentFacts
    caption: str  # one caption sampled with the caption rng of this segment


@dataclass(frozen=True)
class Episode:
    seed: int
    fps: float
    frames: np.ndarray  # [N, H, W, 3] uint8
    times: np.ndarray  # [N] float64 seconds, j / fps
    segments: tuple[Segment, ...]  # their frames are views into `frames`
    events: tuple[Event, ...]  # every event with t < seconds


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def frame_at(tick: Tick, t: float, cfg: WorldConfig, size: int | tuple[int, int] = 64) -> np.ndarray:
    """Render the world at time t in [tick.t, tick.t + 1 / tps): [H, W, 3] uint8."""
    height, width = _size(size)
    bodies = [advance(b, t - tick.t, cfg.grow_speed) for b in tick.bodies] if t > tick.t else tick.bodies
    return render_frame(tick.background, bodies, height, width, cfg.isotropic_shapes, tick.background_brightness)


def caption_rng(seed: int, index: int) -> np.random.Generator:
    """The rng used for the caption of segment `index` of world `seed`."""
    return np.random.default_rng([seed, index, 7])


def iter_frames(seed: int, fps: float = 2.0, size: int | tuple[int, int] = 64, seconds: float | None = None,
                config: WorldConfig | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """(frame [H, W, 3] uint8, t seconds) at t = j / fps for t < seconds (endless when None). Lazy."""
    cfg = config or WorldConfig()
    tps = cfg.ticks_per_second
    j = 0
    for tick in simulate(seed, cfg):
        while True:
            t = j / fps
            if seconds is not None and t >= seconds - EPS:
                return
            if math.floor(t * tps + EPS) != tick.k:
                break
            yield frame_at(tick, t, cfg, size), t
            j += 1


def first_frame_at_or_after(t: float, fps: float) -> float:
    """Time of the first frame (frames at j / fps) that shows the world as it is at time t."""
    return math.ceil(t * fps - EPS) / fps


def iter_segments(seed: int, seconds: float | None = None, fps: float = 2.0, size: int | tuple[int, int] = 64,
                  segment_seconds: float = 4.0, config: WorldConfig | None = None, render: bool = True,
                  ) -> Iterator[Segment]:
    """Consecutive segments [i L, (i + 1) L) with their frames, facts and one caption. Lazy: holds one
    segment at a time. The last segment is cut at `seconds`.

    A segment's facts are what its frames show: the ticks after the previous segment's last frame up to
    its own last frame (an event between two frames first shows in the later one, which may open the next
    segment). Nothing is stated that no frame of the stream shows."""
    cfg = config or WorldConfig()
    tps = cfg.ticks_per_second
    height, width = _size(size)
    history: dict[int, list[PastEvent]] = {}
    ticks: list[Tick] = []
    frames: list[np.ndarray] = []
    times: list[float] = []
    count_start = 0
    index, j = 0, 0

    def finish() -> Segment:
        t0 = index * segment_seconds
        t1 = (index + 1) * segment_seconds if seconds is None else min((index + 1) * segment_seconds, seconds)
        last_frame = first_frame_at_or_after(t1, fps) - 1.0 / fps  # the segment's last frame
        facts = build_segment(index, t0, t1, ticks, count_start, history, 1.0 / tps, seen_until=last_frame)
        arr = np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
        return Segment(index, t0, t1, arr, np.array(times, dtype=np.float64), facts,
                       sample_caption(facts, caption_rng(seed, index)))

    for tick in simulate(seed, cfg):
        shown_at = first_frame_at_or_after(tick.t, fps)  # the frame that first shows this tick
        if seconds is not None and shown_at >= seconds - EPS:
            break
        if math.floor(shown_at / segment_seconds + EPS) != index:
            yield finish()
            count_start = len(ticks[-1].bodies)
            ticks, frames, times = [], [], []
            index += 1
        if not ticks and index == 0:
            count_start = len(tick.bodies)
        ticks.append(tick)
        while render:
            t = j / fps
            if (seconds is not None and t >= seconds - EPS) or math.floor(t * tps + EPS) != tick.k:
                break
            frames.append(frame_at(tick, t, cfg, (height, width)))
            times.append(t)
            j += 1
    if ticks:
        yield finish()


def episode(seed: int, seconds: float, fps: float = 2.0, size: int | tuple[int, int] = 64,
            segment_seconds: float = 4.0, config: WorldConfig | None = None) -> Episode:
    """A whole clip in memory: frames [N, H, W, 3] uint8, times [N], segments and the event log."""
    segs = list(iter_segments(seed, seconds, fps, size, segment_seconds, config))
    height, width = _size(size)
    frames = np.concatenate([s.frames for s in segs]) if segs else np.zeros((0, height, width, 3), np.uint8)
    times = np.concatenate([s.times for s in segs]) if segs else np.zeros(0)
    out, start = [], 0
    for s in segs:
        n = len(s.times)
        out.append(Segment(s.index, s.t0, s.t1, frames[start:start + n], times[start:start + n], s.facts,
                           s.caption))
        start += n
    events = tuple(e for s in segs for e in s.facts.events)
    return Episode(seed, fps, frames, times, tuple(out), events)
