"""Admission of every stream, gRPC call or WebRTC peer alike: one registry for the bearer token, drain, the
stream's settings (its config checked against the server's limits and the engine), the server-wide and
per-peer stream limits, stream ids, transcript names, and the wait for the last stream on shutdown.

    admission.authorize(header)                 # Fatal(UNAUTHENTICATED) unless "Bearer <token>" matches
    settings = admission.settings(config)       # ValueError naming the field and the limit
    ticket = admission.admit(peer, settings)    # Fatal(UNAVAILABLE | RESOURCE_EXHAUSTED); reserves a place
    ticket.handler.start(inputs)                # the front feeds it and renders ticket.handler.results()
    ...
    await admission.close(ticket)               # once, when the stream is over: frees it everywhere

A peer is the client's IP address (`peer_host`: gRPC's `context.peer()` or aiohttp's `request.remote`; behind a
cluster front, the address the front forwards), so one client cannot take more than `max_streams_per_peer` of the `max_streams` places over either path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import grpc

from sparrow_core.session import CaptionEngine, EngineInfo
from streamer.handler import StreamHandler
from streamer.metrics import ServiceMetrics
from streamer.proto import pb
from streamer.results import Fatal
from streamer.settings import ServerLimits, StreamSettings, parse_stream_config
from streamer.worker import ModelWorker


def bearer_token_ok(header: str | None, token: str | None) -> bool:
    """Does an `authorization` header value carry `Bearer <token>`? True when no token is required.
    The comparison takes the same time wherever the given token differs (hmac.compare_digest)."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"


def peer_host(peer: str | None) -> str:
    """The client address of a gRPC peer string ('ipv4:127.0.0.1:5050', 'ipv6:[::1]:5050') or an aiohttp
    remote ('127.0.0.1'): the IP address alone (IPv4-mapped IPv6 as IPv4); anything else unchanged."""
    text = unquote(peer or "")
    scheme, sep, rest = text.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):  # gRPC: scheme:host:port, an IPv6 host in brackets
        text = rest.rpartition(":")[0] or rest
    text = text.strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text or "unknown"
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@dataclass(eq=False)
class Ticket:
    """One admitted stream: its id, its peer, and the handler that runs it."""

    stream_id: str
    peer: str
    handler: StreamHandler


class Admission:
    def __init__(
        self,
        engine: CaptionEngine,
        worker: ModelWorker,
        limits: ServerLimits,
        metrics: ServiceMetrics,
        auth_token: str | None = None,
        transcript_dir: Path | None = None,
        peer_header: str | None = None,
    ) -> None:
        self.engine = engine
        self.info: EngineInfo = engine.info
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        self.auth_token = auth_token
        self.transcript_dir = transcript_dir
        # a cluster replica behind its front: the metadata key carrying the client's address (trusted: only
        # the front can reach a replica's port)
        self.peer_header = peer_header
        self.draining = False
        self.tickets: set[Ticket] = set()
        self._per_peer: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.tickets)

    @property
    def streams_open(self) -> int:
        """Streams with state held anywhere: admitted, or model state not yet freed by the worker."""
        return max(len(self.tickets), self.worker.streams)

    def authorize(self, header: str | None) -> None:
        if not bearer_token_ok(header, self.auth_token):
            raise Fatal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def peer_of(self, transport_peer: str | None, metadata: dict[str, str]) -> str:
        """The client a call comes from (`peer_host`): the transport's peer, or behind a cluster front the
        address the front forwarded in `peer_header`."""
        if self.peer_header is not None and self.peer_header in metadata:
            return peer_host(metadata[self.peer_header])
        return peer_host(transport_peer)

    def check_open(self) -> None:
        if self.draining:
            raise Fatal(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")

    def settings(self, config: pb.StreamConfig) -> StreamSettings:
        """A stream's settings from its config, checked against the server's limits and the engine (its
        methods, its worst-case KV), with the decoding method resolved; ValueError names the field."""
        settings = parse_stream_config(config, self.limits, self.info.decoding_methods, self.engine.defaults,
                                       self.engine.check_kv)
        settings.session.decoding = self.engine.resolve_decoding(settings.session.decoding)
        return settings

    def transcript_path(self, stream_id: str, label: str) -> Path | None:
        """Where a stream's finals go: `<transcript_dir>/<label>-<stream id>.jsonl` (None: no transcripts)."""
        if self.transcript_dir is None:
            return None
        return self.transcript_dir / f"{f'{label}-' if label else ''}{stream_id}.jsonl"

    def admit(self, peer: str, settings: StreamSettings) -> Ticket:
        """Reserve a place for `peer`'s stream and build its handler (synchronously: the limits hold under
        concurrent requests). Fatal when the server is draining or a limit is reached."""
        self.check_open()
        limit = self.limits.max_streams
        if len(self.tickets) >= limit:
            raise Fatal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"too many open streams (the server's limit is {limit}); retry later")
        per_peer = self.limits.max_streams_per_peer
        if per_peer and self._per_peer.get(peer, 0) >= per_peer:
            raise Fatal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"too many open streams from {peer} (the server's per-peer limit is {per_peer}); "
                        "retry later")
        stream_id = uuid.uuid4().hex[:12]
        handler = StreamHandler(stream_id, settings, self.worker, self.limits, self.metrics,
                                self.transcript_path(stream_id, settings.label))
        ticket = Ticket(stream_id, peer, handler)
        self.tickets.add(ticket)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._idle.clear()
        self.metrics.streams_open.set(len(self.tickets))
        return ticket

    async def close(self, ticket: Ticket) -> None:
        """The stream is over: free its model state and its place (idempotent)."""
        try:
            await ticket.handler.close()
        finally:
            self._release(ticket)

    def _release(self, ticket: Ticket) -> None:
        if ticket not in self.tickets:
            return
        self.tickets.discard(ticket)
        left = self._per_peer[ticket.peer] - 1
        if left:
            self._per_peer[ticket.peer] = left
        else:
            del self._per_peer[ticket.peer]
        self.metrics.streams_open.set(len(self.tickets))
        if not self.tickets:
            self._idle.set()

    def drain(self) -> None:
        """Refuse new streams; let every open stream deliver its pending final and end."""
        self.draining = True
        for ticket in list(self.tickets):
            ticket.handler.drain()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no stream is open; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
