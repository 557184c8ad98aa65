"""The model worker: one thread owns the CaptionEngine and serves every open stream.

Work is done in turns. Each turn every stream with work offers one unit, a frame prefill, one step of
a caption (a draft tree or an AR token) or the close of a caption turn whose final is out (its end and
suffix text: off the caption's latency, in the next turn's shared forward), and the scheduler
(scheduler.py) picks the units that run together as ONE target forward under a token budget (caption
steps first, frames fill the rest; sparrow_core/engine/ragged.py runs them: their frames through the
vision tower in one call, linear layers once over all their tokens, attention per stream over its own
KV). Budget 0 is one unit per forward, round-robin. A stream's own work stays in order
(its frames up to a caption boundary are ingested before that caption decodes), but no stream waits
for another's whole caption.
The worker measures each caption's first-token latency and latency (caption due -> final) and each
frame's ingest lag, and posts its results (streamer/results.py: captions, events, stats, problems; no
protobuf, no file I/O) back through the stream's queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from sparrow_core.engine.ragged import StreamForward, forward_streams
from sparrow_core.engine.stream import StreamStats
from sparrow_core.session import CaptionEngine, CaptionProgress, CaptionSession, CaptionSteps, draft_captions
from streamer.metrics import ServiceMetrics, StreamLoad
from streamer.results import Caption, Event, EventType, Fatal, Problem, ProblemCode, Stats
from streamer.scheduler import DEFAULT_BATCH_TOKEN_BUDGET, Unit, UnitKind, plan_forward
from streamer.stream_queue import CaptionDue, Done, EndOfStream, Ingest, StreamQueue

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class CaptionRun:
    """A caption being decoded for one stream."""

    steps: CaptionSteps
    due: CaptionDue
    segment_id: int
    first_token_s: float | None = None
    last_text: str = ""
    last_tail: str = ""
    last: CaptionProgress | None = None


@dataclass(eq=False)
class WorkerStream:
    """The worker's own state of one stream (touched by the worker thread only, except `measured`, which the
    metrics read: a reference swap)."""

    queue: StreamQueue
    session: CaptionSession | None = None
    caption: CaptionRun | None = None
    segment_id: int = 0
    frames_since_caption: int = 0
    media_ingested_s: float = 0.0
    ingest_lag_s: float = 0.0
    tokens_reported: int = 0  # of the session's emitted tokens, how many the metrics have counted
    last_stats: float = field(default_factory=time.monotonic)
    stats_fresh: bool = False  # nothing changed since the last Stats
    measured: StreamStats | None = None  # the session's stream stats as last measured
    waited: int = 0  # turns in a row its unit was passed over (scheduler.py)
    closing: StreamForward | None = None  # the last caption's turn close, to run before the stream's next work
    ingesting: float = 0.0  # media time of the frame whose forward is planned

    @property
    def stream_id(self) -> str:
        return self.queue.stream_id


def draft_stability(tau: float | None) -> float:
    """A rough chance that a drafted tail survives verification, from the mean accepted tokens per forward."""
    if not tau or tau <= 1.0:
        return 0.1
    return float(min(0.9, max(0.1, 1.0 - 1.0 / tau)))


class ModelWorker:
    def __init__(self, engine: CaptionEngine, metrics: ServiceMetrics,
                 batch_token_budget: int = DEFAULT_BATCH_TOKEN_BUDGET) -> None:
        """`batch_token_budget`: the most tokens one target forward carries (scheduler.py; UNBATCHED = 0:
        one unit per forward, round-robin)."""
        if batch_token_budget < 0:
            raise ValueError(f"the batch token budget is a token count >= 0 (0: unbatched), got {batch_token_budget}")
        self.engine = engine
        self.metrics = metrics
        self.batch_token_budget = batch_token_budget
        self.lock = threading.Condition()
        self._streams: list[WorkerStream] = []
        self._next = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sparrow-model-worker", daemon=True)

    # --- called from the event loop ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self._stopping = True
            for stream in self._streams:
                stream.queue.closed = True
            self.lock.notify_all()
        self._thread.join(timeout)

    def add(self, queue: StreamQueue) -> None:
        with self.lock:
            self._streams.append(WorkerStream(queue))
            self.lock.notify_all()

    def release(self, queue: StreamQueue) -> None:
        """The stream's handler is gone (finished, failed or cancelled): free the stream."""
        with self.lock:
            queue.closed = True
            self.lock.notify_all()

    @property
    def alive(self) -> bool:
        """The model thread is running (a cluster replica's health check)."""
        return self._thread.is_alive()

    @property
    def streams(self) -> int:
        """Streams whose model state is still held (a released stream counts until the worker frees it)."""
        with self.lock:
            return len(self._streams)

    def open_streams(self) -> list[WorkerStream]:
        """The streams the worker holds now, a snapshot (for the metrics and tests; read, do not modify)."""
        with self.lock:
            return list(self._streams)

    def stream_loads(self) -> list[StreamLoad]:
        """What each stream holds now (thread-safe; for the metrics)."""
        with self.lock:
            return [StreamLoad(s.measured.kv_bytes if s.measured else 0, s.measured.frame_slots if s.measured else 0,
                               s.queue.queued_frames) for s in self._streams if not s.queue.closed]

    # --- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                streams = self._in_turn()
                while not streams:
                    if self._stopping:
                        return
                    self.lock.wait()
                    streams = self._in_turn()
            self._turn(streams)

    def _in_turn(self) -> list[WorkerStream]:
        """The streams with work, in round-robin order from the one after the last turn's first (caller
        holds the lock)."""
        n = len(self._streams)
        ring = [self._streams[(self._next + k) % n] for k in range(n)]
        return [s for s in ring if s.queue.runnable()]

    def _guard(self, stream: WorkerStream, work: Callable[[], T]) -> T | None:
        """Run one stream's part of a turn; a model bug ends that stream, not the others."""
        try:
            return work()
        except Exception as exc:
            log.exception("stream %s failed", stream.stream_id)
            self._finish(stream, Fatal(grpc.StatusCode.INTERNAL, f"model worker error: {exc}"))
            return None

    def _turn(self, streams: list[WorkerStream]) -> None:
        """One turn: every stream's bookkeeping, then one target forward for the units the scheduler picks
        (streamer/scheduler.py), then each unit's results."""
        units = [u for s in streams if (u := self._guard(s, lambda s=s: self._offer(s))) is not None]
        planned = plan_forward(units, self.batch_token_budget)
        picked = {id(u) for u in planned}
        for unit in units:
            unit.owner.waited = 0 if id(unit) in picked else unit.owner.waited + 1
        with self.lock:
            if planned and planned[0].owner in self._streams:
                self._next = self._streams.index(planned[0].owner) + 1
        # the captions open (a caption's first step is its prefix's forward, which decides its first token) and
        # draft the trees still missing, every stream's at once (one drafter forward per depth), then one target
        # forward for all units
        opened = [u.owner for u in planned if u.kind is UnitKind.CAPTION
                  and self._guard(u.owner, lambda u=u: self._open_caption(u.owner))]
        self._draft(opened)
        work = [(u.owner, u.kind, fw) for u in planned if u.kind is not UnitKind.CAPTION or u.owner in opened
                if (fw := self._guard(u.owner, lambda u=u: self._prepare(u.owner, u.kind))) is not None]
        if work:
            t0 = time.perf_counter()
            try:
                forward_streams(self.engine.target, [fw for _, _, fw in work])
            except Exception as exc:  # the forward's streams' caches are part-written: each of them ends
                log.exception("a forward of %d streams failed", len(work))
                for stream, _, _ in work:
                    self._finish(stream, Fatal(grpc.StatusCode.INTERNAL, f"model worker error: {exc}"))
                return
            self.metrics.observe_forward(len(work), sum(fw.size for _, _, fw in work), time.perf_counter() - t0)
            for stream, kind, fw in work:
                self._guard(stream, lambda s=stream, k=kind, f=fw: self._done(s, k, f))
            # the captions still decoding draft their next trees together, then tell their clients
            decoding = [s for s, kind, _ in work if kind is UnitKind.CAPTION and s.caption is not None]
            self._draft(decoding)
            for stream in decoding:
                self._guard(stream, lambda s=stream: self._interim(s))
        for stream in streams:
            if stream.session is not None and not stream.queue.closed:
                interval = stream.queue.settings.stats_interval_s
                if interval > 0 and time.monotonic() - stream.last_stats >= interval:
                    self._guard(stream, lambda s=stream: self._send_stats(s))

    def _offer(self, stream: WorkerStream) -> Unit[WorkerStream] | None:
        """The stream's unit for this turn's forward, after what needs no forward of its own (free a closed
        stream, open its session, a caption with nothing to describe, the end of the stream); None: none."""
        queue = stream.queue
        if queue.closed:
            self._free(stream)
            return None
        if stream.closing is not None:
            return Unit(stream, UnitKind.CLOSE, stream.closing.size, stream.waited)
        if stream.session is None:
            try:
                stream.session = self.engine.open_session(queue.settings.session)
                resume = queue.settings.resume
                if resume is not None:  # a resumed stream: its finals so far become its caption history
                    for text, end_s in resume.history:
                        stream.session.append_caption(text, end_s)
                    stream.segment_id = resume.next_segment_id
            except ValueError as exc:
                self._finish(stream, Fatal(grpc.StatusCode.INVALID_ARGUMENT, f"bad config: {exc}"))
                return None
            stream.last_stats = time.monotonic()
        with self.lock:
            head = queue.items[0] if queue.items else None
        self._report_drops(stream)
        if isinstance(head, Ingest):
            return Unit(stream, UnitKind.FRAME, self.engine.target.max_tokens_per_frame, stream.waited)
        if isinstance(head, CaptionDue):
            if stream.caption is None and stream.frames_since_caption == 0:  # nothing new to describe
                self._pop(stream)
                return None
            return Unit(stream, UnitKind.CAPTION, stream.session.decoder.max_tree_tokens, stream.waited)
        if isinstance(head, EndOfStream):
            if not stream.stats_fresh:  # before STREAM_END: no response follows it (the contract)
                self._send_stats(stream)
            queue.post(Event(EventType.STREAM_END, stream.segment_id, stream.media_ingested_s, detail=head.reason))
            self._finish(stream, head.fatal)
        return None

    def _prepare(self, stream: WorkerStream, kind: UnitKind) -> StreamForward | None:
        """The planned unit's forward (None: it needs none after all)."""
        if kind is UnitKind.FRAME:
            return self._ingest_forward(stream)
        if kind is UnitKind.CLOSE:
            return stream.closing
        return self._caption_forward(stream)

    def _done(self, stream: WorkerStream, kind: UnitKind, forward: StreamForward) -> None:
        """After the forward: the unit's results."""
        if kind is UnitKind.FRAME:
            self._ingested(stream, forward)
        elif kind is UnitKind.CLOSE:
            stream.closing = None
            self._closed(stream)
        else:
            self._caption_step(stream, forward)

    def _report_drops(self, stream: WorkerStream) -> None:
        with self.lock:
            dropped, upto = stream.queue.take_drop_report()
        if not dropped:
            return
        self.metrics.frames_dropped.inc(dropped)
        stream.queue.post(Event(EventType.FRAMES_DROPPED, stream.segment_id, upto, dropped,
                                "ingest fell behind; stale frames dropped (latest frame wins)"))

    def _ingest_forward(self, stream: WorkerStream) -> StreamForward | None:
        with self.lock:
            item = stream.queue.take_frame()
        self._report_drops(stream)  # take_frame may drop stale frames
        if item is None:
            return None
        stream.queue.on_space()
        frame = item.frame
        stream.ingest_lag_s = max(0.0, stream.queue.newest_ts - frame.timestamp_s)
        self.metrics.ingest_lag.observe(stream.ingest_lag_s)
        try:
            forward = stream.session.ingest_forward(frame.rgb[None], [frame.timestamp_s])
        except ValueError as exc:
            stream.queue.post(Problem(ProblemCode.FRAME_REJECTED, str(exc), frame.timestamp_s))
            return None
        stream.ingesting = frame.timestamp_s
        return forward

    def _ingested(self, stream: WorkerStream, forward: StreamForward) -> None:
        stream.frames_since_caption += 1
        stream.stats_fresh = False
        stream.media_ingested_s = stream.ingesting
        self.metrics.frames_ingested.inc()
        self._measure(stream)

    def _measure(self, stream: WorkerStream) -> StreamStats:
        """The (open) session's stream stats, kept on the stream for the metrics."""
        s = stream.session.stats()
        before = stream.measured.frame_slots_evicted if stream.measured else 0
        if s.frame_slots_evicted > before:
            self.metrics.visual_tokens_evicted.inc(s.frame_slots_evicted - before)
        stream.measured = s
        return s

    def _open_caption(self, stream: WorkerStream) -> bool:
        """Open the stream's due caption if it is not open yet (its first step is the opening's forward, which
        decides its first token); True when it has a step to run, False when it failed (a CAPTION_FAILED
        problem) or has no step left (then it is final now)."""
        run = stream.caption
        try:
            if run is None:
                with self.lock:
                    due = stream.queue.items[0]
                # trees: `_draft`, all streams'; the turn's close: a unit of the next turn (`closing`)
                steps = stream.session.open_caption(due.end_s, draft_ahead=False, close_later=True)
                run = stream.caption = CaptionRun(steps, due, stream.segment_id)
            if run.steps.done:  # ended without a done step: the last one is final
                if run.last is None:
                    self._end_caption(stream)
                else:
                    self._final(stream, run, run.last, time.monotonic())
                return False
            return True
        except Exception as exc:
            self._caption_failed(stream, exc)
            return False

    def _draft(self, streams: list[WorkerStream]) -> None:
        """Draft the next tree of every open caption among `streams` that needs one, all at once."""
        runs = [s for s in streams if s.caption is not None]
        if not runs:
            return
        try:
            draft_captions([s.caption.steps for s in runs])
        except Exception as exc:
            for stream in runs:
                self._caption_failed(stream, exc)

    def _caption_forward(self, stream: WorkerStream) -> StreamForward | None:
        """The open caption's next step's forward (None: it failed, a CAPTION_FAILED problem)."""
        run = stream.caption
        if run is None:  # its drafting failed
            return None
        try:
            return run.steps.prepare()
        except Exception as exc:
            self._caption_failed(stream, exc)
            return None

    def _caption_failed(self, stream: WorkerStream, exc: Exception) -> None:
        log.error("caption failed on stream %s", stream.stream_id, exc_info=exc)
        stream.queue.post(Problem(ProblemCode.CAPTION_FAILED, f"caption failed: {exc}", stream.media_ingested_s))
        self._end_caption(stream)

    def _caption_step(self, stream: WorkerStream, forward: StreamForward) -> None:
        run = stream.caption
        try:
            progress = run.steps.finish(forward)
        except Exception as exc:
            self._caption_failed(stream, exc)
            return
        run.last = progress
        if progress.done:
            self._final(stream, run, progress, time.monotonic())
        elif run.first_token_s is None and progress.text:  # the opening decided it: told now, before any drafting
            self._interim(stream)

    def _interim(self, stream: WorkerStream) -> None:
        """Tell the client where the open caption stands (text decided so far, draft tail), if it changed; the
        caption's first token is counted from the first time there is text."""
        run = stream.caption
        progress = run.steps.progress()
        if run.first_token_s is None and progress.text:
            run.first_token_s = time.monotonic() - run.due.due
        settings = stream.queue.settings
        tail = progress.draft_tail if settings.draft_tail else ""
        if settings.interim and (progress.text != run.last_text or tail != run.last_tail):
            run.last_text, run.last_tail = progress.text, tail
            stream.queue.post(Caption(
                run.segment_id, progress.text, is_final=False, start_s=progress.start_s, end_s=progress.end_s,
                stability=draft_stability(progress.tau) if tail else 1.0, draft_tail=tail,
            ))

    def _final(self, stream: WorkerStream, run: CaptionRun, progress: CaptionProgress, now: float) -> None:
        latency = now - run.due.due
        first_token = run.first_token_s or latency
        tau = float(progress.tau) if progress.tau is not None else 1.0
        stream.queue.post(Caption(
            run.segment_id, progress.text, is_final=True, start_s=progress.start_s, end_s=progress.end_s,
            first_token_latency_s=first_token, latency_s=latency, tau=tau,
        ))
        stream.queue.post(Event(EventType.SEGMENT_FINAL, run.segment_id, progress.end_s, detail=run.due.reason))
        self.metrics.caption_latency.observe(latency)
        self.metrics.first_token_latency.observe(first_token)
        self.metrics.captions.labels(method=stream.queue.settings.session.decoding).inc()
        self.metrics.tau.set(tau)
        stream.stats_fresh = False  # its tokens are not in the last Stats yet
        self._end_caption(stream)
        stream.closing = run.steps.closing
        if stream.closing is None:
            self._closed(stream)

    def _closed(self, stream: WorkerStream) -> None:
        """The last caption's turn is closed in the stream (its close's forward recorded)."""
        stream.session.catch_up()  # the closed turn enters the drafter now, not when the next caption is due
        if stream.queue.settings.stats_interval_s == 0:
            self._send_stats(stream)
        else:
            self._measure(stream)

    def _end_caption(self, stream: WorkerStream) -> None:
        if stream.caption is not None:
            stream.segment_id += 1
        stream.caption = None
        stream.frames_since_caption = 0
        self._pop(stream)

    def _pop(self, stream: WorkerStream) -> None:
        with self.lock:
            if stream.queue.items:
                stream.queue.items.popleft()

    def _send_stats(self, stream: WorkerStream) -> None:
        stream.last_stats = time.monotonic()
        stream.stats_fresh = True
        s = self._measure(stream)
        decoding = stream.session.metrics  # every caption's decoding so far
        tokens = decoding.emitted_tokens
        self.metrics.add_tokens(tokens - stream.tokens_reported)
        stream.tokens_reported = tokens
        queue = stream.queue
        with self.lock:
            received, dropped, depth = queue.frames_received, queue.frames_dropped, queue.queued_frames
        queue.post(Stats(
            media_processed_s=s.media_time_s, ingest_lag_s=stream.ingest_lag_s, kv_tokens=s.slots,
            visual_tokens=s.frame_slots, visual_tokens_evicted=s.frame_slots_evicted, frames_received=received,
            frames_ingested=s.frames_ingested, frames_dropped=dropped, tau=decoding.tau or 0.0,
            tokens_generated=tokens, queue_depth=depth,
        ))

    def _finish(self, stream: WorkerStream, fatal: Fatal | None) -> None:
        """The stream is over on the model side: free it, then tell the handler."""
        self._free(stream)
        stream.queue.post(fatal if fatal is not None else Done())

    def _free(self, stream: WorkerStream) -> None:
        stream.caption = None
        stream.closing = None
        if stream.session is not None:
            try:
                stream.session.close()
            finally:
                stream.session = None
        queue = stream.queue
        with self.lock:
            queue.closed = True
            queue.items.clear()
            dropped, _ = queue.take_drop_report()  # dropped after the last report: still counted
            if stream in self._streams:
                self._streams.remove(stream)
        if dropped:
            self.metrics.frames_dropped.inc(dropped)
        queue.on_space()
