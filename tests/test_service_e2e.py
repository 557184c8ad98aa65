"""The service end to end over 127.0.0.1 with the real CaptionEngine on a tiny model."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.request
import weakref

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service_support import (
    SEND_FPS,
    encode,
    events,
    finals,
    gradient,
    offline_captions,
    outcome,
    replay_config,
    requests,
    run_with_server,
    self_signed_cert,
    stats,
    wait_until,
)
from streamer.client import (
    CaptionClient,
    control_request,
    encoded_request,
    frame_requests,
    i420_request,
    rgb_request,
)
from streamer.proto import pb
from streamer.settings import ServerLimits

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def expected(engine, clip):
    return offline_captions(engine, clip, sampling_fps=SEND_FPS)


def test_replay_end_to_end_matches_offline(engine, clip, expected, tmp_path) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            info = await client.model_info()
            assert info.frame_width == 64 and "ar" in info.methods and info.limits.max_streams == 8
            responses, code, details = await outcome(client.describe(frame_requests(replay_config(), clip)))
            assert code == grpc.StatusCode.OK, details
            health = health_pb2_grpc.HealthStub(client.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="sparrow.v1.Captioner"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                assert "sparrow.v1.Captioner" in {s.name for s in r.list_services_response.service}
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
        )
        return responses, metrics

    result = {}

    async def run(server, target):
        result["responses"], result["metrics"] = await body(server, target)

    run_with_server(engine, run, transcript_dir=tmp_path / "transcripts", metrics_port=0, reflection=True)
    responses = result["responses"]
    got = finals(responses)
    # finals in order, one per segment, spans contiguous and increasing, text equal to the offline captioner's
    assert [f.segment_id for f in got] == list(range(len(expected)))
    assert [(f.text, f.start_s, f.end_s) for f in got] == expected
    for a, b in zip(got, got[1:]):
        assert a.start_s <= a.end_s == b.start_s <= b.end_s
    assert all(f.latency_s >= f.first_token_latency_s > 0 for f in got)
    # interim results grow the verified prefix of their segment's final
    by_segment = {f.segment_id: f.text for f in got}
    last_len: dict[int, int] = {}
    for r in responses:
        if r.WhichOneof("response") == "caption" and not r.caption.is_final:
            c = r.caption
            assert by_segment[c.segment_id].startswith(c.text) and c.stability == 1.0
            assert len(c.text) >= last_len.get(c.segment_id, 0)
            last_len[c.segment_id] = len(c.text)
    assert responses[0].event.type == pb.StreamEvent.STREAM_STARTED
    assert responses[-1].WhichOneof("response") == "event" and responses[-1].event.type == pb.StreamEvent.STREAM_END
    assert len(events(responses, pb.StreamEvent.SEGMENT_FINAL)) == len(got)
    last = stats(responses)[-1]
    assert last.frames_ingested == len(clip) and last.frames_dropped == 0 and last.kv_tokens > 0
    # transcript: one JSONL line per final
    (transcript,) = (tmp_path / "transcripts").glob("*.jsonl")
    rows = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [(r["segment_id"], r["text"], r["start_s"], r["end_s"]) for r in rows] == [
        (f.segment_id, f.text, f.start_s, f.end_s) for f in got
    ]
    metrics = result["metrics"]
    assert "sparrow_streams_open 0.0" in metrics
    assert f'sparrow_captions_total{{method="ar"}} {float(len(got))}' in metrics
    assert "sparrow_caption_latency_seconds_count" in metrics and "sparrow_tokens_per_second" in metrics


def test_two_streams_interleave_and_match_offline(engine, clip, expected) -> None:
    """One ar stream and one speculative stream (draft tails on): both greedy, both equal to offline ar."""
    method = pb.DECODING_METHOD_SPARROW if "sparrow" in engine.decoders else pb.DECODING_METHOD_AR

    async def body(server, target):
        async with CaptionClient(target) as client:
            configs = [replay_config(), replay_config(decoding=method, interim_draft_tail=True)]
            calls = [client.describe(frame_requests(cfg, clip)) for cfg in configs]
            arrivals: list[list[float]] = [[], []]

            async def run(i):
                out = []
                async for r in calls[i]:
                    out.append(r)
                    if r.WhichOneof("response") == "caption" and r.caption.is_final:
                        arrivals[i].append(time.monotonic())
                return out

            results = await asyncio.gather(run(0), run(1))
        for out in results:
            assert [(f.text, f.start_s, f.end_s) for f in finals(out)] == expected
        if method == pb.DECODING_METHOD_SPARROW:
            assert "decoding=sparrow" in results[1][0].event.detail
            interims = [r.caption for r in results[1] if r.WhichOneof("response") == "caption" and not r.caption.is_final]
            tails = [c for c in interims if c.draft_tail]
            assert tails and all(0 < c.stability < 1 for c in tails)
            by_segment = {f.segment_id: f.text for f in finals(results[1])}
            assert all(by_segment[c.segment_id].startswith(c.text) for c in interims)
        # round-robin: neither stream waits for the other to finish
        assert arrivals[0][0] < arrivals[1][-1] and arrivals[1][0] < arrivals[0][-1]

    run_with_server(engine, body)


def test_bad_clients_get_their_status_and_a_healthy_stream_is_unaffected(engine, clip, expected) -> None:
    limits = ServerLimits(max_streams=2, max_message_bytes=200_000, max_frame_pixels=320 * 240)

    async def body(server, target):
        gate = asyncio.Event()
        async with CaptionClient(target, token=TOKEN) as client:

            async def healthy_requests():
                yield replay_config()
                for i, (rgb, ts) in enumerate(clip):
                    if i == len(clip) // 2:
                        await gate.wait()  # the second half only once every bad client is done
                    yield rgb_request(rgb, ts)

            healthy = asyncio.create_task(outcome(client.describe(healthy_requests())))
            frame = gradient(0)
            cases = {
                "media before config": (requests(rgb_request(frame, 0.0)), grpc.StatusCode.FAILED_PRECONDITION),
                "bad config": (requests(replay_config(max_caption_tokens=10_000)), grpc.StatusCode.INVALID_ARGUMENT),
                "second config": (requests(replay_config(), replay_config()), grpc.StatusCode.FAILED_PRECONDITION),
                "wrong dimensions": (
                    requests(replay_config(), pb.StreamDescribeRequest(media=pb.MediaChunk(raw=pb.RawFrame(
                        width=640, height=48, format=pb.PIXEL_FORMAT_RGB24, data=frame.tobytes())))),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                "frame over max size": (
                    requests(replay_config(), i420_request(np.zeros((375, 330), np.uint8), 330, 250, 0.0)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                "unknown codec": (requests(replay_config(), encoded_request(b"\0\0\0\1", 99, 0.0)),
                                  grpc.StatusCode.INVALID_ARGUMENT),
                "oversize message": (requests(replay_config(), rgb_request(np.zeros((240, 320, 3), np.uint8), 0.0)),
                                     grpc.StatusCode.RESOURCE_EXHAUSTED),
                "timestamps backwards": (requests(replay_config(), rgb_request(frame, 1.0), rgb_request(frame, 0.5)),
                                         grpc.StatusCode.INVALID_ARGUMENT),
                "timestamp past 2^53 us": (requests(replay_config(), encoded_request(b"\0\0\0\1", pb.CODEC_H264, 1e13)),
                                           grpc.StatusCode.INVALID_ARGUMENT),
                "nanoseconds as seconds": (requests(replay_config(caption_every_s=0.5), rgb_request(frame, 0.0),
                                                    rgb_request(frame, 1.8e9)), grpc.StatusCode.OUT_OF_RANGE),
                "nan sampling": (requests(replay_config(sampling_fps=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT),
                "cadence too fine": (requests(replay_config(caption_every_s=1e-7)), grpc.StatusCode.INVALID_ARGUMENT),
                "visual budget over the cap": (requests(replay_config(visual_token_budget=2**32 - 1)),
                                               grpc.StatusCode.INVALID_ARGUMENT),
            }
            messages = {
                "timestamp past 2^53 us": "timestamp_s must be a finite number of seconds in [0, 9007199254.740992]",
                "nanoseconds as seconds": "past the server's max stream duration",
                "nan sampling": "sampling_fps must be a finite number in [0, 240], got nan",
                "cadence too fine": "caption_every_s must be a finite number in 0 or [0.001, 14400]",
                "visual budget over the cap": "over the server's limit of 16384 (--max-visual-tokens)",
            }
            for name, (reqs, want) in cases.items():
                _, code, details = await outcome(client.describe(reqs))
                assert code == want, f"{name}: got {code} ({details})"
                assert details, name
                assert messages.get(name, "") in details, (name, details)
            # an empty chunk is reported in band alone: the decoder state is untouched for the chunks after it
            packets = encode("libx264", [gradient(i) for i in range(17)])
            chunks = [encoded_request(p, pb.CODEC_H264, i * 0.25) for i, p in enumerate(packets)]
            empty = encoded_request(b"", pb.CODEC_H264, 1.0)
            out, code, details = await outcome(client.describe(requests(
                replay_config(max_caption_tokens=2, caption_every_s=0, sampling_fps=10.0), *chunks[:4], empty,
                *chunks[4:],
            )))
            assert code == grpc.StatusCode.OK, details
            errors = [r.error for r in out if r.WhichOneof("response") == "error"]
            assert [(e.code, e.media_time_s) for e in errors] == [(pb.StreamError.DECODE_ERROR, 1.0)]
            assert "empty" in errors[0].message and stats(out)[-1].frames_ingested == len(packets)
            # a corrupt encoded chunk is reported in band; the stream goes on and captions the good chunks
            packets = encode("libx264", [gradient(i) for i in range(6)])
            reqs = [replay_config(max_caption_tokens=3)]
            reqs += [encoded_request(p, pb.CODEC_H264, i * 0.5) for i, p in enumerate(packets[:3])]
            reqs.append(encoded_request(b"\0\0\0\1\x65garbage" * 20, pb.CODEC_H264, 1.5))
            reqs += [encoded_request(p, pb.CODEC_H264, 2.0 + i * 0.5) for i, p in enumerate(packets[3:])]
            out, code, details = await outcome(client.describe(requests(*reqs)))
            assert code == grpc.StatusCode.OK, details
            errors = [r.error for r in out if r.WhichOneof("response") == "error"]
            assert [e.code for e in errors] == [pb.StreamError.DECODE_ERROR] and errors[0].media_time_s == 1.5
            assert len(finals(out)) == 1 and stats(out)[-1].frames_ingested == len(packets)
            # too many streams: the healthy stream and one more fill the server
            holder_gate = asyncio.Event()
            holder = client.describe(requests(replay_config(), gate=holder_gate))
            first = await holder.read()
            assert first.event.type == pb.StreamEvent.STREAM_STARTED
            _, code, details = await outcome(client.describe(requests(replay_config())))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many open streams" in details
            holder_gate.set()
            assert (await outcome(holder))[1] == grpc.StatusCode.OK
            # a wrong token and no token
            for token in ("wrong", None):
                async with CaptionClient(target, token=token) as other:
                    _, code, _ = await outcome(other.describe(requests(replay_config())))
                    assert code == grpc.StatusCode.UNAUTHENTICATED
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await other.model_info()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert not healthy.done()
            gate.set()
            out, code, details = await healthy
        assert code == grpc.StatusCode.OK, details
        assert [(f.text, f.start_s, f.end_s) for f in finals(out)] == expected
        assert await wait_until(lambda: server.streams_open == 0)

    run_with_server(engine, body, limits=limits, auth_token=TOKEN)


def test_cancel_mid_stream_frees_the_stream(engine, clip) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:

            async def endless():
                yield replay_config(caption_every_s=1.0)
                for i in range(10_000):
                    yield rgb_request(clip[i % len(clip)][0], i * 0.5)

            call = client.describe(endless())
            async for r in call:
                if r.WhichOneof("response") == "caption" and r.caption.is_final:
                    break
            (stream,) = server.worker.open_streams()
            session = weakref.ref(stream.session)
            del stream
            assert server.streams_open == 1 and (await client.model_info()).streams_open == 1
            call.cancel()
            assert await wait_until(lambda: server.streams_open == 0)
            assert (await client.model_info()).streams_open == 0
            gc.collect()
            assert session() is None, "the cancelled stream's CaptionSession is still referenced"

    run_with_server(engine, body)


def test_live_mode_drops_stale_frames_replay_mode_never(engine, clip) -> None:
    limits = ServerLimits(queue_frames=4, live_max_lag_s=0.3)
    frames = [(clip[i % len(clip)][0], i * 0.1) for i in range(40)]  # 4 s of 10 fps media, sent at once

    async def body(server, target):
        async with CaptionClient(target) as client:
            live_cfg = replay_config(mode=pb.STREAM_MODE_LIVE, caption_every_s=2.0, max_caption_tokens=3,
                                     stats_interval_s=0.05, sampling_fps=10.0)
            live, code, details = await outcome(client.describe(frame_requests(live_cfg, frames)))
            assert code == grpc.StatusCode.OK, details
            replay_cfg = replay_config(caption_every_s=2.0, max_caption_tokens=3, stats_interval_s=0.05,
                                       sampling_fps=10.0)
            replay, code, details = await outcome(client.describe(frame_requests(replay_cfg, frames)))
            assert code == grpc.StatusCode.OK, details
        return live, replay

    result = {}

    async def run(server, target):
        result["live"], result["replay"] = await body(server, target)

    run_with_server(engine, run, limits=limits)
    live, replay = result["live"], result["replay"]
    dropped = sum(e.frames for e in events(live, pb.StreamEvent.FRAMES_DROPPED))
    last = stats(live)[-1]
    assert dropped > 0 and last.frames_dropped == dropped
    assert last.frames_ingested + last.frames_dropped == last.frames_received == 40
    assert [f.segment_id for f in finals(live)] == [0, 1]  # every segment still gets its final
    last = stats(replay)[-1]
    assert last.frames_dropped == 0 and last.frames_ingested == 40 and not events(replay, pb.StreamEvent.FRAMES_DROPPED)
    assert max(s.queue_depth for s in stats(replay)) <= 4  # backpressure held the client back


def test_stream_too_long_gets_its_final_then_out_of_range(engine, clip) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            frames = [(clip[i][0], i * 0.5) for i in range(10)]
            out, code, details = await outcome(
                client.describe(frame_requests(replay_config(caption_every_s=0, max_caption_tokens=3), frames))
            )
            assert code == grpc.StatusCode.OUT_OF_RANGE and "max stream duration" in details
            (final,) = finals(out)
            assert final.end_s == 3.5  # media up to the limit was captioned: its last frame, at 3.0, lasts 0.5 s

    run_with_server(engine, body, limits=ServerLimits(max_stream_s=3.0))


def test_drain_delivers_pending_final_and_refuses_new_streams(engine, clip) -> None:
    async def body(server, target):
        gate = asyncio.Event()
        async with CaptionClient(target) as client:
            frames = [rgb_request(rgb, ts) for rgb, ts in clip[:5]]
            call = client.describe(requests(replay_config(caption_every_s=0, max_caption_tokens=3), *frames, gate=gate))
            assert (await call.read()).event.type == pb.StreamEvent.STREAM_STARTED
            assert await wait_until(lambda: (held := server.worker.open_streams()) and not held[0].queue.items)
            drain = asyncio.create_task(server.drain())
            _, code, details = await outcome(client.describe(requests(replay_config())))
            assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
            out, code, details = await outcome(call)
            assert code == grpc.StatusCode.OK, details
            (final,) = finals(out)
            assert (final.start_s, final.end_s) == (0.0, 2 * clip[4][1] - clip[3][1])  # its last frame's end
            (end,) = events(out, pb.StreamEvent.STREAM_END)
            assert end.detail == "draining"
            await drain

    run_with_server(engine, body)


def test_flush_and_caption_now(engine, clip) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            reqs = [replay_config(caption_every_s=0, max_caption_tokens=3)]
            reqs += [rgb_request(rgb, ts) for rgb, ts in clip[:3]]
            reqs.append(control_request(pb.Control.CAPTION_NOW))
            reqs.append(control_request(pb.Control.CAPTION_NOW))  # nothing new: no caption
            reqs += [rgb_request(rgb, ts) for rgb, ts in clip[3:6]]
            reqs.append(control_request(pb.Control.FLUSH))
            reqs += [rgb_request(rgb, ts) for rgb, ts in clip[6:8]]
            reqs.append(control_request(pb.Control.END_OF_STREAM))
            out, code, details = await outcome(client.describe(requests(*reqs)))
            assert code == grpc.StatusCode.OK, details
            spans = [(f.segment_id, f.start_s, f.end_s) for f in finals(out)]
            # each ends one frame after its last frame
            ends = [2 * clip[i][1] - clip[i - 1][1] for i in (2, 5, 7)]
            assert spans == [(0, 0.0, ends[0]), (1, ends[0], ends[1]), (2, ends[1], ends[2])]
            assert [e.detail for e in events(out, pb.StreamEvent.SEGMENT_FINAL)] == ["request", "flush", "end"]

    run_with_server(engine, body)


def test_spans_include_the_last_frame_as_offline(engine, clip) -> None:
    """An 8 s clip at 8 fps replayed with a caption every 4 s, sampled at 1 fps: spans 0-4 and 4-8 (each frame
    lasts until the next, the frames the sampling skips included), equal to sparrow-caption's loop."""
    frames = [(clip[i % len(clip)][0], i / 8) for i in range(64)]
    expected = offline_captions(engine, frames, every_s=4.0, max_tokens=3, sampling_fps=1.0)
    assert [(start, end) for _, start, end in expected] == [(0.0, 4.0), (4.0, 8.0)]

    async def body(server, target):
        async with CaptionClient(target) as client:
            config = replay_config(caption_every_s=4.0, sampling_fps=1.0, max_caption_tokens=3)
            out, code, details = await outcome(client.describe(frame_requests(config, frames)))
            assert code == grpc.StatusCode.OK, details
            assert [(f.text, f.start_s, f.end_s) for f in finals(out)] == expected

    run_with_server(engine, body)


def test_tls(engine, tmp_path) -> None:
    cert_path, key_path = self_signed_cert(tmp_path, ca=True)

    async def body(server, target):
        async with CaptionClient(target, tls_ca=cert_path) as client:
            assert (await client.model_info()).frame_width == 64

    run_with_server(engine, body, tls_cert=cert_path, tls_key=key_path)
