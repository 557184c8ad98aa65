"""`sparrow-stream serve`: run the gRPC captioning server until SIGTERM / SIGINT, then drain and exit 0.
`sparrow-stream cluster`: replicas of that server on Ray Serve behind one gRPC front (streamer/cluster/)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from sparrow_core.cli.device import add_device_flags, add_kv_dtype_flag, device_and_dtype, kv_dtype
from sparrow_core.cli.drafter_flag import add_drafter_flag
from streamer.engine_loading import load_engine
from streamer.server import ServerOptions
from streamer.settings import ServerLimits
from streamer.webrtc import WebRTCOptions

log = logging.getLogger("sparrow-stream")


def add_service_flags(p: argparse.ArgumentParser) -> None:
    """The flags `serve` and `cluster` share: the model, its run flags, the limits, auth, TLS, metrics, drain."""
    d, o = ServerLimits(), ServerOptions()
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on (port 0: any free port)")
    p.add_argument("--model", default=None, help="target model dir (default: the embedded default model)")
    add_drafter_flag(p)
    p.add_argument("--no-drafter", action="store_true",
                   help="load no drafter: serve the methods that need none (ar, ngram)")
    add_device_flags(p)
    add_kv_dtype_flag(p)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the model worker (0: torch's default); on a small shared "
                   "CPU one thread avoids oversubscription and leaves a core for gRPC and decoding")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: any free port)")
    p.add_argument("--metrics-address", default="127.0.0.1")
    p.add_argument("--transcript-dir", type=Path, default=None, help="append final captions per stream as JSONL here")
    p.add_argument("--auth-token", default=os.environ.get("SPARROW_AUTH_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' (default: $SPARROW_AUTH_TOKEN)")
    p.add_argument("--tls-cert", type=Path, default=None)
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--max-streams", type=int, default=d.max_streams)
    p.add_argument("--max-streams-per-peer", type=int, default=d.max_streams_per_peer,
                   help="streams one client IP may hold, gRPC and WebRTC together (0: no per-peer cap)")
    p.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s,
                   help="end a stream (DEADLINE_EXCEEDED) that sends no media and no control this long (0: never)")
    p.add_argument("--max-frame-pixels", type=int, default=d.max_frame_pixels)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument("--max-stream-seconds", type=float, default=d.max_stream_s)
    p.add_argument("--max-caption-tokens", type=int, default=d.max_caption_tokens)
    p.add_argument("--max-visual-tokens", type=int, default=d.max_visual_tokens,
                   help="per stream: the most visual tokens kept in the KV (caps visual_token_budget and the "
                   "model's default budget)")
    p.add_argument("--max-caption-history", type=int, default=d.max_caption_history,
                   help="per stream: the most earlier caption turns kept in the KV")
    p.add_argument("--max-kv-mb", type=float, default=d.max_kv_bytes / 2**20,
                   help="per stream: the most MB its KV may reach in the worst case; configs over it are refused")
    p.add_argument("--queue-frames", type=int, default=d.queue_frames, help="per-stream model queue depth")
    p.add_argument("--live-max-lag", type=float, default=d.live_max_lag_s,
                   help="live mode: drop queued frames this many media seconds behind the newest")
    p.add_argument("--keepalive-s", type=float, default=o.keepalive_s,
                   help="HTTP/2 keepalive: ping a gRPC connection after this many seconds without activity")
    p.add_argument("--keepalive-timeout-s", type=float, default=o.keepalive_timeout_s,
                   help="disconnect a client (freeing its streams) that does not answer a ping this fast")
    p.add_argument("--batch-token-budget", type=int, default=o.batch_token_budget,
                   help="the most tokens one target forward carries over all streams (caption steps first, "
                        "frame prefills fill the rest); 0: one stream's unit per forward, round-robin")
    p.add_argument("--drain-grace", type=float, default=60.0, help="seconds to wait for open streams on SIGTERM")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparrow-stream", description="Sparrow Stream real-time captioning server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    w = WebRTCOptions()
    add_service_flags(serve)
    serve.add_argument("--http-address", default="127.0.0.1:8080",
                       help="host:port of the HTTP side: live-camera page, WebRTC /offer, /healthz (off: none)")
    serve.add_argument("--ice-server", action="append", default=[], metavar="URL",
                       help="WebRTC ICE server, repeatable: stun:HOST:PORT or turn:USER:PASS@HOST:PORT (default: "
                       "none, host candidates only)")
    serve.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                       help="gather WebRTC host candidates on this local address only, repeatable (e.g. 127.0.0.1)")
    serve.add_argument("--webrtc-connect-timeout-s", type=float, default=w.connect_timeout_s,
                       help="free an answered WebRTC offer whose connection is not up within this many seconds")
    serve.add_argument("--reflection", action="store_true",
                       help="serve gRPC server reflection (it lists every service to any client; health is always on)")
    cluster = sub.add_parser("cluster", help="run replicas of the server on Ray Serve behind one gRPC front")
    add_service_flags(cluster)
    cluster.add_argument("--replicas", type=int, default=1, help="model replicas (each its own engine and server)")
    cluster.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPUs Ray reserves per replica")
    cluster.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica")
    cluster.add_argument("--ray-address", default="local",
                         help="'local': start Ray here; 'auto': join the running cluster; or ray://HOST:PORT")
    cluster.add_argument("--replica-host", default="127.0.0.1",
                         help="address each replica binds its own gRPC server and /metrics on ('auto': its node's "
                         "IP, for a multi-node cluster); only the front should reach it")
    cluster.add_argument("--front-resource", default=None, metavar="NAME",
                         help="a Ray custom resource the front needs: it runs on the node that has it (the one "
                         "the clients' Service points at)")
    cluster.add_argument("--max-replicas", type=int, default=0,
                         help="autoscale between --replicas and this many on open streams (0: a fixed count)")
    cluster.add_argument("--streams-per-replica", type=int, default=4,
                         help="autoscaling target: open streams per replica")
    return parser


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_streams=args.max_streams,
        max_streams_per_peer=args.max_streams_per_peer,
        idle_timeout_s=args.idle_timeout_s,
        max_frame_pixels=args.max_frame_pixels,
        max_message_bytes=args.max_message_bytes,
        max_stream_s=args.max_stream_seconds,
        max_caption_tokens=args.max_caption_tokens,
        max_visual_tokens=args.max_visual_tokens,
        max_caption_history=args.max_caption_history,
        max_kv_bytes=int(args.max_kv_mb * 2**20),
        queue_frames=args.queue_frames,
        live_max_lag_s=args.live_max_lag,
    )


def default_stream_line(engine, limits: ServerLimits) -> str:
    """One line: what a stream that sets nothing gets (the model's defaults under the server's limits)."""
    from streamer.proto import pb
    from streamer.settings import parse_stream_config

    try:
        settings = parse_stream_config(pb.StreamConfig(), limits, sorted(engine.decoders), engine.defaults,
                                       engine.check_kv)
    except ValueError as exc:
        return f"refuses a stream with default settings: {exc}"
    return engine.describe_defaults(settings.session)


async def serve(args: argparse.Namespace) -> int:
    from streamer.server import SparrowServer

    limits = limits_from_args(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    engine = await asyncio.to_thread(load_engine, args.model, args.drafter, args.no_drafter, device, dtype,
                                     args.tree_profile, kv_dtype(args))
    http = None
    if args.http_address.lower() not in ("", "off", "none"):
        http = WebRTCOptions(address=args.http_address, ice_servers=tuple(args.ice_server),
                             ice_hosts=tuple(args.ice_host), connect_timeout_s=args.webrtc_connect_timeout_s)
    server = SparrowServer(engine, ServerOptions(
        address=args.address, limits=limits, auth_token=args.auth_token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, transcript_dir=args.transcript_dir, metrics_port=args.metrics_port,
        metrics_address=args.metrics_address, drain_grace_s=args.drain_grace, http=http, reflection=args.reflection,
        keepalive_s=args.keepalive_s, keepalive_timeout_s=args.keepalive_timeout_s,
        batch_token_budget=args.batch_token_budget,
    ))
    port = await server.start()
    host = args.address.rsplit(":", 1)[0]
    extra = f" metrics=http://{args.metrics_address}:{server.metrics_port}/metrics" if server.metrics_port else ""
    if server.webrtc is not None:
        http_host = args.http_address.rsplit(":", 1)[0]
        extra += f" http={server.webrtc.scheme}://{http_host}:{server.http_port}/"
    print(f"sparrow-stream listening on {host}:{port}{extra}", flush=True)
    print(f"sparrow-stream {default_stream_line(engine, limits)}", flush=True)  # after the line clients wait for
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: refusing new streams, finishing pending finals")
    await server.drain()
    log.info("drained; bye")
    return 0


def cluster_spec(args: argparse.Namespace):
    """The cluster's ClusterSpec from the `cluster` flags."""
    from streamer.cluster.app import ClusterSpec

    device, dtype = device_and_dtype(args)
    return ClusterSpec(
        address=args.address, replica_host=args.replica_host, model=args.model, drafters=list(args.drafter),
        tree_profile=args.tree_profile,
        no_drafter=args.no_drafter, device=device, dtype=dtype, kv_dtype=kv_dtype(args), threads=args.threads,
        limits=limits_from_args(args),
        auth_token=args.auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key, transcript_dir=args.transcript_dir,
        metrics_port=args.metrics_port, metrics_address=args.metrics_address, drain_grace_s=args.drain_grace,
        keepalive_s=args.keepalive_s, keepalive_timeout_s=args.keepalive_timeout_s, front_resource=args.front_resource,
        batch_token_budget=args.batch_token_budget,
    )


def cluster(args: argparse.Namespace) -> int:
    """Start (or join) Ray, run the Serve application, print the front's address, and on SIGTERM / SIGINT
    delete it (each replica drains), stop Serve and Ray, and exit 0. A local Ray runs in a child process of its
    own session (streamer/cluster/session.py): a signal to this command's process group reaches this process
    only, never Ray's GCS, raylet or replicas, and the stop goes in order."""
    from streamer.cluster.session import run_in_own_session

    if args.ray_address == "local":
        code = run_in_own_session(lambda ready: run_cluster(args, ready))
        # this process only forwarded signals: nothing of it needs finalizing, and a normal interpreter exit
        # after importing torch and the server took ~2 s more on 2 cores
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return run_cluster(args)


def run_cluster(args: argparse.Namespace, ready: Callable[[], None] = lambda: None) -> int:
    """The Ray driver of `cluster`; ready() once it handles SIGTERM / SIGINT itself (after ray.init)."""
    import ray
    from ray import serve

    from streamer.cluster.app import APP_NAME, build_app, cluster_autoscaling, start_local_ray
    from streamer.cluster.session import Stopping, StopSignals

    spec = cluster_spec(args)
    if args.ray_address == "local":
        start_local_ray(num_cpus=max(2, os.cpu_count() or 2))
    else:
        ray.init(address=args.ray_address, log_to_driver=False)
    signals = StopSignals()
    try:
        signals.install()  # over ray.init's own (sys.exit, and its C++ core's crash handler)
        ready()
        with signals.interrupting():
            serve.start(proxy_location="Disabled")
            front = serve.run(build_app(spec, args.replicas, args.num_gpus_per_replica, args.cpus_per_replica,
                                        cluster_autoscaling(args)), name=APP_NAME, route_prefix=None)
            address = front.address.remote(args.replicas).result()
            metrics_port = front.metrics_port.remote().result()
            extra = f" metrics=http://{args.metrics_address}:{metrics_port}/metrics" if metrics_port else ""
            print(f"sparrow-stream cluster listening on {address}{extra} "
                  f"replicas={len(front.replica_ids.remote().result())}", flush=True)
        log.info("%s: stopping; each replica drains (pending finals, STREAM_END)", signals.wait())
        serve.delete(APP_NAME)
    except Stopping as stop:
        log.info("%s while starting: stopping what had started", stop)
    finally:
        if args.ray_address == "local":
            serve.shutdown()
        ray.shutdown()
        log.info("Serve and Ray stopped; bye")
    return 0


def cluster_app(args: dict):
    """The cluster's Serve application from `args`, the flags of `cluster` by name (replicas, model,
    num_gpus_per_replica, max_streams, ...): `serveConfigV2`'s import_path for KubeRay (deploy/rayservice.yaml)."""
    from streamer.cluster.app import build_app, cluster_autoscaling

    argv = ["cluster"]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    parsed = build_parser().parse_args(argv)
    return build_app(cluster_spec(parsed), parsed.replicas, parsed.num_gpus_per_replica, parsed.cpus_per_replica,
                     cluster_autoscaling(parsed))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device_and_dtype(args, parser)  # a device this machine lacks is a usage error, before any loading
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.command == "serve":
        return asyncio.run(serve(args))
    if args.command == "cluster":
        return cluster(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
