"""Video files with PyAV: write mp4 (h264) / webm (vp8) / y4m, read any video back as RGB frames
with media times (optionally resampled and resized), and write world clips with their ground truth.

CLI: python -m sparrow_core.world.video_io --seed 3 --seconds 20 out.mp4   (writes out.json too)"""

import argparse
import json
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import numpy as np

from sparrow_core.world.config import WorldConfig
from sparrow_core.world.episode import iter_segments
from sparrow_core.world.facts import segment_to_json

T = TypeVar("T")
EPS = 1e-6

# suffix -> (codec, encoder options)
CODECS: dict[str, tuple[str, dict[str, str]]] = {
    ".mp4": ("libx264", {"crf": "18", "preset": "veryfast"}),
    ".mkv": ("libx264", {"crf": "18", "preset": "veryfast"}),
    ".mov": ("libx264", {"crf": "18", "preset": "veryfast"}),
    ".webm": ("libvpx", {"crf": "6", "b:v": "4M", "deadline": "good", "cpu-used": "4"}),
}


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def write_y4m(path: str | Path, frames: Iterable[np.ndarray], fps: float = 30) -> int:
    """Uncompressed YUV4MPEG2 4:2:0 (BT.601, what Chromium's --use-file-for-fake-video-capture reads).
    frames: [H, W, 3] uint8 RGB with even H, W. Returns the number of frames written."""
    rate = _rate(fps)
    n = 0
    with open(path, "wb") as f:
        for rgb in frames:
            h, w = rgb.shape[:2]
            if n == 0:
                if h % 2 or w % 2:
                    raise ValueError(f"y4m 4:2:0 needs even sizes, got {w}x{h}")
                f.write(f"YUV4MPEG2 W{w} H{h} F{rate.numerator}:{rate.denominator} Ip A1:1 C420jpeg\n".encode())
            yuv = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            f.write(b"FRAME\n")
            f.write(yuv.to_ndarray().tobytes())  # [H * 3 / 2, W]: Y plane, then U, then V
            n += 1
    return n


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 30) -> int:
    """Encode RGB frames [H, W, 3] uint8 (even H, W) to path: .mp4/.mkv/.mov -> h264 yuv420p,
    .webm -> vp8 yuv420p, .y4m -> raw 4:2:0. Frame i gets media time i / fps. Returns the frame count."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".y4m":
        return write_y4m(path, frames, fps)
    if suffix not in CODECS:
        raise ValueError(f"unsupported video suffix {suffix!r}; use one of {sorted(CODECS) + ['.y4m']}")
    codec, options = CODECS[suffix]
    rate = _rate(fps)
    n = 0
    with av.open(str(path), "w") as container:
        stream = None
        for rgb in frames:
            if stream is None:
                h, w = rgb.shape[:2]
                if h % 2 or w % 2:
                    raise ValueError(f"yuv420p needs even sizes, got {w}x{h}")
                stream = container.add_stream(codec, rate=rate, options=dict(options))
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.codec_context.time_base = 1 / rate
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = n, 1 / rate
            container.mux(stream.encode(frame))
            n += 1
        if stream is not None:
            container.mux(stream.encode(None))
    return n


def resample_latest(items: Iterable[tuple[T, float]], fps: float) -> Iterator[tuple[T, float]]:
    """Keep, for every sampling tick t0 + k / fps (t0 = first item's time), the latest item with time <= tick.
    Each item is emitted at most once, with its own time; items after the last tick inside the stream
    are dropped (a 30 fps clip of 20 s read at 2 fps gives the frames at 0, 0.5, ..., 19.5)."""
    period = 1.0 / fps
    tick = None
    pending = None
    for item, t in items:
        if tick is None:
            tick = t
        if t > tick + EPS:
            if pending is not None:
                yield pending
                pending = None
            tick += period * max(1, int(np.ceil((t - tick - EPS) / period)))
        pending = (item, t)
    if pending is not None and tick is not None and abs(pending[1] - tick) <= EPS:
        yield pending


def _size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    return (size, size) if isinstance(size, int) else size


def read_video(path: str | Path, fps: float | None = None, size: int | tuple[int, int] | None = None,
               start_s: float = 0.0) -> Iterator[tuple[np.ndarray, float]]:
    """Decode any video PyAV/ffmpeg reads: (frame [H, W, 3] uint8 RGB, media time in seconds), in order.
    fps: resample with resample_latest; size: int or (H, W) resize (area filter); start_s: the first frame
    at or after this media time (a seek to the keyframe before it where the container can seek)."""
    hw = _size(size)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        guess = float(stream.average_rate or stream.base_rate or 30)
        if start_s > 0:
            try:
                container.seek(int(start_s * av.time_base), backward=True)
            except av.error.FFmpegError:  # not seekable: decode from the start and skip
                pass

        def decoded() -> Iterator[tuple[av.VideoFrame, float]]:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / guess
                if t >= start_s - EPS:
                    yield frame, t

        items = decoded() if fps is None else resample_latest(decoded(), fps)
        for frame, t in items:
            if hw is None:
                yield frame.to_ndarray(format="rgb24"), t
            else:
                out = frame.reformat(width=hw[1], height=hw[0], format="rgb24", interpolation="AREA")
                yield out.to_ndarray(), t


def write_world_clip(path: str | Path, seed: int, seconds: float, fps: float = 30,
                     size: int | tuple[int, int] = 256, segment_seconds: float = 4.0,
                     config: WorldConfig | None = None) -> dict:
    """Render world `seed` for `seconds` at `fps` into a video file (any write_video suffix) and return
    its JSON-ready ground truth: {seed, seconds, fps, size, segment_seconds, frames, events, segments}."""
    segments: list[dict] = []

    def frames() -> Iterator[np.ndarray]:
        for seg in iter_segments(seed, seconds, fps, size, segment_seconds, config):
            segments.append({"index": seg.index, "t0": seg.t0, "t1": seg.t1, "caption": seg.caption,
                             "facts": segment_to_json(seg.facts)})
            yield from seg.frames

    n = write_video(path, frames(), fps)
    hw = _size(size)
    events = [e for s in segments for e in s["facts"]["events"]]
    return {"seed": seed, "seconds": seconds, "fps": fps, "size": list(hw), "segment_seconds": segment_seconds,
            "frames": n, "events": events, "segments": segments}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a procedural world clip and its ground truth JSON.")
    ap.add_argument("out", help="output video: .mp4 (h264), .webm (vp8) or .y4m (raw, for Chromium)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=256, help="square frame side in pixels (even)")
    ap.add_argument("--segment-seconds", type=float, default=4.0)
    args = ap.parse_args(argv)
    truth = write_world_clip(args.out, args.seed, args.seconds, args.fps, args.size, args.segment_seconds)
    gt_path = Path(args.out).with_suffix(".json")
    gt_path.write_text(json.dumps(truth, indent=1))
    print(f"wrote {args.out} ({truth['frames']} frames) and {gt_path}")
    for s in truth["segments"]:
        print(f"[{s['t0']:6.1f}, {s['t1']:6.1f}) {s['caption']}")


if __name__ == "__main__":
    main()
