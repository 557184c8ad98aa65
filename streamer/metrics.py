"""Prometheus metrics of one server, in its own CollectorRegistry (several servers may share a process)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
_FORWARD_STREAMS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_FORWARD_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class StreamLoad:
    """What one open stream holds, as the model worker last measured it."""

    kv_bytes: int  # the valid part of the stream's KV cache
    visual_tokens: int  # visual tokens in its context (after eviction)
    queue_depth: int  # frames waiting for the model


class StreamLoadCollector(Collector):
    """Gauges over the open streams, read at scrape time: `sparrow_stream_<what>{agg="sum"|"max"}`."""

    GAUGES = (
        ("kv_bytes", "KV cache bytes held by open streams"),
        ("visual_tokens", "Visual tokens in the context of open streams"),
        ("queue_depth", "Frames queued for the model by open streams"),
    )

    def __init__(self, source: Callable[[], list[StreamLoad]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loads = self.source()
        for name, doc in self.GAUGES:
            values = [getattr(load, name) for load in loads]
            family = GaugeMetricFamily(f"sparrow_stream_{name}", f"{doc} (sum and max over streams)", labels=["agg"])
            family.add_metric(["sum"], float(sum(values)))
            family.add_metric(["max"], float(max(values, default=0)))
            yield family


class LabelledCollector(Collector):
    """Every series of `registry` with `labels` added (a cluster replica's id on each of its series)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield family


class ServiceMetrics:
    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.labels = dict(labels or {})  # added to every series on /metrics
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_open = Gauge("sparrow_streams_open", "Open StreamDescribe calls", registry=r)
        self.streams_total = Counter("sparrow_streams", "StreamDescribe calls accepted", registry=r)
        self.streams_refused = Counter(
            "sparrow_streams_refused", "StreamDescribe calls refused", ["code"], registry=r
        )
        self.frames_in = Counter("sparrow_frames_in", "Frames received (after decoding)", registry=r)
        self.frames_ingested = Counter("sparrow_frames_ingested", "Frames prefilled into the model", registry=r)
        self.frames_dropped = Counter("sparrow_frames_dropped", "Stale frames dropped (live mode)", registry=r)
        self.ingest_lag = Histogram(
            "sparrow_ingest_lag_seconds", "Media seconds between the newest frame received and the frame ingested",
            buckets=_LAG_BUCKETS, registry=r,
        )
        self.caption_latency = Histogram(
            "sparrow_caption_latency_seconds", "Wall seconds from a caption being due to its final",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.first_token_latency = Histogram(
            "sparrow_first_token_latency_seconds", "Wall seconds from a caption being due to its first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.captions = Counter("sparrow_captions", "Final captions", ["method"], registry=r)
        self.tau = Gauge("sparrow_tau", "Accepted tokens per target forward of the latest caption", registry=r)
        self.tokens = Counter("sparrow_tokens_generated", "Caption tokens generated", registry=r)
        self.tokens_per_s = Gauge(
            "sparrow_tokens_per_second", "Caption tokens per second over the last 10 s", registry=r
        )
        self.streams_idle_timeout = Counter(
            "sparrow_streams_idle_timeout", "Streams ended for sending nothing for --idle-timeout-s", registry=r
        )
        self.visual_tokens_evicted = Counter(
            "sparrow_visual_tokens_evicted", "Visual tokens evicted from stream contexts (the visual budget)",
            registry=r,
        )
        self.forward_streams = Histogram(
            "sparrow_forward_streams", "Streams whose work one target forward of the worker carried",
            buckets=_FORWARD_STREAMS_BUCKETS, registry=r,
        )
        self.forward_tokens = Histogram(
            "sparrow_forward_tokens", "Tokens (new KV slots) one target forward of the worker carried",
            buckets=_FORWARD_TOKENS_BUCKETS, registry=r,
        )
        self.forward_seconds = Histogram(
            "sparrow_forward_seconds", "Wall seconds of one target forward of the worker (all its streams; its frames' vision tower included)",
            buckets=_FORWARD_BUCKETS, registry=r,
        )
        self._token_times: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._http = None

    def add_tokens(self, n: int) -> None:
        if n <= 0:
            return
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._token_times.append((now, n))
            while self._token_times and now - self._token_times[0][0] > 10.0:
                self._token_times.popleft()
            self.tokens_per_s.set(sum(k for _, k in self._token_times) / 10.0)

    def observe_forward(self, streams: int, tokens: int, seconds: float) -> None:
        """One target forward of the worker: how many streams' work it carried, their tokens, its time."""
        self.forward_streams.observe(streams)
        self.forward_tokens.observe(tokens)
        self.forward_seconds.observe(seconds)

    def watch_streams(self, source: Callable[[], list[StreamLoad]]) -> None:
        """Expose the per-stream loads `source()` returns (called at each scrape, from the HTTP thread)."""
        self.registry.register(StreamLoadCollector(source))

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics on addr:port (0 = any free port); return the port."""
        registry = self.registry
        if self.labels:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(LabelledCollector(self.registry, self.labels))
        server, _thread = start_http_server(port, addr=addr, registry=registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
