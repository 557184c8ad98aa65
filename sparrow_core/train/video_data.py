"""One's own videos as drafter training material: the files `--videos` names, a held-out split by file, and
windows of consecutive caption segments cut from them (the target captions them, see drafter_data.py).

A PATH is a file, a folder (searched recursively) or a glob. A file counts as a video when PyAV opens it
with a video stream of more than one frame (so a folder's stills and text files are passed over); a file
named directly that is not one is an error naming it. Segments follow `timeline.Timeline`, the rule the
service and `sparrow-caption` apply, at the training fps; frames reach the target at their own size, and
the target's adapter resizes and normalises them with the checkpoint's own preprocessor config.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from sparrow_core.timeline import Timeline
from sparrow_core.train.drafter_config import DrafterDataError
from sparrow_core.world.video_io import read_video


def video_duration(path: Path) -> float | None:
    """Seconds of video in `path` (from its metadata, else by decoding it); None unless PyAV reads it as a
    video stream of more than one frame."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None and stream.frames != 1:
                seconds = float(stream.duration * stream.time_base)
                if seconds > 0:
                    return seconds
    except (av.error.FFmpegError, UnicodeDecodeError, IsADirectoryError):
        return None
    try:
        times = [t for _, t in read_video(path)]
    except (av.error.FFmpegError, ValueError):
        return None
    return times[-1] - times[0] if len(times) > 1 else None


def find_videos(paths: Sequence[str]) -> list[tuple[Path, float]]:
    """(file, duration in seconds) of every video the PATHs name, sorted, each once."""
    found: dict[Path, float] = {}
    for spec in paths:
        p = Path(spec).expanduser()
        if p.is_file():
            seconds = video_duration(p)
            if seconds is None:
                raise DrafterDataError(f"--videos: {p} is not a video PyAV can read (no video stream of more "
                                       "than one frame)")
            found[p.resolve()] = seconds
            continue
        matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))] if not p.is_dir() else [p]
        if not matches:
            raise DrafterDataError(f"--videos: no file, folder or glob match for {spec!r}")
        for m in matches:
            for f in sorted(m.rglob("*")) if m.is_dir() else [m]:
                if f.is_file() and f.resolve() not in found and (seconds := video_duration(f)) is not None:
                    found[f.resolve()] = seconds
    if not found:
        raise DrafterDataError(f"--videos: no video PyAV can read in {', '.join(paths)}")
    return sorted(found.items())


@dataclass(frozen=True)
class VideoClips:
    """The videos split by file: held-out streams come only from `held_out`, training streams from `train`."""

    train: list[tuple[Path, float]]
    held_out: list[tuple[Path, float]]

    @classmethod
    def split(cls, videos: list[tuple[Path, float]], held_out_fraction: float, seed: int) -> VideoClips:
        if len(videos) < 2:
            raise DrafterDataError(f"--videos needs at least 2 video files (whole files are held out), found "
                                   f"{len(videos)}")
        order = np.random.default_rng([seed, 4]).permutation(len(videos))
        n_held = min(len(videos) - 1, max(1, round(len(videos) * held_out_fraction)))
        held = sorted(int(i) for i in order[:n_held])
        return cls([v for i, v in enumerate(videos) if i not in held], [videos[i] for i in held])

    def window(self, rng: np.random.Generator, held_out: bool, segments: int, segment_seconds: float,
               fps: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`segments` consecutive caption segments (frames [n, H, W, 3] uint8, times [n]) from a file drawn
        in proportion to its length, starting at a segment boundary drawn uniformly."""
        pool = self.held_out if held_out else self.train
        lengths = np.array([max(1, int(seconds // segment_seconds)) for _, seconds in pool], dtype=np.float64)
        path, seconds = pool[int(rng.choice(len(pool), p=lengths / lengths.sum()))]
        starts = max(1, int(seconds // segment_seconds) - segments + 1)
        start_s = segment_seconds * int(rng.integers(starts))
        return caption_segments(read_video(path, fps=fps, start_s=start_s), segments, segment_seconds)


def caption_segments(frames: Iterator[tuple[np.ndarray, float]], segments: int, segment_seconds: float
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Group (frame, time) into at most `segments` caption segments by the service's rule (`Timeline`): a
    segment ends before the first frame at or past its end; the last one ends with the frames."""
    timeline = Timeline(segment_seconds)
    rgb: list[np.ndarray] = []
    times: list[float] = []
    done = 0
    for frame, t in frames:
        if timeline.on_frame(t).caption_before and rgb:
            yield np.stack(rgb), np.array(times)
            rgb, times, done = [], [], done + 1
            if done == segments:
                return
        rgb.append(frame)
        times.append(t)
    if rgb:
        yield np.stack(rgb), np.array(times)
