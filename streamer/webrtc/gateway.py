"""The HTTP side of the WebRTC front: the page, /config, /healthz, and POST /offer turned into live streams
admitted by streamer/admission.py (the registry the gRPC front uses too) and run by `PeerSession`s."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import grpc
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription

from streamer.admission import Admission, peer_host
from streamer.results import Fatal
from streamer.settings import StreamSettings
from streamer.webrtc.options import (
    OPTIONS,
    WebRTCOptions,
    loads_client_json,
    parse_ice_server,
    restrict_host_candidates,
    stream_config,
)
from streamer.webrtc.peer import PeerSession

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# the HTTP status of a refused offer, by its gRPC status (any other: 400)
HTTP_STATUS = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 503}


class OfferRefused(Fatal):
    """A refused offer: a Fatal answered with an HTTP status more precise than its gRPC status gives
    (413 body too large, 415 not JSON)."""

    def __init__(self, http_status: int, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(code, message)
        self.http_status = http_status


def refusal(fatal: Fatal) -> web.Response:
    """The HTTP answer to a refused offer; `fatal.code` names it (also the streams_refused label)."""
    status = fatal.http_status if isinstance(fatal, OfferRefused) else HTTP_STATUS.get(fatal.code, 400)
    headers = {"Retry-After": "5"} if status == 503 else None
    return web.json_response({"error": fatal.message}, status=status, headers=headers)


class WebRTCGateway:
    """The aiohttp app: page, config, health, and WebRTC offers turned into live streams."""

    def __init__(self, admission: Admission, options: WebRTCOptions,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.admission = admission
        self.options = options
        self.tls = tls  # (certificate, key): serve https
        self.ice_servers = [parse_ice_server(s) for s in options.ice_servers]
        self.sessions: set[PeerSession] = set()
        self.port: int | None = None
        self.scheme = "http"
        self._runner: web.AppRunner | None = None
        self.frame_hw = admission.info.frame_size or (0, 0)
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
        if self.tls is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(*self.tls)
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
            raise OfferRefused(415, f"POST /offer takes application/json, got {request.content_type or 'no content type'}")
        if request.content_length is not None and request.content_length > self.options.max_body_bytes:
            raise OfferRefused(413, f"body of {request.content_length} bytes is over the limit of {self.options.max_body_bytes}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:  # chunked bodies: aiohttp counts against client_max_size
            raise OfferRefused(413, f"body is over the limit of {self.options.max_body_bytes} bytes") from exc
        try:
            params = loads_client_json(body)
        except ValueError as exc:
            raise OfferRefused(400, f"body is not acceptable JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise OfferRefused(400, "body must be a JSON object {sdp, type, ...}")
        sdp, kind = params.pop("sdp", None), params.pop("type", None)
        if not isinstance(kind, str) or kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
            raise OfferRefused(400, 'expected {"sdp": "<offer SDP>", "type": "offer"}')
        try:
            media = SessionDescription.parse(sdp).media
        except Exception as exc:  # the parser raises whatever the bad line makes it raise
            raise OfferRefused(400, f"malformed SDP: {exc!r}") from exc
        if not {"video", "application"} <= {m.kind for m in media}:
            raise OfferRefused(400, "the offer needs a video track and a data channel (m=video and m=application)")
        # aiortc checks these only once connecting, in a background task: refuse here instead
        if any(m.dtls is None or not m.dtls.fingerprints for m in media):
            raise OfferRefused(400, "malformed SDP: a media section has no DTLS fingerprint")
        try:
            settings = self.admission.settings(stream_config({**request.query, **params}))
        except ValueError as exc:
            raise OfferRefused(400, f"bad options: {exc}") from exc
        return RTCSessionDescription(sdp=sdp, type="offer"), settings

    # --- routes -----------------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _config(self, request: web.Request) -> web.Response:
        servers = [{"urls": s.urls, **({"username": s.username, "credential": s.credential} if s.username else {})}
                   for s in self.ice_servers]
        info = self.admission.info
        return web.json_response({"iceServers": servers, "options": sorted(OPTIONS), "model": info.model_name,
                                  "methods": info.decoding_methods, "max_streams": self.admission.limits.max_streams})

    async def _healthz(self, request: web.Request) -> web.Response:
        draining = self.admission.draining
        body = {"status": "draining" if draining else "serving", "streams_open": self.admission.streams_open,
                "max_streams": self.admission.limits.max_streams, "peers": len(self.sessions)}
        return web.json_response(body, status=503 if draining else 200)

    async def _offer(self, request: web.Request) -> web.Response:
        admission = self.admission
        metrics = admission.metrics
        try:
            admission.authorize(request.headers.get("Authorization"))
            offer, settings = await self._read_offer(request)
            # reserve the place before the first await: the limits hold under concurrent offers
            ticket = admission.admit(peer_host(request.remote), settings)
        except Fatal as refused:
            metrics.streams_refused.labels(code=refused.code.name).inc()
            return refusal(refused)
        try:  # from here the session's close() frees the stream
            pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
            session = PeerSession(pc, ticket, admission, self.options, self.frame_hw, self.sessions.discard)
        except BaseException:
            await admission.close(ticket)
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
            return refusal(OfferRefused(400, f"negotiation failed: {exc}"))
        if admission.draining or session.closing:
            await session.close("refused")
            return refusal(Fatal(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server"))
        session.start()
        log.info("stream %s opened (webrtc, live, %s)", ticket.stream_id, settings.session.decoding)
        answer = pc.localDescription
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "stream_id": ticket.stream_id})
