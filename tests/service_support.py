"""Shared by the service and replay tests (no tests here): a real tiny model, world clips, a server runner, and
helpers to build requests and read a call's responses.

The engine is the real CaptionEngine. When the embedded default model is shipped it is used as is;
otherwise a checkpoint of the default architecture with random weights (and the world tokenizer) is
written once per test session, so the transport is tested against a real model either way.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import av
import grpc
import numpy as np
import torch

from sparrow_core.engine.checkpoint import DEFAULT_MODEL_DIR
from sparrow_core.offline import caption_frames
from sparrow_core.session import CaptionEngine, SessionConfig
from streamer.client import call_status, config_request
from streamer.proto import SERVICE_NAME, pb
from streamer.server import ServerOptions, SparrowServer

CLIP_SECONDS = 12.0
CLIP_FPS = 10.0
SEND_FPS = 2.0
CAPTION_EVERY_S = 4.0
# more than one draft chain (5 drafted + the bonus token), so that even a fully accepted speculative
# caption takes two verify steps and shows a draft tail in between (the shipped drafter often is)
MAX_TOKENS = 12
W, H = 64, 48  # the synthetic frames' size (gradient)


def gradient(i: int, w: int = W, h: int = H) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4 + i * 10) % 256, (y * 5) % 256, np.full_like(x, (i * 37) % 256)], -1).astype(np.uint8)


def encode(codec: str, frames: list[np.ndarray], fps: int = 10) -> list[bytes]:
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = frames[0].shape[1], frames[0].shape[0]
    ctx.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    ctx.time_base = fractions.Fraction(1, fps)
    ctx.options = {"libx264": {"tune": "zerolatency", "preset": "ultrafast"},
                   "libvpx": {"deadline": "realtime", "lag-in-frames": "0"}}.get(codec, {})
    packets = []
    for i, rgb in enumerate(frames):
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=ctx.pix_fmt)
        f.pts = i
        packets += [bytes(p) for p in ctx.encode(f)]
    packets += [bytes(p) for p in ctx.encode(None)]
    return packets


# the shipped default model, usable by these tests once its drafter ships beside it (they decode with sparrow)
SHIPPED = (DEFAULT_MODEL_DIR / "config.json").is_file() and (DEFAULT_MODEL_DIR / "drafter" / "config.json").is_file()


def model_dir(root: Path) -> Path:
    """The shipped default model, or a random-weight checkpoint of its architecture (and a random
    drafter) written under root."""
    if SHIPPED:
        return DEFAULT_MODEL_DIR
    out = root / "tiny-default-arch"
    if (out / "config.json").is_file():
        return out
    from transformers import LlavaOnevisionForConditionalGeneration

    from sparrow_core.engine.default_model import default_config, preprocessor_config
    from sparrow_core.world.tokenizer import build_tokenizer, load_tokenizer

    build_tokenizer(out, seed=0, segments=40)
    tokenizer = load_tokenizer(out)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(
        default_config(tokenizer), attn_implementation="sdpa", dtype=torch.float32
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    # a random drafter beside it (CaptionEngine.load picks up <model>/drafter): sparrow decoding works,
    # with low acceptance; greedy output must still equal ar's
    from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
    from sparrow_core.engine.checkpoint import load_target

    torch.manual_seed(1)
    TextAnchoredDrafter(load_target(out), DrafterConfig()).save_pretrained(out / "drafter")
    return out


def load_engine(path: Path) -> CaptionEngine:
    torch.set_num_threads(1)  # one model thread on a small shared CPU (the server's default too)
    return CaptionEngine.load(path)


def world_frames(root: Path, seed: int = 3, seconds: float = CLIP_SECONDS) -> tuple[Path, list[tuple[np.ndarray, float]]]:
    """A world clip file, and the frames a client sends of it (SEND_FPS, the model's 64x64)."""
    from sparrow_core.world.video_io import read_video, write_world_clip

    path = root / f"world-{seed}-{seconds:g}.mp4"
    if not path.is_file():
        write_world_clip(path, seed=seed, seconds=seconds, fps=CLIP_FPS, size=64)
    return path, list(read_video(path, fps=SEND_FPS, size=64))


def offline_captions(
    engine: CaptionEngine, frames: list[tuple[np.ndarray, float]], every_s: float = CAPTION_EVERY_S,
    max_tokens: int = MAX_TOKENS, sampling_fps: float | None = None,
) -> list[tuple[str, float, float]]:
    """The greedy captions of the offline path (`sparrow-caption`'s loop), with the server's segment rule,
    sampling frames at `sampling_fps` (None: the model's rate, what the server uses when a client leaves
    it unset)."""
    session = engine.open_session(SessionConfig(max_caption_tokens=max_tokens, decoding="ar"))
    fps = engine.defaults.sampling_fps if sampling_fps is None else sampling_fps
    try:
        return [(c.text, c.start_s, c.end_s) for c in caption_frames(session, frames, every_s, fps)]
    finally:
        session.close()


async def offer_sdp() -> str:
    """A real WebRTC offer (a video track and a data channel) from a peer connection closed at once: valid
    signaling input that never connects."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    probe = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    probe.createDataChannel("captions")
    probe.addTransceiver("video", direction="sendonly")
    await probe.setLocalDescription(await probe.createOffer())
    await probe.close()
    return probe.localDescription.sdp


def run_with_server(
    engine: CaptionEngine, body: Callable[[SparrowServer, str], Awaitable[None]], **options
) -> None:
    """Start a server on 127.0.0.1:0 with ServerOptions(**options), run body(server, target), stop it."""

    async def main() -> None:
        server = SparrowServer(engine, ServerOptions(address="127.0.0.1:0", **options))
        port = await server.start()
        try:
            await body(server, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=0.5)

    asyncio.run(main())


def self_signed_cert(root: Path, ca: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (a CA certificate when `ca`: grpc wants one as its root) and its
    key, written as PEM under root; returns (cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def replay_config(**overrides) -> pb.StreamDescribeRequest:
    # every frame sent is ingested (the model's own rate may be lower): counts and boundaries below rely on it
    fields = dict(mode=pb.STREAM_MODE_REPLAY, caption_every_s=CAPTION_EVERY_S, sampling_fps=SEND_FPS, interim_results=True,
                  max_caption_tokens=MAX_TOKENS, decoding=pb.DECODING_METHOD_AR)
    fields.update(overrides)
    return config_request(**fields)


async def outcome(call) -> tuple[list[pb.StreamDescribeResponse], grpc.StatusCode, str]:
    """All responses of a call and how it ended."""
    out = []
    try:
        while (r := await call.read()) is not grpc.aio.EOF:
            out.append(r)
        return out, grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as exc:
        fatal = [r.error for r in out if r.WhichOneof("response") == "error" and r.error.code == pb.StreamError.FATAL]
        code, details = call_status(exc, fatal[-1] if fatal else None)
        if fatal:  # the in-band copy agrees with the status
            assert (fatal[-1].status, fatal[-1].message) == (code.name, details)
        return out, code, details


async def requests(*reqs, gate: asyncio.Event | None = None):
    for r in reqs:
        yield r
    if gate is not None:
        await gate.wait()


def finals(responses) -> list[pb.CaptionResult]:
    return [r.caption for r in responses if r.WhichOneof("response") == "caption" and r.caption.is_final]


def events(responses, kind: int) -> list[pb.StreamEvent]:
    return [r.event for r in responses if r.WhichOneof("response") == "event" and r.event.type == kind]


def stats(responses) -> list[pb.StreamStats]:
    return [r.stats for r in responses if r.WhichOneof("response") == "stats"]


async def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


# --- raw wire: StreamDescribe with the request side as bytes (the edge and cluster tests) ---

STREAM_DESCRIBE = f"/{SERVICE_NAME}/StreamDescribe"
GET_MODEL_INFO = f"/{SERVICE_NAME}/GetModelInfo"
FRAME = np.zeros((64, 64, 3), np.uint8)
# StreamDescribeRequest{config: StreamConfig{instruction: b"\xff"}}: field 1 (config) holding field 3 (a string)
BAD_UTF8_CONFIG = b"\x0a\x03\x1a\x01\xff"


def raw_describe(channel: grpc.aio.Channel):
    """StreamDescribe with the request side as raw bytes (responses decoded)."""
    return channel.stream_stream(STREAM_DESCRIBE, request_serializer=None,
                                 response_deserializer=pb.StreamDescribeResponse.FromString)


async def raw_requests(*messages: bytes, then_wait: float = 0.0):
    for m in messages:
        yield m
    await asyncio.sleep(then_wait)
