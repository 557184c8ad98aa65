"""The WebRTC front: live camera captioning over WebRTC: aiortc peer connections behind an aiohttp signaling endpoint.

Served by `sparrow-stream serve` next to gRPC (`--http-address`, default 127.0.0.1:8080):

    GET  /         the live-captioning page (streamer/webrtc/static/)
    GET  /config   ICE servers and option defaults for the page
    GET  /healthz  {"status": "serving" | "draining", "streams_open", "max_streams"}; 503 while draining
    POST /offer    {"sdp", "type": "offer", <options>} -> {"sdp", "type": "answer", "stream_id"}

One peer connection is one LIVE-mode stream on the server's model worker, run by the same
`StreamHandler` as a gRPC call (timeline, segments, latest-frame-wins dropping, transcript JSONL, idle
timeout), and admitted by the same registry (streamer/admission.py: token, drain, `--max-streams` and
`--max-streams-per-peer`, counted with the gRPC streams). An answered offer whose connection is not up
within `--webrtc-connect-timeout-s` is dropped. The client sends one video track and opens one data channel;
the video is decoded by aiortc/PyAV and resized to the model's frame size, stamped with its RTP media
time. Over the data channel the server sends JSON messages:

    {"type": "caption", "segment_id", "text", "is_final", "start", "end", ...}
    {"type": "stats", "ingest_lag_s", "tau", "frames_dropped", ...}      every stats_interval_s (default 1)
    {"type": "event", "event": "stream_started" | "segment_final" | "frames_dropped" | "stream_end", ...}
    {"type": "error", "code", "message", "fatal"}

and accepts {"type": "caption_now" | "flush" | "end"} (the gRPC Control actions). Options are JSON
fields of the offer or query parameters (`POST /offer?caption_every_s=4`), named as in OPTIONS, with
the gRPC StreamConfig defaults (except stats_interval_s). The stream ends when the track ends, on
"end", when the connection fails or closes (the tab is gone), or when the server drains.
"""

from streamer.webrtc.gateway import WebRTCGateway
from streamer.webrtc.options import (
    MAX_JSON_DEPTH,
    OPTIONS,
    WebRTCOptions,
    json_depth,
    loads_client_json,
    parse_ice_server,
    restrict_host_candidates,
    stream_config,
)

__all__ = [
    "MAX_JSON_DEPTH", "OPTIONS", "WebRTCGateway", "WebRTCOptions", "json_depth", "loads_client_json",
    "parse_ice_server", "restrict_host_candidates", "stream_config",
]
