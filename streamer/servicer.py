"""The sparrow.v1.Captioner service: a call's admission (streamer/admission.py, then its config) and its
response loop. Requests arrive decoded by streamer/wire.py: an undecodable one is a BadRequest."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from streamer.admission import Admission, Refused, Ticket, peer_host
from streamer.handler import StreamFault, StreamHandler, next_request
from streamer.metrics import ServiceMetrics
from streamer.proto import pb, pb_grpc
from streamer.settings import ServerLimits, StreamSettings, parse_stream_config
from streamer.slot import Fatal
from streamer.wire import BadRequest
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
        admission: Admission,
        transcript_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.info = model_info(engine)
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        self.admission = admission
        self.transcript_dir = transcript_dir

    @staticmethod
    def _authorization(context: grpc.aio.ServicerContext) -> str | None:
        return dict(context.invocation_metadata() or ()).get("authorization")

    # --- RPCs -----------------------------------------------------------------------------------
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest | BadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            self.admission.authorize(self._authorization(context))
            if isinstance(request, BadRequest):
                raise Refused(request.code, request.message)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        return pb.ModelInfo(**self.info, limits=self.limits.to_proto(), streams_open=len(self.admission))

    async def _first_request(
        self, request_iterator: AsyncIterator[pb.StreamDescribeRequest | BadRequest]
    ) -> pb.StreamDescribeRequest | None:
        """The config message (None: the client closed its side first), within the idle timeout."""
        try:
            return await next_request(aiter(request_iterator), self.limits.idle_timeout_s, self.metrics, "StreamConfig")
        except StopAsyncIteration:
            return None
        except StreamFault as fault:
            raise Refused(fault.code, str(fault)) from None

    async def _admit(
        self, request_iterator: AsyncIterator[pb.StreamDescribeRequest | BadRequest],
        context: grpc.aio.ServicerContext,
    ) -> tuple[StreamSettings, Ticket] | None:
        """Auth, drain state, the config and the stream limits; raise Refused. None: the client sent nothing."""
        self.admission.authorize(self._authorization(context))
        self.admission.check_open()
        first = await self._first_request(request_iterator)
        if first is None:
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
        return settings, self.admission.admit(peer_host(context.peer()))

    async def StreamDescribe(
        self, request_iterator: AsyncIterator[pb.StreamDescribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamDescribeResponse]:
        try:
            admitted = await self._admit(request_iterator, context)
        except Refused as refused:
            self.metrics.streams_refused.labels(code=refused.code.name).inc()
            yield fatal_response(refused.code, refused.message)
            await context.abort(refused.code, refused.message)
        if admitted is None:
            return
        settings, ticket = admitted
        stream_id = ticket.stream_id
        try:
            transcript = None
            if self.transcript_dir is not None:
                name = f"{settings.label}-{stream_id}" if settings.label else stream_id
                transcript = self.transcript_dir / f"{name}.jsonl"
            handler = ticket.handler = StreamHandler(
                stream_id, settings, self.worker, self.limits, self.metrics, transcript
            )
            self.metrics.streams_total.inc()
            log.info("stream %s opened (%s, %s)", stream_id, "live" if settings.live else "replay",
                     settings.session.decoding)
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
            if ticket.handler is not None:
                await ticket.handler.close()
            self.admission.release(ticket)
            log.info("stream %s closed", stream_id)
