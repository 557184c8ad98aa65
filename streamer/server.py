"""A Sparrow Stream server: the composition root. It builds the model worker, the metrics and the admission
registry, and hands the registry to both fronts: the gRPC Captioner service (streamer/grpc_front/) with
health and opt-in reflection, and the HTTP/WebRTC gateway (streamer/webrtc/). Neither front knows this module.

    server = SparrowServer(engine, ServerOptions(address="127.0.0.1:0"))
    port = await server.start()
    ...
    await server.drain()   # SIGTERM: refuse new streams, deliver pending finals, stop
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sparrow_core.session import CaptionEngine
from streamer.admission import Admission
from streamer.grpc_front.servicer import CaptionerServicer
from streamer.grpc_front.wire import add_captioner_to_server, transport_receive_limit
from streamer.metrics import ServiceMetrics
from streamer.proto import SERVICE_NAME
from streamer.scheduler import DEFAULT_BATCH_TOKEN_BUDGET
from streamer.settings import ServerLimits
from streamer.webrtc import WebRTCGateway, WebRTCOptions
from streamer.worker import ModelWorker

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    address: str = "127.0.0.1:50051"
    limits: ServerLimits = field(default_factory=ServerLimits)
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    transcript_dir: Path | None = None
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    metrics_address: str = "127.0.0.1"
    drain_grace_s: float = 60.0
    http: WebRTCOptions | None = None  # the HTTP side (page, /offer, /healthz); None: gRPC only
    reflection: bool = False  # serve grpc.reflection (lists every service to any client); health is always on
    # HTTP/2 keepalive: ping each connection after keepalive_s without activity; a client that does not answer
    # within keepalive_timeout_s (a stopped process, a dead link) is disconnected and its streams freed
    keepalive_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    # the most tokens one target forward carries over all streams (scheduler.py); 0: one unit per forward
    batch_token_budget: int = DEFAULT_BATCH_TOKEN_BUDGET
    # a cluster replica (streamer/cluster/): the metadata key in which its front forwards the client's address
    peer_header: str | None = None
    metrics_labels: dict[str, str] = field(default_factory=dict)  # on every series (a replica's id)

    def __post_init__(self) -> None:
        for name in ("keepalive_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.001 <= value <= 86400):
                raise ValueError(f"{name} must be in [0.001, 86400] seconds, got {value!r}")


def grpc_server_options(options: ServerOptions) -> list[tuple[str, int]]:
    """grpc's channel arguments for the server: message size and keepalive."""
    max_msg = options.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", transport_receive_limit(max_msg)),
        ("grpc.max_send_message_length", max_msg),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", round(options.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(options.keepalive_timeout_s * 1000)),
        # any ping in flight (grpc's own BDP pings too, which a keepalive ping joins) times out as fast
        ("grpc.http2.ping_timeout_ms", round(options.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),  # ping idle connections too
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection whose streams send nothing
        # clients may ping as often as the server does (grpc's default would answer them GOAWAY)
        ("grpc.http2.min_ping_interval_without_data_ms", round(options.keepalive_s * 1000)),
    ]


class SparrowServer:
    def __init__(self, engine: CaptionEngine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.metrics = ServiceMetrics(options.metrics_labels)
        self.worker = ModelWorker(engine, self.metrics, options.batch_token_budget)
        self.metrics.watch_streams(self.worker.stream_loads)
        transcript_dir = Path(options.transcript_dir) if options.transcript_dir is not None else None
        self.admission = Admission(engine, self.worker, options.limits, self.metrics, options.auth_token,
                                   transcript_dir, options.peer_header)
        self.servicer: CaptionerServicer | None = None
        self.health: health.aio.HealthServicer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.webrtc: WebRTCGateway | None = None
        self.http_port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind, start serving and return the bound port."""
        opts = self.options
        if self.admission.transcript_dir is not None:
            self.admission.transcript_dir.mkdir(parents=True, exist_ok=True)
        if (opts.tls_cert is None) != (opts.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        tls = (Path(opts.tls_cert), Path(opts.tls_key)) if opts.tls_cert is not None else None
        self._server = grpc.aio.server(options=grpc_server_options(opts))
        self.servicer = CaptionerServicer(self.admission)
        add_captioner_to_server(self.servicer, self._server, opts.limits.max_message_bytes)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if opts.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                                self._server)
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1].read_bytes(), tls[0].read_bytes())])
            self.port = self._server.add_secure_port(opts.address, creds)
        else:
            self.port = self._server.add_insecure_port(opts.address)
        if not self.port:
            raise OSError(f"could not bind {opts.address}")
        self.worker.start()
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if opts.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(opts.metrics_port, opts.metrics_address)
        if opts.http is not None:
            self.webrtc = WebRTCGateway(self.admission, opts.http, tls)
            self.http_port = await self.webrtc.start()
        return self.port

    @property
    def streams_open(self) -> int:
        """Streams with state held anywhere: open calls, or model state not yet freed by the worker."""
        return self.admission.streams_open

    async def drain(self) -> None:
        """Graceful stop: NOT_SERVING, refuse new streams, let open streams deliver their pending finals."""
        if self.servicer is None:
            return
        self.admission.drain()
        await self.health.enter_graceful_shutdown()
        if not await self.admission.wait_idle(self.options.drain_grace_s):
            log.warning("drain: streams still open after %.0fs; cancelling them", self.options.drain_grace_s)
        await self.stop(grace=1.0)

    async def stop(self, grace: float | None = None) -> None:
        if self.webrtc is not None:
            await self.webrtc.stop()
            self.webrtc = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.worker.stop()
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
