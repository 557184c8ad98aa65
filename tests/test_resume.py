"""Resuming a lost stream on the single server (no cluster): StreamConfig.resume puts the finals so far back as
caption history, numbers on from the last final and keeps the lost call's segment boundaries; bad resume
points are INVALID_ARGUMENT naming what is wrong."""

from __future__ import annotations

import asyncio

import grpc

from service_support import CAPTION_EVERY_S, finals, outcome, replay_config, requests, run_with_server
from sparrow_core.timeline import Timeline
from streamer.client import CaptionClient, control_request, frame_requests, rgb_request
from streamer.proto import pb


def resume_config(first_ts: float, kept: list[pb.CaptionResult], **overrides) -> pb.StreamDescribeRequest:
    request = replay_config(**overrides)
    request.config.resume.first_timestamp_s = first_ts
    request.config.resume.finals.extend(kept)
    return request


def test_timeline_resumed_keeps_the_lost_streams_boundaries() -> None:
    timeline = Timeline(4.0)
    timeline.resume_at(0.0, 6.0)  # the last final closed early (CAPTION_NOW) at 6 s, inside segment 1
    assert not timeline.on_frame(6.0).caption_before
    assert not timeline.on_frame(7.5).caption_before
    crossing = timeline.on_frame(8.0)
    assert crossing.caption_before and crossing.caption_end_s == 8.0  # the boundary of the original stream


def test_a_resumed_stream_goes_on_after_its_last_final(engine, clip) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            whole, code, details = await outcome(client.describe(frame_requests(replay_config(), clip)))
            assert code == grpc.StatusCode.OK, details
            expected = finals(whole)
            assert [f.segment_id for f in expected] == [0, 1, 2]

            # a call that is lost after its first final, with part of segment 1 already sent
            gate = asyncio.Event()
            sent = [rgb_request(rgb, ts) for rgb, ts in clip if ts < 6.0]
            lost = client.describe(requests(replay_config(), *sent, gate=gate))
            got: list[pb.CaptionResult] = []
            async for response in lost:
                if response.WhichOneof("response") == "caption" and response.caption.is_final:
                    got.append(response.caption)
                    break
            lost.cancel()
            assert [f.segment_id for f in got] == [0]

            rest = [rgb_request(rgb, ts) for rgb, ts in clip if ts >= got[-1].end_s]
            resumed, code, details = await outcome(client.describe(requests(
                resume_config(clip[0][1], got), *rest, control_request(pb.Control.END_OF_STREAM))))
            assert code == grpc.StatusCode.OK, details
            after = finals(resumed)
            transcript = got + after
            # contiguous ids and the uninterrupted stream's spans: nothing lost, nothing twice
            assert [f.segment_id for f in transcript] == [0, 1, 2]
            assert [(f.start_s, f.end_s) for f in transcript] == [(f.start_s, f.end_s) for f in expected]
            assert got[0].text == expected[0].text

            # the bad resume points
            early = [rgb_request(clip[0][0], got[-1].end_s - 0.5)]
            _, code, details = await outcome(client.describe(requests(resume_config(0.0, got), *early)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "before 4.000s" in details, details
            gap = pb.CaptionResult(segment_id=2, text="x", start_s=got[0].end_s, end_s=got[0].end_s + CAPTION_EVERY_S)
            _, code, details = await outcome(client.describe(requests(resume_config(0.0, [got[0], gap]))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "consecutive ids" in details, details
            long = pb.CaptionResult(segment_id=0, text=" ".join(["a red ball"] * 40), start_s=0.0, end_s=4.0)
            _, code, details = await outcome(client.describe(requests(
                resume_config(0.0, [long]), *rest[:1], control_request(pb.Control.END_OF_STREAM))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_caption_tokens" in details, details

    run_with_server(engine, body)
