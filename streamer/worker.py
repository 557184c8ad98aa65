"""The model worker: one thread owns the CaptionEngine and serves every open stream.

Work is done in small units, round-robin over the streams that have any: one frame prefill, or one
step of a caption (one target forward). A stream's own work stays in order (its frames up to a caption
boundary are ingested before that caption decodes), but no stream waits for another's whole caption.
The worker measures each caption's first-token latency and latency (caption due -> final) and each
frame's ingest lag, and sends interim/final results, events and stats back through the stream's slot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from sparrow_core.engine.stream import StreamStats
from streamer.metrics import ServiceMetrics, StreamLoad
from streamer.proto import pb
from streamer.slot import CaptionDue, Done, EndOfStream, Fatal, Ingest, StreamSlot

log = logging.getLogger(__name__)


@dataclass
class CaptionRun:
    """A caption being decoded for one stream."""

    steps: Iterator
    due: CaptionDue
    segment_id: int
    started: float
    first_token_s: float | None = None
    last_text: str = ""
    last_tail: str = ""
    last: object = None  # the latest CaptionProgress


def _draft_stability(tau: float | None) -> float:
    """A rough chance that a drafted tail survives verification, from the mean accepted tokens per forward."""
    if not tau or tau <= 1.0:
        return 0.1
    return float(min(0.9, max(0.1, 1.0 - 1.0 / tau)))


class ModelWorker:
    def __init__(self, engine, metrics: ServiceMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.lock = threading.Condition()
        self._slots: list[StreamSlot] = []
        self._next = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sparrow-model-worker", daemon=True)

    # --- called from the event loop ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self._stopping = True
            for slot in self._slots:
                slot.closed = True
            self.lock.notify_all()
        self._thread.join(timeout)

    def add(self, slot: StreamSlot) -> None:
        with self.lock:
            self._slots.append(slot)
            self.lock.notify_all()

    def release(self, slot: StreamSlot) -> None:
        """The stream's handler is gone (finished, failed or cancelled): free the stream."""
        with self.lock:
            slot.closed = True
            self.lock.notify_all()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    @property
    def streams(self) -> int:
        """Streams whose model state is still held (a released stream counts until the worker frees it)."""
        with self.lock:
            return len(self._slots)

    def stream_loads(self) -> list[StreamLoad]:
        """What each stream holds now (thread-safe; for the metrics)."""
        with self.lock:
            return [StreamLoad(s.kv_bytes, s.visual_tokens, s.queued_frames) for s in self._slots if not s.closed]

    # --- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                slot = self._pick()
                while slot is None:
                    if self._stopping:
                        return
                    self.lock.wait()
                    slot = self._pick()
            try:
                self._serve(slot)
            except Exception as exc:  # a model bug must not take the other streams down
                log.exception("stream %s failed", slot.stream_id)
                self._finish(slot, Fatal(grpc.StatusCode.INTERNAL, f"model worker error: {exc}"))

    def _pick(self) -> StreamSlot | None:
        n = len(self._slots)
        for k in range(n):
            i = (self._next + k) % n
            slot = self._slots[i]
            if slot.runnable():
                self._next = i + 1
                return slot
        return None

    def _serve(self, slot: StreamSlot) -> None:
        """One unit of work for one stream."""
        if slot.closed:
            self._free(slot)
            return
        if slot.session is None:
            try:
                slot.session = self.engine.open_session(slot.settings.session)
            except ValueError as exc:
                self._finish(slot, Fatal(grpc.StatusCode.INVALID_ARGUMENT, f"bad config: {exc}"))
                return
            slot.last_stats = time.monotonic()
        with self.lock:
            dropped = slot.drop_stale() if slot.items and isinstance(slot.items[0], Ingest) else 0
            head = slot.items[0] if slot.items else None
            if isinstance(head, Ingest):
                slot.items.popleft()
                slot.queued_frames -= 1
            report_drops, upto = slot.dropped_unreported, slot.dropped_upto_ts
            slot.dropped_unreported = 0
        if dropped:
            self.metrics.frames_dropped.inc(dropped)
        if report_drops:
            slot.post(pb.StreamDescribeResponse(event=pb.StreamEvent(
                type=pb.StreamEvent.FRAMES_DROPPED, frames=report_drops, media_time_s=upto,
                segment_id=slot.segment_id, detail="ingest fell behind; stale frames dropped (latest frame wins)",
            )))
        if isinstance(head, Ingest):
            slot.on_space()
            self._ingest(slot, head)
        elif isinstance(head, CaptionDue):
            self._caption_step(slot, head)
        elif isinstance(head, EndOfStream):
            if not slot.stats_fresh:  # before STREAM_END: no response follows it (the contract)
                self._send_stats(slot)
            slot.post(pb.StreamDescribeResponse(event=pb.StreamEvent(
                type=pb.StreamEvent.STREAM_END, segment_id=slot.segment_id,
                media_time_s=slot.media_ingested_s, detail=head.reason,
            )))
            self._finish(slot, head.fatal)
            return
        if slot.settings.stats_interval_s > 0 and time.monotonic() - slot.last_stats >= slot.settings.stats_interval_s:
            self._send_stats(slot)

    def _ingest(self, slot: StreamSlot, item: Ingest) -> None:
        frame = item.frame
        slot.ingest_lag_s = max(0.0, slot.newest_ts - frame.timestamp_s)
        self.metrics.ingest_lag.observe(slot.ingest_lag_s)
        try:
            slot.session.ingest(frame.rgb[None], [frame.timestamp_s])
        except ValueError as exc:
            slot.post(pb.StreamDescribeResponse(error=pb.StreamError(
                code=pb.StreamError.FRAME_REJECTED, message=str(exc), media_time_s=frame.timestamp_s,
            )))
            return
        slot.frames_since_caption += 1
        slot.stats_fresh = False
        slot.media_ingested_s = frame.timestamp_s
        self.metrics.frames_ingested.inc()
        self._measure(slot)

    def _measure(self, slot: StreamSlot) -> StreamStats | None:
        """The session's stream stats; its memory is noted on the slot for the metrics. None: no session."""
        if slot.session is None:
            return None
        s = slot.session.stats()
        slot.kv_bytes, slot.visual_tokens = s.kv_bytes, s.frame_slots
        evicted = s.frame_slots_evicted
        if evicted > slot.visual_tokens_evicted:
            self.metrics.visual_tokens_evicted.inc(evicted - slot.visual_tokens_evicted)
        slot.visual_tokens_evicted = evicted
        return s

    def _caption_step(self, slot: StreamSlot, due: CaptionDue) -> None:
        run: CaptionRun | None = slot.caption
        if run is None:
            if slot.frames_since_caption == 0:  # nothing new to describe
                self._pop(slot)
                return
            run = CaptionRun(slot.session.caption_steps(), due, slot.segment_id, time.monotonic())
            slot.caption = run
        exhausted = False
        try:
            progress = next(run.steps)
        except StopIteration:  # ended without a done step: the last one is final
            progress, exhausted = run.last, True
        except Exception as exc:
            log.exception("caption failed on stream %s", slot.stream_id)
            slot.post(pb.StreamDescribeResponse(error=pb.StreamError(
                code=pb.StreamError.CAPTION_FAILED, message=f"caption failed: {exc}",
                media_time_s=slot.media_ingested_s,
            )))
            self._end_caption(slot)
            return
        if progress is None:
            self._end_caption(slot)
            return
        run.last = progress
        now = time.monotonic()
        if run.first_token_s is None and (progress.text or progress.done or exhausted):
            run.first_token_s = now - due.due
        if progress.done or exhausted:
            self._final(slot, run, progress, now)
            return
        tail = progress.draft_tail if slot.settings.draft_tail else ""
        if slot.settings.interim and (progress.text != run.last_text or tail != run.last_tail):
            run.last_text, run.last_tail = progress.text, tail
            slot.post(pb.StreamDescribeResponse(caption=pb.CaptionResult(
                segment_id=run.segment_id, text=progress.text, is_final=False,
                stability=_draft_stability(progress.tau) if tail else 1.0,
                start_s=progress.start_s, end_s=progress.end_s, draft_tail=tail,
            )))

    def _final(self, slot: StreamSlot, run: CaptionRun, progress, now: float) -> None:
        latency = now - run.due.due
        tau = float(progress.tau) if progress.tau is not None else 1.0
        slot.tau = tau
        result = pb.CaptionResult(
            segment_id=run.segment_id, text=progress.text, is_final=True, stability=1.0,
            start_s=progress.start_s, end_s=progress.end_s,
            first_token_latency_s=run.first_token_s or latency, latency_s=latency, tau=tau,
        )
        slot.post(pb.StreamDescribeResponse(caption=result))
        slot.post(pb.StreamDescribeResponse(event=pb.StreamEvent(
            type=pb.StreamEvent.SEGMENT_FINAL, segment_id=run.segment_id, media_time_s=progress.end_s,
            detail=run.due.reason,
        )))
        self.metrics.caption_latency.observe(latency)
        self.metrics.first_token_latency.observe(run.first_token_s or latency)
        self.metrics.captions.labels(method=slot.settings.session.decoding).inc()
        self.metrics.tau.set(tau)
        if slot.transcript is not None:
            record = {
                "stream_id": slot.stream_id, "segment_id": run.segment_id, "start_s": progress.start_s,
                "end_s": progress.end_s, "text": progress.text, "tau": tau, "latency_s": round(latency, 4),
            }
            with open(slot.transcript, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self._end_caption(slot)
        if slot.settings.stats_interval_s == 0:
            self._send_stats(slot)
        else:
            self._measure(slot)

    def _end_caption(self, slot: StreamSlot) -> None:
        run = slot.caption
        if run is not None:
            run.steps.close()
            slot.segment_id += 1
        slot.caption = None
        slot.frames_since_caption = 0
        self._pop(slot)

    def _pop(self, slot: StreamSlot) -> None:
        with self.lock:
            if slot.items:
                slot.items.popleft()

    def _send_stats(self, slot: StreamSlot) -> None:
        slot.last_stats = time.monotonic()
        slot.stats_fresh = True
        s = self._measure(slot)
        m = slot.session.metrics if slot.session is not None else None

        def get(name: str, default=0, of=s):
            value = getattr(of, name, None) if of is not None else None
            return default if value is None else value

        tokens = int(get("emitted_tokens", of=m))
        self.metrics.add_tokens(tokens - slot.tokens_reported)
        slot.tokens_reported = tokens
        with self.lock:
            received, dropped, depth = slot.frames_received, slot.frames_dropped, slot.queued_frames
        tau = get("tau", None, of=m)
        slot.post(pb.StreamDescribeResponse(stats=pb.StreamStats(
            media_processed_s=float(get("media_time_s", slot.media_ingested_s)),
            ingest_lag_s=slot.ingest_lag_s,
            kv_tokens=int(get("slots")),
            visual_tokens=int(get("frame_slots")),
            visual_tokens_evicted=int(get("frame_slots_evicted")),
            frames_received=received,
            frames_ingested=int(get("frames_ingested")),
            frames_dropped=dropped,
            tau=float(tau if tau is not None else (slot.tau or 0.0)),
            tokens_generated=tokens,
            queue_depth=depth,
        )))

    def _finish(self, slot: StreamSlot, fatal: Fatal | None) -> None:
        """The stream is over on the model side: free it, then tell the handler."""
        self._free(slot)
        slot.post(fatal if fatal is not None else Done())

    def _free(self, slot: StreamSlot) -> None:
        if slot.caption is not None:
            slot.caption.steps.close()
            slot.caption = None
        if slot.session is not None:
            try:
                slot.session.close()
            finally:
                slot.session = None
        with self.lock:
            slot.closed = True
            slot.items.clear()
            slot.queued_frames = 0
            if slot in self._slots:
                self._slots.remove(slot)
        slot.on_space()
