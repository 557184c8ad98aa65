"""Server limits and one stream's settings, parsed and checked from the client's StreamConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparrow_core.session import SessionConfig, StreamDefaults
from streamer.proto import pb

_METHODS = {
    pb.DECODING_METHOD_UNSPECIFIED: "auto",
    pb.DECODING_METHOD_AR: "ar",
    pb.DECODING_METHOD_SPARROW: "sparrow",
}


@dataclass(frozen=True)
class ServerLimits:
    max_streams: int = 8
    # Streams one client (IP address) may hold at once, gRPC and WebRTC together (0: no per-peer cap).
    max_streams_per_peer: int = 4
    max_frame_pixels: int = 1920 * 1080
    max_message_bytes: int = 8 * 1024 * 1024
    max_stream_s: float = 4 * 3600.0
    max_caption_tokens: int = 256
    default_caption_tokens: int = 48
    # Per-stream model queue, in frames: replay mode stops reading at this depth (backpressure),
    # live mode drops the oldest queued frame.
    queue_frames: int = 16
    # Live mode: a queued frame this far (media seconds) behind the newest received one is stale and
    # dropped in favour of a later frame of the same segment.
    live_max_lag_s: float = 0.5
    # A stream that sends no media and no control for this long (wall seconds) is ended with
    # DEADLINE_EXCEEDED (0: never).
    idle_timeout_s: float = 60.0

    def to_proto(self) -> pb.ServerLimits:
        return pb.ServerLimits(
            max_streams=self.max_streams,
            max_frame_pixels=self.max_frame_pixels,
            max_message_bytes=self.max_message_bytes,
            max_stream_s=self.max_stream_s,
            max_caption_tokens=self.max_caption_tokens,
            max_streams_per_peer=self.max_streams_per_peer,
            idle_timeout_s=self.idle_timeout_s,
        )


@dataclass
class StreamSettings:
    live: bool
    caption_every_s: float
    interim: bool
    draft_tail: bool
    sampling_fps: float
    stats_interval_s: float
    label: str
    session: SessionConfig = field(default_factory=SessionConfig)


def parse_stream_config(
    cfg: pb.StreamConfig, limits: ServerLimits, methods: list[str], defaults: StreamDefaults | None = None
) -> StreamSettings:
    """Check a StreamConfig against the server's limits and the engine's methods; ValueError names the fault.

    `sampling_fps`, `visual_token_budget` and `caption_history` 0 take the model's recommended values
    (`defaults`)."""
    defaults = defaults or StreamDefaults()
    if cfg.mode not in (pb.STREAM_MODE_UNSPECIFIED, pb.STREAM_MODE_LIVE, pb.STREAM_MODE_REPLAY):
        raise ValueError(f"unknown stream mode {cfg.mode}")
    if cfg.decoding not in _METHODS:
        raise ValueError(f"unknown decoding method {cfg.decoding}")
    method = _METHODS[cfg.decoding]
    if method != "auto" and method not in methods:
        raise ValueError(f"decoding method {method!r} is not available on this server (has {methods})")
    if not 0.0 <= cfg.caption_every_s <= limits.max_stream_s:
        raise ValueError(f"caption_every_s must be in [0, {limits.max_stream_s}], got {cfg.caption_every_s}")
    if cfg.sampling_fps < 0 or cfg.sampling_fps > 240:
        raise ValueError(f"sampling_fps must be in [0, 240], got {cfg.sampling_fps}")
    if cfg.stats_interval_s < 0:
        raise ValueError(f"stats_interval_s must be >= 0, got {cfg.stats_interval_s}")
    max_tokens = cfg.max_caption_tokens or min(limits.default_caption_tokens, limits.max_caption_tokens)
    if max_tokens > limits.max_caption_tokens:
        raise ValueError(
            f"max_caption_tokens {cfg.max_caption_tokens} is over the server's limit of {limits.max_caption_tokens}"
        )
    if not 0.0 <= cfg.temperature <= 5.0:
        raise ValueError(f"temperature must be in [0, 5], got {cfg.temperature}")
    if not 0.0 <= cfg.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {cfg.top_p}")
    if len(cfg.instruction) > 4096:
        raise ValueError(f"instruction is {len(cfg.instruction)} characters; the limit is 4096")
    if len(cfg.label) > 64 or any(not (c.isalnum() or c in "-_.") for c in cfg.label):
        raise ValueError("label must be at most 64 characters of [A-Za-z0-9._-]")
    session = SessionConfig(
        instruction=cfg.instruction or None,
        max_caption_tokens=max_tokens,
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p) or 1.0,
        decoding=method,
        visual_token_budget=cfg.visual_token_budget or None,
        caption_history=cfg.caption_history or None,
        seed=int(cfg.seed),
    )
    return StreamSettings(
        live=cfg.mode != pb.STREAM_MODE_REPLAY,
        caption_every_s=float(cfg.caption_every_s),
        interim=bool(cfg.interim_results),
        draft_tail=bool(cfg.interim_draft_tail),
        sampling_fps=float(cfg.sampling_fps) or defaults.sampling_fps,
        stats_interval_s=float(cfg.stats_interval_s),
        label=cfg.label,
        session=session,
    )
