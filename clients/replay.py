"""Replay a recorded video through a Sparrow Stream server and show its captions as they come.

    python clients/replay.py clip.mp4 --server 127.0.0.1:50051 --fast --out captions.vtt
    python clients/replay.py --world-seed 3 --seconds 20 --realtime      # no file: render a world clip

--fast (replay mode, the default) streams as fast as HTTP/2 flow control allows and never loses a
frame; --realtime (live mode) paces frames to their media time, and the server may drop stale ones.
Interim captions are rewritten in place, finals go on new lines; --out writes .vtt, .srt or .jsonl. A call
that ends UNAVAILABLE (the server, or a cluster replica, lost) is resumed after its last final (--max-resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from sparrow_core.subtitles import Cue, format_for, format_timestamp, write_subtitles
from streamer.client import CaptionClient, ResumableStream, call_status
from streamer.proto import pb


@dataclass
class ReplayResult:
    cues: list[Cue] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_token_latencies: list[float] = field(default_factory=list)
    frames_sent: int = 0
    frames_dropped: int = 0
    last_stats: pb.StreamStats | None = None
    errors: list[str] = field(default_factory=list)
    fatal: pb.StreamError | None = None  # the server's in-band copy of a failed call's status
    wall_s: float = 0.0
    resumes: int = 0  # calls opened again with StreamConfig.resume after the server was lost


class ReplayFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class TerminalView:
    """Finals on their own lines; one status line (progress bar + the interim caption) rewritten in place."""

    def __init__(self, duration_s: float | None, enabled: bool = True, stream=sys.stdout) -> None:
        self.duration_s = duration_s
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.sent_s = 0.0
        self.interim = ""

    def _status(self) -> str:
        width = shutil.get_terminal_size((100, 20)).columns
        if self.duration_s:
            frac = min(1.0, self.sent_s / self.duration_s)
            filled = int(frac * 20)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {frac * 100:3.0f}% {self.sent_s:6.1f}/{self.duration_s:.1f}s"
        else:
            bar = f"{self.sent_s:7.1f}s"
        line = f"{bar} | {self.interim}"
        return line[: width - 1]

    def _redraw(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self._status())
            self.stream.flush()

    def progress(self, sent_s: float) -> None:
        self.sent_s = sent_s
        self._redraw()

    def interim_caption(self, text: str, tail: str) -> None:
        self.interim = text + (f" \x1b[2m{tail}\x1b[0m" if tail and self.tty else "")
        self._redraw()

    def final(self, cue: Cue) -> None:
        if not self.enabled:
            return
        self.interim = ""
        prefix = "\r\x1b[2K" if self.tty else ""
        self.stream.write(f"{prefix}[{format_timestamp(cue.start_s)} --> {format_timestamp(cue.end_s)}] {cue.text}\n")
        self._redraw()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        prefix = "\r\x1b[2K" if self.tty else ""
        self.stream.write(f"{prefix}{text}\n")
        self._redraw()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def video_duration(path: Path) -> float | None:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / 1e6 if container.duration else None


def video_frames(path: Path, fps: float, size: tuple[int, int] | None) -> Iterator[tuple[np.ndarray, float]]:
    """RGB frames and media times from any video file (sampled to fps, latest frame per tick; resized to (H, W))."""
    from sparrow_core.world.video_io import read_video

    yield from read_video(path, fps=fps or None, size=size)


async def replay(
    server: str,
    frames: Iterator[tuple[np.ndarray, float]],
    config: pb.StreamConfig,
    view: TerminalView | None = None,
    token: str | None = None,
    tls_ca: Path | None = None,
    max_resumes: int = 3,
) -> ReplayResult:
    """Stream frames under config; collect finals as cues. A call that ends UNAVAILABLE (its server or
    cluster replica lost) is resumed up to max_resumes times (streamer.client.ResumableStream). Raises
    ReplayFailed when the stream fails."""
    view = view or TerminalView(None, enabled=False)
    result = ReplayResult()
    live = config.mode != pb.STREAM_MODE_REPLAY
    t0 = time.monotonic()

    def sent(ts: float) -> None:
        result.frames_sent += 1
        view.progress(ts)

    stream = ResumableStream(server, config, frames, realtime=live, token=token, tls_ca=tls_ca,
                             max_resumes=max_resumes, on_sent=sent)
    try:
        await _collect(stream.responses(), result, view)
    except grpc.aio.AioRpcError as exc:
        raise ReplayFailed(*call_status(exc, result.fatal)) from exc
    result.resumes = stream.resumes
    result.wall_s = time.monotonic() - t0
    return result


async def _collect(responses, result: ReplayResult, view: TerminalView) -> None:
    async for response in responses:
        kind = response.WhichOneof("response")
        if kind == "event" and response.event.type == pb.StreamEvent.STREAM_STARTED and result.fatal is not None:
            view.note(f"! resumed after {result.fatal.status}: {result.fatal.message}")
            result.fatal = None  # that call's loss is behind us: the stream goes on

        if kind == "caption":
            c = response.caption
            if c.is_final:
                cue = Cue(c.start_s, c.end_s, c.text, int(c.segment_id))
                result.cues.append(cue)
                result.latencies.append(c.latency_s)
                result.first_token_latencies.append(c.first_token_latency_s)
                view.final(cue)
            else:
                view.interim_caption(c.text, c.draft_tail)
        elif kind == "event" and response.event.type == pb.StreamEvent.FRAMES_DROPPED:
            result.frames_dropped += response.event.frames
        elif kind == "stats":
            result.last_stats = response.stats
        elif kind == "error" and response.error.code == pb.StreamError.FATAL:
            result.fatal = response.error
        elif kind == "error":
            result.errors.append(f"{pb.StreamError.Code.Name(response.error.code)}: {response.error.message}")
            view.note(f"! {result.errors[-1]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replay", description=__doc__.split("\n\n")[0])
    p.add_argument("video", nargs="?", type=Path, help="video file (any format PyAV reads); none: a world clip")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of sparrow-stream serve")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="live mode: pace frames to their media time")
    pace.add_argument("--fast", action="store_true", help="replay mode (default): as fast as flow control allows")
    p.add_argument("--out", type=Path, help="write the final captions: .vtt, .srt or .jsonl")
    p.add_argument("--every", type=float, default=4.0, help="caption every N seconds of media (default 4)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sent (latest frame per tick; 0: all)")
    p.add_argument("--size", type=int, default=0, help="square frame side sent (default: the model's frame size)")
    p.add_argument("--instruction", default="")
    p.add_argument("--method", default="auto",
                   help="a decoding method the server has (its GetModelInfo.methods: ar, ngram, sparrow, ...) or auto")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--visual-token-budget", type=int, default=0,
                   help="visual tokens the stream keeps in the server's KV (0: the model's default)")
    p.add_argument("--caption-history", type=int, default=0,
                   help="earlier caption turns the stream keeps in the server's KV (0: the model's default)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-interim", action="store_true", help="do not ask for interim results")
    p.add_argument("--draft-tail", action="store_true", help="show the unverified drafted tail, dimmed")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate: connect with TLS")
    p.add_argument("--world-seed", type=int, default=0, help="with no video: the world clip's seed")
    p.add_argument("--seconds", type=float, default=20.0, help="with no video: the world clip's length")
    p.add_argument("--max-resumes", type=int, default=3,
                   help="reopen a stream whose server was lost (UNAVAILABLE) this many times, resuming after its "
                   "last final")
    p.add_argument("--quiet", action="store_true")
    return p


async def amain(args: argparse.Namespace) -> int:
    if args.out is not None:
        format_for(args.out)  # fail on a bad extension before streaming
    tmp = None
    video = args.video
    if video is None:
        from sparrow_core.world.video_io import write_world_clip

        tmp = tempfile.TemporaryDirectory(prefix="sparrow-replay-")
        video = Path(tmp.name) / f"world-{args.world_seed}.mp4"
        write_world_clip(video, seed=args.world_seed, seconds=args.seconds, fps=30, size=256)
    elif not video.is_file():
        print(f"replay: no such file: {video}", file=sys.stderr)
        return 2
    try:
        size = args.size
        if not size:
            async with CaptionClient(args.server, token=args.token, tls_ca=args.tls_ca) as client:
                info = await client.model_info()
            size = info.frame_width or 0
        config = pb.StreamConfig(
            mode=pb.STREAM_MODE_LIVE if args.realtime else pb.STREAM_MODE_REPLAY,
            caption_every_s=args.every,
            instruction=args.instruction,
            interim_results=not args.no_interim,
            interim_draft_tail=args.draft_tail,
            max_caption_tokens=args.max_tokens,
            visual_token_budget=args.visual_token_budget,
            caption_history=args.caption_history,
            temperature=args.temperature,
            decoding_method="" if args.method == "auto" else args.method,  # "": the server's auto
            seed=args.seed,
            label="replay",
        )
        view = TerminalView(video_duration(video), enabled=not args.quiet)
        frames = video_frames(video, args.fps, (size, size) if size else None)
        try:
            result = await replay(args.server, frames, config, view, args.token, args.tls_ca, args.max_resumes)
        finally:
            view.close()
    except grpc.aio.AioRpcError as exc:
        print(f"replay: server said {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ReplayFailed as exc:
        print(f"replay: server said {exc}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.out is not None:
        write_subtitles(args.out, result.cues)
    if not args.quiet:
        lat = f"{np.median(result.latencies):.2f}s" if result.latencies else "-"
        print(f"{len(result.cues)} captions, {result.frames_sent} frames sent, {result.frames_dropped} dropped, "
              f"median caption latency {lat}, {result.wall_s:.1f}s"
              + (f", resumed {result.resumes}x" if result.resumes else "")
              + (f"; wrote {args.out}" if args.out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
