"""The service's edges over 127.0.0.1 with the real engine: bytes that are not a message, messages over the
size limit, idle and stopped clients, per-peer admission, reflection, and the memory gauges."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service_support import (
    BAD_UTF8_CONFIG,
    FRAME,
    GET_MODEL_INFO,
    offer_sdp,
    outcome,
    raw_describe,
    raw_requests,
    replay_config,
    requests,
    run_with_server,
    wait_until,
)
from streamer.admission import bearer_token_ok, peer_host
from streamer.client import CaptionClient, rgb_request
from streamer.proto import SERVICE_NAME, pb
from streamer.settings import ServerLimits
from streamer.webrtc import WebRTCOptions


def test_undecodable_messages_are_invalid_argument_with_the_fatal_copy(engine, caplog) -> None:
    async def body(server, target):
        async with grpc.aio.insecure_channel(target) as channel:
            config = replay_config().SerializeToString()
            cases = {
                "garbage first message": [b"\xff\xff\xff\xff"],
                "invalid UTF-8 in a string field": [BAD_UTF8_CONFIG],
                "garbage after the config": [config, rgb_request(FRAME, 0.0).SerializeToString(), b"\x0a\xff"],
            }
            for name, messages in cases.items():
                out, code, details = await outcome(raw_describe(channel)(raw_requests(*messages, then_wait=5.0)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {code} {details}"
                assert "undecodable StreamDescribeRequest" in details, name
                fatal = [r.error for r in out if r.WhichOneof("response") == "error"]
                assert [e.code for e in fatal] == [pb.StreamError.FATAL], name
            info = channel.unary_unary(GET_MODEL_INFO, request_serializer=None,
                                       response_deserializer=pb.ModelInfo.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await info(b"\x0a\x05\xff", timeout=10)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "undecodable GetModelInfoRequest" in exc.value.details()
            assert (await info(b"", timeout=10)).frame_width == 64  # still serving
        assert await wait_until(lambda: server.streams_open == 0)

    run_with_server(engine, body)
    assert "DecodeError" not in caplog.text and "Traceback" not in caplog.text  # refused, not crashed


def test_oversize_message_is_resource_exhausted_with_the_fatal_copy(engine) -> None:
    limit = 100_000

    async def body(server, target):
        async with CaptionClient(target) as client:
            big = rgb_request(np.zeros((200, 200, 3), np.uint8), 0.0)  # 120 KB: over the limit, under 2x
            for reqs in ([big], [replay_config(), big]):
                out, code, details = await outcome(client.describe(requests(*reqs)))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert f"max message size of {limit} bytes" in details
                fatal = [r.error for r in out if r.WhichOneof("response") == "error"]
                assert [(e.code, e.status) for e in fatal] == [(pb.StreamError.FATAL, "RESOURCE_EXHAUSTED")]
            out, code, details = await outcome(client.describe(requests(replay_config(), rgb_request(FRAME, 0.0))))
            assert code == grpc.StatusCode.OK, details

    run_with_server(engine, body, limits=ServerLimits(max_message_bytes=limit))


def test_idle_stream_ends_deadline_exceeded_and_is_counted(engine) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            # a config, one frame, then nothing: the slot is freed after the idle timeout
            out, code, details = await outcome(
                client.describe(raw_requests(replay_config(), rgb_request(FRAME, 0.0), then_wait=30.0)))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "idle timeout of 0.5s" in details, details
            assert out[0].event.type == pb.StreamEvent.STREAM_STARTED
            assert out[-1].error.code == pb.StreamError.FATAL  # the in-band copy (outcome checks it agrees)
            # no config at all: refused the same way, without holding a slot
            out, code, details = await outcome(client.describe(raw_requests(then_wait=30.0)))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no StreamConfig" in details, details
            assert out[-1].error.code == pb.StreamError.FATAL
            assert await wait_until(lambda: server.streams_open == 0)
        text = await asyncio.to_thread(scrape, server.metrics_port)
        assert "sparrow_streams_idle_timeout_total 2.0" in text

    run_with_server(engine, body, limits=ServerLimits(idle_timeout_s=0.5), metrics_port=0)


STOPPABLE_CLIENT = textwrap.dedent("""
    import sys, time
    import grpc
    from streamer.client import config_request, rgb_request
    from streamer.proto import pb, pb_grpc
    import numpy as np

    def reqs():
        yield config_request(mode=pb.STREAM_MODE_REPLAY, max_caption_tokens=2)
        yield rgb_request(np.zeros((64, 64, 3), np.uint8), 0.0)
        while True:  # a live client with nothing more to say: the stream stays open
            time.sleep(1)

    channel = grpc.insecure_channel(sys.argv[1])
    call = pb_grpc.CaptionerStub(channel).StreamDescribe(reqs())
    next(call)  # STREAM_STARTED
    print("started", flush=True)
    for _ in call:
        pass
""")


def test_a_stopped_client_is_dropped_by_keepalive(engine) -> None:
    async def body(server, target):
        proc = subprocess.Popen([sys.executable, "-c", STOPPABLE_CLIENT, target], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).parent)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line.strip() == "started"
            assert server.streams_open == 1
            os.kill(proc.pid, signal.SIGSTOP)  # the socket stays open; nobody answers pings
            assert await wait_until(lambda: server.streams_open == 0, timeout=30), "the stopped client kept its slot"
        finally:
            proc.kill()
            proc.wait(10)

    # no idle timeout here: only keepalive can notice the stopped process
    run_with_server(engine, body, limits=ServerLimits(idle_timeout_s=0), keepalive_s=0.5, keepalive_timeout_s=0.5)


def test_per_peer_cap_counts_grpc_and_webrtc_together(engine) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            gate = asyncio.Event()
            holder = client.describe(requests(replay_config(), gate=gate))
            assert (await holder.read()).event.type == pb.StreamEvent.STREAM_STARTED
            limits = (await client.model_info()).limits
            assert (limits.max_streams_per_peer, limits.idle_timeout_s) == (1, ServerLimits().idle_timeout_s)
            _, code, details = await outcome(client.describe(requests(replay_config())))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-peer limit is 1" in details, details
            async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{server.http_port}/offer", json={"sdp": await offer_sdp(), "type": "offer"},
            ) as r:
                status, text = r.status, await r.text()
            assert status == 503 and "per-peer limit is 1" in text, text
            assert server.streams_open == 1  # refused streams hold nothing
            gate.set()
            assert (await outcome(holder))[1] == grpc.StatusCode.OK
            assert await wait_until(lambda: server.streams_open == 0)

    run_with_server(engine, body, limits=ServerLimits(max_streams=4, max_streams_per_peer=1),
                    http=WebRTCOptions(address="127.0.0.1:0", ice_hosts=("127.0.0.1",)))


def test_reflection_is_opt_in_and_health_needs_no_token(engine) -> None:
    async def list_services(channel) -> set[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            return {s.name for s in r.list_services_response.service}
        return set()

    async def closed(server, target):
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await list_services(channel)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def opened(server, target):
        async with grpc.aio.insecure_channel(target) as channel:
            assert SERVICE_NAME in await list_services(channel)

    run_with_server(engine, closed, auth_token="s3cret")
    run_with_server(engine, opened, reflection=True)


def test_token_check_and_peer_names() -> None:
    assert bearer_token_ok(None, None) and bearer_token_ok("anything", "")
    assert bearer_token_ok("Bearer s3cret", "s3cret") and bearer_token_ok("bearer  s3cret ", "s3cret")
    for header in (None, "", "s3cret", "Bearer s3cre", "Basic s3cret", "Bearer s3cret2"):
        assert not bearer_token_ok(header, "s3cret"), header
    assert peer_host("ipv4:127.0.0.1:51234") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:51234") == peer_host("ipv6:%5B::1%5D:51234") == "::1"
    assert peer_host("::ffff:10.0.0.7") == "10.0.0.7" and peer_host("127.0.0.1") == "127.0.0.1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock" and peer_host(None) == "unknown"


def test_keepalive_and_connect_timeouts_must_be_positive() -> None:
    from streamer.server import ServerOptions, grpc_server_options

    for bad in (dict(keepalive_s=0), dict(keepalive_s=-1), dict(keepalive_timeout_s=float("nan"))):
        with pytest.raises(ValueError, match="keepalive"):
            ServerOptions(**bad)
    with pytest.raises(ValueError, match="connect_timeout_s"):
        WebRTCOptions(connect_timeout_s=0)
    args = dict(grpc_server_options(ServerOptions(keepalive_s=2.5, limits=ServerLimits(max_message_bytes=1000))))
    assert args["grpc.keepalive_time_ms"] == 2500 and args["grpc.max_receive_message_length"] == 2000


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def gauge(text: str, name: str, agg: str) -> float:
    return float(re.search(rf'^{name}{{agg="{agg}"}} (\S+)$', text, re.M).group(1))


def test_memory_gauges_while_a_stream_is_open(engine) -> None:
    async def body(server, target):
        async with CaptionClient(target) as client:
            gate = asyncio.Event()
            frames = [rgb_request(np.full((64, 64, 3), 30 * i, np.uint8), i * 0.5) for i in range(4)]
            call = client.describe(requests(replay_config(caption_every_s=0), *frames, gate=gate))
            assert (await call.read()).event.type == pb.StreamEvent.STREAM_STARTED
            def ingested() -> bool:
                held = server.worker.open_streams()
                return bool(held) and not held[0].queue.items and held[0].media_ingested_s == 1.5

            assert await wait_until(ingested, 60)
            text = await asyncio.to_thread(scrape, server.metrics_port)
            kv = gauge(text, "sparrow_stream_kv_bytes", "sum")
            visual = gauge(text, "sparrow_stream_visual_tokens", "sum")
            assert kv > 0 and kv == gauge(text, "sparrow_stream_kv_bytes", "max")  # one stream: sum == max
            assert visual > 0 and visual == gauge(text, "sparrow_stream_visual_tokens", "max")
            assert gauge(text, "sparrow_stream_queue_depth", "sum") == 0  # all four ingested
            assert "sparrow_visual_tokens_evicted_total" in text
            gate.set()
            out, code, details = await outcome(call)
            assert code == grpc.StatusCode.OK, details
            # what the stream reports of itself agrees (a caption adds text, not visual tokens)
            assert [r.stats.visual_tokens for r in out if r.WhichOneof("response") == "stats"][-1] == visual
        assert await wait_until(lambda: server.streams_open == 0)
        text = await asyncio.to_thread(scrape, server.metrics_port)
        assert gauge(text, "sparrow_stream_kv_bytes", "sum") == 0 == gauge(text, "sparrow_stream_visual_tokens", "max")

    run_with_server(engine, body, metrics_port=0)


def test_offer_json_is_bounded_and_typed() -> None:
    from streamer.webrtc import MAX_JSON_DEPTH, json_depth, loads_client_json, stream_config

    assert json_depth('{"a": "[[[{{{", "b": [1, {"c": "\\"]"}]}') == 3
    assert json_depth("[" * 30_000 + "]" * 30_000) == 30_000 > MAX_JSON_DEPTH
    for data in ("[" * 30_000 + "]" * 30_000, b"\xff", "{", '{"type": "end"'):
        with pytest.raises(ValueError):
            loads_client_json(data)
    assert loads_client_json(b'{"type": "end"}') == {"type": "end"}
    for options in ({"instruction": ["x"]}, {"label": {"a": 1}}, {"decoding": ["ar"]}, {"interim": [True]},
                    {"caption_every_s": [1]}, {"seed": {"x": 1}}, {"temperature": "nan"}):
        with pytest.raises(ValueError):
            stream_config(options)
    assert stream_config({"instruction": "say it", "interim": "true"}).interim_results


def test_offer_bodies_get_4xx(engine) -> None:
    async def post(http: str, data: bytes | str) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s, s.post(f"{http}/offer", data=data,
                                                        headers={"Content-Type": "application/json"}) as r:
            return r.status, json.loads(await r.text())

    async def body(server, target):
        http = f"http://127.0.0.1:{server.http_port}"
        sdp = await offer_sdp()
        deep = "[" * 30_000 + "]" * 30_000  # 60 KB, under the body limit
        cases = [
            deep,
            json.dumps({"sdp": sdp, "type": "offer", "instruction": json.loads("[" * 3 + "]" * 3)}),
            json.dumps({"sdp": sdp, "type": ["offer"]}),
            json.dumps({"sdp": [sdp], "type": "offer"}),
            json.dumps({"sdp": sdp, "type": "offer", "label": 7}),
            json.dumps({"sdp": sdp, "type": "offer", "decoding": {"x": 1}}),
            b'{"sdp": "\xff", "type": "offer"}',
        ]
        for i, data in enumerate(cases):
            status, answer = await post(http, data)
            assert status == 400 and answer["error"], (i, status, answer)
        assert server.streams_open == 0
        async with aiohttp.ClientSession() as s, s.get(f"{http}/healthz") as r:
            assert r.status == 200

    run_with_server(engine, body, http=WebRTCOptions(address="127.0.0.1:0", ice_hosts=("127.0.0.1",)))
