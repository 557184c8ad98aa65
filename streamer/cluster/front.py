"""The cluster front: one gRPC endpoint for sparrow.v1.Captioner that places each stream on a replica and relays
its messages, as bytes, both ways. Every rule of the contract (request decoding, auth, limits, statuses and their
in-band FATAL copies) is the replica's own `SparrowServer`; the front adds only placement and failover:

- A new stream goes to the live replica with the fewest open streams (then the least KV held). Its first message
  (the config) is kept; when a replica refuses the stream with RESOURCE_EXHAUSTED (full) or UNAVAILABLE
  (draining), or cannot be reached, the stream is offered to the next one, so it fails only when no replica has
  room (the last refusal is what the client gets). Once a replica answers STREAM_STARTED, the stream stays on it.
- A replica lost mid-stream (its call breaks without the FATAL copy every status of a replica carries) ends the
  client's call with UNAVAILABLE, with its own FATAL copy: the client resumes with StreamConfig.resume, and the
  front places the resumed stream on a live replica.
- Replicas report themselves (`ReplicaReport`) every `report_interval_s`; one silent for `stale_after_s`, or
  whose connection broke, gets no new streams. `GetModelInfo` is answered by a live replica, with the cluster's
  open streams and stream limit (sums over the live replicas).
- The front's /metrics holds every replica's series too (`ReplicaMetricsCollector`, read at scrape time), each
  with its replica id: one scrape target for the cluster.

The front knows nothing of Ray: streamer/cluster/app.py runs it as a Serve deployment and feeds it the reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from streamer.client import call_status
from streamer.grpc_front.responses import fatal_response
from streamer.grpc_front.wire import transport_receive_limit
from streamer.proto import SERVICE_NAME, pb
from streamer.server import ServerOptions, grpc_server_options

log = logging.getLogger(__name__)

PEER_HEADER = "x-sparrow-peer"  # the client's address, as the front saw it (a replica's Admission.peer_header)
_RETRY_ELSEWHERE = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})  # a replica's refusal of a new stream


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica says of itself (every report_interval_s)."""

    replica_id: str
    address: str  # host:port of its gRPC server
    metrics_address: str  # host:port of its /metrics ("" when none)
    streams_open: int
    max_streams: int
    kv_bytes: int  # KV held by its open streams
    serving: bool  # False while draining


class ReplicaLink:
    """The front's view of one replica: its last report, a channel to it, and the streams the front has open on it."""

    def __init__(self, report: ReplicaReport, max_message_bytes: int) -> None:
        self.report = report
        self.seen = time.monotonic()
        self.lost = False  # a call to it broke: no new streams until it reports again
        self.calls = 0  # streams this front has open on it
        limit = transport_receive_limit(max_message_bytes)
        self.channel = grpc.aio.insecure_channel(report.address, options=[
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
        self.stream_describe = self.channel.stream_stream(f"/{SERVICE_NAME}/StreamDescribe")  # bytes both ways
        self.get_model_info = self.channel.unary_unary(f"/{SERVICE_NAME}/GetModelInfo")

    @property
    def replica_id(self) -> str:
        return self.report.replica_id

    @property
    def streams(self) -> int:
        """Open streams: what it reported, or what this front opened on it since, whichever is more."""
        return max(self.calls, self.report.streams_open)

    def live(self, now: float, stale_after_s: float) -> bool:
        return not self.lost and self.report.serving and now - self.seen <= stale_after_s


class ClientRequests:
    """One client call's request stream, shared by the calls the front opens upstream for it: the first message
    is read once (whichever replica is tried first reads it, under that replica's idle timeout) and sent to every
    replica tried; the rest go only to the replica that took the stream (`placed`)."""

    def __init__(self, requests: AsyncIterator[bytes]) -> None:
        self._requests = aiter(requests)
        self._first: asyncio.Future | None = None
        self._placed = asyncio.Event()
        self._placed_on: str | None = None

    def place(self, replica_id: str) -> None:
        """The stream is on `replica_id`: the rest of the client's messages go to that attempt alone."""
        self._placed_on = replica_id
        self._placed.set()

    async def for_replica(self, replica_id: str) -> AsyncIterator[bytes]:
        if self._first is None:
            self._first = asyncio.ensure_future(anext(self._requests, None))
        first = await asyncio.shield(self._first)  # an attempt given up on does not cancel the read
        if first is None:
            return
        yield first
        await self._placed.wait()
        if self._placed_on != replica_id:  # a refused attempt: it never reads the client's stream
            return
        async for request in self._requests:
            yield request

    def close(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.cancel()


class ReplicaMetricsCollector(Collector):
    """Every replica's /metrics, read at scrape time, on the front's: one scrape target gives the whole cluster.
    Each replica labels its own series with its replica id (`SparrowServer`'s metrics_labels), so the
    families of all replicas merge into one family per name; `sparrow_cluster_replica_scraped{replica}` says
    whose answered (0: unreachable or slow, its series are missing from this scrape)."""

    def __init__(self, replicas: Callable[[], list[ReplicaReport]], timeout_s: float = 2.0) -> None:
        self.replicas = replicas  # called on the scraping thread: must be safe there (a snapshot of the reports)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="replica-scrape")
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # replicas: never via a proxy

    def _scrape(self, report: ReplicaReport) -> list[Metric] | None:
        try:
            with self._http.open(f"http://{report.metrics_address}/metrics", timeout=self.timeout_s) as r:
                return list(text_string_to_metric_families(r.read().decode()))
        except (OSError, ValueError) as exc:
            log.warning("replica %s: /metrics at %s: %s", report.replica_id, report.metrics_address, exc)
            return None

    def collect(self) -> Iterator[Metric]:
        reports = [r for r in self.replicas() if r.metrics_address]
        merged: dict[str, Metric] = {}
        scraped = GaugeMetricFamily("sparrow_cluster_replica_scraped", "1 when the replica's /metrics answered this "
                                    "scrape (its series are in it), 0 when it did not", labels=["replica"])
        for report, families in zip(reports, self._pool.map(self._scrape, reports)):
            scraped.add_metric([report.replica_id], 0.0 if families is None else 1.0)
            for family in families or ():
                into = merged.setdefault(family.name, family)
                if into is not family:
                    into.samples += family.samples
        yield scraped
        yield from merged.values()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class FrontMetrics:
    """The front's own series, and (`ReplicaMetricsCollector`) every replica's, with its replica id."""

    def __init__(self, replicas: Callable[[], list[ReplicaReport]]) -> None:
        r = self.registry = CollectorRegistry()
        self.replica_metrics = ReplicaMetricsCollector(replicas)
        r.register(self.replica_metrics)
        self.replica_up = Gauge("sparrow_cluster_replica_up", "1 while a replica is live (reporting, reachable, "
                                "not draining)", ["replica", "address", "metrics"], registry=r)
        self.replica_streams = Gauge("sparrow_cluster_replica_streams", "Open streams of a replica",
                                     ["replica"], registry=r)
        self.placed = Counter("sparrow_cluster_streams_placed", "Streams a replica took", ["replica"], registry=r)
        self.redirected = Counter("sparrow_cluster_streams_redirected", "Refusals (full, draining, unreachable) "
                                  "after which a stream was offered to another replica", ["code"], registry=r)
        self.lost = Counter("sparrow_cluster_streams_lost", "Streams whose replica was lost mid-stream (ended "
                            "UNAVAILABLE for the client to resume)", registry=r)
        self._http = None

    def serve_http(self, port: int, addr: str) -> int:
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.replica_metrics.close()


class ClusterFront:
    def __init__(self, options: ServerOptions, stale_after_s: float = 3.0) -> None:
        self.options = options  # address, limits (message size), keepalive, metrics port, TLS
        self.stale_after_s = stale_after_s
        self.replicas: dict[str, ReplicaLink] = {}
        self.metrics = FrontMetrics(lambda: [link.report for link in list(self.replicas.values())])
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None

    # --- replicas --------------------------------------------------------------------------------
    def report(self, report: ReplicaReport) -> None:
        """A replica's report: a new replica joins, a known one is refreshed (and is live again)."""
        link = self.replicas.get(report.replica_id)
        if link is None or link.report.address != report.address:
            if link is not None:
                self._forget(link)
            link = self.replicas[report.replica_id] = ReplicaLink(report, self.options.limits.max_message_bytes)
            log.info("replica %s joined at %s", report.replica_id, report.address)
        link.report, link.seen, link.lost = report, time.monotonic(), False

    def live_replicas(self) -> list[ReplicaLink]:
        """Live replicas, least loaded first (fewest open streams, then least KV)."""
        now = time.monotonic()
        live = [link for link in self.replicas.values() if link.live(now, self.stale_after_s)]
        return sorted(live, key=lambda link: (link.streams / max(1, link.report.max_streams), link.streams,
                                              link.report.kv_bytes))

    def _forget(self, link: ReplicaLink) -> None:
        self.replicas.pop(link.replica_id, None)
        self.metrics.replica_up.remove(link.replica_id, link.report.address, link.report.metrics_address)
        self.metrics.replica_streams.remove(link.replica_id)
        asyncio.ensure_future(link.channel.close())

    async def _watch_replicas(self) -> None:
        """Health: the front's own grpc.health SERVING while any replica is live; per-replica gauges; replicas
        silent for 10x stale_after_s are forgotten (Serve has replaced them)."""
        while True:
            now = time.monotonic()
            for link in list(self.replicas.values()):
                if now - link.seen > 10 * self.stale_after_s:
                    log.info("replica %s forgotten (silent %.0fs)", link.replica_id, now - link.seen)
                    self._forget(link)
                    continue
                up = link.live(now, self.stale_after_s)
                self.metrics.replica_up.labels(link.replica_id, link.report.address,
                                               link.report.metrics_address).set(1 if up else 0)
                self.metrics.replica_streams.labels(link.replica_id).set(link.streams)
            status = health_pb2.HealthCheckResponse.SERVING if self.live_replicas() else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)
            await asyncio.sleep(min(0.5, self.stale_after_s / 2))

    # --- serving ---------------------------------------------------------------------------------
    async def start(self) -> int:
        opts = self.options
        self._server = grpc.aio.server(options=grpc_server_options(opts))
        handlers = {
            "StreamDescribe": grpc.stream_stream_rpc_method_handler(self.StreamDescribe),  # bytes: no decoding here
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(self.GetModelInfo),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if opts.tls_cert is not None and opts.tls_key is not None:
            creds = grpc.ssl_server_credentials([(opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())])
            self.port = self._server.add_secure_port(opts.address, creds)
        else:
            self.port = self._server.add_insecure_port(opts.address)
        if not self.port:
            raise OSError(f"could not bind {opts.address}")
        await self._server.start()
        self._watch = asyncio.create_task(self._watch_replicas(), name="watch-replicas")
        if opts.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(opts.metrics_port, opts.metrics_address)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for link in list(self.replicas.values()):
            await link.channel.close()
        self.replicas.clear()
        self.metrics.close()

    @staticmethod
    def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
        """The metadata a replica gets: the client's bearer token, and its address (PEER_HEADER)."""
        metadata = dict(context.invocation_metadata() or ())
        forwarded = [(PEER_HEADER, context.peer() or "")]
        if "authorization" in metadata:
            forwarded.append(("authorization", metadata["authorization"]))
        return tuple(forwarded)

    async def GetModelInfo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        last: grpc.aio.AioRpcError | None = None
        live = self.live_replicas()
        for link in live:
            try:
                answer = await link.get_model_info(request, metadata=self._forwarded(context), timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # the replica's own answer (auth, decoding)
                    await context.abort(exc.code(), exc.details() or "")
                link.lost, last = True, exc
                continue
            info = pb.ModelInfo.FromString(answer)  # the cluster's totals, not the one replica's
            info.streams_open = sum(link.streams for link in live)
            info.limits.max_streams = sum(link.report.max_streams for link in live)
            return info.SerializeToString()
        await context.abort(grpc.StatusCode.UNAVAILABLE, self._no_replica(last))

    def _no_replica(self, last: grpc.aio.AioRpcError | None) -> str:
        message = f"no replica is serving ({len(self.replicas)} known, none live); retry later"
        return message + (f"; the last one tried said {last.code().name}: {last.details()}" if last else "")

    async def StreamDescribe(self, requests: AsyncIterator[bytes],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        client = ClientRequests(requests)
        tried: set[str] = set()
        refusal: tuple[bytes, grpc.StatusCode, str] | None = None  # the last replica's refusal, passed on
        unreachable: grpc.aio.AioRpcError | None = None
        try:
            while True:
                link = next((r for r in self.live_replicas() if r.replica_id not in tried), None)
                if link is None:
                    if refusal is not None:
                        yield refusal[0]
                        await context.abort(refusal[1], refusal[2])
                    message = self._no_replica(unreachable)
                    yield fatal_response(grpc.StatusCode.UNAVAILABLE, message).SerializeToString()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, message)
                tried.add(link.replica_id)
                link.calls += 1  # counted from the attempt on, so that streams opening together spread
                call = link.stream_describe(client.for_replica(link.replica_id), metadata=self._forwarded(context))
                try:
                    try:
                        first = await call.read()
                    except grpc.aio.AioRpcError as exc:  # nothing answered: the replica is gone; the config is kept
                        link.lost, unreachable = True, exc
                        self.metrics.redirected.labels(code="unreachable").inc()
                        continue
                    if first is grpc.aio.EOF:  # the client closed before sending anything: as the replica ended it
                        return
                    response = pb.StreamDescribeResponse.FromString(first)
                    if response.WhichOneof("response") == "error" and response.error.code == pb.StreamError.FATAL:
                        # refused: a full or draining replica's refusal sends the stream on; any other is the answer
                        code, details = await self._status(call, response.error)
                        if response.error.status in _RETRY_ELSEWHERE:
                            self.metrics.redirected.labels(code=response.error.status).inc()
                            refusal = (first, code, details)
                            continue
                        yield first
                        await context.abort(code, details)
                    client.place(link.replica_id)
                    self.metrics.placed.labels(replica=link.replica_id).inc()
                    yield first
                    async for item in self._relay(link, call, context):
                        yield item
                    return
                finally:
                    link.calls -= 1
                    call.cancel()
        finally:
            client.close()

    @staticmethod
    async def _status(call, fatal: pb.StreamError) -> tuple[grpc.StatusCode, str]:
        """How a replica ended a call after its FATAL copy (the copy wins over a transport INTERNAL)."""
        code, details = await call.code(), await call.details()
        call.cancel()  # done already; this also ends the task that was feeding it our requests
        if code == grpc.StatusCode.OK or (code == grpc.StatusCode.INTERNAL and fatal.status):
            return grpc.StatusCode[fatal.status], fatal.message
        return code, details

    async def _relay(self, link: ReplicaLink, call, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """The replica's responses, then its status; a call that breaks without a FATAL copy lost its replica."""
        fatal: pb.StreamError | None = None
        try:
            while (item := await call.read()) is not grpc.aio.EOF:  # read(), as for the first: one API per call
                response = pb.StreamDescribeResponse.FromString(item)
                if response.WhichOneof("response") == "error" and response.error.code == pb.StreamError.FATAL:
                    fatal = response.error
                yield item
        except grpc.aio.AioRpcError as exc:
            if fatal is not None:  # the replica ended the stream by the contract: its status
                await context.abort(*call_status(exc, fatal))
            link.lost = True
            self.metrics.lost.inc()
            message = (f"replica {link.replica_id} was lost mid-stream ({exc.code().name}: {exc.details()}); "
                       "open the stream again with StreamConfig.resume")
            log.warning("stream on %s", message)
            yield fatal_response(grpc.StatusCode.UNAVAILABLE, message).SerializeToString()
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
