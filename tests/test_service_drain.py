"""SIGTERM to a real `sparrow-stream serve` process mid-stream: the pending final arrives, then exit 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import urllib.request

import grpc
import numpy as np

from service_support import model_dir
from streamer.client import CaptionClient, config_request, control_request, rgb_request
from streamer.proto import pb
from streamer.serve_process import serve_command


def test_sigterm_mid_stream_delivers_pending_final_then_exits_0(tmp_path) -> None:
    transcripts = tmp_path / "transcripts"
    proc = subprocess.Popen(
        [*serve_command(), "serve", "--address", "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--model", str(model_dir(tmp_path)),
         "--transcript-dir", str(transcripts), "--metrics-port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (\S+) metrics=(\S+)", line)
        assert match, f"no listening line: {line!r} {''.join(stderr)}"
        target, metrics_url = match.groups()

        def frames_ingested() -> float:
            text = urllib.request.urlopen(metrics_url).read().decode()
            return float(re.search(r"^sparrow_frames_ingested_total (\S+)$", text, re.M).group(1))
        frames = [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(6)]

        async def stream() -> list[pb.StreamDescribeResponse]:
            got_first = asyncio.Event()
            never = asyncio.Event()

            async def reqs():
                yield config_request(mode=pb.STREAM_MODE_REPLAY, max_caption_tokens=4, decoding=pb.DECODING_METHOD_AR,
                                     sampling_fps=2.0)  # every frame at 0.5 s steps is ingested
                for i in range(3):
                    yield rgb_request(frames[i], i * 0.5)
                yield control_request(pb.Control.CAPTION_NOW)
                await got_first.wait()
                for i in range(3, 6):
                    yield rgb_request(frames[i], i * 0.5)
                await never.wait()  # the client keeps the stream open: only the drain ends it

            out = []
            async with CaptionClient(target) as client:
                call = client.describe(reqs())
                while (r := await call.read()) is not grpc.aio.EOF:
                    out.append(r)
                    if r.WhichOneof("response") == "caption" and r.caption.is_final and r.caption.segment_id == 0:
                        got_first.set()
                        while await asyncio.to_thread(frames_ingested) < len(frames):  # the last frames are in
                            await asyncio.sleep(0.05)
                        proc.send_signal(signal.SIGTERM)
                assert await call.code() == grpc.StatusCode.OK
            return out

        out = asyncio.run(asyncio.wait_for(stream(), 60))
        assert proc.wait(timeout=30) == 0, "".join(stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    finals = [r.caption for r in out if r.WhichOneof("response") == "caption" and r.caption.is_final]
    assert [(f.segment_id, f.start_s, f.end_s) for f in finals] == [(0, 0.0, 1.0), (1, 1.0, 2.5)]
    ends = [r.event for r in out if r.WhichOneof("response") == "event" and r.event.type == pb.StreamEvent.STREAM_END]
    assert [e.detail for e in ends] == ["draining"]
    (transcript,) = transcripts.glob("*.jsonl")
    assert len(transcript.read_text().splitlines()) == 2
