"""A Sparrow Stream server: the Captioner service, health, reflection, metrics and the model worker.

    server = SparrowServer(engine, ServerOptions(address="127.0.0.1:0"))
    port = await server.start()
    ...
    await server.drain()   # SIGTERM: refuse new streams, deliver pending finals, stop
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from streamer.metrics import ServiceMetrics
from streamer.proto import SERVICE_NAME, pb_grpc
from streamer.servicer import CaptionerServicer
from streamer.settings import ServerLimits
from streamer.worker import ModelWorker

if TYPE_CHECKING:
    from streamer.webrtc import WebRTCGateway, WebRTCOptions

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


class SparrowServer:
    def __init__(self, engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.metrics = ServiceMetrics()
        self.worker = ModelWorker(engine, self.metrics)
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
        if opts.transcript_dir is not None:
            Path(opts.transcript_dir).mkdir(parents=True, exist_ok=True)
        max_msg = opts.limits.max_message_bytes
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_msg),
            ("grpc.max_send_message_length", max_msg),
            ("grpc.so_reuseport", 0),
        ])
        self.servicer = CaptionerServicer(
            self.engine, self.worker, opts.limits, self.metrics, opts.auth_token,
            Path(opts.transcript_dir) if opts.transcript_dir is not None else None,
        )
        pb_grpc.add_CaptionerServicer_to_server(self.servicer, self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        if opts.tls_cert is not None or opts.tls_key is not None:
            if opts.tls_cert is None or opts.tls_key is None:
                raise ValueError("TLS needs both a certificate and a key")
            creds = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())])
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
            from streamer.webrtc import WebRTCGateway

            self.webrtc = WebRTCGateway(self, opts.http)
            self.http_port = await self.webrtc.start()
        return self.port

    @property
    def streams_open(self) -> int:
        """Streams with state held anywhere: open calls, or model state not yet freed by the worker."""
        calls = len(self.servicer.handlers) if self.servicer is not None else 0
        return max(calls, self.worker.streams)

    async def drain(self) -> None:
        """Graceful stop: NOT_SERVING, refuse new streams, let open streams deliver their pending finals."""
        if self.servicer is None:
            return
        self.servicer.drain()
        await self.health.enter_graceful_shutdown()
        if not await self.servicer.wait_idle(self.options.drain_grace_s):
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
