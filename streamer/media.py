"""Turn one stream's MediaChunk messages into RGB frames, with PyAV for I420 and encoded chunks.

One `MediaDecoder` per stream keeps the codec state across chunks (one decoder per codec, so a chunk
of another codec does not reset it). A malformed message (a timestamp outside [0, MAX_TIMESTAMP_S],
wrong byte count for its width/height, a frame over the size limit, an unknown codec or pixel format)
raises `Fatal` (INVALID_ARGUMENT, `bad_media`); a chunk the codec cannot decode, or an empty one, raises
`DecodeFailed` (recoverable: the chunk is skipped, the decoder state for the chunks after it is left as
it was, and the decoder resynchronises on a later keyframe) until too many fail in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import grpc
import numpy as np

from streamer.proto import pb
from streamer.results import Fatal

_DECODERS = {pb.CODEC_H264: "h264", pb.CODEC_VP8: "vp8", pb.CODEC_MJPEG: "mjpeg"}
_PTS_PER_SECOND = 1_000_000
# The largest media time accepted: 2^53 microseconds (~285 years). Every timestamp up to it is an exact
# integer count of microseconds (a codec pts, int64) and keeps microsecond resolution as a double.
MAX_TIMESTAMP_S = 2**53 / _PTS_PER_SECOND


class DecodeFailed(ValueError):
    """An encoded chunk could not be decoded; it was skipped (the stream goes on)."""


def bad_media(message: str) -> Fatal:
    """The message itself is wrong: the stream cannot go on (INVALID_ARGUMENT)."""
    return Fatal(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class Frame:
    rgb: np.ndarray  # uint8 [H, W, 3]
    timestamp_s: float


def check_timestamp(timestamp_s: float) -> None:
    """Fatal (INVALID_ARGUMENT) unless the media time is a finite number in [0, MAX_TIMESTAMP_S]."""
    if not (math.isfinite(timestamp_s) and 0.0 <= timestamp_s <= MAX_TIMESTAMP_S):
        raise bad_media(
            f"timestamp_s must be a finite number of seconds in [0, {MAX_TIMESTAMP_S}] (2^53 microseconds), "
            f"got {timestamp_s}"
        )


class MediaDecoder:
    def __init__(self, max_frame_pixels: int, max_consecutive_failures: int = 8) -> None:
        self.max_frame_pixels = max_frame_pixels
        self.max_consecutive_failures = max_consecutive_failures
        self._contexts: dict[int, av.CodecContext] = {}  # codec -> its decoder, created on its first chunk
        self._failures = 0
        self._last_ts = 0.0

    def decode(self, chunk: pb.MediaChunk) -> list[Frame]:
        """The frames this chunk yields (0 or more for encoded chunks, exactly 1 for raw frames)."""
        check_timestamp(chunk.timestamp_s)
        kind = chunk.WhichOneof("payload")
        if kind == "raw":
            return [Frame(self._raw_to_rgb(chunk.raw), chunk.timestamp_s)]
        if kind == "encoded":
            return self._decode_encoded(chunk.encoded, chunk.timestamp_s)
        raise bad_media("media chunk has neither a raw frame nor an encoded chunk")

    def flush(self) -> list[Frame]:
        """Drain frames the codecs still hold (end of stream), in media order; the decoders are reset afterwards."""
        frames: list[Frame] = []
        for ctx in self._contexts.values():
            try:
                frames += [self._to_frame(f, self._last_ts) for f in ctx.decode(None)]
            except (av.error.FFmpegError, Fatal):
                pass
        self.close()
        return sorted(frames, key=lambda f: f.timestamp_s)

    def close(self) -> None:
        self._contexts.clear()

    # -----------------------------------------------------------------------------------------
    def _check_size(self, width: int, height: int) -> None:
        if width < 2 or height < 2:
            raise bad_media(f"frame is {width}x{height}; width and height must be at least 2")
        if width * height > self.max_frame_pixels:
            raise bad_media(
                f"frame is {width}x{height} = {width * height} pixels, over the server's max frame size of "
                f"{self.max_frame_pixels} pixels"
            )

    def _raw_to_rgb(self, raw: pb.RawFrame) -> np.ndarray:
        w, h = raw.width, raw.height
        self._check_size(w, h)
        n = len(raw.data)
        if raw.format == pb.PIXEL_FORMAT_RGB24:
            if n != w * h * 3:
                raise bad_media(f"RGB24 frame {w}x{h} needs {w * h * 3} bytes, got {n}")
            return np.frombuffer(raw.data, np.uint8).reshape(h, w, 3).copy()  # writable, owned by the frame
        if raw.format == pb.PIXEL_FORMAT_I420:
            if w % 2 or h % 2:
                raise bad_media(f"I420 frame must have even width and height, got {w}x{h}")
            if n != w * h * 3 // 2:
                raise bad_media(f"I420 frame {w}x{h} needs {w * h * 3 // 2} bytes, got {n}")
            planes = np.frombuffer(raw.data, np.uint8).reshape(h * 3 // 2, w)
            return av.VideoFrame.from_ndarray(planes, format="yuv420p").to_ndarray(format="rgb24")
        raise bad_media(f"unknown pixel format {raw.format}; use PIXEL_FORMAT_RGB24 or PIXEL_FORMAT_I420")

    def _decode_encoded(self, enc: pb.EncodedChunk, timestamp_s: float) -> list[Frame]:
        if enc.codec not in _DECODERS:
            known = ", ".join(pb.Codec.Name(c) for c in _DECODERS)
            raise bad_media(f"unknown codec {enc.codec}; supported: {known}")
        name = pb.Codec.Name(enc.codec)
        if not enc.data:
            # an empty packet is the codec's end-of-stream signal (it would drain and close the decoder):
            # it never reaches the decoder
            self._failed(f"empty {name} chunk at {timestamp_s:.3f}s", timestamp_s, name)
        ctx = self._contexts.get(enc.codec)
        if ctx is None:
            ctx = av.CodecContext.create(_DECODERS[enc.codec], "r")
            # the decoder refuses a frame over the limit before allocating it (a few bytes of header can
            # declare a huge picture)
            ctx.options = {"max_pixels": str(self.max_frame_pixels)}
            self._contexts[enc.codec] = ctx
        packet = av.Packet(enc.data)
        packet.pts = round(timestamp_s * _PTS_PER_SECOND)
        try:
            decoded = ctx.decode(packet)
        except av.error.FFmpegError as exc:
            if ctx.width * ctx.height > self.max_frame_pixels:
                self._check_size(ctx.width, ctx.height)
            self._failed(f"undecodable {name} chunk at {timestamp_s:.3f}s: {exc}", timestamp_s, name, exc)
        self._failures = 0
        self._last_ts = timestamp_s
        return [self._to_frame(f, timestamp_s) for f in decoded]

    def _failed(self, message: str, timestamp_s: float, codec: str, cause: Exception | None = None) -> None:
        """Count an undecodable chunk: DecodeFailed, or Fatal once too many failed in a row."""
        self._failures += 1
        if self._failures >= self.max_consecutive_failures:
            raise bad_media(
                f"{self._failures} {codec} chunks in a row could not be decoded (last at {timestamp_s:.3f}s): {message}"
            ) from cause
        raise DecodeFailed(message) from cause

    def _to_frame(self, frame: av.VideoFrame, fallback_s: float) -> Frame:
        self._check_size(frame.width, frame.height)
        ts = frame.pts / _PTS_PER_SECOND if frame.pts is not None else fallback_s
        return Frame(frame.to_ndarray(format="rgb24"), float(ts))
