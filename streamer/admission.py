"""Admission of every stream, gRPC call or WebRTC peer alike: one registry for the bearer token, drain,
the server-wide and per-peer stream limits, stream ids, and the wait for the last stream on shutdown.

    admission.authorize(header)          # Refused(UNAUTHENTICATED) unless "Bearer <token>" matches
    ticket = admission.admit(peer)       # Refused(UNAVAILABLE | RESOURCE_EXHAUSTED); reserves a slot
    ticket.handler = StreamHandler(ticket.stream_id, ...)
    ...
    admission.release(ticket)            # once, when the stream is freed

A peer is the client's IP address (`peer_host`: gRPC's `context.peer()` or aiohttp's `request.remote`),
so one client cannot take more than `max_streams_per_peer` of the `max_streams` slots over either path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

import grpc

from streamer.metrics import ServiceMetrics
from streamer.settings import ServerLimits

if TYPE_CHECKING:
    from streamer.handler import StreamHandler


class Refused(Exception):
    """A stream or call the server does not take, with the status it ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
    """One admitted stream: its id, its peer, and the handler that runs it (set by the caller)."""

    stream_id: str
    peer: str
    handler: StreamHandler | None = None


class Admission:
    def __init__(self, limits: ServerLimits, metrics: ServiceMetrics, auth_token: str | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self.auth_token = auth_token
        self.draining = False
        self.tickets: set[Ticket] = set()
        self._per_peer: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.tickets)

    def authorize(self, header: str | None) -> None:
        if not bearer_token_ok(header, self.auth_token):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def check_open(self) -> None:
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")

    def admit(self, peer: str) -> Ticket:
        """Reserve a stream slot for `peer` (synchronously: the limits hold under concurrent requests)."""
        self.check_open()
        limit = self.limits.max_streams
        if len(self.tickets) >= limit:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many open streams (the server's limit is {limit}); retry later")
        per_peer = self.limits.max_streams_per_peer
        if per_peer and self._per_peer.get(peer, 0) >= per_peer:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many open streams from {peer} (the server's per-peer limit is {per_peer}); "
                          "retry later")
        ticket = Ticket(uuid.uuid4().hex[:12], peer)
        self.tickets.add(ticket)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._idle.clear()
        self.metrics.streams_open.set(len(self.tickets))
        return ticket

    def release(self, ticket: Ticket) -> None:
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
            if ticket.handler is not None:
                ticket.handler.drain()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no stream is open; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
