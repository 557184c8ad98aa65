"""What a stream says, front-neutral: the model worker and the stream's handler produce these values, and
each front renders them (streamer/grpc_front/responses.py as protobuf, streamer/webrtc/messages.py as JSON).

Two error types, because they mean two different things:
- `Fatal`: the stream (or the call, or the offer) cannot go on; it ends with this status. Raised where it is
  found (admission, a malformed request or chunk, the idle timeout) and posted as the stream's last result.
  The gRPC front ends the call with it (after the in-band StreamError FATAL copy), the WebRTC front answers
  the offer with its HTTP status or sends a fatal data-channel error.
- `DecodeFailed` (streamer/media.py): one encoded chunk could not be decoded; it is skipped and reported
  (`Problem`), and the stream goes on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class Fatal(Exception):
    """The stream ends with `code` (a gRPC status: the one status vocabulary of both fronts)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Control(enum.Enum):
    """What a client may ask of its stream besides media (gRPC Control actions, WebRTC data-channel types)."""

    CAPTION_NOW = "caption_now"
    FLUSH = "flush"
    END = "end"


@dataclass(frozen=True)
class Caption:
    """An interim (is_final False) or final caption of one segment."""

    segment_id: int
    text: str
    is_final: bool
    start_s: float  # the media span it covers
    end_s: float
    stability: float = 1.0  # interim: a rough chance the draft tail survives verification
    draft_tail: str = ""  # interim: the unverified drafted continuation
    first_token_latency_s: float = 0.0  # final: wall seconds from due to the first token
    latency_s: float = 0.0  # final: wall seconds from due to final
    tau: float = 0.0  # final: accepted tokens per target forward


class EventType(enum.Enum):
    STREAM_STARTED = "stream_started"
    SEGMENT_FINAL = "segment_final"
    FRAMES_DROPPED = "frames_dropped"
    STREAM_END = "stream_end"


@dataclass(frozen=True)
class Event:
    type: EventType
    segment_id: int = 0
    media_time_s: float = 0.0
    frames: int = 0  # FRAMES_DROPPED: how many
    detail: str = ""


@dataclass(frozen=True)
class Stats:
    media_processed_s: float
    ingest_lag_s: float
    kv_tokens: int
    visual_tokens: int
    visual_tokens_evicted: int
    frames_received: int
    frames_ingested: int
    frames_dropped: int
    tau: float
    tokens_generated: int
    queue_depth: int


class ProblemCode(enum.Enum):
    """A recoverable problem: the stream goes on (StreamError codes other than FATAL)."""

    DECODE_ERROR = "decode_error"
    FRAME_REJECTED = "frame_rejected"
    CAPTION_FAILED = "caption_failed"


@dataclass(frozen=True)
class Problem:
    code: ProblemCode
    message: str
    media_time_s: float = 0.0


Result = Caption | Event | Stats | Problem | Fatal
