"""Turn one stream's MediaChunk messages into RGB frames, with PyAV for I420 and encoded chunks.

One `MediaDecoder` per stream keeps the codec state across chunks. A malformed message (wrong byte
count for its width/height, a frame over the size limit, an unknown codec or pixel format) raises
`BadMedia` (fatal, INVALID_ARGUMENT); a chunk the codec cannot decode raises `DecodeFailed`
(recoverable: the chunk is skipped and the decoder resynchronises on a later keyframe) until too many
fail in a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from streamer.proto import pb

_DECODERS = {pb.CODEC_H264: "h264", pb.CODEC_VP8: "vp8", pb.CODEC_MJPEG: "mjpeg"}
_PTS_PER_SECOND = 1_000_000


class BadMedia(ValueError):
    """The message itself is wrong; the stream cannot go on."""


class DecodeFailed(ValueError):
    """An encoded chunk could not be decoded; it was skipped."""


@dataclass
class Frame:
    rgb: np.ndarray  # uint8 [H, W, 3]
    timestamp_s: float


class MediaDecoder:
    def __init__(self, max_frame_pixels: int, max_consecutive_failures: int = 8) -> None:
        self.max_frame_pixels = max_frame_pixels
        self.max_consecutive_failures = max_consecutive_failures
        self._codec: int | None = None
        self._ctx: av.CodecContext | None = None
        self._failures = 0
        self._last_ts = 0.0

    def decode(self, chunk: pb.MediaChunk) -> list[Frame]:
        """The frames this chunk yields (0 or more for encoded chunks, exactly 1 for raw frames)."""
        kind = chunk.WhichOneof("payload")
        if kind == "raw":
            return [Frame(self._raw_to_rgb(chunk.raw), chunk.timestamp_s)]
        if kind == "encoded":
            return self._decode_encoded(chunk.encoded, chunk.timestamp_s)
        raise BadMedia("media chunk has neither a raw frame nor an encoded chunk")

    def flush(self) -> list[Frame]:
        """Drain frames the codec still holds (end of stream); the decoder is reset afterwards."""
        if self._ctx is None:
            return []
        try:
            frames = [self._to_frame(f, self._last_ts) for f in self._ctx.decode(None)]
        except av.error.FFmpegError:
            frames = []
        self.close()
        return frames

    def close(self) -> None:
        self._ctx = None
        self._codec = None

    # -----------------------------------------------------------------------------------------
    def _check_size(self, width: int, height: int) -> None:
        if width < 2 or height < 2:
            raise BadMedia(f"frame is {width}x{height}; width and height must be at least 2")
        if width * height > self.max_frame_pixels:
            raise BadMedia(
                f"frame is {width}x{height} = {width * height} pixels, over the server's max frame size of "
                f"{self.max_frame_pixels} pixels"
            )

    def _raw_to_rgb(self, raw: pb.RawFrame) -> np.ndarray:
        w, h = raw.width, raw.height
        self._check_size(w, h)
        n = len(raw.data)
        if raw.format == pb.PIXEL_FORMAT_RGB24:
            if n != w * h * 3:
                raise BadMedia(f"RGB24 frame {w}x{h} needs {w * h * 3} bytes, got {n}")
            return np.frombuffer(raw.data, np.uint8).reshape(h, w, 3).copy()  # writable, owned by the frame
        if raw.format == pb.PIXEL_FORMAT_I420:
            if w % 2 or h % 2:
                raise BadMedia(f"I420 frame must have even width and height, got {w}x{h}")
            if n != w * h * 3 // 2:
                raise BadMedia(f"I420 frame {w}x{h} needs {w * h * 3 // 2} bytes, got {n}")
            planes = np.frombuffer(raw.data, np.uint8).reshape(h * 3 // 2, w)
            return av.VideoFrame.from_ndarray(planes, format="yuv420p").to_ndarray(format="rgb24")
        raise BadMedia(f"unknown pixel format {raw.format}; use PIXEL_FORMAT_RGB24 or PIXEL_FORMAT_I420")

    def _decode_encoded(self, enc: pb.EncodedChunk, timestamp_s: float) -> list[Frame]:
        if enc.codec not in _DECODERS:
            known = ", ".join(pb.Codec.Name(c) for c in _DECODERS)
            raise BadMedia(f"unknown codec {enc.codec}; supported: {known}")
        if enc.codec != self._codec:
            self._ctx = av.CodecContext.create(_DECODERS[enc.codec], "r")
            self._codec = enc.codec
        packet = av.Packet(enc.data)
        packet.pts = round(timestamp_s * _PTS_PER_SECOND)
        try:
            decoded = self._ctx.decode(packet)
        except av.error.FFmpegError as exc:
            self._failures += 1
            if self._failures >= self.max_consecutive_failures:
                raise BadMedia(
                    f"{self._failures} {pb.Codec.Name(enc.codec)} chunks in a row could not be decoded "
                    f"(last at {timestamp_s:.3f}s): {exc}"
                ) from exc
            raise DecodeFailed(f"undecodable {pb.Codec.Name(enc.codec)} chunk at {timestamp_s:.3f}s: {exc}") from exc
        self._failures = 0
        self._last_ts = timestamp_s
        return [self._to_frame(f, timestamp_s) for f in decoded]

    def _to_frame(self, frame: av.VideoFrame, fallback_s: float) -> Frame:
        self._check_size(frame.width, frame.height)
        ts = frame.pts / _PTS_PER_SECOND if frame.pts is not None else fallback_s
        return Frame(frame.to_ndarray(format="rgb24"), float(ts))
