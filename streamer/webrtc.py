"""Live camera captioning over WebRTC: aiortc peer connections behind an aiohttp signaling endpoint.

Served by `sparrow-stream serve` next to gRPC (`--http-address`, default 127.0.0.1:8080):

    GET  /         the live-captioning page (streamer/static/)
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

from __future__ import annotations

import asyncio
import json
import logging
import math
import reprlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioice.ice
from aiohttp import web
from aiortc import (
    MediaStreamError,
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import SessionDescription

from streamer.admission import Refused, Ticket, peer_host
from streamer.client import control_request, rgb_request
from streamer.handler import StreamHandler
from streamer.proto import pb
from streamer.settings import StreamSettings, parse_stream_config
from streamer.slot import Fatal

if TYPE_CHECKING:
    from streamer.server import SparrowServer

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_STATS_INTERVAL_S = 1.0  # gRPC's default is 0 (stats after each final); a live page wants a pulse


@dataclass
class WebRTCOptions:
    address: str = "127.0.0.1:8080"  # host:port of the HTTP side (port 0: any free port)
    ice_servers: tuple[str, ...] = ()  # "stun:host:port", "turn:user:pass@host:port?transport=udp"
    ice_hosts: tuple[str, ...] = ()  # gather host candidates only on these local addresses (); all but loopback
    max_body_bytes: int = 64 * 1024  # POST /offer body limit (a browser offer is ~5 KB)
    linger_s: float = 2.0  # after a stream ends, how long the client has to hang up before the server does
    connect_timeout_s: float = 10.0  # an answered offer whose connection is not up by then is dropped

    def __post_init__(self) -> None:
        if not 0 < self.connect_timeout_s <= 3600:
            raise ValueError(f"connect_timeout_s must be in (0, 3600] seconds, got {self.connect_timeout_s!r}")


# --- options ------------------------------------------------------------------------------------------
def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    out = int(value)
    if out < 0:
        raise ValueError("expected an integer >= 0")
    return out


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _decoding(value: Any) -> int:
    methods = {"auto": pb.DECODING_METHOD_UNSPECIFIED, "ar": pb.DECODING_METHOD_AR,
               "sparrow": pb.DECODING_METHOD_SPARROW}
    if not isinstance(value, str) or value not in methods:
        raise ValueError(f"expected one of {', '.join(methods)}")
    return methods[value]


# offer option -> (StreamConfig field, parser)
OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "caption_every_s": ("caption_every_s", _float),
    "sampling_fps": ("sampling_fps", _float),
    "interim": ("interim_results", _bool),
    "draft_tail": ("interim_draft_tail", _bool),
    "max_caption_tokens": ("max_caption_tokens", _int),
    "temperature": ("temperature", _float),
    "top_p": ("top_p", _float),
    "decoding": ("decoding", _decoding),
    "instruction": ("instruction", _text),
    "visual_token_budget": ("visual_token_budget", _int),
    "caption_history": ("caption_history", _int),
    "seed": ("seed", _int),
    "stats_interval_s": ("stats_interval_s", _float),
    "label": ("label", _text),
}


def stream_config(options: dict[str, Any]) -> pb.StreamConfig:
    """A LIVE StreamConfig from offer options; ValueError names the bad option."""
    cfg = pb.StreamConfig(mode=pb.STREAM_MODE_LIVE, stats_interval_s=DEFAULT_STATS_INTERVAL_S)
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown option {reprlib.repr(name)}; known: {', '.join(OPTIONS)}")
        field_name, parse = OPTIONS[name]
        try:
            setattr(cfg, field_name, parse(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"option {name}={reprlib.repr(value)}: {exc}") from exc
    return cfg


MAX_JSON_DEPTH = 4  # an offer or a data-channel message is one object of strings and numbers


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings do not count). One pass,
    no recursion: it bounds what json.loads (which recurses) is given."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_client_json(data: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for what clients send: ValueError (never RecursionError) for text that is not UTF-8, not
    JSON, or nested deeper than max_depth, which is refused before it is parsed."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError is a ValueError
    if (depth := json_depth(text)) > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep; the limit is {max_depth}")
    return json.loads(text)


def parse_ice_server(spec: str) -> RTCIceServer:
    """'stun:host:port', or 'turn:USER:PASS@host:port[?transport=tcp]' (also stuns:/turns:)."""
    scheme, _, rest = spec.partition(":")
    if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise ValueError(f"ICE server {spec!r} is not stun:HOST:PORT or turn:USER:PASS@HOST:PORT")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        user, _, password = cred.partition(":")
        return RTCIceServer(urls=f"{scheme}:{host}", username=user, credential=password)
    return RTCIceServer(urls=spec)


def restrict_host_candidates(addresses: tuple[str, ...]) -> None:
    """Gather ICE host candidates on these local addresses only (process-wide: aioice has no option for it).
    aioice's default skips loopback, so a same-machine peer on 127.0.0.1 needs ("127.0.0.1",)."""
    allowed = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in allowed if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


# --- responses ----------------------------------------------------------------------------------------
def response_json(msg: pb.StreamDescribeResponse) -> dict[str, Any] | None:
    """A worker response as a data-channel message."""
    kind = msg.WhichOneof("response")
    if kind == "caption":
        c = msg.caption
        out: dict[str, Any] = {"type": "caption", "segment_id": c.segment_id, "text": c.text,
                               "is_final": c.is_final, "start": round(c.start_s, 3), "end": round(c.end_s, 3)}
        if c.is_final:
            out.update(latency_s=round(c.latency_s, 3), first_token_latency_s=round(c.first_token_latency_s, 3),
                       tau=round(c.tau, 3))
        else:
            out.update(stability=round(c.stability, 3), draft_tail=c.draft_tail)
        return out
    if kind == "stats":
        s = msg.stats
        return {"type": "stats", "ingest_lag_s": round(s.ingest_lag_s, 3), "tau": round(s.tau, 3),
                "frames_dropped": s.frames_dropped, "frames_received": s.frames_received,
                "frames_ingested": s.frames_ingested, "media_processed_s": round(s.media_processed_s, 3),
                "queue_depth": s.queue_depth, "kv_tokens": s.kv_tokens, "visual_tokens": s.visual_tokens,
                "visual_tokens_evicted": s.visual_tokens_evicted, "tokens_generated": s.tokens_generated}
    if kind == "event":
        e = msg.event
        return {"type": "event", "event": pb.StreamEvent.Type.Name(e.type).lower(), "segment_id": e.segment_id,
                "media_time_s": round(e.media_time_s, 3), "frames": e.frames, "detail": e.detail}
    if kind == "error":
        e = msg.error
        return {"type": "error", "code": pb.StreamError.Code.Name(e.code).lower(), "message": e.message,
                "media_time_s": round(e.media_time_s, 3), "fatal": e.code == pb.StreamError.FATAL}
    return None


# --- one peer connection ------------------------------------------------------------------------------
class PeerSession:
    """One peer connection and its live stream."""

    def __init__(self, gateway: WebRTCGateway, pc: RTCPeerConnection, ticket: Ticket, handler: StreamHandler) -> None:
        self.gateway = gateway
        self.pc = pc
        self.ticket = ticket
        self.handler = handler
        self.stream_id = handler.slot.stream_id
        self.track: MediaStreamTrack | None = None
        self.channel: RTCDataChannel | None = None
        self.requests: asyncio.Queue[pb.StreamDescribeRequest | None] = asyncio.Queue()
        # requests waiting for the handler (which waits while the stream's queue is full): past this many,
        # new camera frames are skipped (a later frame wins) and control messages other than "end" refused
        self.max_pending = handler.limits.queue_frames
        self._unsent: list[str] = []  # messages posted before the data channel opened
        self._ended = False  # no more frames go to the handler
        self.released: asyncio.Future | None = None  # set once the stream is being freed
        self.respond_task: asyncio.Task | None = None
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._hung_up = asyncio.Event()

        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self.track is None:
            self.track = track

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("close", lambda: asyncio.ensure_future(self.close("data channel closed")))
        for text in self._unsent:
            channel.send(text)
        self._unsent.clear()

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.debug("stream %s: connection %s", self.stream_id, state)
        if state in ("failed", "closed"):
            self._hung_up.set()
            await self.close(f"connection {state}")

    def _on_message(self, message: str | bytes) -> None:
        actions = {"caption_now": pb.Control.CAPTION_NOW, "flush": pb.Control.FLUSH, "end": pb.Control.END_OF_STREAM}
        try:
            action = actions[loads_client_json(message)["type"]]
        except (ValueError, KeyError, TypeError):
            self.send({"type": "error", "code": "bad_message", "fatal": False,
                       "message": f"expected {{\"type\": one of {', '.join(actions)}}}"})
            return
        if self._ended:
            return
        if action != pb.Control.END_OF_STREAM and self.requests.qsize() >= self.max_pending:
            self.send({"type": "error", "code": "busy", "fatal": False,
                       "message": f"{self.max_pending} requests are already waiting for this stream; try again later"})
            return
        self.requests.put_nowait(control_request(action))
        self._ended = action == pb.Control.END_OF_STREAM

    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        if self.channel is None:
            if len(self._unsent) < 256:
                self._unsent.append(text)
        elif self.channel.readyState == "open":
            self.channel.send(text)

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.handler.start(self._request_stream())
        settings = self.handler.settings
        self.send({"type": "event", "event": "stream_started", "stream_id": self.stream_id,
                   "decoding": settings.session.decoding, "caption_every_s": settings.caption_every_s})
        self.respond_task = asyncio.create_task(self._respond(), name=f"respond-{self.stream_id}")
        self._tasks = [asyncio.create_task(self._read_track(), name=f"track-{self.stream_id}"), self.respond_task,
                       asyncio.create_task(self._watch_connect(), name=f"connect-{self.stream_id}")]

    async def _watch_connect(self) -> None:
        """A client that goes away before ICE/DTLS complete sends no goodbye: do not hold its slot for long."""
        await asyncio.sleep(self.gateway.options.connect_timeout_s)
        if self.pc.connectionState != "connected":
            await self.close(f"not connected after {self.gateway.options.connect_timeout_s:g}s")

    async def _request_stream(self) -> AsyncIterator[pb.StreamDescribeRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def _read_track(self) -> None:
        """Frames of the video track -> RGB at the model's frame size, stamped with their media time."""
        assert self.track is not None
        height, width = self.gateway.frame_hw
        first: float | None = None
        last = -1.0
        try:
            while not self._ended:
                frame = await self.track.recv()
                if frame.pts is None or frame.time_base is None:
                    continue
                t = float(frame.pts * frame.time_base)
                first = t if first is None else first
                ts = t - first
                if ts <= last:  # a repeated or reordered frame: timestamps must not go backwards
                    continue
                if self.requests.qsize() >= self.max_pending:  # the stream is backlogged: a later frame wins
                    continue
                last = ts
                if width and height:
                    frame = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                else:
                    frame = frame.reformat(format="rgb24")
                if not self._ended:
                    self.requests.put_nowait(rgb_request(frame.to_ndarray(), ts))
        except MediaStreamError:  # the track ended (the sender stopped it, or the connection closed)
            pass
        if not self._ended:
            self._ended = True
            self.requests.put_nowait(None)  # end of the request stream: pending caption, then the end

    async def _respond(self) -> None:
        """Worker responses -> data-channel messages until the stream is over; then let the client hang up."""
        try:
            async for msg in self.handler.responses():
                if isinstance(msg, Fatal):
                    self.send({"type": "error", "code": "fatal", "status": msg.code.name, "message": msg.message,
                               "fatal": True})
                    break
                out = response_json(msg)
                if out is not None:
                    self.send(out)
        finally:
            await self._release()
        try:
            await asyncio.wait_for(self._hung_up.wait(), self.gateway.options.linger_s)
        except TimeoutError:
            pass
        await self.close("stream over")

    def _release(self) -> asyncio.Future:
        """Free the stream (model state, admission slot) once; the peer connection may linger a moment.
        Shielded: a close() that cancels the task awaiting it must not leave the stream half freed."""
        if self.released is None:
            self._ended = True
            self.released = asyncio.ensure_future(self._free())
        return asyncio.shield(self.released)

    async def _free(self) -> None:
        try:
            await self.handler.close()
        finally:
            self.gateway.server.admission.release(self.ticket)

    async def close(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        log.info("stream %s (webrtc) closing: %s", self.stream_id, reason)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self._release()
        await self.pc.close()
        self.gateway.sessions.discard(self)


# --- the HTTP side --------------------------------------------------------------------------------------
class OfferRefused(Exception):
    # the HTTP status of a refusal by admission (streamer/admission.py), by its gRPC status
    HTTP_STATUS = {"UNAUTHENTICATED": 401, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 503}

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status  # HTTP status
        self.code = code  # the gRPC status it corresponds to (the streams_refused metric label)

    @classmethod
    def of(cls, refused: Refused) -> OfferRefused:
        return cls(cls.HTTP_STATUS.get(refused.code.name, 400), refused.code.name, refused.message)

    def response(self) -> web.Response:
        headers = {"Retry-After": "5"} if self.status == 503 else None
        return web.json_response({"error": str(self)}, status=self.status, headers=headers)


class WebRTCGateway:
    """The aiohttp app: page, config, health, and WebRTC offers turned into live streams."""

    def __init__(self, server: SparrowServer, options: WebRTCOptions) -> None:
        self.server = server
        self.options = options
        self.ice_servers = [parse_ice_server(s) for s in options.ice_servers]
        self.sessions: set[PeerSession] = set()
        self.port: int | None = None
        self.scheme = "http"
        self._runner: web.AppRunner | None = None
        info = server.servicer.info if server.servicer is not None else {}
        self.frame_hw = (int(info.get("frame_height", 0)), int(info.get("frame_width", 0)))

    async def start(self) -> int:
        """Bind and serve; return the bound port. Call after the gRPC server has started."""
        if self.options.ice_hosts:
            restrict_host_candidates(self.options.ice_hosts)
        app = web.Application(client_max_size=self.options.max_body_bytes)
        app.router.add_get("/", self._index)
        app.router.add_get("/config", self._config)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/offer", self._offer)
        app.router.add_static("/static/", STATIC_DIR)
        host, _, port = self.options.address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        tls = None
        opts = self.server.options
        if opts.tls_cert is not None and opts.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(opts.tls_cert, opts.tls_key)
            self.scheme = "https"
        elif host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("HTTP on %s without TLS: browsers allow the camera only on localhost or https "
                        "(pass --tls-cert/--tls-key)", host)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port), ssl_context=tls, reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Close every peer connection (a stream that just ended gets linger_s to deliver its last messages)."""
        lingering = [s.respond_task for s in self.sessions if s.released is not None and s.respond_task is not None]
        if lingering:
            await asyncio.wait(lingering, timeout=self.options.linger_s)
        await asyncio.gather(*(s.close("server stopping") for s in list(self.sessions)), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _read_offer(self, request: web.Request) -> tuple[RTCSessionDescription, StreamSettings]:
        if request.content_type != "application/json":
            raise OfferRefused(415, "INVALID_ARGUMENT",
                               f"POST /offer takes application/json, got {request.content_type or 'no content type'}")
        if request.content_length is not None and request.content_length > self.options.max_body_bytes:
            raise OfferRefused(413, "INVALID_ARGUMENT",
                               f"body of {request.content_length} bytes is over the limit of {self.options.max_body_bytes}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:  # chunked bodies: aiohttp counts against client_max_size
            raise OfferRefused(413, "INVALID_ARGUMENT",
                               f"body is over the limit of {self.options.max_body_bytes} bytes") from exc
        try:
            params = loads_client_json(body)
        except ValueError as exc:
            raise OfferRefused(400, "INVALID_ARGUMENT", f"body is not acceptable JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise OfferRefused(400, "INVALID_ARGUMENT", "body must be a JSON object {sdp, type, ...}")
        sdp, kind = params.pop("sdp", None), params.pop("type", None)
        if not isinstance(kind, str) or kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
            raise OfferRefused(400, "INVALID_ARGUMENT", 'expected {"sdp": "<offer SDP>", "type": "offer"}')
        try:
            media = SessionDescription.parse(sdp).media
        except Exception as exc:  # the parser raises whatever the bad line makes it raise
            raise OfferRefused(400, "INVALID_ARGUMENT", f"malformed SDP: {exc!r}") from exc
        if not {"video", "application"} <= {m.kind for m in media}:
            raise OfferRefused(400, "INVALID_ARGUMENT",
                               "the offer needs a video track and a data channel (m=video and m=application)")
        # aiortc checks these only once connecting, in a background task: refuse here instead
        if any(m.dtls is None or not m.dtls.fingerprints for m in media):
            raise OfferRefused(400, "INVALID_ARGUMENT", "malformed SDP: a media section has no DTLS fingerprint")
        try:
            cfg = stream_config({**request.query, **params})
            settings = parse_stream_config(
                cfg, self.server.options.limits, self.server.servicer.info["methods"], self.server.engine.defaults,
                getattr(self.server.engine, "check_kv", None),
            )
            settings.session.decoding = self.server.engine.resolve_decoding(settings.session.decoding)
        except ValueError as exc:
            raise OfferRefused(400, "INVALID_ARGUMENT", f"bad options: {exc}") from exc
        return RTCSessionDescription(sdp=sdp, type="offer"), settings

    # --- routes -----------------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _config(self, request: web.Request) -> web.Response:
        servers = [{"urls": s.urls, **({"username": s.username, "credential": s.credential} if s.username else {})}
                   for s in self.ice_servers]
        info = self.server.servicer.info
        return web.json_response({"iceServers": servers, "options": sorted(OPTIONS), "model": info["model_name"],
                                  "methods": info["methods"], "max_streams": self.server.options.limits.max_streams})

    async def _healthz(self, request: web.Request) -> web.Response:
        draining = self.server.servicer is None or self.server.admission.draining
        body = {"status": "draining" if draining else "serving", "streams_open": self.server.streams_open,
                "max_streams": self.server.options.limits.max_streams, "peers": len(self.sessions)}
        return web.json_response(body, status=503 if draining else 200)

    async def _offer(self, request: web.Request) -> web.Response:
        metrics = self.server.metrics
        admission = self.server.admission
        try:
            try:
                admission.authorize(request.headers.get("Authorization"))
                offer, settings = await self._read_offer(request)
                # reserve the slot before the first await: the limits hold under concurrent offers
                ticket = admission.admit(peer_host(request.remote))
            except Refused as refused:
                raise OfferRefused.of(refused) from refused
        except OfferRefused as refused:
            metrics.streams_refused.labels(code=refused.code).inc()
            return refused.response()

        stream_id = ticket.stream_id
        try:  # from here the session's close() releases the ticket
            transcript = None
            if self.server.options.transcript_dir is not None:
                name = f"{settings.label}-{stream_id}" if settings.label else stream_id
                transcript = Path(self.server.options.transcript_dir) / f"{name}.jsonl"
            handler = ticket.handler = StreamHandler(stream_id, settings, self.server.worker,
                                                     self.server.options.limits, metrics, transcript)
            pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
            session = PeerSession(self, pc, ticket, handler)
        except BaseException:
            admission.release(ticket)
            raise
        self.sessions.add(session)
        try:
            await pc.setRemoteDescription(offer)
            if session.track is None:
                raise ValueError("the offer sends no video track")
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await session.close("negotiation failed")
            metrics.streams_refused.labels(code="INVALID_ARGUMENT").inc()
            return OfferRefused(400, "INVALID_ARGUMENT", f"negotiation failed: {exc}").response()
        if admission.draining or session._closing:
            await session.close("refused")
            return OfferRefused(503, "UNAVAILABLE", "server is draining; retry on another server").response()
        session.start()
        metrics.streams_total.inc()
        log.info("stream %s opened (webrtc, live, %s)", stream_id, settings.session.decoding)
        answer = pc.localDescription
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "stream_id": stream_id})
