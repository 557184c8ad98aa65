"""`sparrow-bench soak`: a long replay at full speed against a `sparrow-stream serve` process of its own.

    sparrow-bench soak --media-minutes 120 --streams 2 --json soak.json

Each stream replays a procedural world clip (rendered once, looped with increasing timestamps, so that
two hours of media need no two-hour file) in replay mode, as fast as the server's backpressure lets
it. Printed and written: the server's RSS at warm-up, middle and end, the largest KV (tokens) any
stream reported in StreamStats, and finals expected (by the server's own segment rule) vs received.
Exit status 1 when RSS grows more than --max-rss-growth after warm-up, a final is missing, or a call fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from sparrow_core.timeline import Timeline
from streamer.client import CaptionClient, call_status, config_request, frame_requests
from streamer.proto import pb
from streamer.serve_process import ServeProcess
from streamer.settings import ServerLimits


@dataclass
class StreamTally:
    finals_expected: int = 0
    finals_received: int = 0
    segments_in_order: bool = True
    kv_tokens_max: int = 0
    frames_sent: int = 0
    status: str = "OK"
    details: str = ""


@dataclass
class SoakReport:
    media_minutes: float
    streams: int
    rss_mb: dict[str, float] = field(default_factory=dict)  # warm_up, middle, end (last frame sent), closed
    rss_series_mb: list[tuple[float, float]] = field(default_factory=list)  # (fraction of media sent, MB)
    rss_growth: float = 0.0  # (max(middle, end, closed) - warm_up) / warm_up
    kv_tokens_max: int = 0
    finals_expected: int = 0
    finals_received: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    per_stream: list[StreamTally] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def frame_count(fps: float, seconds: float) -> int:
    """How many media times i / fps lie in [0, seconds)."""
    n = math.ceil(seconds * fps)
    while n > 0 and (n - 1) / fps >= seconds:
        n -= 1
    while n / fps < seconds:
        n += 1
    return n


def looped(clip: list[tuple[np.ndarray, float]], fps: float, seconds: float) -> Iterator[tuple[np.ndarray, float]]:
    """The clip's frames over and over, at media times 0, 1/fps, ... below `seconds` (none held in memory
    beyond the clip)."""
    for i in range(frame_count(fps, seconds)):
        yield clip[i % len(clip)][0], i / fps


def expected_finals(fps: float, seconds: float, every_s: float) -> int:
    """Finals the server owes a stream of frames at i / fps: one per segment the cadence cuts, plus the last."""
    timeline = Timeline(every_s)
    n = frame_count(fps, seconds)
    return 1 + sum(timeline.on_frame(i / fps).caption_before for i in range(n)) if n else 0


class RssProbe:
    """Reads the server's RSS as the media sent (over all streams) passes warm-up, the middle and the
    last frame, and at every 5% for the series."""

    def __init__(self, server: ServeProcess, total_frames: int, warmup_fraction: float) -> None:
        self.server = server
        self.total = total_frames
        self.marks = {"warm_up": max(1, int(total_frames * warmup_fraction)), "middle": max(1, total_frames // 2),
                      "end": total_frames}
        self.sent = 0
        self.mb: dict[str, float] = {}
        self.series: list[tuple[float, float]] = []

    def on_sent(self, _ts: float) -> None:
        self.sent += 1
        step = max(1, self.total // 20)
        due = [name for name, mark in self.marks.items() if name not in self.mb and self.sent >= mark]
        if due or self.sent % step == 0:
            mb = self.server.rss_bytes() / 1e6
            self.series.append((round(self.sent / self.total, 3), round(mb, 1)))
            for name in due:
                self.mb[name] = mb

    def closed(self) -> None:
        """After every stream has ended (its state freed by the server)."""
        self.mb["closed"] = self.server.rss_bytes() / 1e6


async def soak_stream(target: str, clip, args: argparse.Namespace, probe: RssProbe, index: int) -> StreamTally:
    tally = StreamTally(finals_expected=expected_finals(args.fps, args.media_minutes * 60, args.every))
    config = config_request(mode=pb.STREAM_MODE_REPLAY, caption_every_s=args.every, sampling_fps=args.fps,
                            max_caption_tokens=args.max_tokens, decoding=pb.DECODING_METHOD_AR,
                            label=f"soak-{index}")

    def sent(ts: float) -> None:
        tally.frames_sent += 1
        probe.on_sent(ts)

    fatal: pb.StreamError | None = None
    async with CaptionClient(target) as client:
        call = client.describe(frame_requests(config, looped(clip, args.fps, args.media_minutes * 60), on_sent=sent))
        try:
            async for r in call:
                kind = r.WhichOneof("response")
                if kind == "caption" and r.caption.is_final:
                    tally.segments_in_order &= r.caption.segment_id == tally.finals_received
                    tally.finals_received += 1
                elif kind == "stats":
                    tally.kv_tokens_max = max(tally.kv_tokens_max, int(r.stats.kv_tokens))
                elif kind == "error" and r.error.code == pb.StreamError.FATAL:
                    fatal = r.error
        except grpc.aio.AioRpcError as exc:
            code, tally.details = call_status(exc, fatal)
            tally.status = code.name
    return tally


def make_clip(seconds: float, fps: float, size: int, seed: int) -> list[tuple[np.ndarray, float]]:
    from sparrow_core.world.video_io import read_video, write_world_clip

    with tempfile.TemporaryDirectory(prefix="sparrow-soak-") as tmp:
        path = Path(tmp) / f"world-{seed}.mp4"
        write_world_clip(path, seed=seed, seconds=seconds, fps=max(10.0, fps), size=size)
        return list(read_video(path, fps=fps, size=size))


async def run_soak(args: argparse.Namespace) -> SoakReport:
    media_s = args.media_minutes * 60
    report = SoakReport(media_minutes=args.media_minutes, streams=args.streams)
    # every stream comes from this process (one peer): the per-peer cap is the stream count too
    flags = ["--max-streams", str(args.streams), "--max-streams-per-peer", str(args.streams), "--threads", str(args.threads),
             "--max-stream-seconds", str(max(ServerLimits().max_stream_s, media_s + 60)),
             "--max-caption-tokens", str(max(ServerLimits().max_caption_tokens, args.max_tokens))]
    if args.model:
        flags += ["--model", args.model]
    with ServeProcess(flags) as server:
        async with CaptionClient(server.target) as client:
            info = await client.model_info()
        clip = make_clip(args.clip_seconds, args.fps, info.frame_width or 64, args.seed)
        probe = RssProbe(server, frame_count(args.fps, media_s) * args.streams, args.warmup_fraction)
        t0 = time.monotonic()
        report.per_stream = list(await asyncio.gather(*(
            soak_stream(server.target, clip, args, probe, i) for i in range(args.streams)
        )))
        report.wall_s = time.monotonic() - t0
        probe.closed()
    report.rss_mb, report.rss_series_mb = probe.mb, probe.series
    warm = probe.mb["warm_up"]
    report.rss_growth = (max(probe.mb[k] for k in ("middle", "end", "closed")) - warm) / warm
    report.kv_tokens_max = max(t.kv_tokens_max for t in report.per_stream)
    report.finals_expected = sum(t.finals_expected for t in report.per_stream)
    report.finals_received = sum(t.finals_received for t in report.per_stream)
    if report.rss_growth > args.max_rss_growth:
        report.failures.append(f"server RSS grew {report.rss_growth:.1%} after warm-up "
                               f"(limit {args.max_rss_growth:.0%})")
    for i, t in enumerate(report.per_stream):
        if t.status != "OK":
            report.failures.append(f"stream {i} ended {t.status}: {t.details}")
        if t.finals_received != t.finals_expected or not t.segments_in_order:
            report.failures.append(f"stream {i}: {t.finals_received} finals of {t.finals_expected} expected"
                                   + ("" if t.segments_in_order else ", segments out of order"))
    return report


def format_report(r: SoakReport) -> str:
    rss = r.rss_mb
    lines = [
        f"soak: {r.media_minutes:g} media minutes x {r.streams} stream(s) in {r.wall_s:.0f}s wall",
        f"server RSS: warm-up {rss['warm_up']:.1f} MB, middle {rss['middle']:.1f} MB, end {rss['end']:.1f} MB, "
        f"streams closed {rss['closed']:.1f} MB ({r.rss_growth:+.1%} after warm-up)",
        f"KV tokens max: {r.kv_tokens_max}",
        f"finals: {r.finals_expected} expected, {r.finals_received} received",
        "PASS" if r.passed else "FAIL: " + "; ".join(r.failures),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparrow-bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--media-minutes", type=float, default=120.0, help="media length of each stream")
    p.add_argument("--streams", type=int, default=1, help="concurrent replay streams")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--fps", type=float, default=2.0, help="frames per media second each stream sends")
    p.add_argument("--every", type=float, default=4.0, help="caption every N seconds of media")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--clip-seconds", type=float, default=60.0, help="length of the world clip that is looped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="RSS is compared against its value once this fraction of the media is sent")
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="fail above this RSS growth after warm-up")
    p.add_argument("--model", default=None, help="server model dir (default: the embedded model)")
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.media_minutes <= 0 or args.streams < 1 or not 0 < args.warmup_fraction < 0.5:
        raise SystemExit("need --media-minutes > 0, --streams >= 1 and 0 < --warmup-fraction < 0.5")
    report = asyncio.run(run_soak(args))
    print(format_report(report))
    if args.json is not None:
        payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   **asdict(report), "passed": report.passed}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0 if report.passed else 1
