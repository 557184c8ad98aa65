"""A small async client for sparrow.v1.Captioner: request builders and a stream that paces frames.

    async with CaptionClient("127.0.0.1:50051") as client:
        call = client.describe(frame_requests(config, frames, realtime=True))
        async for response in call:
            ...
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import numpy as np

from streamer.proto import pb, pb_grpc
from streamer.settings import MAX_RESUME_FINALS

# How a call ends when its server was lost mid-stream (a cluster replica died, a server went away): the
# stream may be opened again with StreamConfig.resume
RESUMABLE_STATUSES = frozenset({grpc.StatusCode.UNAVAILABLE})


def config_request(**fields) -> pb.StreamDescribeRequest:
    """The first message: `fields` are StreamConfig fields (mode=pb.STREAM_MODE_REPLAY, caption_every_s=2, ...)."""
    return pb.StreamDescribeRequest(config=pb.StreamConfig(**fields))


def rgb_request(rgb: np.ndarray, timestamp_s: float) -> pb.StreamDescribeRequest:
    h, w, _ = rgb.shape
    raw = pb.RawFrame(width=w, height=h, format=pb.PIXEL_FORMAT_RGB24, data=np.ascontiguousarray(rgb).tobytes())
    return pb.StreamDescribeRequest(media=pb.MediaChunk(timestamp_s=timestamp_s, raw=raw))


def i420_request(planes: np.ndarray, width: int, height: int, timestamp_s: float) -> pb.StreamDescribeRequest:
    raw = pb.RawFrame(width=width, height=height, format=pb.PIXEL_FORMAT_I420, data=planes.tobytes())
    return pb.StreamDescribeRequest(media=pb.MediaChunk(timestamp_s=timestamp_s, raw=raw))


def encoded_request(data: bytes, codec: int, timestamp_s: float) -> pb.StreamDescribeRequest:
    enc = pb.EncodedChunk(codec=codec, data=data)
    return pb.StreamDescribeRequest(media=pb.MediaChunk(timestamp_s=timestamp_s, encoded=enc))


def control_request(action: int) -> pb.StreamDescribeRequest:
    return pb.StreamDescribeRequest(control=pb.Control(action=action))


class Pacer:
    """Real-time pacing by media time: each frame waits until as much wall time has passed since the first
    frame as media time has."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.first_ts = 0.0

    async def wait(self, ts: float) -> None:
        if self.t0 is None:
            self.t0, self.first_ts = time.monotonic(), ts
            return
        delay = self.t0 + (ts - self.first_ts) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def frame_requests(
    config: pb.StreamDescribeRequest,
    frames: Iterable[tuple[np.ndarray, float]],
    realtime: bool = False,
    end: bool = True,
    on_sent=None,
) -> AsyncIterator[pb.StreamDescribeRequest]:
    """Config, then RGB frames (paced to their media time when realtime), then END_OF_STREAM.

    The call consumes this generator only as fast as HTTP/2 flow control lets it, so a replay-mode
    server's backpressure reaches the frame source. `on_sent(ts)` is called as each frame goes out.
    """
    yield config
    pacer = Pacer()
    for rgb, ts in frames:
        if realtime:
            await pacer.wait(ts)
        yield rgb_request(rgb, ts)
        if on_sent is not None:
            on_sent(ts)
    if end:
        yield control_request(pb.Control.END_OF_STREAM)


def call_status(exc: grpc.aio.AioRpcError, fatal: pb.StreamError | None = None) -> tuple[grpc.StatusCode, str]:
    """How a failed call ended. `fatal` is the StreamError FATAL seen last, if any: the server sends one
    just before it ends a call, and it is preferred when the transport reports only INTERNAL
    (an asyncio client still writing as the call ends, grpc/grpc#36066)."""
    if fatal is not None and fatal.status and exc.code() == grpc.StatusCode.INTERNAL:
        return grpc.StatusCode[fatal.status], fatal.message
    return exc.code(), exc.details() or ""


class CaptionClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: Path | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.CaptionerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def __aenter__(self) -> CaptionClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def model_info(self, timeout: float = 10.0) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=timeout)

    def describe(self, requests: AsyncIterator[pb.StreamDescribeRequest]) -> grpc.aio.StreamStreamCall:
        return self.stub.StreamDescribe(requests, metadata=self.metadata)


class ResumableStream:
    """One StreamDescribe that outlives the loss of its server: when the call ends UNAVAILABLE (or OK after a
    STREAM_END "draining" while media is left to send), the stream is opened again (on the same target: a cluster front places it on a live replica) with StreamConfig.resume,
    the first timestamp and the finals so far, and the frames from the last final's end on are sent again.
    The transcript goes on with the next segment id: nothing lost, nothing twice.

        stream = ResumableStream("127.0.0.1:50051", config, frames, realtime=True)
        async for response in stream.responses():   # every response of every call, in order
            ...
        stream.finals, stream.resumes

    The frames held for a resend are those at or after the last final's end (its segment in progress and
    what the server still had queued), so memory stays bounded by the server's queue and one segment.
    `frames` is consumed once, across calls; resent frames are not paced (they are late already).
    """

    def __init__(
        self,
        target: str,
        config: pb.StreamConfig,
        frames: Iterable[tuple[np.ndarray, float]],
        realtime: bool = False,
        token: str | None = None,
        tls_ca: Path | None = None,
        max_resumes: int = 3,
        on_sent=None,
    ) -> None:
        self.target, self.token, self.tls_ca = target, token, tls_ca
        self.config = config
        self.frames = iter(frames)
        self.realtime = realtime
        self.max_resumes = max_resumes
        self.on_sent = on_sent
        self.finals: list[pb.CaptionResult] = []
        self.resumes = 0
        self.first_ts: float | None = None
        self._held: deque[tuple[np.ndarray, float]] = deque()  # sent, at or after the last final's end
        self._source_done = False
        self._pacer = Pacer()

    async def responses(self) -> AsyncIterator[pb.StreamDescribeResponse]:
        """The responses of the stream's calls; raises the last call's AioRpcError when it failed with a
        status that is not resumable, or after max_resumes resumes."""
        while True:
            fatal: pb.StreamError | None = None
            drained = False
            async with CaptionClient(self.target, token=self.token, tls_ca=self.tls_ca) as client:
                try:
                    async for response in client.describe(self._requests()):
                        kind = response.WhichOneof("response")
                        if kind == "caption" and response.caption.is_final:
                            self._final(response.caption)
                        elif kind == "error" and response.error.code == pb.StreamError.FATAL:
                            fatal = response.error
                        elif kind == "event" and response.event.type == pb.StreamEvent.STREAM_END:
                            drained = response.event.detail == "draining"
                        yield response
                    # a draining server (SIGTERM, a replica scaled down) ends the call OK after its pending
                    # final: with media still to send, the stream goes on elsewhere
                    if not (drained and not self._source_done and self.resumes < self.max_resumes):
                        return
                except grpc.aio.AioRpcError as exc:
                    if call_status(exc, fatal)[0] not in RESUMABLE_STATUSES or self.resumes >= self.max_resumes:
                        raise
            self.resumes += 1
            await asyncio.sleep(0.2 * self.resumes)

    def _final(self, caption: pb.CaptionResult) -> None:
        kept = pb.CaptionResult()
        kept.CopyFrom(caption)
        self.finals.append(kept)
        while self._held and self._held[0][1] < caption.end_s - 1e-6:  # the server's segment rule's epsilon
            self._held.popleft()

    def _config(self) -> pb.StreamDescribeRequest:
        config = pb.StreamConfig()
        config.CopyFrom(self.config)
        if self.first_ts is not None:  # media was sent: this call resumes the stream
            config.resume.first_timestamp_s = self.first_ts
            config.resume.finals.extend(self.finals[-MAX_RESUME_FINALS:])
        return pb.StreamDescribeRequest(config=config)

    async def _requests(self) -> AsyncIterator[pb.StreamDescribeRequest]:
        yield self._config()
        for rgb, ts in list(self._held):
            yield rgb_request(rgb, ts)
        if not self._source_done:
            for rgb, ts in self.frames:
                if self.realtime:
                    await self._pacer.wait(ts)
                if self.first_ts is None:
                    self.first_ts = ts
                self._held.append((rgb, ts))
                yield rgb_request(rgb, ts)
                if self.on_sent is not None:
                    self.on_sent(ts)
            self._source_done = True
        yield control_request(pb.Control.END_OF_STREAM)
