"""One stream on the event loop, for either front: reads the client's inputs into the stream's queue, hands
the worker's results back, and appends finals to the stream's transcript.

Inputs (`StreamInput`) are front-neutral: a `pb.MediaChunk` (gRPC: decoded here, in a thread for encoded
chunks), a `Frame` already decoded (WebRTC: aiortc decoded it), or a `Control`. A front turns whatever its
client sent into these and raises `Fatal` for what it cannot. Frames are stamped, sampled and cut into
caption segments (`Timeline`), then queued for the model worker. In replay mode the reader stops reading
while the queue is full, so HTTP/2 flow control holds the client back; in live mode the queue drops its
oldest droppable frame instead, and the reader waits only when none may be dropped. The reader also waits
while the front leaves too many results untaken.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from sparrow_core.timeline import Timeline
from streamer.media import DecodeFailed, Frame, MediaDecoder, check_timestamp
from streamer.metrics import ServiceMetrics
from streamer.proto import pb
from streamer.results import Caption, Control, Fatal, Problem, ProblemCode, Result
from streamer.settings import ServerLimits, StreamSettings
from streamer.stream_queue import CaptionDue, Done, EndOfStream, Ingest, StreamQueue
from streamer.worker import ModelWorker

StreamInput = pb.MediaChunk | Frame | Control
T = TypeVar("T")


async def next_input(
    inputs: AsyncIterator[T], idle_timeout_s: float, metrics: ServiceMetrics, waiting_for: str
) -> T:
    """The client's next input (StopAsyncIteration at its end); Fatal(DEADLINE_EXCEEDED) when nothing came for
    `idle_timeout_s` (0: wait forever)."""
    try:
        async with asyncio.timeout(idle_timeout_s if idle_timeout_s > 0 else None):  # in this task: no task per message
            return await anext(inputs)
    except TimeoutError:
        metrics.streams_idle_timeout.inc()
        raise Fatal(grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no {waiting_for} within the server's idle timeout of {idle_timeout_s:g}s") from None


def transcript_line(stream_id: str, caption: Caption) -> str:
    """A final caption as one JSONL transcript record."""
    return json.dumps({
        "stream_id": stream_id, "segment_id": caption.segment_id, "start_s": caption.start_s, "end_s": caption.end_s,
        "text": caption.text, "tau": caption.tau, "latency_s": round(caption.latency_s, 4),
    }) + "\n"


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
        self.stream_id = stream_id
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        self.settings = settings
        self.transcript = transcript
        self.out: asyncio.Queue[Result | Done] = asyncio.Queue()
        self.space = asyncio.Event()  # set when the worker took a frame off the queue
        self.read = asyncio.Event()  # set when the front took a result (unread fell below the limit)
        self.queue = StreamQueue(
            stream_id=stream_id,
            settings=settings,
            post=self._post_threadsafe,
            on_space=self._on_space,
            queue_frames=limits.queue_frames,
            live_max_lag_s=limits.live_max_lag_s,
            max_unread=limits.max_unread_responses,
        )
        self.decoder = MediaDecoder(limits.max_frame_pixels)
        self.timeline = Timeline(settings.caption_every_s, settings.sampling_fps)
        if settings.resume is not None:  # the lost call's boundaries (the worker restores its finals)
            self.timeline.resume_at(settings.resume.first_timestamp_s, settings.resume.start_s)
        self._reader: asyncio.Task | None = None
        self._ended = False

    # --- results --------------------------------------------------------------------------------
    def _post(self, result: Result | Done, put: Callable[[Result | Done], None]) -> None:
        """Count a result as unread and hand it to the front with `put`."""
        with self.worker.lock:
            self.queue.unread += 1
        put(result)

    def _post_threadsafe(self, result: Result | Done) -> None:
        """The worker's `post` (its thread)."""
        try:
            self._post(result, lambda r: self.loop.call_soon_threadsafe(self.out.put_nowait, r))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _emit(self, result: Result) -> None:
        """A result of the handler's own (event loop)."""
        self._post(result, self.out.put_nowait)

    def _on_space(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.space.set)
        except RuntimeError:
            pass

    async def results(self) -> AsyncIterator[Result]:
        """Results until the stream is over; a Fatal comes last when the stream must fail. Finals are appended
        to the transcript (in a thread: no file I/O on the loop or the model thread) before they are yielded."""
        while True:
            result = await self.out.get()
            if isinstance(result, Done):
                return
            if self.transcript is not None and isinstance(result, Caption) and result.is_final:
                await asyncio.to_thread(self._append_transcript, transcript_line(self.stream_id, result))
            yield result
            if isinstance(result, Fatal):
                return
            with self.worker.lock:
                self.queue.unread -= 1
                readable = self.queue.unread < self.queue.max_unread
                if readable:
                    self.worker.lock.notify_all()
            if readable:
                self.read.set()

    def _append_transcript(self, line: str) -> None:
        with open(self.transcript, "a", encoding="utf-8") as f:
            f.write(line)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, inputs: AsyncIterator[StreamInput]) -> None:
        self.worker.add(self.queue)
        self.metrics.streams_total.inc()
        self._reader = asyncio.create_task(self._read(self._client_inputs(inputs)), name=f"read-{self.stream_id}")

    async def _client_inputs(self, inputs: AsyncIterator[StreamInput]) -> AsyncIterator[StreamInput]:
        """The client's inputs, each within the idle timeout (`next_input`). Time the reader spends not
        reading (replay backpressure) does not count."""
        it = aiter(inputs)
        while True:
            try:
                yield await next_input(it, self.limits.idle_timeout_s, self.metrics, "media or control")
            except StopAsyncIteration:
                return

    def drain(self) -> None:
        """Server shutdown: stop reading, finish the pending caption, end the stream."""
        if self._reader is not None:
            self._reader.cancel()
        self._end("draining")

    async def close(self) -> None:
        """The stream is over (ended, failed or cancelled by the client): free it."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self.worker.release(self.queue)
        self.decoder.close()

    # --- reading --------------------------------------------------------------------------------
    async def _read(self, inputs: AsyncIterator[StreamInput]) -> None:
        try:
            async for item in inputs:
                # a client that does not read its results is not read from either
                await self._wait(self.read, lambda: self.queue.unread < self.queue.max_unread)
                if isinstance(item, Control):
                    if self._control(item):
                        break
                else:
                    await self._media(item)
                if self._ended:
                    return
            self._end("end of stream")
        except Fatal as fatal:
            self._emit(fatal)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request stream broke (client gone, message over the limit)
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.INTERNAL
            self._emit(Fatal(code, f"reading the request stream failed: {exc}"))

    async def _media(self, media: pb.MediaChunk | Frame) -> None:
        ts = media.timestamp_s
        check_timestamp(ts)
        if self.timeline.last_ts is not None and ts < self.timeline.last_ts - 1e-6:
            raise Fatal(grpc.StatusCode.INVALID_ARGUMENT,
                        f"timestamps must not go backwards: {ts:.3f}s after {self.timeline.last_ts:.3f}s")
        resume = self.settings.resume
        if resume is not None and ts < resume.start_s - 1e-6:
            raise Fatal(grpc.StatusCode.INVALID_ARGUMENT,
                        f"media at {ts:.3f}s is before {resume.start_s:.3f}s, where the resumed stream's last final "
                        "ended (StreamConfig.resume)")
        first = self.timeline.first_ts if self.timeline.first_ts is not None else ts
        if ts - first > self.limits.max_stream_s:
            self._end("stream too long", Fatal(
                grpc.StatusCode.OUT_OF_RANGE,
                f"media at {ts - first:.1f}s is past the server's max stream duration of {self.limits.max_stream_s}s",
            ))
            return
        if isinstance(media, Frame):  # decoded by the front (WebRTC)
            frames = [media]
        elif media.WhichOneof("payload") == "raw" and media.raw.format == pb.PIXEL_FORMAT_RGB24:
            frames = self.decoder.decode(media)  # a view of the bytes: no work worth a thread
        else:
            try:
                frames = await asyncio.to_thread(self.decoder.decode, media)
            except DecodeFailed as exc:
                self._emit(Problem(ProblemCode.DECODE_ERROR, str(exc), ts))
                return
        for frame in frames:
            await self._frame(frame)

    async def _frame(self, frame: Frame) -> None:
        if self._ended:  # drained while this chunk was decoding
            return
        self.metrics.frames_in.inc()
        decision = self.timeline.on_frame(frame.timestamp_s)
        if decision.caption_before:
            self._queue_caption(CaptionDue(time.monotonic(), "cadence", decision.caption_end_s))
        if not decision.keep:
            return
        # the queue never holds more than queue_frames frames: live mode makes room by dropping, and
        # when nothing may be dropped (replay mode; every queued frame kept or its segment's latest)
        # the reader waits, so HTTP/2 flow control holds the client back
        await self._wait(self.space, self.queue.has_room)
        if self._ended:
            return
        with self.worker.lock:
            self.queue.add_frame(Ingest(frame, time.monotonic()))  # the worker reports (and counts) drops
            self.worker.lock.notify_all()

    async def _wait(self, event: asyncio.Event, ready: Callable[[], bool]) -> None:
        """Until ready() (checked under the worker's lock) or the stream is closed; `event` is set by
        whoever may have made it true."""
        while True:
            with self.worker.lock:
                if self.queue.closed or ready():
                    return
            event.clear()
            with self.worker.lock:
                if self.queue.closed or ready():
                    return
            await event.wait()

    def _control(self, action: Control) -> bool:
        """Apply a control input; True when the stream's input is over."""
        if action is Control.CAPTION_NOW:
            self._queue_caption(CaptionDue(time.monotonic(), "request", self.timeline.end_now()))
        elif action is Control.FLUSH:
            with self.worker.lock:
                self.queue.mark_keep()
            self._queue_caption(CaptionDue(time.monotonic(), "flush", self.timeline.end_now()))
        else:
            self._end("end of stream")
            return True
        return False

    def _queue_caption(self, item: CaptionDue) -> None:
        with self.worker.lock:
            if self.queue.add_caption_due(item):
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
                    self.queue.add_caption_due(CaptionDue(now, "cadence", decision.caption_end_s))
                if decision.keep:  # the codec's last few (reordered) frames: a bounded overshoot
                    self.queue.add_frame(Ingest(frame, now, keep=True))
            self.queue.mark_keep()
            self.queue.add_caption_due(CaptionDue(now, "end", self.timeline.end_now()))
            self.queue.items.append(EndOfStream(reason, fatal))
            self.worker.lock.notify_all()
