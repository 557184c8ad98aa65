"""Property-based fuzzing of sparrow.v1.Captioner/StreamDescribe against a real `sparrow-stream serve`.

One server process with the default model (small limits keep every accepted call cheap) serves the
whole module. Every generated call must end within CALL_DEADLINE_S with a status the contract
(captioner.proto) documents, carry the in-band FATAL copy of a fatal status, and leave the server
SERVING. Beside each fuzz test a healthy greedy replay stream (the neighbour) is advanced by one frame
per example; when the test is done its finals must be byte-identical to a solo run of the same clip.

A server that stops answering (frozen event loop) is killed and a fresh one started for the next test.
Profiles (tests/conftest.py): `ci` by default, `--hypothesis-profile=long` for a longer local run.
"""

from __future__ import annotations

import asyncio
import functools
import math
import struct
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service_support import encode, gradient, model_dir, world_frames
from streamer.client import (
    CaptionClient,
    call_status,
    config_request,
    control_request,
    encoded_request,
    rgb_request,
)
from streamer.proto import SERVICE_NAME, pb
from streamer.serve_process import ServeProcess

# the fuzz server's limits: small, so that whatever it accepts is cheap
MAX_CAPTION_TOKENS = 4
MAX_FRAME_PIXELS = 96 * 96
MAX_MESSAGE_BYTES = 64 * 1024
QUEUE_FRAMES = 4
SERVER_FLAGS = [
    "--max-caption-tokens", str(MAX_CAPTION_TOKENS), "--max-frame-pixels", str(MAX_FRAME_PIXELS),
    "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--queue-frames", str(QUEUE_FRAMES), "--max-streams", "4",
    "--max-streams-per-peer", "0",  # every call comes from 127.0.0.1: the neighbour and one example at a time
]
# a generated call must have ended by then (the calls take well under a second); it is below the server's
# idle timeout (60 s), so a DEADLINE_EXCEEDED here is always this deadline, never the server's documented one
CALL_DEADLINE_S = 20.0
HEALTH_DEADLINE_S = 10.0
# the statuses captioner.proto documents for a call to a server that is not draining and wants no token
CONTRACT_STATUSES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
}
METHOD = "/sparrow.v1.Captioner/StreamDescribe"
NEIGHBOUR_EVERY_S = 2.0
SIDE = 64  # the default model's frame side


# ---------------------------------------------------------------------------------------------
# the server, a client event loop in a thread, and the neighbour stream


class ClientLoop:
    """An asyncio loop in a daemon thread: hypothesis calls are synchronous, the neighbour spans them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-client-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Outcome:
    responses: list[pb.StreamDescribeResponse]
    code: grpc.StatusCode
    details: str
    fatal: pb.StreamError | None  # the last in-band FATAL copy, if any

    def of(self, kind: str) -> list[Any]:
        return [getattr(r, kind) for r in self.responses if r.WhichOneof("response") == kind]

    @property
    def finals(self) -> list[pb.CaptionResult]:
        return [c for c in self.of("caption") if c.is_final]


class FuzzServer:
    """The module's server process and a client to it; restarted when a test left it unable to answer."""

    def __init__(self, model: str, clip: list[tuple[np.ndarray, float]]) -> None:
        self.model = model
        self.clip = clip
        self.loop = ClientLoop()
        self.process: ServeProcess | None = None
        self.client: CaptionClient | None = None
        self.solo: list[tuple[str, float, float]] | None = None
        self.frozen = False
        self.limits: pb.ServerLimits | None = None  # what the server reports in ModelInfo
        self.methods: list[str] = []  # its decoding methods (ModelInfo.methods)

    def start(self) -> None:
        self.process = ServeProcess(["--model", self.model, *SERVER_FLAGS]).start()

        async def connect() -> CaptionClient:
            return CaptionClient(self.process.target, max_message_bytes=8 * MAX_MESSAGE_BYTES)

        self.client = self.loop.run(connect(), 30)
        info = self.run(self.client.model_info())
        self.limits, self.methods = info.limits, list(info.methods)
        if self.solo is None:  # the neighbour's reference: the clip alone on a fresh server
            self.solo = self.run(neighbour_finals(self, iter_clip(self.clip)))

    def stop(self) -> None:
        if self.client is not None:
            self.loop.run(self.client.close(), 30)
            self.client = None
        if self.process is not None:
            self.process.kill()  # no drain: a frozen server ignores SIGTERM
            self.process = None

    def ensure_serving(self) -> None:
        if self.frozen or self.process is None or not self.process.alive() or not self.serving():
            self.stop()
            self.start()
            self.frozen = False

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_DEADLINE_S + 20) -> Any:
        return self.loop.run(coro, timeout)

    def serving(self) -> bool:
        async def check() -> bool:
            stub = health_pb2_grpc.HealthStub(self.client.channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=HEALTH_DEADLINE_S)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        return self.run(check(), HEALTH_DEADLINE_S + 10)

    def exchange(self, requests: list[bytes]) -> Outcome:
        """One StreamDescribe call with these serialized (or deliberately broken) request messages."""

        async def call() -> Outcome:
            describe = self.client.channel.stream_stream(
                METHOD, request_serializer=None, response_deserializer=pb.StreamDescribeResponse.FromString
            )

            async def send() -> AsyncIterator[bytes]:
                for r in requests:
                    yield r

            responses: list[pb.StreamDescribeResponse] = []
            stream = describe(send(), timeout=CALL_DEADLINE_S)
            try:
                async for r in stream:
                    responses.append(r)
            except grpc.aio.AioRpcError as exc:
                fatal = [e for e in (r.error for r in responses if r.WhichOneof("response") == "error")
                         if e.code == pb.StreamError.FATAL]
                code, details = call_status(exc, fatal[-1] if fatal else None)
                return Outcome(responses, code, details, fatal[-1] if fatal else None)
            return Outcome(responses, grpc.StatusCode.OK, "", None)

        return self.run(call())


def iter_clip(clip: list[tuple[np.ndarray, float]]):
    for rgb, ts in clip:
        yield rgb_request(rgb, ts)


async def neighbour_finals(server: FuzzServer, frames) -> list[tuple[str, float, float]]:
    """A greedy ar replay stream of `frames` (sync or async iterable of requests); its finals."""

    async def requests() -> AsyncIterator[pb.StreamDescribeRequest]:
        yield config_request(mode=pb.STREAM_MODE_REPLAY, caption_every_s=NEIGHBOUR_EVERY_S, sampling_fps=2.0,
                             max_caption_tokens=MAX_CAPTION_TOKENS, decoding=pb.DECODING_METHOD_AR)
        if hasattr(frames, "__aiter__"):
            async for r in frames:
                yield r
        else:
            for r in frames:
                yield r
        yield control_request(pb.Control.END_OF_STREAM)

    finals = []
    async for r in server.client.describe(requests()):
        if r.WhichOneof("response") == "caption" and r.caption.is_final:
            finals.append((r.caption.text, r.caption.start_s, r.caption.end_s))
    return finals


class Neighbour:
    """The healthy stream beside a fuzz test: the clip's frames spread over the profile's examples (one
    every `every` examples, so that it is never silent for the server's idle timeout), the rest at the end."""

    def __init__(self, server: FuzzServer) -> None:
        self.server = server
        self.pending = list(iter_clip(server.clip))
        self.every = max(1, math.ceil(settings.default.max_examples / len(self.pending)))
        self.examples = 0
        self.queue: asyncio.Queue | None = None

        async def begin() -> asyncio.Task:
            self.queue = asyncio.Queue()

            async def frames() -> AsyncIterator[pb.StreamDescribeRequest]:
                while (r := await self.queue.get()) is not None:
                    yield r

            return asyncio.create_task(neighbour_finals(server, frames()))

        self.task = server.run(begin(), 30)

    def advance(self) -> None:
        self.examples += 1
        if self.pending and self.examples % self.every == 0:
            self.server.loop.loop.call_soon_threadsafe(self.queue.put_nowait, self.pending.pop(0))

    def cancel(self) -> None:
        self.server.loop.loop.call_soon_threadsafe(self.task.cancel)

    def finals(self) -> list[tuple[str, float, float]]:
        for r in [*self.pending, None]:
            self.server.loop.loop.call_soon_threadsafe(self.queue.put_nowait, r)
        self.pending = []

        async def wait() -> list[tuple[str, float, float]]:
            return await self.task

        return self.server.run(wait())


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    _, clip = world_frames(root, seed=4, seconds=8.0)
    server = FuzzServer(str(model_dir(root)), clip)
    server.start()
    yield server
    server.stop()
    server.loop.close()


@pytest.fixture
def fuzz(fuzz_server):
    """The server, serving (restarted if an earlier test froze it), and a neighbour checked at the end."""
    fuzz_server.ensure_serving()
    checker = ExampleChecker(fuzz_server, Neighbour(fuzz_server))
    yield checker
    checker.neighbour.cancel()  # a test that failed did not finish it


class ExampleChecker:
    def __init__(self, server: FuzzServer, neighbour: Neighbour) -> None:
        self.server = server
        self.neighbour = neighbour

    def call(self, first: bytes, steps: list[tuple]) -> Outcome:
        """Run one generated call (the `first` message, then `steps`) and check what every call must
        satisfy; the outcome, for the test's own checks."""
        assert not self.server.frozen, "an earlier example left the server unable to answer"
        requests = [first, *map(wire, steps)]
        out = self.server.exchange(requests)
        assert out.code in CONTRACT_STATUSES, f"{out.code.name} is not a documented status: {out.details}"
        # the contract's one exception to the FATAL copy a client can cause here: a message over twice
        # --max-message-bytes, which gRPC refuses itself before the service sees it
        refused_by_grpc = out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(max(requests, key=len)) > 2 * MAX_MESSAGE_BYTES
        if out.code != grpc.StatusCode.OK:
            assert out.details, f"{out.code.name} without a message"
            if not refused_by_grpc:
                assert out.fatal is not None, f"{out.code.name} ({out.details}) came without its in-band FATAL copy"
                assert (out.fatal.status, out.fatal.message) == (out.code.name, out.details)
        else:
            last = out.responses[-1] if out.responses else None
            assert last is not None and last.WhichOneof("response") == "event", "an OK call ends with STREAM_END"
            assert last.event.type == pb.StreamEvent.STREAM_END
        assert [f.segment_id for f in out.finals] == list(range(len(out.finals))), "one final per segment, in order"
        failed = [e.message for e in out.of("error") if e.code == pb.StreamError.CAPTION_FAILED]
        assert not failed, f"a caption failed: {failed}"
        depths = [s.queue_depth for s in out.of("stats")]
        assert max(depths, default=0) <= QUEUE_FRAMES, f"queue depth {max(depths)} over --queue-frames {QUEUE_FRAMES}"
        self.server.frozen = not self.server.serving()
        assert not self.server.frozen, "the server stopped answering health checks"
        self.neighbour.advance()
        return out

    def neighbour_unharmed(self) -> None:
        """After the examples: the neighbour's greedy finals equal the solo run's, byte for byte."""
        assert self.neighbour.finals() == self.server.solo, "the neighbour stream's finals changed under the fuzz"


# ---------------------------------------------------------------------------------------------
# requests, described as small tuples (readable in a failing example) and written out by `wire`
#   ("frame", ts)                              a 64x64 RGB24 frame
#   ("raw", width, height, format, nbytes, ts) any RawFrame
#   ("chunk", codec, kind, index, ts)          an encoded chunk: kind "valid" (packet `index` of a PyAV
#                                              clip), "empty", "truncated", "garbage", "zeros"
#   ("control", action) ("config",) ("empty",) ("bytes", b"...")   (a second config, an empty request,
#                                              bytes that may not be a message at all)
#   ("big", nbytes, ts)                        a frame message of nbytes over --max-message-bytes

CODECS = {pb.CODEC_H264: "libx264", pb.CODEC_VP8: "libvpx", pb.CODEC_MJPEG: "mjpeg"}
CLIP_PACKETS = 8


@functools.cache
def packets(codec: int) -> list[bytes]:
    """A valid encoded clip of `codec`, one packet per frame (PyAV)."""
    return encode(CODECS[codec], [gradient(i) for i in range(CLIP_PACKETS)])


def _pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def chunk_payload(codec: int, kind: str, index: int) -> bytes:
    valid = packets(codec) if codec in CODECS else [_pattern(64, index)]
    packet = valid[index % len(valid)]
    return {"valid": packet, "empty": b"", "truncated": packet[: max(1, len(packet) // 2)],
            "garbage": _pattern(1 + index % 300, index), "zeros": b"\0" * (1 + index % 100)}[kind]


def wire(step: tuple) -> bytes:
    kind, *a = step
    if kind == "frame":
        (ts,) = a
        shade = sum(struct.pack("<d", ts)) % 256  # any double, NaN included, gives its own frame
        return rgb_request(np.full((SIDE, SIDE, 3), shade, np.uint8), ts).SerializeToString()
    if kind == "raw":
        width, height, fmt, nbytes, ts = a
        raw = pb.RawFrame(width=width, height=height, format=fmt, data=_pattern(nbytes, nbytes))
        return pb.StreamDescribeRequest(media=pb.MediaChunk(timestamp_s=ts, raw=raw)).SerializeToString()
    if kind == "chunk":
        codec, what, index, ts = a
        return encoded_request(chunk_payload(codec, what, index), codec, ts).SerializeToString()
    if kind == "control":
        return control_request(a[0]).SerializeToString()
    if kind == "config":
        return plain_config()
    if kind == "empty":
        return b""
    if kind == "bytes":
        return a[0]
    if kind == "big":
        nbytes, ts = a
        return wire(("raw", SIDE, SIDE, pb.PIXEL_FORMAT_RGB24, MAX_MESSAGE_BYTES + nbytes, ts))
    raise ValueError(f"unknown step {step}")


def plain_config(**fields) -> bytes:
    """A config the server accepts (replay, every frame sampled, cheap captions), with `fields` changed."""
    base = dict(mode=pb.STREAM_MODE_REPLAY, caption_every_s=1.0, max_caption_tokens=MAX_CAPTION_TOKENS,
                decoding=pb.DECODING_METHOD_AR, sampling_fps=240.0, stats_interval_s=0.0)
    base.update(fields)
    return config_request(**base).SerializeToString()


def frames(*timestamps: float) -> list[tuple]:
    return [("frame", ts) for ts in timestamps]


END = ("control", pb.Control.END_OF_STREAM)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand so that its bytes can be anything."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# ---------------------------------------------------------------------------------------------
# strategies

NON_FINITE = [math.nan, math.inf, -math.inf]
EXTREME = [0.0, -0.0, 5e-324, 1e-300, 1e-40, 1e-7, -1.0, 1e13, 1e300, 2.0**63, 1.7976931348623157e308]
TIMESTAMPS = [0.0, 5e-324, 1e-300, 1e-7, 0.5, 1.0, 3600.0, 1e13, 1.8e18, 2.0**63, 1e300, *NON_FINITE, -1.0]


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(NON_FINITE + EXTREME), st.floats(allow_nan=True, allow_infinity=True))


def floats32() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(NON_FINITE + EXTREME), st.floats(width=32))


uint32 = st.one_of(st.sampled_from([0, 1, 2, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
enum_value = st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
text = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=4090, max_size=4200))


# each StreamConfig field: (values a client would send, anything its type holds)
CONFIG_FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "mode": (st.sampled_from([0, 1, 2]), enum_value),
    "caption_every_s": (st.sampled_from([0.0, 0.5, 1.0]), doubles()),
    "instruction": (st.text(max_size=20), text),
    "interim_results": (st.booleans(), st.booleans()),
    "interim_draft_tail": (st.booleans(), st.booleans()),
    "max_caption_tokens": (st.integers(0, MAX_CAPTION_TOKENS), uint32),
    "temperature": (st.one_of(st.just(0.0), st.floats(0.0625, 5.0, width=32)), floats32()),
    "top_p": (st.sampled_from([0.0, 0.5, 0.9, 1.0]), floats32()),
    "decoding": (st.sampled_from([0, 1, 2]), enum_value),
    "decoding_method": (st.sampled_from(["", "", "auto", "ar", "ngram"]), text),
    "sampling_fps": (st.sampled_from([0.0, 1.0, 2.0, 240.0]), floats32()),
    "visual_token_budget": (st.sampled_from([0, 17, 34, 408]), uint32),
    "seed": (st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    "stats_interval_s": (st.sampled_from([0.0, 0.01, 1.0]), doubles()),
    "label": (st.from_regex(r"[A-Za-z0-9._-]{0,64}", fullmatch=True), text),
    "caption_history": (st.sampled_from([0, 1, 5]), uint32),
}


@st.composite
def stream_configs(draw) -> pb.StreamConfig:
    """Every StreamConfig field: up to three of them anything (edges, far out of range, non-finite), the rest
    what a client would send, so that both refusals and accepted streams are explored."""
    wild = draw(st.sets(st.sampled_from(sorted(CONFIG_FIELDS)), max_size=3))
    return pb.StreamConfig(**{name: draw(CONFIG_FIELDS[name][name in wild]) for name in CONFIG_FIELDS})


def first_non_finite(cfg: pb.StreamConfig) -> str | None:
    for name in ("caption_every_s", "temperature", "top_p", "sampling_fps", "stats_interval_s"):
        if not math.isfinite(getattr(cfg, name)):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# the fuzz tests


def test_fuzz_stream_config(fuzz) -> None:
    """Any config: a documented status; non-finite, unknown-enum and over-limit values are INVALID_ARGUMENT;
    an accepted one captions without failing, at any temperature it accepts."""
    media = [*frames(0.0, 0.5, 1.0), ("control", pb.Control.CAPTION_NOW), END]

    @given(cfg=stream_configs())
    @example(cfg=pb.StreamConfig(sampling_fps=math.nan, max_caption_tokens=2))
    @example(cfg=pb.StreamConfig(stats_interval_s=math.nan, max_caption_tokens=2))
    @example(cfg=pb.StreamConfig(temperature=1e-40, max_caption_tokens=2, mode=pb.STREAM_MODE_REPLAY))
    def run(cfg: pb.StreamConfig) -> None:
        out = fuzz.call(pb.StreamDescribeRequest(config=cfg).SerializeToString(), media)
        reasons = []
        if first_non_finite(cfg):
            reasons.append(f"{first_non_finite(cfg)} is not finite")
        if cfg.mode not in pb.StreamMode.values() or cfg.decoding not in pb.DecodingMethod.values():
            reasons.append("unknown enum value")
        if cfg.decoding_method not in ("", "auto", *fuzz.server.methods):
            reasons.append(f"decoding_method {cfg.decoding_method[:20]!r} is not a method of the server")
        limits = fuzz.server.limits
        for name, limit in [("max_caption_tokens", limits.max_caption_tokens),
                            ("visual_token_budget", limits.max_visual_tokens),
                            ("caption_history", limits.max_caption_history)]:
            if getattr(cfg, name) > limit:
                reasons.append(f"{name} over the server's limit of {limit}")
        if reasons:
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, f"{reasons}: got {out.code.name} {out.details}"

    run()
    fuzz.neighbour_unharmed()


def garbage_messages() -> st.SearchStrategy[bytes]:
    bad_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf8\x88\x80\x80\x80"])
    # a config whose instruction (3) or label (14) is not UTF-8
    config_with_bad_string = st.builds(lambda field, raw: _field(1, _field(field, raw)), st.sampled_from([3, 14]),
                                       bad_utf8)
    return st.one_of(config_with_bad_string, st.binary(min_size=1, max_size=32),
                     st.sampled_from([b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05\x09", b"\xff\xff\xff\xff"]))


def test_fuzz_undecodable_messages(fuzz) -> None:
    """Bytes that are not a StreamDescribeRequest (bad UTF-8 in a string, garbage), first or after the config."""

    @given(garbage=garbage_messages(), after_config=st.booleans())
    @example(garbage=_field(1, _field(3, b"\xff")), after_config=False)
    @example(garbage=b"\xff\xff\xff\xff", after_config=True)
    def run(garbage: bytes, after_config: bool) -> None:
        try:
            pb.StreamDescribeRequest.FromString(garbage)
            decodable = True
        except Exception:
            decodable = False
        if after_config:
            out = fuzz.call(plain_config(), [*frames(0.0), ("bytes", garbage), END])
        else:
            out = fuzz.call(garbage, [END])
        if not decodable:
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, f"got {out.code.name} {out.details}"

    run()
    fuzz.neighbour_unharmed()


@st.composite
def raw_frames(draw, well_formed: bool) -> tuple[int, int, int, int]:
    """(width, height, format, byte length): well-formed under the size limit, or anything."""
    if well_formed or draw(st.booleans()):
        fmt = draw(st.sampled_from([pb.PIXEL_FORMAT_RGB24, pb.PIXEL_FORMAT_I420]))
        step = 2 if fmt == pb.PIXEL_FORMAT_I420 else 1
        width = draw(st.integers(2 // step, 48)) * step
        height = draw(st.integers(2 // step, MAX_FRAME_PIXELS // width // step)) * step
        return width, height, fmt, width * height * 3 // (2 if fmt == pb.PIXEL_FORMAT_I420 else 1)
    width = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 64, 96, 97, 2**32 - 1]), st.integers(0, 200)))
    height = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 64, 96, 2**31]), st.integers(0, 200)))
    fmt = draw(st.one_of(st.sampled_from([0, 1, 2]), enum_value))
    want = {1: width * height * 3, 2: width * height * 3 // 2}.get(fmt, 0)
    nbytes = draw(st.one_of(st.sampled_from([want, want - 1, want + 1]).filter(lambda n: 0 <= n < 40_000),
                            st.integers(0, 40_000)))
    return width, height, fmt, nbytes


def well_formed(width: int, height: int, fmt: int, nbytes: int) -> bool:
    need = {1: width * height * 3, 2: width * height * 3 // 2}.get(fmt)
    even = fmt != pb.PIXEL_FORMAT_I420 or (width % 2 == 0 and height % 2 == 0)
    return need == nbytes and even and width >= 2 and height >= 2 and width * height <= MAX_FRAME_PIXELS


def test_fuzz_raw_frames(fuzz) -> None:
    """Raw frames of any size, format and byte length: well-formed ones are captioned, the rest INVALID_ARGUMENT."""

    @given(shapes=st.one_of(st.lists(raw_frames(True), min_size=1, max_size=4),
                            st.lists(raw_frames(False), min_size=1, max_size=4)),
           mode=st.sampled_from([pb.STREAM_MODE_LIVE, pb.STREAM_MODE_REPLAY]))
    def run(shapes: list[tuple[int, int, int, int]], mode: int) -> None:
        out = fuzz.call(plain_config(mode=mode), [*(("raw", *f, 0.5 * i) for i, f in enumerate(shapes)), END])
        if all(well_formed(*f) for f in shapes):
            assert out.code == grpc.StatusCode.OK, out.details
        else:
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, f"got {out.code.name} {out.details}"

    run()
    fuzz.neighbour_unharmed()


def test_fuzz_oversize_messages(fuzz) -> None:
    """A message over --max-message-bytes ends the call RESOURCE_EXHAUSTED (with the FATAL copy)."""

    @given(nbytes=st.integers(1, 3 * MAX_MESSAGE_BYTES), frames_before=st.integers(0, 2))
    def run(nbytes: int, frames_before: int) -> None:
        out = fuzz.call(plain_config(), [*frames(*(0.5 * i for i in range(frames_before))), ("big", nbytes, 5.0), END])
        assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"got {out.code.name} {out.details}"

    run()
    fuzz.neighbour_unharmed()


BAD_CHUNKS = ["empty", "truncated", "garbage", "zeros", "other codec"]


def test_fuzz_encoded_chunks(fuzz) -> None:
    """A valid clip with bad chunks: a chunk the decoder rejects (empty, garbage, zeros, another codec's)
    is inserted and must cost nothing; a packet truncated in place (a damaged packet) costs at most itself."""
    damage = st.dictionaries(st.integers(1, CLIP_PACKETS - 1),
                             st.tuples(st.sampled_from(BAD_CHUNKS), st.integers(0, 10**6)), max_size=3)

    @given(codec=st.sampled_from(sorted(CODECS)), damage=damage)
    @example(codec=pb.CODEC_H264, damage={4: ("empty", 0)})  # issue 14 item 5: 4 valid, one empty, the rest
    def run(codec: int, damage: dict[int, tuple[str, int]]) -> None:
        steps = []
        for i in range(CLIP_PACKETS):
            kind, salt = damage.get(i, ("valid", 0))
            if kind == "other codec":
                steps.append(("chunk", sorted(c for c in CODECS if c != codec)[salt % 2], "valid", salt))
            elif kind != "valid" and kind != "truncated":
                steps.append(("chunk", codec, kind, salt))
            steps.append(("chunk", codec, "truncated" if kind == "truncated" else "valid", i))
        steps = [(*s, 0.1 * t) for t, s in enumerate(steps)]
        out = fuzz.call(plain_config(caption_every_s=0.0), [*steps, END])
        assert out.code == grpc.StatusCode.OK, f"{out.code.name} {out.details}"
        truncated = sum(kind == "truncated" for kind, _ in damage.values())
        ingested = out.of("stats")[-1].frames_ingested
        assert ingested >= CLIP_PACKETS - truncated, f"{ingested} of {CLIP_PACKETS} valid chunks were ingested"

    run()
    fuzz.neighbour_unharmed()


def first_fault_is_a_bad_timestamp(stamps: list[float]) -> bool:
    """True when a timestamp the contract refuses (not finite, negative, backwards) comes before any media
    past the server's max stream duration (OUT_OF_RANGE, default 4 h) ends the stream."""
    first = last = None
    for ts in stamps:
        if not math.isfinite(ts) or ts < 0 or (last is not None and ts < last - 1e-6):
            return True
        first = ts if first is None else first
        if ts - first > 4 * 3600:
            return False
        last = ts
    return False


def test_fuzz_timestamps(fuzz) -> None:
    """Media stamped backwards, equal, 0, denormal, huge, 2^63, non-finite, on raw frames and encoded chunks."""

    @given(
        stamps=st.lists(st.one_of(st.sampled_from(TIMESTAMPS), doubles()), min_size=1, max_size=4),
        every=st.sampled_from([0.0, 1e-7, 1.0, 4.0]), encoded=st.booleans(),
    )
    @example(stamps=[0.0, 1.8e18], every=4.0, encoded=False)  # nanoseconds sent as seconds
    @example(stamps=[1.8e18, 1.8e18], every=4.0, encoded=False)
    @example(stamps=[1e300, 1e300], every=4.0, encoded=False)
    @example(stamps=[0.0, 3600.0], every=1e-7, encoded=False)
    @example(stamps=[1e13], every=1.0, encoded=True)
    def run(stamps: list[float], every: float, encoded: bool) -> None:
        media = [("chunk", pb.CODEC_MJPEG, "valid", i, ts) if encoded else ("frame", ts) for i, ts in enumerate(stamps)]
        out = fuzz.call(plain_config(caption_every_s=every), [*media, END])
        if first_fault_is_a_bad_timestamp(stamps):
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, f"got {out.code.name} {out.details}"

    run()
    fuzz.neighbour_unharmed()


@st.composite
def control_sequences(draw) -> list[tuple]:
    """Frames, chunks, control messages (known and not), a second config, empty requests, in any order."""
    kinds = draw(st.lists(st.sampled_from(
        ["frame"] * 6 + ["chunk", "caption now", "flush", "end", "unknown action", "config", "empty"]
    ), max_size=24))
    steps, ts = [], 0.0
    for kind in kinds:
        ts += draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
        if kind == "frame":
            steps.append(("frame", ts))
        elif kind == "chunk":
            codec = draw(st.one_of(st.sampled_from(sorted(CODECS)), enum_value))
            what = draw(st.sampled_from(["valid", "valid", "truncated", "empty", "garbage"]))
            steps.append(("chunk", codec, what, draw(st.integers(0, CLIP_PACKETS - 1)), ts))
        elif kind == "caption now":
            steps.append(("control", pb.Control.CAPTION_NOW))
        elif kind == "flush":
            steps.append(("control", pb.Control.FLUSH))
        elif kind == "end":
            steps.append(END)
        elif kind == "unknown action":
            steps.append(("control", draw(st.integers(4, 2**31 - 1))))
        else:
            steps.append((kind,))
    return steps


def test_fuzz_control_sequences(fuzz) -> None:
    """Media and control interleaved in live and replay mode; the queue bound holds in both."""

    @given(steps=control_sequences(), mode=st.sampled_from([pb.STREAM_MODE_LIVE, pb.STREAM_MODE_REPLAY]),
           every=st.sampled_from([0.0, 0.05, 1.0]), before_config=st.booleans())
    # every frame its own segment, sent flat out in live mode
    @example(steps=frames(*(0.05 * i for i in range(24))), mode=pb.STREAM_MODE_LIVE, every=0.05, before_config=False)
    def run(steps: list[tuple], mode: int, every: float, before_config: bool) -> None:
        config = plain_config(mode=mode, caption_every_s=every, stats_interval_s=0.01)
        if before_config and steps:
            out = fuzz.call(wire(steps[0]), [("bytes", config), *steps[1:]])
            assert out.code == grpc.StatusCode.FAILED_PRECONDITION, f"got {out.code.name} {out.details}"
        else:
            fuzz.call(config, steps)

    run()
    fuzz.neighbour_unharmed()


def test_wire_helpers_write_what_protobuf_reads() -> None:
    """The hand-written fields above are real protobuf: valid UTF-8 through them parses back."""
    msg = pb.StreamDescribeRequest.FromString(_field(1, _field(3, "héllo".encode()) + _field(14, b"lbl")))
    assert msg.config.instruction == "héllo" and msg.config.label == "lbl"
    assert _varint(300) == bytes([0xAC, 0x02])
    big = wire(("big", 1, 5.0))
    assert len(big) > MAX_MESSAGE_BYTES and pb.StreamDescribeRequest.FromString(big).media.raw.width == SIDE
