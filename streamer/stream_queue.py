"""One open stream's work queue, shared by its handler (event loop) and the model worker (its thread).

The handler appends frames, caption requests and the end of the stream; the worker consumes them in order.
Both sides hold the worker's lock while touching the queue. Everything the worker sends back goes through
`post`, which hands it to the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from streamer.media import Frame
from streamer.results import Fatal, Result
from streamer.settings import StreamSettings


@dataclass
class Ingest:
    frame: Frame
    received: float  # time.monotonic() when it arrived
    keep: bool = False  # queued before a FLUSH: never dropped


@dataclass
class CaptionDue:
    due: float  # time.monotonic() when the caption became due (segment end received, or requested)
    reason: str  # "cadence" | "request" | "flush" | "end"


@dataclass
class EndOfStream:
    reason: str  # "end of stream" | "draining" | "stream too long"
    fatal: Fatal | None = None  # end the call with this status after the pending final


class Done:
    """Posted last: no more results for this stream."""


WorkItem = Ingest | CaptionDue | EndOfStream


@dataclass(eq=False)
class StreamQueue:
    stream_id: str
    settings: StreamSettings
    post: Callable[[Result | Done], None]  # thread-safe: hand a result (a Fatal last) or Done to the handler
    on_space: Callable[[], None]  # thread-safe: the queue has room again (replay backpressure)
    queue_frames: int
    live_max_lag_s: float
    # results posted but not yet taken by the front: past this many the worker gives the stream no model
    # time and its handler stops reading, until the client reads (a client that does not read its
    # results cannot grow the server's memory)
    max_unread: int = 256

    # --- under the worker's lock ------------------------------------------------------------
    items: deque[WorkItem] = field(default_factory=deque)
    newest_ts: float = 0.0
    frames_received: int = 0
    frames_dropped: int = 0
    frames_dropped_reported: int = 0  # of frames_dropped, how many a FRAMES_DROPPED event has named
    dropped_upto_ts: float = 0.0  # the newest media time dropped so far
    closed: bool = False  # the handler is gone, or the worker freed the stream
    unread: int = 0  # results posted and not yet taken by the front

    @property
    def queued_frames(self) -> int:
        """Frames waiting for the model (at most queue_frames plus the codec's last few at the end)."""
        return sum(isinstance(it, Ingest) for it in self.items)

    def runnable(self) -> bool:
        """The worker has something to do for this stream (caller holds the lock)."""
        return self.closed or (bool(self.items) and self.unread < self.max_unread)

    def has_room(self) -> bool:
        """A frame can be queued now without the queue going over `queue_frames` (caller holds the lock):
        there is a free place, or (live mode) a frame that adding one makes droppable. False: the handler
        waits (replay mode always; live mode when every queued frame is kept or is its segment's latest)."""
        if self.queued_frames < self.queue_frames:
            return True
        return self.settings.live and self._victim(with_new_frame=True) is not None

    def _victim(self, with_new_frame: bool = False) -> int | None:
        """Index of the oldest droppable frame: not kept, with a later frame of its segment directly behind
        it (a frame about to be appended counts as one behind the last item)."""
        items = self.items
        for i, it in enumerate(items):
            if not isinstance(it, Ingest) or it.keep:
                continue
            nxt = items[i + 1] if i + 1 < len(items) else None
            if isinstance(nxt, Ingest) or (nxt is None and with_new_frame):
                return i
        return None

    def add_frame(self, item: Ingest) -> int:
        """Queue a frame (caller holds the lock; `has_room()` was true). When the queue is over
        `queue_frames`, live mode drops the oldest queued frame that has a later frame of the same
        segment behind it (each segment keeps its latest frame); returns how many were dropped."""
        self.items.append(item)
        self.frames_received += 1
        self.newest_ts = max(self.newest_ts, item.frame.timestamp_s)
        dropped = 0
        while self.settings.live and self.queued_frames > self.queue_frames:
            victim = self._victim()
            if victim is None:
                break
            self._drop_at(victim)
            dropped += 1
        return dropped

    def add_caption_due(self, item: CaptionDue) -> bool:
        """Queue a caption request (caller holds the lock). One right behind another adds nothing (no frame
        between them, so it would describe nothing): it is coalesced, which bounds the queue to about two
        items per queued frame whatever the rate of caption requests. True when queued."""
        if self.items and isinstance(self.items[-1], CaptionDue):
            return False
        self.items.append(item)
        return True

    def drop_stale(self) -> int:
        """Live mode, before ingesting the head frame (caller holds the lock): drop queued frames that are
        more than live_max_lag_s behind the newest received frame while a later frame of the same
        segment is queued behind them (the latest frame wins)."""
        if not self.settings.live:
            return 0
        dropped = 0
        while len(self.items) > 1:
            head, nxt = self.items[0], self.items[1]
            if not (isinstance(head, Ingest) and isinstance(nxt, Ingest)) or head.keep:
                break
            if self.newest_ts - head.frame.timestamp_s <= self.live_max_lag_s:
                break
            self._drop_at(0)
            dropped += 1
        return dropped

    def _drop_at(self, index: int) -> None:
        item = self.items[index]
        del self.items[index]
        self.frames_dropped += 1
        self.dropped_upto_ts = max(self.dropped_upto_ts, item.frame.timestamp_s)

    def mark_keep(self) -> None:
        """FLUSH: everything queued so far must be ingested (caller holds the lock)."""
        for it in self.items:
            if isinstance(it, Ingest):
                it.keep = True

    def take_drop_report(self) -> tuple[int, float]:
        """Frames dropped since the last report, and the newest media time dropped (caller holds the lock)."""
        count = self.frames_dropped - self.frames_dropped_reported
        self.frames_dropped_reported = self.frames_dropped
        return count, self.dropped_upto_ts

    def take_frame(self) -> Ingest | None:
        """Pop the head frame, when the head is a frame, after dropping stale ones (caller holds the lock).
        Returns the frame, or None when the head is another item (left in place) or nothing is queued."""
        if not self.items or not isinstance(self.items[0], Ingest):
            return None
        self.drop_stale()
        return self.items.popleft()
