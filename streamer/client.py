"""A small async client for sparrow.v1.Captioner: request builders and a stream that paces frames.

    async with CaptionClient("127.0.0.1:50051") as client:
        call = client.describe(frame_requests(config, frames, realtime=True))
        async for response in call:
            ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import numpy as np

from streamer.proto import pb, pb_grpc


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
    t0: float | None = None
    first_ts = 0.0
    for rgb, ts in frames:
        if realtime:
            if t0 is None:
                t0, first_ts = time.monotonic(), ts
            delay = t0 + (ts - first_ts) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
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
