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
from streamer.settings import ServerLimits, StreamSettings, parse_stream_config
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


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fatal_response(code: grpc.StatusCode, message: str) -> pb.StreamDescribeResponse:
    """The in-band mirror of the status a call is about to end with (see StreamError.FATAL)."""
    return pb.StreamDescribeResponse(error=pb.StreamError(code=pb.StreamError.FATAL, message=message, status=code.name))


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

    async def _admit(
        self, request_iterator: AsyncIterator[pb.StreamDescribeRequest], context: grpc.aio.ServicerContext
    ) -> StreamSettings | None:
        """Auth, drain state, the config and the stream limit; raise Refused. None: the client sent nothing."""
        if not self._authorized(context):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return None
        if first.WhichOneof("request") != "config":
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the first message must be a StreamConfig, got {first.WhichOneof('request') or 'an empty request'}",
            )
        try:
            settings = parse_stream_config(first.config, self.limits, self.info["methods"], self.engine.defaults,
                                           getattr(self.engine, "check_kv", None))
            resolve = getattr(self.engine, "resolve_decoding", None)
            if resolve is not None:
                settings.session.decoding = resolve(settings.session.decoding)
        except ValueError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad config: {exc}") from exc
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another server")
        if len(self.handlers) >= self.limits.max_streams:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open streams (the server's limit is {self.limits.max_streams}); retry later",
            )
        return settings

    async def StreamDescribe(
        self, request_iterator: AsyncIterator[pb.StreamDescribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamDescribeResponse]:
        try:
            settings = await self._admit(request_iterator, context)
        except Refused as refused:
            self.metrics.streams_refused.labels(code=refused.code.name).inc()
            yield fatal_response(refused.code, refused.message)
            await context.abort(refused.code, refused.message)
        if settings is None:
            return
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
                    yield fatal_response(msg.code, msg.message)
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
