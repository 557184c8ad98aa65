"""Server limits and one stream's settings, parsed and checked from the client's StreamConfig."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from sparrow_core.session import SessionConfig, StreamDefaults
from streamer.media import MAX_TIMESTAMP_S
from streamer.proto import DECODING_METHODS, pb

_METHOD_NAMES = {value: name for name, value in DECODING_METHODS.items()}


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
    # Per stream: the most visual tokens kept in the KV (a stream's visual_token_budget, and the model's
    # default budget, are capped by it), the most earlier caption turns kept, and the most bytes its
    # KV may reach in the worst case (visual budget + caption turns + prompt, see
    # CaptionEngine.kv_tokens_bound); a config over any of them is INVALID_ARGUMENT.
    max_visual_tokens: int = 16384
    max_caption_history: int = 64
    max_kv_bytes: int = 512 * 2**20
    # Per-stream model queue, in frames: replay mode stops reading at this depth (backpressure),
    # live mode drops the oldest queued frame.
    queue_frames: int = 16
    # Live mode: a queued frame this far (media seconds) behind the newest received one is stale and
    # dropped in favour of a later frame of the same segment.
    live_max_lag_s: float = 0.5
    # Responses a stream may have posted and its client not yet read; past it the stream gets no model
    # time and its request stream is not read until the client reads.
    max_unread_responses: int = 256
    # A stream that sends no media and no control for this long (wall seconds) is ended with
    # DEADLINE_EXCEEDED (0: never).
    idle_timeout_s: float = 60.0

    def to_proto(self) -> pb.ServerLimits:
        """The limits the contract's ServerLimits names (each field of the same name here), and the largest
        timestamp accepted."""
        names = [f.name for f in pb.ServerLimits.DESCRIPTOR.fields if f.name != "max_timestamp_s"]
        return pb.ServerLimits(max_timestamp_s=MAX_TIMESTAMP_S, **{name: getattr(self, name) for name in names})


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed stream picks up (StreamConfig.resume, checked): the lost call's first timestamp (the
    origin of its segment boundaries), the id of the next segment, where its span starts (the last final's
    end, 0 with none), and the finals to restore as caption history, oldest first: (text, end_s)."""

    first_timestamp_s: float
    next_segment_id: int
    start_s: float
    history: tuple[tuple[str, float], ...]


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
    resume: ResumePoint | None = None


MIN_CAPTION_EVERY_S = 0.001
MAX_SAMPLING_FPS = 240.0
MAX_TEMPERATURE = 5.0
MAX_INSTRUCTION_CHARS = 4096
MAX_LABEL_CHARS = 64
MAX_METHOD_CHARS = 64
MAX_RESUME_FINALS = 1024  # StreamConfig.resume.finals: the latest finals a resumed stream may carry
MAX_RESUME_TEXT_CHARS = 4096


def _check_range(name: str, value: float, low: float, high: float, zero_ok: bool = False) -> float:
    """value, if finite and in [low, high] (or 0 when zero_ok); ValueError naming the field and the range."""
    if math.isfinite(value) and (low <= value <= high or (zero_ok and value == 0)):
        return float(value)
    allowed = f"0 or [{low:g}, {high:g}]" if zero_ok else f"[{low:g}, {high:g}]"
    raise ValueError(f"{name} must be a finite number in {allowed}, got {value}")


def _check_count(name: str, value: int, limit: int, flag: str) -> int:
    if value > limit:
        raise ValueError(f"{name} {value} is over the server's limit of {limit} ({flag})")
    return int(value)


def parse_resume(resume: pb.Resume, history: int) -> ResumePoint:
    """StreamConfig.resume checked (captioner.proto, message Resume); ValueError names what is wrong. Keeps
    the latest `history` finals' text (0: all) to restore."""
    first_ts = _check_range("resume.first_timestamp_s", resume.first_timestamp_s, 0.0, MAX_TIMESTAMP_S)
    finals = resume.finals
    if len(finals) > MAX_RESUME_FINALS:
        raise ValueError(f"resume.finals has {len(finals)} captions; the limit is {MAX_RESUME_FINALS} (send the latest)")
    previous = None
    for i, final in enumerate(finals):
        where = f"resume.finals[{i}]"
        if len(final.text) > MAX_RESUME_TEXT_CHARS:
            raise ValueError(f"{where}.text is {len(final.text)} characters; the limit is {MAX_RESUME_TEXT_CHARS}")
        start = _check_range(f"{where}.start_s", final.start_s, 0.0, MAX_TIMESTAMP_S)
        _check_range(f"{where}.end_s", final.end_s, start, MAX_TIMESTAMP_S)
        if previous is None:
            if final.segment_id == 0 and start != 0.0:
                raise ValueError(f"{where} is segment 0 but starts at {start}s; spans start at 0")
        elif final.segment_id != previous.segment_id + 1 or start != previous.end_s:
            raise ValueError(
                f"{where} (segment {final.segment_id}, from {start}s) does not follow segment "
                f"{previous.segment_id} (to {previous.end_s}s): finals must have consecutive ids and tiling spans")
        previous = final
    kept = finals[-history:] if history else finals
    return ResumePoint(
        first_timestamp_s=first_ts,
        next_segment_id=previous.segment_id + 1 if previous is not None else 0,
        start_s=previous.end_s if previous is not None else 0.0,
        history=tuple((f.text, f.end_s) for f in kept),
    )


def parse_stream_config(
    cfg: pb.StreamConfig,
    limits: ServerLimits,
    methods: list[str],
    defaults: StreamDefaults | None = None,
    check_kv: Callable[[SessionConfig], None] | None = None,
) -> StreamSettings:
    """Check a StreamConfig against the server's limits and the engine's methods; ValueError names the field
    and the limit. `check_kv` (the engine's `CaptionEngine.check_kv`) refuses a config whose worst-case KV is
    over `limits.max_kv_bytes`.

    `sampling_fps`, `visual_token_budget`, `caption_history` and `max_caption_tokens` 0 take the model's
    recommended values (`defaults`), capped by the server's limits. The ranges are documented in
    protos/sparrow/v1/captioner.proto."""
    defaults = defaults or StreamDefaults()
    if cfg.mode not in (pb.STREAM_MODE_UNSPECIFIED, pb.STREAM_MODE_LIVE, pb.STREAM_MODE_REPLAY):
        raise ValueError(f"unknown stream mode {cfg.mode}")
    if len(cfg.decoding_method) > MAX_METHOD_CHARS:
        raise ValueError(f"decoding_method is {len(cfg.decoding_method)} characters; the limit is {MAX_METHOD_CHARS}")
    if cfg.decoding not in _METHOD_NAMES:
        raise ValueError(f"unknown decoding method {cfg.decoding}")
    method = cfg.decoding_method or _METHOD_NAMES[cfg.decoding]  # the name, when given, wins over the enum
    if method != "auto" and method not in methods:
        raise ValueError(f"decoding method {method!r} is not available on this server; it has {', '.join(methods)}")
    caption_every_s = _check_range("caption_every_s", cfg.caption_every_s, MIN_CAPTION_EVERY_S, limits.max_stream_s,
                                   zero_ok=True)
    sampling_fps = _check_range("sampling_fps", cfg.sampling_fps, 0.0, MAX_SAMPLING_FPS)
    stats_interval_s = _check_range("stats_interval_s", cfg.stats_interval_s, 0.0, limits.max_stream_s)
    temperature = _check_range("temperature", cfg.temperature, 0.0, MAX_TEMPERATURE)
    top_p = _check_range("top_p", cfg.top_p, 0.0, 1.0)
    max_tokens = _check_count(
        "max_caption_tokens",
        cfg.max_caption_tokens or min(limits.default_caption_tokens, limits.max_caption_tokens),
        limits.max_caption_tokens, "--max-caption-tokens",
    )
    budget = _check_count(
        "visual_token_budget",
        cfg.visual_token_budget or min(defaults.visual_token_budget or limits.max_visual_tokens, limits.max_visual_tokens),
        limits.max_visual_tokens, "--max-visual-tokens",
    )
    history = _check_count(
        "caption_history",
        cfg.caption_history or min(defaults.caption_history or limits.max_caption_history, limits.max_caption_history),
        limits.max_caption_history, "--max-caption-history",
    )
    if len(cfg.instruction) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"instruction is {len(cfg.instruction)} characters; the limit is {MAX_INSTRUCTION_CHARS}")
    if len(cfg.label) > MAX_LABEL_CHARS or any(not (c.isalnum() or c in "-_.") for c in cfg.label):
        raise ValueError(f"label must be at most {MAX_LABEL_CHARS} characters of [A-Za-z0-9._-]")
    session = SessionConfig(
        instruction=cfg.instruction or None,
        max_caption_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p or 1.0,
        decoding=method,
        visual_token_budget=budget,
        caption_history=history,
        seed=int(cfg.seed),
        max_kv_bytes=limits.max_kv_bytes,
    )
    if check_kv is not None:
        try:
            check_kv(session)
        except ValueError as exc:
            raise ValueError(f"{exc} (the server's --max-kv-mb)") from exc
    resume = parse_resume(cfg.resume, history) if cfg.HasField("resume") else None
    return StreamSettings(
        live=cfg.mode != pb.STREAM_MODE_REPLAY,
        caption_every_s=caption_every_s,
        interim=bool(cfg.interim_results),
        draft_tail=bool(cfg.interim_draft_tail),
        sampling_fps=sampling_fps or defaults.sampling_fps,
        stats_interval_s=stats_interval_s,
        label=cfg.label,
        session=session,
        resume=resume,
    )
