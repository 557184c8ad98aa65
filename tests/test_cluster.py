"""`sparrow-stream cluster` on a local Ray: two CPU replicas of the default model behind the cluster front.

One cluster for the module (Ray and two model replicas take a while to start on a small machine): concurrent
replays spread over both replicas with the single server's greedy finals, a full cluster's refusal, the single
server's bad-input statuses through the front, and last a replica killed mid-stream whose streams resume on the
other with contiguous transcripts.
"""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from service_support import (
    BAD_UTF8_CONFIG,
    FRAME,
    GET_MODEL_INFO,
    SEND_FPS,
    finals,
    model_dir,
    offline_captions,
    outcome,
    raw_describe,
    raw_requests,
    replay_config,
    requests,
    run_with_server,
    wait_until,
)
from streamer.client import CaptionClient, ResumableStream, control_request, rgb_request
from streamer.cluster.app import APP_NAME, REPLICA, ClusterSpec, build_app, start_local_ray
from streamer.cluster.front import ReplicaMetricsCollector, ReplicaReport
from streamer.metrics import ServiceMetrics
from streamer.proto import pb
from streamer.settings import ServerLimits

TOKEN = "s3cret"
# per replica: two streams each, a small message limit for the oversize case, no per-peer cap (every test
# stream comes from 127.0.0.1)
LIMITS = ServerLimits(max_streams=2, max_streams_per_peer=0, max_message_bytes=100_000)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(the front's deployment handle, its address) with two live replicas; Ray is shut down afterwards."""
    model = model_dir(tmp_path_factory.mktemp("model"))
    start_local_ray(num_cpus=4, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        spec = ClusterSpec(address="127.0.0.1:0", model=str(model), limits=LIMITS, auth_token=TOKEN, threads=1,
                           report_interval_s=0.25, drain_grace_s=5.0, metrics_port=0)
        front = serve.run(build_app(spec, replicas=2), name=APP_NAME, route_prefix=None)
        target = front.address.remote(2).result()
        assert len(front.replica_ids.remote().result()) == 2
        yield front, target
    finally:
        serve.shutdown()
        ray.shutdown()


async def streams_on_replicas(front, until, timeout: float = 120.0) -> dict[str, int]:
    """The live replicas' open streams, once until(them) holds (or at the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        streams = await front.replica_ids.remote()
        if until(streams) or loop.time() > deadline:
            return streams
        await asyncio.sleep(0.1)


def test_concurrent_replays_spread_over_replicas_with_the_single_servers_finals(cluster, engine, clip) -> None:
    front, target = cluster
    expected = offline_captions(engine, clip, sampling_fps=SEND_FPS)  # what the single server gives (its e2e test)
    seen: list[dict[str, int]] = []

    async def main() -> None:
        async with CaptionClient(target, token=TOKEN) as client:
            info = await client.model_info()
            assert info.limits.max_streams == 2 * LIMITS.max_streams  # the cluster's, over both replicas
            gate = asyncio.Event()
            held = [client.describe(requests(replay_config(), *[rgb_request(rgb, ts) for rgb, ts in clip],
                                             control_request(pb.Control.END_OF_STREAM), gate=gate))
                    for _ in range(4)]
            tasks = [asyncio.ensure_future(outcome(call)) for call in held]
            seen.append(await streams_on_replicas(front, lambda streams: sum(streams.values()) == 4))
            # the cluster is full (2 + 2): a fifth stream is refused by the last replica tried
            _, code, details = await outcome(client.describe(requests(replay_config())))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the server's limit is 2" in details, details
            gate.set()
            for responses, code, details in await asyncio.gather(*tasks):
                assert code == grpc.StatusCode.OK, details
                assert [(f.text, f.start_s, f.end_s) for f in finals(responses)] == expected

    asyncio.run(main())
    assert sorted(seen[0].values()) == [2, 2], seen  # fewest open streams first: spread over both


def test_the_fronts_metrics_hold_every_replicas_series(cluster) -> None:
    """One scrape of the front gives each replica's own series with its replica id: the streams each replica
    counted match the streams the front placed on it (after the replays above, or none yet)."""
    front, _ = cluster
    replicas = set(front.replica_ids.remote().result())
    port = front.metrics_port.remote().result()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        samples = [s for family in text_string_to_metric_families(answer.read().decode()) for s in family.samples]

    def by_replica(name: str) -> dict[str, float]:
        return {s.labels["replica"]: s.value for s in samples if s.name == name}

    assert by_replica("sparrow_cluster_replica_scraped") == {rid: 1.0 for rid in replicas}
    assert set(by_replica("sparrow_streams_open")) == replicas  # a replica's gauge, once per replica
    accepted = by_replica("sparrow_streams_total")
    placed = by_replica("sparrow_cluster_streams_placed_total")
    assert {rid: accepted[rid] for rid in placed} == placed, (accepted, placed)
    assert sum(accepted.values()) == sum(placed.values())


def test_replica_metrics_merge_into_one_family_per_name_and_a_silent_replica_is_named() -> None:
    """Without Ray: two replicas' real /metrics endpoints and one whose port answers nothing."""
    replicas = {rid: ServiceMetrics({"replica": rid}) for rid in ("r1", "r2")}
    ports = {rid: metrics.serve_http(0) for rid, metrics in replicas.items()}
    replicas["r1"].streams_total.inc(3)
    replicas["r2"].frames_dropped.inc(5)
    silent = ServiceMetrics({"replica": "r3"})
    silent_port = silent.serve_http(0)
    silent.close()  # its port is free now: nothing answers there

    def report(rid: str, port: int) -> ReplicaReport:
        return ReplicaReport(replica_id=rid, address="127.0.0.1:1", metrics_address=f"127.0.0.1:{port}",
                             streams_open=0, max_streams=1, kv_bytes=0, serving=True)

    collector = ReplicaMetricsCollector(lambda: [report("r1", ports["r1"]), report("r2", ports["r2"]),
                                                 report("r3", silent_port)])
    try:
        families = {family.name: family for family in collector.collect()}
    finally:
        collector.close()
        for metrics in replicas.values():
            metrics.close()
    assert {s.labels["replica"]: s.value for s in families["sparrow_cluster_replica_scraped"].samples} == \
        {"r1": 1.0, "r2": 1.0, "r3": 0.0}
    values = {(s.name, s.labels["replica"]): s.value for family in families.values() for s in family.samples
              if "replica" in s.labels}
    assert values[("sparrow_streams_total", "r1")] == 3 and values[("sparrow_streams_total", "r2")] == 0
    assert values[("sparrow_frames_dropped_total", "r2")] == 5
    assert not any(rid == "r3" for name, rid in values if name != "sparrow_cluster_replica_scraped")


def test_bad_input_gets_the_single_servers_statuses_through_the_front(cluster, engine) -> None:
    _, target = cluster
    big = rgb_request(np.zeros((200, 200, 3), np.uint8), 0.0).SerializeToString()  # over 100 KB, under 2x
    config = replay_config().SerializeToString()
    cases = {
        "garbage first message": [b"\xff\xff\xff\xff"],
        "invalid UTF-8 in a string field": [BAD_UTF8_CONFIG],
        "garbage after the config": [config, rgb_request(FRAME, 0.0).SerializeToString(), b"\x0a\xff"],
        "oversize message": [config, big],
        "media before the config": [rgb_request(FRAME, 0.0).SerializeToString()],
        "a second config": [config, config],
        "a bad config": [replay_config(max_caption_tokens=100_000).SerializeToString()],
        "timestamps going backwards": [config, rgb_request(FRAME, 2.0).SerializeToString(),
                                       rgb_request(FRAME, 1.0).SerializeToString()],
        "resume before the last final": [replay_config().SerializeToString(), rgb_request(FRAME, 0.0).SerializeToString()],
    }
    resume = replay_config()
    resume.config.resume.finals.add(segment_id=0, text="a", start_s=0.0, end_s=4.0)
    cases["resume before the last final"][0] = resume.SerializeToString()

    async def statuses(address: str, token: str | None) -> dict[str, tuple[grpc.StatusCode, str, list[str]]]:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        got = {}
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 2**24)]) as channel:
            for name, messages in cases.items():
                call = raw_describe(channel)(raw_requests(*messages, then_wait=5.0), metadata=metadata)
                out, code, details = await outcome(call)
                got[name] = (code, details, [r.error.status for r in out if r.WhichOneof("response") == "error"])
            call = raw_describe(channel)(raw_requests(config, then_wait=5.0))  # no token
            got["no token"] = (await outcome(call))[1:] + ([],)
            info = channel.unary_unary(GET_MODEL_INFO, request_serializer=None)
            try:
                await info(b"\x0a\x05\xff", timeout=10, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                got["undecodable GetModelInfo"] = (exc.code(), exc.details(), [])
        return got

    single: dict = {}

    async def on_single(server, address):
        single.update(await statuses(address, TOKEN))

    run_with_server(engine, on_single, limits=LIMITS, auth_token=TOKEN)
    through_front = asyncio.run(statuses(target, TOKEN))
    assert through_front["no token"][0] == grpc.StatusCode.UNAUTHENTICATED
    assert through_front["oversize message"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert through_front["resume before the last final"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert through_front == single


def test_a_killed_replica_s_streams_resume_on_the_other(cluster, clip) -> None:
    front, target = cluster
    long_clip = clip + [(rgb, ts + 12.0) for rgb, ts in clip]  # 24 s: six segments

    async def main() -> tuple[list[list[pb.CaptionResult]], list[int]]:
        # live, paced in real time: both streams are still open when the replica dies
        config = replay_config(mode=pb.STREAM_MODE_LIVE, max_caption_tokens=6).config
        streams = [ResumableStream(target, config, long_clip, realtime=True, token=TOKEN) for _ in range(2)]
        finals_by_stream: list[list[pb.CaptionResult]] = [[], []]

        async def run(i: int) -> None:
            async for response in streams[i].responses():
                if response.WhichOneof("response") == "caption" and response.caption.is_final:
                    finals_by_stream[i].append(response.caption)

        tasks = [asyncio.ensure_future(run(i)) for i in range(2)]
        # once each stream has a final, kill a replica serving one
        await wait_until(lambda: all(finals_by_stream), timeout=120)
        placed = await streams_on_replicas(front, lambda open_streams: sum(open_streams.values()) == 2)
        victim = next(rid for rid, n in placed.items() if n > 0)
        ray.kill(ray.get_actor(replica_actor_name(victim), namespace="serve"), no_restart=True)
        await asyncio.wait_for(asyncio.gather(*tasks), 240)
        return finals_by_stream, [s.resumes for s in streams]

    finals_by_stream, resumes = asyncio.run(main())
    assert sum(resumes) >= 1, resumes  # at least the stream on the killed replica was resumed
    for got in finals_by_stream:
        assert [f.segment_id for f in got] == list(range(6)), [f.segment_id for f in got]  # no gap, no repeat
        spans = [(f.start_s, f.end_s) for f in got]
        assert spans[0][0] == 0.0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
        assert spans[-1][1] == pytest.approx(24.0)


def replica_actor_name(replica_id: str) -> str:
    """The Ray actor of a Serve replica (Serve's own naming; ray.serve._private, the one way to reach it)."""
    from ray.serve._private.common import DeploymentID, ReplicaID

    return ReplicaID(replica_id, DeploymentID(REPLICA, APP_NAME)).to_full_id_str()
