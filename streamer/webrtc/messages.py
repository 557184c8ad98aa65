"""Front-neutral results (streamer/results.py) as the WebRTC data channel's JSON messages."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from streamer.results import Caption, Event, Fatal, Problem, Result, Stats


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def result_message(result: Result) -> dict[str, Any]:
    """One result as a data-channel message (times and ratios rounded to milliseconds)."""
    if isinstance(result, Caption):
        c = result
        out: dict[str, Any] = {"type": "caption", "segment_id": c.segment_id, "text": c.text,
                               "is_final": c.is_final, "start": round(c.start_s, 3), "end": round(c.end_s, 3)}
        if c.is_final:
            out.update(latency_s=round(c.latency_s, 3), first_token_latency_s=round(c.first_token_latency_s, 3),
                       tau=round(c.tau, 3))
        else:
            out.update(stability=round(c.stability, 3), draft_tail=c.draft_tail)
        return out
    if isinstance(result, Stats):
        return {"type": "stats", **{k: _rounded(v) for k, v in asdict(result).items()}}
    if isinstance(result, Event):
        return {"type": "event", "event": result.type.value, "segment_id": result.segment_id,
                "media_time_s": round(result.media_time_s, 3), "frames": result.frames, "detail": result.detail}
    if isinstance(result, Problem):
        return {"type": "error", "code": result.code.value, "message": result.message,
                "media_time_s": round(result.media_time_s, 3), "fatal": False}
    if isinstance(result, Fatal):
        return {"type": "error", "code": "fatal", "status": result.code.name, "message": result.message, "fatal": True}
    raise TypeError(f"not a stream result: {result!r}")
