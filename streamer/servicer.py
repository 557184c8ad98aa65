"""The sparrow.v1.Captioner service: admission (auth, drain, limits, config) and the per-call response loop."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from streamer.handler import StreamHandler
from streamer.metrics import ServiceMetrics
from streamer.proto import pb, pb_grpc
from streamer.settings import ServerLimits, parse_stream_config
from streamer.slot import Fatal
from streamer.worker import ModelWorker

log = logging.getLogger(__name__)


def model_info(engine) -> dict:
    """The engine's description as plain values (tolerant of what EngineInfo names its fields)."""
    info = getattr(engine, "info", None)

    def get(*names: str, default=None):
        for name in names:
            value = getattr(info, name, None)
            if value is not None:
                return value
        return default

    size = get("frame_size", default=(0, 0))
    methods = list(get("decoding_methods", "methods", default=["ar"]))
    return {
        "model_name": str(get("model_name", "name", default="")),
        "architecture": str(get("architecture", default="")),
        "frame_width": int(get("frame_width", default=size[1] if len(size) > 1 else 0)),
        "frame_height": int(get("frame_height", default=size[0] if size else 0)),
        "tokens_per_frame": int(get("tokens_per_frame", default=0)),
        "has_drafter": bool(get("has_drafter", default=False)),
        "methods": methods,
    }


class CaptionerServicer(pb_grpc.CaptionerServicer):
    def __init__(
        self,
        engine,
        worker: ModelWorker,
        limits: ServerLimits,
        metrics: ServiceMetrics,
        auth_token: str | None = None,
        transcript_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.info = model_info(engine)
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        self.auth_token = auth_token
        self.transcript_dir = transcript_dir
        self.handlers: set[StreamHandler] = set()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # --- admission ------------------------------------------------------------------------------
    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.streams_refused.labels(code=code.name).inc()
        await context.abort(code, message)

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if not self.auth_token:
            return True
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.auth_token.encode())

    # --- RPCs -----------------------------------------------------------------------------------
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return pb.ModelInfo(**self.info, limits=self.limits.to_proto(), streams_open=len(self.handlers))

    async def StreamDescribe(
        self, request_iterator: AsyncIterator[pb.StreamDescribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamDescribeResponse]:
        if not self._authorized(context):
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if self.draining:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("request") != "config":
            await self._refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION,
                f"the first message must be a StreamConfig, got {first.WhichOneof('request') or 'an empty request'}",
            )
        try:
            settings = parse_stream_config(first.config, self.limits, self.info["methods"])
            resolve = getattr(self.engine, "resolve_decoding", None)
            if resolve is not None:
                settings.session.decoding = resolve(settings.session.decoding)
        except ValueError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad config: {exc}")
        if self.draining:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")
        if len(self.handlers) >= self.limits.max_streams:
            await self._refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open streams (the server's limit is {self.limits.max_streams}); retry later",
            )
        stream_id = uuid.uuid4().hex[:12]
        transcript = None
        if self.transcript_dir is not None:
            name = f"{settings.label}-{stream_id}" if settings.label else stream_id
            transcript = self.transcript_dir / f"{name}.jsonl"
        handler = StreamHandler(stream_id, settings, self.worker, self.limits, self.metrics, transcript)
        self.handlers.add(handler)
        self._idle.clear()
        self.metrics.streams_open.set(len(self.handlers))
        self.metrics.streams_total.inc()
        log.info("stream %s opened (%s, %s)", stream_id, "live" if settings.live else "replay",
                 settings.session.decoding)
        try:
            handler.start(request_iterator)
            yield pb.StreamDescribeResponse(event=pb.StreamEvent(
                type=pb.StreamEvent.STREAM_STARTED, detail=f"stream_id={stream_id} decoding={settings.session.decoding}",
            ))
            async for msg in handler.responses():
                if isinstance(msg, Fatal):
                    await context.abort(msg.code, msg.message)
                yield msg
        finally:
            await handler.close()
            self.handlers.discard(handler)
            self.metrics.streams_open.set(len(self.handlers))
            if not self.handlers:
                self._idle.set()
            log.info("stream %s closed", stream_id)

    # --- shutdown -------------------------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new streams; let every open stream deliver its pending final and end."""
        self.draining = True
        for handler in list(self.handlers):
            handler.drain()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no stream is open; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
