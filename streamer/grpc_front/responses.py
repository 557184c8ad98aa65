"""Front-neutral results (streamer/results.py) and the engine's description as sparrow.v1 messages."""

from __future__ import annotations

import grpc

from sparrow_core.session import EngineInfo
from streamer.proto import pb
from streamer.results import Caption, Event, Fatal, Problem, Result, Stats


def fatal_response(code: grpc.StatusCode, message: str) -> pb.StreamDescribeResponse:
    """The in-band mirror of the status a call is about to end with (see StreamError.FATAL)."""
    return pb.StreamDescribeResponse(error=pb.StreamError(code=pb.StreamError.FATAL, message=message, status=code.name))


def response(result: Result) -> pb.StreamDescribeResponse:
    """One result as the response message carrying it."""
    if isinstance(result, Caption):
        return pb.StreamDescribeResponse(caption=pb.CaptionResult(
            segment_id=result.segment_id, text=result.text, is_final=result.is_final, stability=result.stability,
            start_s=result.start_s, end_s=result.end_s, draft_tail=result.draft_tail,
            first_token_latency_s=result.first_token_latency_s, latency_s=result.latency_s, tau=result.tau,
        ))
    if isinstance(result, Event):
        return pb.StreamDescribeResponse(event=pb.StreamEvent(
            type=pb.StreamEvent.Type.Value(result.type.name), segment_id=result.segment_id,
            media_time_s=result.media_time_s, frames=result.frames, detail=result.detail,
        ))
    if isinstance(result, Stats):
        return pb.StreamDescribeResponse(stats=pb.StreamStats(**vars(result)))
    if isinstance(result, Problem):
        return pb.StreamDescribeResponse(error=pb.StreamError(
            code=pb.StreamError.Code.Value(result.code.name), message=result.message, media_time_s=result.media_time_s,
        ))
    if isinstance(result, Fatal):
        return fatal_response(result.code, result.message)
    raise TypeError(f"not a stream result: {result!r}")


def model_info(info: EngineInfo) -> pb.ModelInfo:
    """The engine's description (without the server's limits and load, which the servicer adds)."""
    height, width = info.frame_size or (0, 0)
    return pb.ModelInfo(
        model_name=info.model_name, architecture=info.architecture, frame_width=width, frame_height=height,
        tokens_per_frame=info.tokens_per_frame or 0, has_drafter=info.has_drafter, methods=info.decoding_methods,
    )
