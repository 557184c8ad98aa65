"""One StreamDescribe call on the event loop: reads requests into the stream's slot, hands responses back.

Reading: media is decoded (in a thread), stamped, sampled and cut into caption segments (`Timeline`),
then queued for the model worker. In replay mode the reader stops reading while the queue is full,
so HTTP/2 flow control holds the client back; in live mode the queue drops its oldest droppable frame
instead, and the reader waits only when none may be dropped. The reader also waits while the client
leaves too many responses unread. Control messages and the end of the request stream become caption
requests and the end of stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from sparrow_core.timeline import Timeline
from streamer.media import BadMedia, DecodeFailed, Frame, MediaDecoder, check_timestamp
from streamer.metrics import ServiceMetrics
from streamer.proto import pb
from streamer.settings import ServerLimits, StreamSettings
from streamer.slot import CaptionDue, Done, EndOfStream, Fatal, Ingest, StreamSlot
from streamer.wire import BadRequest
from streamer.worker import ModelWorker


class StreamFault(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


async def next_request(
    requests: AsyncIterator[pb.StreamDescribeRequest | BadRequest], idle_timeout_s: float, metrics: ServiceMetrics,
    waiting_for: str,
) -> pb.StreamDescribeRequest:
    """The client's next request (StopAsyncIteration at the end of its stream). StreamFault: a BadRequest
    (undecodable, over the message size limit) with its status, or DEADLINE_EXCEEDED when nothing came for
    `idle_timeout_s` (0: wait forever)."""
    try:
        async with asyncio.timeout(idle_timeout_s if idle_timeout_s > 0 else None):  # in this task: no task per message
            req = await anext(requests)
    except TimeoutError:
        metrics.streams_idle_timeout.inc()
        raise StreamFault(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no {waiting_for} within the server's idle timeout of {idle_timeout_s:g}s") from None
    if isinstance(req, BadRequest):
        raise StreamFault(req.code, req.message)
    return req


class StreamHandler:
    def __init__(
        self,
        stream_id: str,
        settings: StreamSettings,
        worker: ModelWorker,
        limits: ServerLimits,
        metrics: ServiceMetrics,
        transcript: Path | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        self.settings = settings
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.space = asyncio.Event()  # set when the worker took a frame off the queue
        self.read = asyncio.Event()  # set when the call took a response (unread fell below the limit)
        self.slot = StreamSlot(
            stream_id=stream_id,
            settings=settings,
            post=self._post,
            on_space=self._on_space,
            queue_frames=limits.queue_frames,
            live_max_lag_s=limits.live_max_lag_s,
            transcript=transcript,
            max_unread=limits.max_unread_responses,
        )
        self.decoder = MediaDecoder(limits.max_frame_pixels)
        self.timeline = Timeline(settings.caption_every_s, settings.sampling_fps)
        self._reader: asyncio.Task | None = None
        self._ended = False

    # --- thread-safe callbacks for the worker ---------------------------------------------------
    def _post(self, msg: Any) -> None:
        with self.worker.lock:
            self.slot.unread += 1
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, msg)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _on_space(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.space.set)
        except RuntimeError:
            pass

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, requests: AsyncIterator[pb.StreamDescribeRequest]) -> None:
        self.worker.add(self.slot)
        self._reader = asyncio.create_task(self._read(self._client_requests(requests)),
                                           name=f"read-{self.slot.stream_id}")

    async def _client_requests(
        self, requests: AsyncIterator[pb.StreamDescribeRequest | BadRequest]
    ) -> AsyncIterator[pb.StreamDescribeRequest]:
        """The client's requests, each within the idle timeout (`next_request`). Time the reader spends not
        reading (replay backpressure) does not count."""
        it = aiter(requests)
        while True:
            try:
                yield await next_request(it, self.limits.idle_timeout_s, self.metrics, "media or control")
            except StopAsyncIteration:
                return

    async def responses(self) -> AsyncIterator[pb.StreamDescribeResponse | Fatal]:
        """Responses until the stream is over; a Fatal comes last when the call must fail."""
        while True:
            msg = await self.out.get()
            if isinstance(msg, Done):
                return
            yield msg
            if isinstance(msg, Fatal):
                return
            with self.worker.lock:
                self.slot.unread -= 1
                readable = self.slot.unread < self.slot.max_unread
                if readable:
                    self.worker.lock.notify_all()
            if readable:
                self.read.set()

    def _emit(self, msg: Any) -> None:
        """Hand a response (or a Fatal) to the call, from the event loop."""
        with self.worker.lock:
            self.slot.unread += 1
        self.out.put_nowait(msg)

    def drain(self) -> None:
        """Server shutdown: stop reading, finish the pending caption, end the stream."""
        if self._reader is not None:
            self._reader.cancel()
        self._end("draining")

    async def close(self) -> None:
        """The call is over (ended, failed or cancelled by the client): free the stream."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self.worker.release(self.slot)
        self.decoder.close()

    # --- reading --------------------------------------------------------------------------------
    async def _read(self, requests: AsyncIterator[pb.StreamDescribeRequest]) -> None:
        try:
            async for req in requests:
                # a client that does not read its responses is not read from either
                await self._wait(self.read, lambda: self.slot.unread < self.slot.max_unread)
                kind = req.WhichOneof("request")
                if kind == "media":
                    await self._media(req.media)
                elif kind == "control":
                    if self._control(req.control.action):
                        break
                elif kind == "config":
                    raise StreamFault(
                        grpc.StatusCode.FAILED_PRECONDITION, "config may be sent only once, as the first message"
                    )
                else:
                    raise StreamFault(grpc.StatusCode.INVALID_ARGUMENT, "empty request message")
                if self._ended:
                    return
            self._end("end of stream")
        except StreamFault as exc:
            self._emit(Fatal(exc.code, str(exc)))
        except BadMedia as exc:
            self._emit(Fatal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request stream broke (client gone, message over the limit)
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.INTERNAL
            self._emit(Fatal(code, f"reading the request stream failed: {exc}"))

    async def _media(self, chunk: pb.MediaChunk) -> None:
        ts = chunk.timestamp_s
        check_timestamp(ts)
        if self.timeline.last_ts is not None and ts < self.timeline.last_ts - 1e-6:
            raise BadMedia(f"timestamps must not go backwards: {ts:.3f}s after {self.timeline.last_ts:.3f}s")
        first = self.timeline.first_ts if self.timeline.first_ts is not None else ts
        if ts - first > self.limits.max_stream_s:
            self._end(
                "stream too long",
                Fatal(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"media at {ts - first:.1f}s is past the server's max stream duration of {self.limits.max_stream_s}s",
                ),
            )
            return
        if chunk.WhichOneof("payload") == "raw" and chunk.raw.format == pb.PIXEL_FORMAT_RGB24:
            frames = self.decoder.decode(chunk)  # a view of the bytes: no work worth a thread
        else:
            try:
                frames = await asyncio.to_thread(self.decoder.decode, chunk)
            except DecodeFailed as exc:
                self._emit(pb.StreamDescribeResponse(error=pb.StreamError(
                    code=pb.StreamError.DECODE_ERROR, message=str(exc), media_time_s=ts,
                )))
                return
        for frame in frames:
            await self._frame(frame)

    async def _frame(self, frame: Frame) -> None:
        if self._ended:  # drained while this chunk was decoding
            return
        self.metrics.frames_in.inc()
        decision = self.timeline.on_frame(frame.timestamp_s)
        if decision.caption_before:
            self._queue(CaptionDue(time.monotonic(), "cadence"))
        if not decision.keep:
            return
        # the queue never holds more than queue_frames frames: live mode makes room by dropping, and
        # when nothing may be dropped (replay mode; every queued frame kept or its segment's latest)
        # the reader waits, so HTTP/2 flow control holds the client back
        await self._wait(self.space, self.slot.has_room)
        if self._ended:
            return
        with self.worker.lock:
            dropped = self.slot.add_frame(Ingest(frame, time.monotonic()))
            self.worker.lock.notify_all()
        if dropped:
            self.metrics.frames_dropped.inc(dropped)

    async def _wait(self, event: asyncio.Event, ready: Callable[[], bool]) -> None:
        """Until ready() (checked under the worker's lock) or the stream is closed; `event` is set by
        whoever may have made it true."""
        while True:
            with self.worker.lock:
                if self.slot.closed or ready():
                    return
            event.clear()
            with self.worker.lock:
                if self.slot.closed or ready():
                    return
            await event.wait()

    def _control(self, action: int) -> bool:
        """Apply a control message; True when the request stream is over."""
        if action == pb.Control.CAPTION_NOW:
            self._queue(CaptionDue(time.monotonic(), "request"))
        elif action == pb.Control.FLUSH:
            with self.worker.lock:
                self.slot.mark_keep()
            self._queue(CaptionDue(time.monotonic(), "flush"))
        elif action == pb.Control.END_OF_STREAM:
            self._end("end of stream")
            return True
        else:
            raise StreamFault(grpc.StatusCode.INVALID_ARGUMENT, f"unknown control action {action}")
        return False

    def _queue(self, item: CaptionDue) -> None:
        with self.worker.lock:
            if self.slot.add_caption_due(item):
                self.worker.lock.notify_all()

    def _end(self, reason: str, fatal: Fatal | None = None) -> None:
        """Caption what is pending, then end the stream (once)."""
        if self._ended:
            return
        self._ended = True
        now = time.monotonic()
        tail = self.decoder.flush()
        with self.worker.lock:
            for frame in tail:
                decision = self.timeline.on_frame(frame.timestamp_s)
                if decision.caption_before:
                    self.slot.add_caption_due(CaptionDue(now, "cadence"))
                if decision.keep:  # the codec's last few (reordered) frames: a bounded overshoot
                    self.slot.add_frame(Ingest(frame, now, keep=True))
            self.slot.mark_keep()
            self.slot.add_caption_due(CaptionDue(now, "end"))
            self.slot.items.append(EndOfStream(reason, fatal))
            self.slot.ended = True
            self.worker.lock.notify_all()
