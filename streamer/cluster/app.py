"""`sparrow-stream cluster` on Ray Serve: a Serve application of two deployments.

- `CaptionReplica` (N replicas, `num_gpus` each): one `CaptionEngine` and one `SparrowServer`, the standalone
  server itself (worker, admission, handler, the gRPC servicer with its guarded decoding), on its own port of its
  node (`replica_host`), with /metrics labelled by its replica id. Serve places the replicas on GPUs across nodes,
  health-checks them (`check_health`: the model thread and the gRPC server), restarts a dead one, and autoscales
  them on open streams (`record_autoscaling_stats`, `open_streams_policy`). Each reports itself to the front
  every `report_interval_s`.
- `SparrowFront` (one replica, no GPU): the `ClusterFront` (front.py) on the cluster's address.

Why not Serve's own gRPC proxy (ray 2.60, `gRPCInputStream`, beta): it would carry the bidi stream, but
(1) it routes a call when it opens, on Serve's queue length, and a stream's refusal comes after its first
message, which the proxy cannot offer to another replica; (2) each request message is a Ray actor call from the
replica back to the proxy (`receive_grpc_messages`), one round trip per frame; (3) a replica's status reaches the
client only through `RayServegRPCContext.set_code` plus an exception: there is no `context.abort`, and a killed
replica surfaces as INTERNAL (a `RayActorError`), not a status a client can resume on; (4) its proxy's message
limit is 2 GiB (`RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`), not the server's, and grpc.health.v1 is not served. The thin
front keeps every byte of the contract the standalone server's and leaves Serve placement, health and restarts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch
from ray import serve
from ray.serve.config import AutoscalingContext

from streamer.cluster.front import PEER_HEADER, ClusterFront, ReplicaReport
from streamer.engine_loading import load_engine
from streamer.scheduler import DEFAULT_BATCH_TOKEN_BUDGET
from streamer.server import ServerOptions, SparrowServer
from streamer.settings import ServerLimits

log = logging.getLogger(__name__)

APP_NAME = "sparrow"
FRONT = "SparrowFront"
REPLICA = "CaptionReplica"
OPEN_STREAMS = "open_streams"  # the custom autoscaling metric
# Serve waits this long before it first checks a stopping replica's Serve requests (2 s by default); our streams
# are gRPC calls, not Serve requests: the replica's own drain (__del__) is what waits for them
SHUTDOWN_LOOP_S = 0.2


@dataclass
class ClusterSpec:
    """What the front and every replica are started with (pickled to each replica)."""

    address: str = "127.0.0.1:50051"  # the front's gRPC address
    replica_host: str = "127.0.0.1"  # where each replica binds its gRPC server and /metrics; "auto": its node's IP
    model: str | None = None
    drafters: list[str] = field(default_factory=list)
    no_drafter: bool = False
    tree_profile: str | None = None  # --tree-profile (a file every node can read)
    device: str = "cpu"
    dtype: torch.dtype | None = None
    kv_dtype: torch.dtype | None = None  # the KV cache's (None: the model's dtype), as serve's --kv-dtype
    threads: int = 1  # torch threads per replica
    limits: ServerLimits = field(default_factory=ServerLimits)  # per replica
    auth_token: str | None = None
    tls_cert: Path | None = None  # the front's
    tls_key: Path | None = None
    transcript_dir: Path | None = None  # each replica appends its streams' finals here (a shared volume)
    metrics_port: int | None = None  # the front's /metrics; each replica serves its own on a free port
    metrics_address: str = "127.0.0.1"
    drain_grace_s: float = 60.0
    keepalive_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    report_interval_s: float = 0.5
    front_resource: str | None = None  # a Ray custom resource the front needs (pins it to the node that has it)
    batch_token_budget: int = DEFAULT_BATCH_TOKEN_BUDGET  # per replica's worker (streamer/scheduler.py)

    def server_options(self, address: str, **overrides) -> ServerOptions:
        return replace(ServerOptions(
            address=address, limits=self.limits, auth_token=self.auth_token, transcript_dir=self.transcript_dir,
            metrics_address=self.metrics_address, drain_grace_s=self.drain_grace_s, keepalive_s=self.keepalive_s,
            keepalive_timeout_s=self.keepalive_timeout_s, batch_token_budget=self.batch_token_budget,
        ), **overrides)


# Ray's own overhead on a local cluster (`--ray-address local`, the tests): every core Ray keeps busy is taken
# from the replicas' model threads. Ray starts its workers (every replica) at niceness 15 by default, so any
# process at the normal priority (a client, Ray's own raylet and GCS) takes a shared core from a replica's model
# thread whenever it runs: workers run at the driver's priority instead. Serve's controller loop runs every
# 0.5 s, not 0.1 s (replica health checks are every 2 s anyway); a replica exports Serve's cached metrics every
# 1 s, not 0.1 s. Set in the environment before Ray starts, so its processes inherit them; a value already in
# the environment wins.
LOCAL_RAY_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def start_local_ray(num_cpus: int, **init_options) -> None:
    """A Ray instance on this machine for the cluster: no dashboard, and none of Ray's own metrics (the replicas'
    and the front's Prometheus series are the cluster's metrics), with `LOCAL_RAY_ENV`."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _system_config={"enable_metrics_collection": False}, **init_options)


def node_host(host: str) -> str:
    if host != "auto":
        return host
    return ray.util.get_node_ip_address()


class CaptionReplica:
    async def __init__(self, spec: ClusterSpec) -> None:
        context = serve.get_replica_context()
        self.replica_id: str = context.replica_id.unique_id
        self.spec = spec
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        engine = await asyncio.to_thread(load_engine, spec.model, spec.drafters, spec.no_drafter, spec.device,
                                         spec.dtype, spec.tree_profile, spec.kv_dtype)
        self.host = node_host(spec.replica_host)
        self.server = SparrowServer(engine, spec.server_options(
            f"{self.host}:0", metrics_port=0, metrics_address=self.host, peer_header=PEER_HEADER,
            metrics_labels={"replica": self.replica_id}))
        self.port = await self.server.start()
        self.front = serve.get_deployment_handle(FRONT, app_name=context.app_name)
        self._reporting = asyncio.create_task(self._report_forever())
        log.info("replica %s serving on %s:%d", self.replica_id, self.host, self.port)

    def report(self) -> ReplicaReport:
        loads = self.server.worker.stream_loads()
        return ReplicaReport(
            replica_id=self.replica_id, address=f"{self.host}:{self.port}",
            metrics_address=f"{self.host}:{self.server.metrics_port}" if self.server.metrics_port else "",
            streams_open=self.server.streams_open, max_streams=self.spec.limits.max_streams,
            kv_bytes=sum(load.kv_bytes for load in loads), serving=not self.server.admission.draining,
        )

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.front.report.remote(self.report())
            except Exception as exc:  # the front restarting: the next report finds the new one
                log.warning("replica %s: report to the front failed: %s", self.replica_id, exc)
            await asyncio.sleep(self.spec.report_interval_s)

    async def check_health(self) -> None:
        """Serve's health check: the model thread runs and the gRPC server is up."""
        if not self.server.worker.alive:
            raise RuntimeError("the model worker thread has stopped")
        if self.server.servicer is None or self.port is None:
            raise RuntimeError("the gRPC server is not running")

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {OPEN_STREAMS: float(self.server.streams_open)}

    async def __del__(self) -> None:
        """Serve stops the replica (scale-down, redeploy): refuse new streams, let open ones deliver their
        pending final and STREAM_END "draining" (ResumableStream resumes them on another replica)."""
        self._reporting.cancel()
        self.server.admission.drain()
        # serving=False: the front sends no new streams here. Beside the drain, not before it: when the whole
        # app is deleted the front is going too, and waiting on its answer only delayed the stop (2 s)
        told = asyncio.ensure_future(asyncio.wait_for(self.front.report.remote(self.report()), 2.0))
        await self.server.drain()
        told.cancel()
        await asyncio.gather(told, return_exceptions=True)


class SparrowFront:
    async def __init__(self, spec: ClusterSpec, replicas) -> None:
        self.replicas = replicas  # the replica deployment's handle: binding it makes the replicas part of the app
        self.front = ClusterFront(spec.server_options(
            spec.address, tls_cert=spec.tls_cert, tls_key=spec.tls_key, metrics_port=spec.metrics_port),
            stale_after_s=max(3.0, 6 * spec.report_interval_s))
        self.port = await self.front.start()
        self.host = spec.address.rsplit(":", 1)[0]

    async def report(self, report: ReplicaReport) -> None:
        self.front.report(report)  # on the front's event loop, where its channels live

    async def address(self, replicas: int = 0, timeout_s: float = 300.0) -> str:
        """host:port of the front, once at least `replicas` replicas are live."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.front.live_replicas()) < replicas and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return f"{self.host}:{self.port}"

    async def replica_ids(self) -> dict[str, int]:
        """Live replicas and the streams each has open (the tests' and the CLI's view)."""
        return {link.replica_id: link.streams for link in self.front.live_replicas()}

    async def replica_addresses(self) -> dict[str, str]:
        """Live replicas' own gRPC addresses (reachable from the cluster's network only)."""
        return {link.replica_id: link.report.address for link in self.front.live_replicas()}

    def metrics_port(self) -> int | None:
        return self.front.metrics_port

    async def check_health(self) -> None:
        if self.port is None:
            raise RuntimeError("the front's gRPC server is not running")

    async def __del__(self) -> None:
        await self.front.stop(grace=1.0)


def open_streams_policy(ctx: AutoscalingContext) -> tuple[int, dict]:
    """Serve autoscaling on open streams: ceil(open streams / target_ongoing_requests) replicas (the config's
    target read as open streams per replica), within min_replicas and max_replicas."""
    per_replica = max(1.0, float(ctx.config.target_ongoing_requests or 1))
    streams = sum((ctx.aggregated_metrics or {}).get(OPEN_STREAMS, {}).values())
    wanted = math.ceil(streams / per_replica)
    return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, wanted)), ctx.policy_state


def autoscaling_config(min_replicas: int, max_replicas: int, streams_per_replica: int) -> dict:
    """Serve's autoscaling_config for the replicas: on open streams (`open_streams_policy`)."""
    return {
        "min_replicas": min_replicas, "max_replicas": max_replicas,
        "target_ongoing_requests": streams_per_replica,  # read as open streams per replica
        "policy": {"policy_function": "streamer.cluster.app:open_streams_policy"},
        "upscale_delay_s": 10.0, "downscale_delay_s": 300.0,  # a stream lasts minutes to hours: scale down slowly
    }


def build_app(spec: ClusterSpec, replicas: int = 1, num_gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0, autoscaling: dict | None = None):
    """The Serve application: the front bound to the replica deployment."""
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    replica = serve.deployment(
        CaptionReplica, name=REPLICA, **scale,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": num_gpus_per_replica},
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=spec.drain_grace_s + 5.0, graceful_shutdown_wait_loop_s=SHUTDOWN_LOOP_S,
    )
    front_options = {"num_cpus": 0}
    if spec.front_resource:
        front_options["resources"] = {spec.front_resource: 0.01}
    front = serve.deployment(SparrowFront, name=FRONT, num_replicas=1, ray_actor_options=front_options,
                             graceful_shutdown_wait_loop_s=SHUTDOWN_LOOP_S)
    return front.bind(spec, replica.bind(spec))


def cluster_autoscaling(args) -> dict | None:
    """Serve's autoscaling_config from the cluster flags (--max-replicas over --replicas), else None."""
    if not args.max_replicas or args.max_replicas <= args.replicas:
        return None
    return autoscaling_config(args.replicas, args.max_replicas, args.streams_per_replica)
