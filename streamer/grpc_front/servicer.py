"""The sparrow.v1.Captioner service: a call's admission (streamer/admission.py, then its config) and its
response loop. Requests arrive decoded by wire.py: an undecodable one is a `Fatal` (raised here)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from streamer.admission import Admission, Ticket
from streamer.grpc_front.responses import fatal_response, model_info, response
from streamer.handler import StreamInput, next_input
from streamer.proto import pb, pb_grpc
from streamer.results import Control, Fatal

log = logging.getLogger(__name__)

_CONTROLS = {pb.Control.CAPTION_NOW: Control.CAPTION_NOW, pb.Control.FLUSH: Control.FLUSH,
             pb.Control.END_OF_STREAM: Control.END}

Request = pb.StreamDescribeRequest | Fatal  # Fatal: undecodable, or over the message size limit


async def stream_inputs(requests: AsyncIterator[Request]) -> AsyncIterator[StreamInput]:
    """The requests after the config as the handler's inputs; Fatal for one that is not media or control."""
    async for request in requests:
        if isinstance(request, Fatal):
            raise request
        kind = request.WhichOneof("request")
        if kind == "media":
            yield request.media
        elif kind == "control":
            if request.control.action not in _CONTROLS:
                raise Fatal(grpc.StatusCode.INVALID_ARGUMENT, f"unknown control action {request.control.action}")
            yield _CONTROLS[request.control.action]
        elif kind == "config":
            raise Fatal(grpc.StatusCode.FAILED_PRECONDITION, "config may be sent only once, as the first message")
        else:
            raise Fatal(grpc.StatusCode.INVALID_ARGUMENT, "empty request message")


class CaptionerServicer(pb_grpc.CaptionerServicer):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.info = model_info(admission.info)

    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
        return dict(context.invocation_metadata() or ())

    def _authorization(self, context: grpc.aio.ServicerContext) -> str | None:
        return self._metadata(context).get("authorization")

    # --- RPCs -----------------------------------------------------------------------------------
    async def GetModelInfo(self, request: pb.GetModelInfoRequest | Fatal,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            self.admission.authorize(self._authorization(context))
            if isinstance(request, Fatal):
                raise request
        except Fatal as fatal:
            await context.abort(fatal.code, fatal.message)
        info = pb.ModelInfo()
        info.CopyFrom(self.info)
        info.limits.CopyFrom(self.admission.limits.to_proto())
        info.streams_open = len(self.admission)
        return info

    async def _admit(self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext) -> Ticket | None:
        """Auth, drain state, the config (within the idle timeout) and the stream limits; raise Fatal.
        None: the client closed its side before sending anything."""
        admission = self.admission
        admission.authorize(self._authorization(context))
        admission.check_open()
        try:
            first = await next_input(aiter(requests), admission.limits.idle_timeout_s, admission.metrics,
                                     "StreamConfig")
        except StopAsyncIteration:
            return None
        if isinstance(first, Fatal):
            raise first
        if first.WhichOneof("request") != "config":
            raise Fatal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the first message must be a StreamConfig, got {first.WhichOneof('request') or 'an empty request'}",
            )
        try:
            settings = admission.settings(first.config)
        except ValueError as exc:
            raise Fatal(grpc.StatusCode.INVALID_ARGUMENT, f"bad config: {exc}") from exc
        return admission.admit(admission.peer_of(context.peer(), self._metadata(context)), settings)

    async def StreamDescribe(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamDescribeResponse]:
        try:
            ticket = await self._admit(request_iterator, context)
        except Fatal as refused:
            self.admission.metrics.streams_refused.labels(code=refused.code.name).inc()
            yield fatal_response(refused.code, refused.message)
            await context.abort(refused.code, refused.message)
        if ticket is None:
            return
        handler = ticket.handler
        try:
            log.info("stream %s opened (%s, %s)", ticket.stream_id, "live" if handler.settings.live else "replay",
                     handler.settings.session.decoding)
            handler.start(stream_inputs(request_iterator))
            yield pb.StreamDescribeResponse(event=pb.StreamEvent(
                type=pb.StreamEvent.STREAM_STARTED,
                detail=f"stream_id={ticket.stream_id} decoding={handler.settings.session.decoding}",
            ))
            async for result in handler.results():
                yield response(result)
                if isinstance(result, Fatal):
                    await context.abort(result.code, result.message)
        finally:
            await self.admission.close(ticket)
            log.info("stream %s closed", ticket.stream_id)
