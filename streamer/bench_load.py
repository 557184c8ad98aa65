"""`sparrow-bench load`: concurrent live streams against one server, per stream count and decoding method.

    sparrow-bench load --streams 1,4,8,16 --method ar,sparrow --batching on,off --json load.json --plot load.png

Each stream replays its own world clip in live mode, paced in real time at the config's fps. Reported per
(batching, streams, method): caption latency p50/p95 (wall time from the segment's end being sent to its
final arriving), first-token latency, ingest lag (from the server's stats), frames sent / dropped, tau,
caption tokens/s over the row's wall time (capped by what live streams offer), aggregate decode tokens/s
(tokens over the wall time some caption was being decoded: the capacity), the worker's streams, tokens
and milliseconds per target forward, and the service latency ratio: AR's p50 caption latency and
first-token latency at the same stream count and batching over the method's (`x ar`; above 1 = the
method's captions arrive sooner). Without --server an in-process server is started on 127.0.0.1 with the
default model, once per --batching mode (on: the worker's batch token budget, --batch-token-budget; off:
one stream's unit per forward).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sparrow_core.cli.device import add_device_flags, add_kv_dtype_flag, device_and_dtype, kv_dtype
from sparrow_core.cli.drafter_flag import add_drafter_flag, parse_drafter_flags
from sparrow_core.timeline import Timeline
from streamer.client import CaptionClient, config_request, control_request, rgb_request
from streamer.proto import DECODING_METHODS, pb
from streamer.scheduler import DEFAULT_BATCH_TOKEN_BUDGET, UNBATCHED


@dataclass
class StreamRun:
    latencies: list[float] = field(default_factory=list)
    decoding: list[tuple[float, float]] = field(default_factory=list)  # (due, final) wall times of each caption
    first_token: list[float] = field(default_factory=list)
    ingest_lag: list[float] = field(default_factory=list)
    frames_sent: int = 0
    frames_dropped: int = 0
    tau: list[float] = field(default_factory=list)
    tokens: int = 0
    captions: int = 0


@dataclass
class Row:
    batching: str  # "on" | "off" | "server" (a running server's own)
    streams: int
    method: str
    captions: int
    latency_p50_s: float
    latency_p95_s: float
    first_token_p50_s: float
    ingest_lag_p50_s: float
    ingest_lag_p95_s: float
    ingest_lag_max_s: float
    frames_sent: int
    frames_dropped: int
    tau: float
    tokens_per_s: float  # caption tokens / the row's wall time (bounded by the live streams' offered load)
    wall_s: float
    decode_tokens_per_s: float  # caption tokens / the wall time some caption was being decoded (capacity)
    streams_per_forward: float = float("nan")  # the in-process worker's, over the row
    tokens_per_forward: float = float("nan")
    forward_ms: float = float("nan")
    latency_p50_vs_ar: float | None = None  # ar's latency_p50_s / this one's at the same stream count and batching
    first_token_vs_ar: float | None = None  # ar's first_token_p50_s / this one's


def add_ratios_vs_ar(rows: list[Row]) -> None:
    """Fill each row's latency ratios from the ar row of its stream count and batching (left None without one)."""
    ar = {(r.streams, r.batching): r for r in rows if r.method == "ar"}
    for r in rows:
        base = ar.get((r.streams, r.batching))
        if base is not None:
            r.latency_p50_vs_ar = base.latency_p50_s / r.latency_p50_s if r.latency_p50_s > 0 else None
            r.first_token_vs_ar = base.first_token_p50_s / r.first_token_p50_s if r.first_token_p50_s > 0 else None


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: wall time during which some caption was due and
    not yet final."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_stream(
    client: CaptionClient, frames: list[tuple[np.ndarray, float]], method: str, every_s: float, max_tokens: int
) -> StreamRun:
    run = StreamRun()
    due: list[float] = []  # wall time each caption became due, in segment order
    timeline = Timeline(every_s)

    async def requests():
        yield config_request(mode=pb.STREAM_MODE_LIVE, caption_every_s=every_s, max_caption_tokens=max_tokens,
                             decoding=DECODING_METHODS[method], stats_interval_s=0.25, label=f"bench-{method}")
        t0, first = time.monotonic(), frames[0][1]
        for rgb, ts in frames:
            delay = t0 + (ts - first) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if timeline.on_frame(ts).caption_before:
                due.append(time.monotonic())
            yield rgb_request(rgb, ts)
            run.frames_sent += 1
        # the last segment ends one frame period after the last frame
        period = frames[1][1] - frames[0][1] if len(frames) > 1 else 0.0
        await asyncio.sleep(max(0.0, t0 + (frames[-1][1] - first) + period - time.monotonic()))
        due.append(time.monotonic())
        yield control_request(pb.Control.END_OF_STREAM)

    async for r in client.describe(requests()):
        kind = r.WhichOneof("response")
        if kind == "caption" and r.caption.is_final:
            now = time.monotonic()
            seg = int(r.caption.segment_id)
            if seg < len(due):
                run.latencies.append(now - due[seg])
                run.decoding.append((due[seg], now))
            run.first_token.append(r.caption.first_token_latency_s)
            run.tau.append(r.caption.tau)
            run.captions += 1
        elif kind == "event" and r.event.type == pb.StreamEvent.FRAMES_DROPPED:
            run.frames_dropped += r.event.frames
        elif kind == "stats":
            run.ingest_lag.append(r.stats.ingest_lag_s)
            run.tokens = int(r.stats.tokens_generated)
    return run


async def run_load(
    target: str, clips: list[list[tuple[np.ndarray, float]]], streams: int, method: str, every_s: float,
    max_tokens: int, token: str | None, batching: str = "server",
) -> Row:
    async with CaptionClient(target, token=token) as client:
        t0 = time.monotonic()
        runs = await asyncio.gather(*(
            run_stream(client, clips[i % len(clips)], method, every_s, max_tokens) for i in range(streams)
        ))
        wall = time.monotonic() - t0
    lat = [x for r in runs for x in r.latencies]
    lag = [x for r in runs for x in r.ingest_lag]
    taus = [x for r in runs for x in r.tau]
    return Row(
        batching=batching, streams=streams, method=method, captions=sum(r.captions for r in runs),
        latency_p50_s=_pct(lat, 50), latency_p95_s=_pct(lat, 95),
        first_token_p50_s=_pct([x for r in runs for x in r.first_token], 50),
        ingest_lag_p50_s=_pct(lag, 50), ingest_lag_p95_s=_pct(lag, 95), ingest_lag_max_s=max(lag, default=0.0),
        frames_sent=sum(r.frames_sent for r in runs), frames_dropped=sum(r.frames_dropped for r in runs),
        tau=float(np.mean(taus)) if taus else float("nan"),
        tokens_per_s=sum(r.tokens for r in runs) / wall, wall_s=wall,
        decode_tokens_per_s=sum(r.tokens for r in runs) / max(busy_seconds([x for r in runs for x in r.decoding]), 1e-9),
    )


def format_table(rows: list[Row]) -> str:
    head = (f"{'batch':>6} {'streams':>7} {'method':>8} {'caps':>5} {'lat p50':>8} {'lat p95':>8} {'1st tok':>8} "
            f"{'lag p50':>8} {'lag p95':>8} {'lag max':>8} {'sent':>6} {'dropped':>7} {'tau':>5} {'tok/s':>7} {'dec t/s':>7} "
            f"{'str/fw':>6} {'tok/fw':>6} {'fw ms':>6} {'lat x ar':>8} {'1st x ar':>8}")
    ratio = lambda x: f"{'n/a':>8}" if x is None else f"{x:>7.2f}x"  # noqa: E731
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.batching:>6} {r.streams:>7} {r.method:>8} {r.captions:>5} {r.latency_p50_s:>7.2f}s {r.latency_p95_s:>7.2f}s "
            f"{r.first_token_p50_s:>7.2f}s {r.ingest_lag_p50_s:>7.2f}s {r.ingest_lag_p95_s:>7.2f}s "
            f"{r.ingest_lag_max_s:>7.2f}s {r.frames_sent:>6} {r.frames_dropped:>7} {r.tau:>5.2f} {r.tokens_per_s:>7.1f} {r.decode_tokens_per_s:>7.1f} "
            f"{r.streams_per_forward:>6.2f} {r.tokens_per_forward:>6.1f} {r.forward_ms:>6.1f} "
            f"{ratio(r.latency_p50_vs_ar)} {ratio(r.first_token_vs_ar)}"
        )
    return "\n".join(lines)


class ForwardCounts:
    """The in-process worker's forward histograms (streamer/metrics.py), read before and after a row."""

    NAMES = ("sparrow_forward_streams", "sparrow_forward_tokens", "sparrow_forward_seconds")

    def __init__(self, registry) -> None:
        self.registry = registry
        self.before = self.read()

    def read(self) -> list[float]:
        get = self.registry.get_sample_value
        return [get(f"{n}_{part}") or 0.0 for n in self.NAMES for part in ("sum", "count")]

    def fill(self, row: Row) -> Row:
        """Per-forward means over the row, into it."""
        after = self.read()
        d = [a - b for a, b in zip(after, self.before)]
        forwards = d[1]
        if forwards:
            row.streams_per_forward, row.tokens_per_forward, row.forward_ms = d[0] / forwards, d[2] / forwards, 1000 * d[4] / forwards
        return row


def plot_rows(rows: list[Row], path: Path) -> None:
    """Aggregate decode tokens/s and p95 caption latency against streams, one line per (method, batching)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_p95) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r.method, r.batching) for r in rows}):
        line = sorted((r for r in rows if (r.method, r.batching) == key), key=lambda r: r.streams)
        label = f"{key[0]}, batching {key[1]}"
        ax_tps.plot([r.streams for r in line], [r.decode_tokens_per_s for r in line], marker="o", label=label)
        ax_p95.plot([r.streams for r in line], [r.latency_p95_s for r in line], marker="o", label=label)
    ax_tps.set(xlabel="streams", ylabel="aggregate decode tokens/s", title="throughput")
    ax_p95.set(xlabel="streams", ylabel="caption latency p95 (s)", title="latency")
    ax_tps.legend()
    fig.tight_layout()
    fig.savefig(path)


def make_clips(n: int, seconds: float, fps: float, size: int, seed: int) -> list[list[tuple[np.ndarray, float]]]:
    from sparrow_core.world.video_io import read_video, write_world_clip

    clips = []
    with tempfile.TemporaryDirectory(prefix="sparrow-bench-") as tmp:
        for i in range(n):
            path = Path(tmp) / f"world-{seed + i}.mp4"
            write_world_clip(path, seed=seed + i, seconds=seconds, fps=max(10.0, fps), size=size)
            clips.append(list(read_video(path, fps=fps, size=size)))
    return clips


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparrow-bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="1,2,4", help="comma-separated concurrent stream counts")
    p.add_argument("--method", default="ar,sparrow", help="comma-separated decoding methods (ar, sparrow, auto)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--seconds", type=float, default=12.0, help="media length of each stream")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second each live stream sends")
    p.add_argument("--every", type=float, default=4.0, help="caption every N seconds of media")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batching", default="on,off",
                   help="in-process server: comma-separated worker modes, on (--batch-token-budget) and/or off")
    p.add_argument("--batch-token-budget", type=int, default=DEFAULT_BATCH_TOKEN_BUDGET,
                   help="in-process server, batching on: the most tokens one target forward carries")
    p.add_argument("--plot", type=Path, default=None, help="plot tokens/s and p95 latency against streams here (PNG)")
    p.add_argument("--server", default=None, help="HOST:PORT of a running server (default: start one in-process)")
    p.add_argument("--token", default=None)
    p.add_argument("--model", default=None, help="in-process server: model dir (default: the embedded model)")
    add_drafter_flag(p)
    p.add_argument("--threads", type=int, default=1, help="in-process server: torch threads")
    add_device_flags(p)  # the in-process server's
    add_kv_dtype_flag(p)
    return p


BATCHING = ("on", "off")


async def amain(args: argparse.Namespace) -> list[Row]:
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for m in methods:
        if m not in DECODING_METHODS:
            raise SystemExit(f"unknown method {m!r}; use {', '.join(DECODING_METHODS)}")
    modes = [b.strip() for b in args.batching.split(",") if b.strip()]
    if any(b not in BATCHING for b in modes):
        raise SystemExit(f"--batching takes {' and/or '.join(BATCHING)}, got {args.batching!r}")
    if args.server is not None:
        return await run_rows(args, args.server, counts, methods, "server", None)
    import torch

    from sparrow_core.session import CaptionEngine
    from streamer.server import ServerOptions, SparrowServer
    from streamer.settings import ServerLimits

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    try:
        engine = CaptionEngine.load(args.model, parse_drafter_flags(args.drafter), device=device, dtype=dtype,
                                    tree_profile=args.tree_profile, kv_dtype=kv_dtype(args))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"sparrow-bench load: error: {exc}") from None
    # every stream comes from this one peer (127.0.0.1): the per-peer cap must not bind
    limits = ServerLimits(max_streams=max(counts), max_streams_per_peer=max(counts),
                          max_caption_tokens=max(256, args.max_tokens))
    rows = []
    for mode in modes:
        budget = args.batch_token_budget if mode == "on" else UNBATCHED
        server = SparrowServer(engine, ServerOptions(address="127.0.0.1:0", limits=limits, batch_token_budget=budget))
        target = f"127.0.0.1:{await server.start()}"
        try:
            rows += await run_rows(args, target, counts, methods, mode, server.metrics.registry)
        finally:
            await server.stop(grace=1.0)
    return rows


async def run_rows(args: argparse.Namespace, target: str, counts: list[int], methods: list[str], batching: str,
                   registry) -> list[Row]:
    """Every (method, stream count) against one server; `registry`: its metrics, when in-process."""
    async with CaptionClient(target, token=args.token) as client:
        info = await client.model_info()
    missing = [m for m in methods if m != "auto" and m not in info.methods]
    if missing:
        raise SystemExit(f"the server has no {', '.join(missing)} decoding (it has {', '.join(info.methods)})")
    clips = make_clips(max(counts), args.seconds, args.fps, info.frame_width or 64, args.seed)
    # one stream's first caption, not measured: every mode's first row starts as warm as its others
    await run_load(target, [clips[0][: max(2, round(args.every * args.fps))]], 1, methods[0], args.every,
                   args.max_tokens, args.token, batching)
    rows = []
    for method in methods:
        for n in counts:
            counted = ForwardCounts(registry) if registry is not None else None
            row = await run_load(target, clips, n, method, args.every, args.max_tokens, args.token, batching)
            rows.append(counted.fill(row) if counted is not None else row)
            print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device_and_dtype(args, parser)  # a device this machine lacks is a usage error, before any loading
    rows = asyncio.run(amain(args))
    add_ratios_vs_ar(rows)
    print()
    print(format_table(rows))
    if args.json is not None:
        payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                              if k != "token"},
                   "results": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_rows(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0
