"""Every decoding method the server has is reachable over gRPC, by name or by enum, and the rest are
refused with the list; `sparrow-stream serve` names a bad drafter in one line."""

from __future__ import annotations

import grpc
import pytest

from service_support import (
    CAPTION_EVERY_S,
    SEND_FPS,
    finals,
    load_engine,
    model_dir,
    offline_captions,
    outcome,
    replay_config,
    requests,
    run_with_server,
    world_frames,
)
from streamer.cli import main as stream_main
from streamer.client import CaptionClient, frame_requests
from streamer.proto import pb

FRAMES = int(CAPTION_EVERY_S * SEND_FPS) + 1  # one segment, and the frame that closes it


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(model_dir(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return world_frames(tmp_path_factory.mktemp("clip"))[1][:FRAMES]


def started_method(responses) -> str:
    first = responses[0].event
    assert first.type == pb.StreamEvent.STREAM_STARTED
    return first.detail.rpartition("decoding=")[2]


def test_every_method_by_name_and_enum_and_a_missing_one_is_refused_with_the_list(engine, clip) -> None:
    want = [(text, start, end) for text, start, end in offline_captions(engine, clip, sampling_fps=SEND_FPS)]
    methods = engine.info.decoding_methods

    async def body(server, target):
        async with CaptionClient(target) as client:
            info = await client.model_info()
            assert list(info.methods) == methods and {"ar", "ngram"} <= set(methods)  # ngram needs no drafter
            for method in methods:  # the name wins over the enum (AR in replay_config)
                out, code, details = await outcome(client.describe(frame_requests(replay_config(decoding_method=method), clip)))
                assert code == grpc.StatusCode.OK, details
                assert started_method(out) == method
                assert [(f.text, f.start_s, f.end_s) for f in finals(out)] == want, method  # greedy: lossless
            out, code, details = await outcome(client.describe(frame_requests(
                replay_config(decoding=pb.DECODING_METHOD_NGRAM), clip[:2])))
            assert code == grpc.StatusCode.OK and started_method(out) == "ngram", details
            for name, message in [
                ("nope", f"decoding method 'nope' is not available on this server; it has {', '.join(methods)}"),
                ("x" * 65, "decoding_method is 65 characters; the limit is 64"),
            ]:
                _, code, details = await outcome(client.describe(requests(replay_config(decoding_method=name))))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
            if "eagle" not in methods:  # an enum value the server does not have
                _, code, details = await outcome(client.describe(requests(replay_config(decoding=pb.DECODING_METHOD_EAGLE))))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "'eagle' is not available" in details

    run_with_server(engine, body)


@pytest.mark.parametrize("args, message", [
    (["--drafter", "/no/such/dir"], "--drafter /no/such/dir: no such directory: /no/such/dir"),
    (["--drafter", "ar=/tmp"], "'ar' is not a drafter's name"),
    (["--drafter", "x=/tmp", "--no-drafter"], "--no-drafter and --drafter contradict each other"),
])
def test_serve_names_a_bad_drafter_in_one_line(args, message) -> None:
    with pytest.raises(SystemExit) as exit_:
        stream_main(["serve", "--address", "127.0.0.1:0", "--http-address", "off", *args])
    assert str(exit_.value).startswith("sparrow-stream: error: ") and message in str(exit_.value)
    assert "\n" not in str(exit_.value)
