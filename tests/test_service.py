"""The transport pieces without a model: contract, media decoding, config checks, timeline, queues, subtitles."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from service_support import H, W, encode, gradient
from sparrow_core.session import SessionConfig, StreamDefaults
from sparrow_core.subtitles import Cue, format_for, render, write_subtitles
from sparrow_core.timeline import Timeline
from streamer.client import encoded_request, i420_request, rgb_request
from streamer.media import MAX_TIMESTAMP_S, DecodeFailed, Frame, MediaDecoder
from streamer.proto import SERVICE_NAME, pb
from streamer.results import Fatal
from streamer.settings import ServerLimits, StreamSettings, parse_stream_config
from streamer.stream_queue import CaptionDue, Ingest, StreamQueue


def test_contract_names() -> None:
    assert SERVICE_NAME == "sparrow.v1.Captioner"
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Captioner"].methods}
    assert methods == {"StreamDescribe", "GetModelInfo"}
    fields = set(pb.CaptionResult.DESCRIPTOR.fields_by_name)
    assert {"segment_id", "text", "is_final", "stability", "start_s", "end_s", "draft_tail"} <= fields
    assert {"media_processed_s", "ingest_lag_s", "kv_tokens", "visual_tokens_evicted", "frames_dropped", "tau"} <= set(
        pb.StreamStats.DESCRIPTOR.fields_by_name
    )


def test_raw_rgb_and_i420() -> None:
    dec = MediaDecoder(max_frame_pixels=W * H)
    rgb = gradient(1)
    (frame,) = dec.decode(rgb_request(rgb, 1.5).media)
    assert frame.timestamp_s == 1.5 and np.array_equal(frame.rgb, rgb) and frame.rgb.flags.writeable
    planes = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
    (frame,) = dec.decode(i420_request(planes, W, H, 2.0).media)
    assert frame.rgb.shape == (H, W, 3)
    assert np.abs(frame.rgb.astype(int) - rgb.astype(int)).mean() < 6  # 4:2:0 round trip


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.MediaChunk(raw=pb.RawFrame(width=W, height=H, format=pb.PIXEL_FORMAT_RGB24, data=b"\0" * 10)), "needs"),
        (pb.MediaChunk(raw=pb.RawFrame(width=W + 1, height=H, format=pb.PIXEL_FORMAT_I420, data=b"")), "even"),
        (pb.MediaChunk(raw=pb.RawFrame(width=W, height=H, format=0, data=b"\0" * (W * H * 3))), "pixel format"),
        (pb.MediaChunk(raw=pb.RawFrame(width=W * 2, height=H, format=1, data=b"\0" * (W * H * 6))), "max frame size"),
        (pb.MediaChunk(encoded=pb.EncodedChunk(codec=42, data=b"\0\0\0\1")), "unknown codec"),
        (pb.MediaChunk(), "neither"),
    ],
)
def test_bad_media_is_fatal(request_: pb.MediaChunk, message: str) -> None:
    with pytest.raises(Fatal, match=message):
        MediaDecoder(max_frame_pixels=W * H + 100).decode(request_)


@pytest.mark.parametrize("codec, encoder", [(pb.CODEC_H264, "libx264"), (pb.CODEC_VP8, "libvpx"), (pb.CODEC_MJPEG, "mjpeg")])
def test_encoded_chunks_decode_with_their_timestamps(codec: int, encoder: str) -> None:
    frames = [gradient(i) for i in range(6)]
    packets = encode(encoder, frames)
    dec = MediaDecoder(max_frame_pixels=W * H)
    out: list[Frame] = []
    for i, data in enumerate(packets):
        out += dec.decode(encoded_request(data, codec, i * 0.1).media)
    out += dec.flush()
    assert [round(f.timestamp_s, 3) for f in out] == [round(i * 0.1, 3) for i in range(6)]
    for f, rgb in zip(out, frames):
        assert f.rgb.shape == (H, W, 3)
        assert np.abs(f.rgb.astype(int) - rgb.astype(int)).mean() < 12


def test_corrupt_chunks_are_recoverable_until_too_many() -> None:
    packets = encode("libx264", [gradient(i) for i in range(4)])
    dec = MediaDecoder(max_frame_pixels=W * H, max_consecutive_failures=3)
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    with pytest.raises(DecodeFailed):
        dec.decode(encoded_request(garbage, pb.CODEC_MJPEG, 0.0).media)
    # the stream goes on: a good chunk after a bad one decodes
    assert len(dec.decode(encoded_request(packets[0], pb.CODEC_H264, 0.1).media)) == 1
    for _ in range(2):
        with pytest.raises(DecodeFailed):
            dec.decode(encoded_request(garbage, pb.CODEC_MJPEG, 0.2).media)
    with pytest.raises(Fatal, match="in a row"):
        dec.decode(encoded_request(garbage, pb.CODEC_MJPEG, 0.3).media)


@pytest.mark.parametrize("codec, encoder", [(pb.CODEC_H264, "libx264"), (pb.CODEC_VP8, "libvpx")])
def test_an_empty_or_bad_chunk_is_rejected_alone_and_the_decoder_goes_on(codec: int, encoder: str) -> None:
    """4 valid chunks, an empty one, a chunk of another codec, garbage, then 12 valid: only the bad ones
    fail, and every valid chunk after them decodes (an empty packet would have drained the decoder)."""
    packets = encode(encoder, [gradient(i) for i in range(16)])
    assert len(packets) == 16
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    dec = MediaDecoder(max_frame_pixels=W * H)
    decoded = []
    for i, data in enumerate(packets[:4]):
        decoded += dec.decode(encoded_request(data, codec, i * 0.1).media)
    for bad_codec, data in ((codec, b""), (pb.CODEC_MJPEG, garbage), (codec, b"")):
        with pytest.raises(DecodeFailed, match="empty|undecodable"):
            dec.decode(encoded_request(data, bad_codec, 0.35).media)
    for i, data in enumerate(packets[4:], start=4):
        decoded += dec.decode(encoded_request(data, codec, i * 0.1).media)
    decoded += dec.flush()
    assert [round(f.timestamp_s, 1) for f in decoded] == [round(i * 0.1, 1) for i in range(16)]


def test_an_encoded_frame_over_the_size_limit_is_refused_before_it_is_decoded() -> None:
    packets = encode("libx264", [gradient(i, 128, 96) for i in range(2)])
    with pytest.raises(Fatal, match="128x96 = 12288 pixels, over the server's max frame size"):
        MediaDecoder(max_frame_pixels=W * H).decode(encoded_request(packets[0], pb.CODEC_H264, 0.0).media)


@pytest.mark.parametrize("ts", [-1e-300, 2**53 / 1e6 + 1, 1e13, 1e300, 2.0**63, float("inf"), float("nan")])
def test_timestamps_outside_the_contract_are_refused_with_the_limit(ts: float) -> None:
    packets = encode("libx264", [gradient(0)])
    for chunk in (encoded_request(packets[0], pb.CODEC_H264, ts).media, rgb_request(gradient(0), ts).media):
        with pytest.raises(Fatal, match=r"timestamp_s must be a finite number of seconds in \[0, 9007199254.740992\]"):
            MediaDecoder(max_frame_pixels=W * H).decode(chunk)
    # the largest accepted timestamp decodes, with its microsecond pts intact
    (frame,) = MediaDecoder(max_frame_pixels=W * H).decode(encoded_request(packets[0], pb.CODEC_H264, MAX_TIMESTAMP_S).media)
    assert frame.timestamp_s == MAX_TIMESTAMP_S


def test_config_checks() -> None:
    limits = ServerLimits(max_caption_tokens=32)
    s = parse_stream_config(
        pb.StreamConfig(mode=pb.STREAM_MODE_REPLAY, caption_every_s=2, instruction="say it", temperature=0.5,
                        decoding=pb.DECODING_METHOD_AR, visual_token_budget=100, caption_history=3, seed=7),
        limits, ["ar"],
    )
    assert not s.live and s.caption_every_s == 2
    assert s.session == SessionConfig(instruction="say it", max_caption_tokens=32, temperature=0.5, decoding="ar",
                                      visual_token_budget=100, caption_history=3, seed=7,
                                      max_kv_bytes=limits.max_kv_bytes)
    bad = {  # each refused with a message that names the field
        "max_caption_tokens": pb.StreamConfig(max_caption_tokens=33),
        "decoding": pb.StreamConfig(decoding=pb.DECODING_METHOD_SPARROW),
        "temperature": pb.StreamConfig(temperature=-1),
        "top_p": pb.StreamConfig(top_p=2),
        "caption_every_s": pb.StreamConfig(caption_every_s=-1),
        "sampling_fps": pb.StreamConfig(sampling_fps=1000),
        "label": pb.StreamConfig(label="../etc"),
        "mode": pb.StreamConfig(mode=7),
    }
    for field, cfg in bad.items():
        with pytest.raises(ValueError, match=field):
            parse_stream_config(cfg, limits, ["ar"])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sampling_fps=NAN), r"sampling_fps must be a finite number in \[0, 240\], got nan"),
        (dict(sampling_fps=INF), r"sampling_fps must be a finite number in \[0, 240\], got inf"),
        (dict(stats_interval_s=NAN), r"stats_interval_s must be a finite number in \[0, 14400\], got nan"),
        (dict(stats_interval_s=1e300), r"stats_interval_s must be a finite number in \[0, 14400\]"),
        (dict(caption_every_s=NAN), r"caption_every_s must be a finite number in 0 or \[0.001, 14400\]"),
        (dict(caption_every_s=1e-7), r"caption_every_s must be a finite number in 0 or \[0.001, 14400\], got 1e-07"),
        (dict(caption_every_s=5e-324), r"caption_every_s .* got 5e-324"),
        (dict(temperature=NAN), r"temperature must be a finite number in \[0, 5\]"),
        (dict(temperature=-INF), r"temperature must be a finite number in \[0, 5\]"),
        (dict(top_p=NAN), r"top_p must be a finite number in \[0, 1\]"),
        (dict(visual_token_budget=2**32 - 1), r"visual_token_budget 4294967295 is over the server's limit of 1000 \(--max-visual-tokens\)"),
        (dict(caption_history=2**32 - 1), r"caption_history 4294967295 is over the server's limit of 8 \(--max-caption-history\)"),
        (dict(max_caption_tokens=2**32 - 1), r"max_caption_tokens 4294967295 is over the server's limit of 32"),
    ],
)
def test_every_config_field_is_finite_in_range_and_capped(fields: dict, message: str) -> None:
    limits = ServerLimits(max_caption_tokens=32, max_visual_tokens=1000, max_caption_history=8)
    with pytest.raises(ValueError, match=message):
        parse_stream_config(pb.StreamConfig(**fields), limits, ["ar"])


def test_model_defaults_are_capped_by_the_server_limits() -> None:
    limits = ServerLimits(max_visual_tokens=300, max_caption_history=4)
    model = StreamDefaults(visual_token_budget=408, caption_history=5, sampling_fps=1.0)
    s = parse_stream_config(pb.StreamConfig(temperature=1e-40), limits, ["ar"], model)
    assert (s.session.visual_token_budget, s.session.caption_history, s.sampling_fps) == (300, 4, 1.0)
    assert s.session.temperature > 0  # a tiny temperature is accepted: sampling is finite for it
    unbounded = StreamDefaults(visual_token_budget=None, caption_history=None)  # "keep everything"
    s = parse_stream_config(pb.StreamConfig(), limits, ["ar"], unbounded)
    assert (s.session.visual_token_budget, s.session.caption_history) == (300, 4)
    s = parse_stream_config(pb.StreamConfig(visual_token_budget=50, caption_history=2), limits, ["ar"], model)
    assert (s.session.visual_token_budget, s.session.caption_history) == (50, 2)


def test_timeline_cadence_and_sampling() -> None:
    t = Timeline(caption_every_s=1.0, sampling_fps=2.0)
    decisions = [(ts, t.on_frame(ts)) for ts in np.arange(0, 3.01, 0.25)]
    assert [ts for ts, d in decisions if d.caption_before] == [1.0, 2.0, 3.0]
    assert [ts for ts, d in decisions if d.keep] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    t = Timeline(caption_every_s=1.0)
    assert [t.on_frame(ts).caption_before for ts in (0.0, 0.4, 2.7, 2.9, 3.0)] == [False, False, True, False, True]


def _queue(live: bool, queue_frames: int = 3) -> StreamQueue:
    settings = StreamSettings(live=live, caption_every_s=0, interim=False, draft_tail=False, sampling_fps=0,
                              stats_interval_s=0, label="")
    return StreamQueue("s", settings, post=lambda m: None, on_space=lambda: None, queue_frames=queue_frames,
                       live_max_lag_s=0.5)


def _frame(ts: float) -> Ingest:
    return Ingest(Frame(np.zeros((2, 2, 3), np.uint8), ts), 0.0)


def test_live_queue_drops_oldest_replay_never() -> None:
    live, replay = _queue(True), _queue(False)
    for i in range(6):
        assert replay.add_frame(_frame(i * 0.1)) == 0
        live.add_frame(_frame(i * 0.1))
    assert replay.queued_frames == 6 and not replay.has_room()
    assert live.queued_frames == 3 and live.frames_dropped == 3
    assert [round(it.frame.timestamp_s, 1) for it in live.items] == [0.3, 0.4, 0.5]


def test_live_stale_frames_dropped_latest_wins_within_segment() -> None:
    queue = _queue(True, queue_frames=100)
    for ts in (0.0, 0.2, 0.4):
        queue.add_frame(_frame(ts))
    queue.items.append(CaptionDue(0.0, "cadence", 1.0))
    for ts in (1.0, 1.2):
        queue.add_frame(_frame(ts))
    # newest is 1.2: frames of the first segment older than 0.7 are stale, but its last frame stays
    assert queue.drop_stale() == 2
    assert isinstance(queue.items[0], Ingest) and queue.items[0].frame.timestamp_s == 0.4
    queue.mark_keep()
    queue.items.popleft()
    queue.items.popleft()
    assert queue.drop_stale() == 0  # kept (FLUSH) frames are never dropped


def test_subtitles(tmp_path) -> None:
    cues = [Cue(0.0, 2.5, "a red ball", 0), Cue(2.5, 3661.25, "it stops --> now\n\nthen", 1)]
    vtt = render(cues, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\na red ball\n")
    assert "00:00:02.500 --> 01:01:01.250\nit stops -> now\nthen\n" in vtt
    srt = render(cues, "srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,500\na red ball\n\n2\n00:00:02,500 --> 01:01:01,250\n")
    rows = [json.loads(line) for line in render(cues, "jsonl").splitlines()]
    assert rows[0] == {"start_s": 0.0, "end_s": 2.5, "text": "a red ball", "segment_id": 0}
    path = write_subtitles(tmp_path / "x.srt", cues)
    assert path.read_text() == srt
    with pytest.raises(ValueError, match="subtitle format"):
        format_for("x.txt")


def test_live_queue_has_no_room_when_nothing_may_be_dropped() -> None:
    queue = _queue(True)
    for ts in (0.0, 0.1, 0.2):  # each frame its segment's latest: a caption is due behind each
        assert queue.has_room()
        queue.add_frame(_frame(ts))
        assert queue.add_caption_due(CaptionDue(0.0, "cadence", 1.0))
    assert not queue.has_room() and queue.queued_frames == 3  # the handler must wait, not grow the queue
    assert not queue.add_caption_due(CaptionDue(0.0, "request", 1.0))  # coalesced behind the pending one
    assert len(queue.items) == 6
    queue = _queue(True)
    for ts in (0.0, 0.1, 0.2):
        queue.add_frame(_frame(ts))
    queue.mark_keep()  # FLUSH: none of them may be dropped either
    assert not queue.has_room()
    queue = _queue(True)
    for ts in (0.0, 0.1, 0.2):
        queue.add_frame(_frame(ts))
    assert queue.has_room()  # the newest has no caption behind it: a new frame makes it droppable
    assert queue.add_frame(_frame(0.3)) == 1 and queue.queued_frames == 3


def test_a_stream_whose_client_does_not_read_gets_no_model_time() -> None:
    queue = _queue(True)
    queue.add_frame(_frame(0.0))
    assert queue.runnable()
    queue.unread = queue.max_unread
    assert not queue.runnable()
    queue.closed = True
    assert queue.runnable()  # a closed stream is always served (freed)
