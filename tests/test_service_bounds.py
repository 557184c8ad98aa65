"""The service's bounds end to end with the real CaptionEngine: the live queue under frames it may not drop, the
KV bound and limit, and a client that does not read its responses."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service_support import (
    finals,
    outcome,
    replay_config,
    requests,
    run_with_server,
    stats,
    wait_until,
)
from sparrow_core.session import SessionConfig
from streamer.client import (
    CaptionClient,
    control_request,
    frame_requests,
    rgb_request,
)
from streamer.handler import StreamHandler
from streamer.metrics import ServiceMetrics
from streamer.proto import pb
from streamer.settings import ServerLimits, parse_stream_config
from streamer.worker import ModelWorker


@pytest.mark.parametrize("pattern", ["caption every frame", "flush first", "caption requests"])
def test_live_queue_bound_holds_when_nothing_can_be_dropped(engine, clip, pattern: str) -> None:
    """Frames a live stream may not drop (each its segment's latest, or kept by FLUSH) and a flood of
    caption requests: the queue stays within --queue-frames (the reader waits instead) and every frame is
    accounted for."""
    queue_frames = 3
    limits = ServerLimits(queue_frames=queue_frames)
    n = 36
    frames = [(clip[i % len(clip)][0], i * 0.1) for i in range(n)]
    every = {"caption every frame": 0.1, "flush first": 0.0, "caption requests": 0.0}[pattern]
    cfg = replay_config(mode=pb.STREAM_MODE_LIVE, caption_every_s=every, max_caption_tokens=2, sampling_fps=10.0,
                        interim_results=False)

    async def reqs():
        yield cfg
        for i, (rgb, ts) in enumerate(frames):
            if pattern == "flush first" and i == n // 2:
                yield control_request(pb.Control.FLUSH)
            yield rgb_request(rgb, ts)
            if pattern == "caption requests":
                for _ in range(20):
                    yield control_request(pb.Control.CAPTION_NOW)
        yield control_request(pb.Control.END_OF_STREAM)

    depth = {"frames": 0, "items": 0}

    async def body(server, target):
        async def watch():
            while True:
                for handler in [t.handler for t in list(server.admission.tickets) if t.handler is not None]:
                    with server.worker.lock:
                        depth["frames"] = max(depth["frames"], handler.queue.queued_frames)
                        depth["items"] = max(depth["items"], len(handler.queue.items))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            async with CaptionClient(target) as client:
                out, code, details = await asyncio.wait_for(outcome(client.describe(reqs())), 120)
        finally:
            watcher.cancel()
        assert code == grpc.StatusCode.OK, details
        last = stats(out)[-1]
        assert last.frames_received == n and last.frames_ingested + last.frames_dropped == n
        if pattern == "caption every frame":
            assert last.frames_dropped == 0  # every frame is its segment's latest
            assert len(finals(out)) > n // 2

    run_with_server(engine, body, limits=limits)
    assert 0 < depth["frames"] <= queue_frames
    assert depth["items"] <= 2 * queue_frames + 2


def test_kv_bound_holds_and_the_kv_limit_refuses_what_could_pass_it(engine, clip, watch_peak_length) -> None:
    """The worst-case KV the engine computes for a config is never exceeded by a real session (frames past
    the visual budget, caption turns past the history, speculative trees); a limit below it is refused."""
    config = SessionConfig(visual_token_budget=60, caption_history=1, max_caption_tokens=4, temperature=0.7)
    bound = engine.kv_tokens_bound(config)
    per_token = engine.target.kv_bytes_per_token
    session = engine.open_session(SessionConfig(**{**vars(config), "max_kv_bytes": bound * per_token}))
    peak = watch_peak_length(session.stream)
    try:
        for i, (rgb, ts) in enumerate(clip):
            session.ingest(rgb[None], [ts])
            if i % 4 == 3:
                session.caption()
        assert 0 < peak[0] <= bound and session.stats().kv_bytes <= bound * per_token
    finally:
        session.close()
    with pytest.raises(ValueError, match=r"over the limit of .* MB of KV per stream"):
        engine.open_session(SessionConfig(**{**vars(config), "max_kv_bytes": (bound - 1) * per_token}))
    with pytest.raises(ValueError, match="unbounded"):
        engine.check_kv(SessionConfig(visual_token_budget=0, max_kv_bytes=2**40))


def test_kv_limit_and_tiny_temperature_over_the_service(engine, clip) -> None:
    limits = ServerLimits(max_kv_bytes=2**20)  # 1 MB: under the default model's default worst case

    async def body(server, target):
        async with CaptionClient(target) as client:
            _, code, details = await outcome(client.describe(requests(replay_config())))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "over the limit of 1 MB of KV per stream (the server's --max-kv-mb)" in details
            small = replay_config(visual_token_budget=20, caption_history=1, max_caption_tokens=3,
                                  temperature=1e-40, decoding=pb.DECODING_METHOD_UNSPECIFIED)
            frames = [(rgb, ts) for rgb, ts in clip[:8]]
            out, code, details = await outcome(client.describe(frame_requests(small, frames)))
            assert code == grpc.StatusCode.OK, details
            assert not [r.error for r in out if r.WhichOneof("response") == "error"]
            assert len(finals(out)) >= 1 and stats(out)[-1].kv_tokens * engine.target.kv_bytes_per_token <= 2**20
            info = await client.model_info()
            assert (info.limits.max_kv_bytes, info.limits.max_visual_tokens) == (2**20, limits.max_visual_tokens)

    run_with_server(engine, body, limits=limits)


def test_a_client_that_does_not_read_its_responses_cannot_grow_the_server(engine, clip) -> None:
    """The stream's handler and the real model worker, with nobody taking its responses: the responses
    waiting stop near the limit, the stream stops getting model time and its requests stop being read;
    reading resumes it."""
    limits = ServerLimits(max_unread_responses=8, queue_frames=4)
    cfg = replay_config(caption_every_s=0.5, sampling_fps=10.0, max_caption_tokens=2, stats_interval_s=0.001)
    settings = parse_stream_config(cfg.config, limits, engine.info.decoding_methods, engine.defaults)

    async def main() -> None:
        worker = ModelWorker(engine, ServiceMetrics())
        worker.start()
        handler = StreamHandler("unread", settings, worker, limits, ServiceMetrics(), None)
        sent = [0]

        async def reqs():
            for i in range(100_000):
                sent[0] = i + 1
                yield rgb_request(clip[i % len(clip)][0], i * 0.1).media

        handler.start(reqs())
        try:
            assert await wait_until(lambda: handler.queue.unread >= limits.max_unread_responses, 60)
            await asyncio.sleep(0.5)
            stalled = (sent[0], handler.queue.frames_received, handler.queue.unread)
            await asyncio.sleep(0.5)
            assert (sent[0], handler.queue.frames_received, handler.queue.unread) == stalled
            assert stalled[2] <= limits.max_unread_responses + 3  # a final posts at most 3 (caption, event, stats)
            assert handler.out.qsize() == stalled[2]
            responses = handler.results()
            for _ in range(3 * limits.max_unread_responses):
                await asyncio.wait_for(anext(responses), 30)
            assert await wait_until(lambda: handler.queue.frames_received > stalled[1], 30)
        finally:
            await handler.close()
            worker.stop()

    asyncio.run(main())
