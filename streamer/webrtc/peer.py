"""One WebRTC peer connection and its live stream: the video track's frames and the data channel's control
messages go to the stream's handler as decoded `Frame`s and `Control`s (the same path as a gRPC call's
media, after its decoding), and the handler's results go back as data-channel JSON (messages.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiortc import MediaStreamError, MediaStreamTrack, RTCDataChannel, RTCPeerConnection

from streamer.admission import Admission, Ticket
from streamer.handler import StreamInput
from streamer.media import Frame
from streamer.results import Control, Fatal
from streamer.webrtc.messages import result_message
from streamer.webrtc.options import WebRTCOptions, loads_client_json

log = logging.getLogger(__name__)

MAX_UNSENT = 256  # messages kept for a data channel that has not opened yet


class PeerSession:
    """One peer connection and its live stream."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        ticket: Ticket,
        admission: Admission,
        options: WebRTCOptions,
        frame_hw: tuple[int, int],  # the model's frame size; (0, 0): as the camera sends it
        on_closed: Callable[[PeerSession], None],
    ) -> None:
        self.pc = pc
        self.ticket = ticket
        self.handler = ticket.handler
        self.admission = admission
        self.options = options
        self.frame_hw = frame_hw
        self.on_closed = on_closed
        self.stream_id = ticket.stream_id
        self.track: MediaStreamTrack | None = None
        self.channel: RTCDataChannel | None = None
        self.inputs: asyncio.Queue[StreamInput | None] = asyncio.Queue()
        # inputs waiting for the handler (which waits while the stream's queue is full): past this many,
        # new camera frames are skipped (a later frame wins) and control messages other than "end" refused
        self.max_pending = admission.limits.queue_frames
        self._unsent: list[str] = []  # messages posted before the data channel opened
        self._ended = False  # no more frames go to the handler
        self.released: asyncio.Future | None = None  # set once the stream is being freed
        self.respond_task: asyncio.Task | None = None
        self.closing = False
        self._tasks: list[asyncio.Task] = []
        self._hung_up = asyncio.Event()

        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self.track is None:
            self.track = track

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("close", lambda: asyncio.ensure_future(self.close("data channel closed")))
        for text in self._unsent:
            channel.send(text)
        self._unsent.clear()

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.debug("stream %s: connection %s", self.stream_id, state)
        if state in ("failed", "closed"):
            self._hung_up.set()
            await self.close(f"connection {state}")

    def _on_message(self, message: str | bytes) -> None:
        try:
            action = Control(loads_client_json(message)["type"])
        except (ValueError, KeyError, TypeError):
            self.send({"type": "error", "code": "bad_message", "fatal": False,
                       "message": f"expected {{\"type\": one of {', '.join(c.value for c in Control)}}}"})
            return
        if self._ended:
            return
        if action is not Control.END and self.inputs.qsize() >= self.max_pending:
            self.send({"type": "error", "code": "busy", "fatal": False,
                       "message": f"{self.max_pending} requests are already waiting for this stream; try again later"})
            return
        self.inputs.put_nowait(action)
        self._ended = action is Control.END

    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        if self.channel is None:
            if len(self._unsent) < MAX_UNSENT:
                self._unsent.append(text)
        elif self.channel.readyState == "open":
            self.channel.send(text)

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.handler.start(self._input_stream())
        settings = self.handler.settings
        self.send({"type": "event", "event": "stream_started", "stream_id": self.stream_id,
                   "decoding": settings.session.decoding, "caption_every_s": settings.caption_every_s})
        self.respond_task = asyncio.create_task(self._respond(), name=f"respond-{self.stream_id}")
        self._tasks = [asyncio.create_task(self._read_track(), name=f"track-{self.stream_id}"), self.respond_task,
                       asyncio.create_task(self._watch_connect(), name=f"connect-{self.stream_id}")]

    async def _watch_connect(self) -> None:
        """A client that goes away before ICE/DTLS complete sends no goodbye: do not hold its place for long."""
        await asyncio.sleep(self.options.connect_timeout_s)
        if self.pc.connectionState != "connected":
            await self.close(f"not connected after {self.options.connect_timeout_s:g}s")

    async def _input_stream(self) -> AsyncIterator[StreamInput]:
        while (item := await self.inputs.get()) is not None:
            yield item

    async def _read_track(self) -> None:
        """Frames of the video track -> RGB at the model's frame size, stamped with their media time."""
        assert self.track is not None
        height, width = self.frame_hw
        first: float | None = None
        last = -1.0
        try:
            while not self._ended:
                frame = await self.track.recv()
                if frame.pts is None or frame.time_base is None:
                    continue
                t = float(frame.pts * frame.time_base)
                first = t if first is None else first
                ts = t - first
                if ts <= last:  # a repeated or reordered frame: timestamps must not go backwards
                    continue
                if self.inputs.qsize() >= self.max_pending:  # the stream is backlogged: a later frame wins
                    continue
                last = ts
                if width and height:
                    frame = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                else:
                    frame = frame.reformat(format="rgb24")
                if not self._ended:
                    self.inputs.put_nowait(Frame(frame.to_ndarray(), ts))
        except MediaStreamError:  # the track ended (the sender stopped it, or the connection closed)
            pass
        if not self._ended:
            self._ended = True
            self.inputs.put_nowait(None)  # end of the input: pending caption, then the end

    async def _respond(self) -> None:
        """Worker responses -> data-channel messages until the stream is over; then let the client hang up."""
        try:
            async for result in self.handler.results():
                self.send(result_message(result))
                if isinstance(result, Fatal):
                    break
        finally:
            await self._release()
        try:
            await asyncio.wait_for(self._hung_up.wait(), self.options.linger_s)
        except TimeoutError:
            pass
        await self.close("stream over")

    def _release(self) -> asyncio.Future:
        """Free the stream (model state, admission place) once; the peer connection may linger a moment.
        Shielded: a close() that cancels the task awaiting it must not leave the stream half freed."""
        if self.released is None:
            self._ended = True
            self.released = asyncio.ensure_future(self._free())
        return asyncio.shield(self.released)

    async def _free(self) -> None:
        await self.admission.close(self.ticket)

    async def close(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        log.info("stream %s (webrtc) closing: %s", self.stream_id, reason)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self._release()
        await self.pc.close()
        self.on_closed(self)

