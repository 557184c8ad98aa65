"""clients/replay.py against a server on 127.0.0.1: subtitles out, finals equal to the offline captioner's."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import service_support as support
from sparrow_core.subtitles import format_timestamp

REPLAY = Path(__file__).resolve().parent.parent / "clients" / "replay.py"


async def run_client(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(REPLAY), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


def test_replay_fast_writes_vtt_equal_to_offline(engine, tmp_path) -> None:
    clip, frames = support.world_frames(tmp_path)
    expected = support.offline_captions(engine, frames)
    vtt, srt = tmp_path / "captions.vtt", tmp_path / "captions.srt"

    async def body(server, target):
        common = ["--server", target, "--fast", "--every", str(support.CAPTION_EVERY_S), "--fps", str(support.SEND_FPS),
                  "--max-tokens", str(support.MAX_TOKENS), "--method", "ar"]
        code, out, err = await run_client(str(clip), *common, "--out", str(vtt))
        assert code == 0, err
        assert f"{len(expected)} captions, {len(frames)} frames sent, 0 dropped" in out
        for text, start, end in expected:
            assert f"[{format_timestamp(start)} --> {format_timestamp(end)}] {text}" in out
        code, _, err = await run_client(str(clip), *common, "--out", str(srt), "--quiet")
        assert code == 0, err

    support.run_with_server(engine, body)
    cues = re.findall(r"(\S+) --> (\S+)\n(.*)\n", vtt.read_text())
    assert vtt.read_text().startswith("WEBVTT\n")
    assert [c[2] for c in cues] == [text for text, _, _ in expected]
    assert [(c[0], c[1]) for c in cues] == [(format_timestamp(s), format_timestamp(e)) for _, s, e in expected]
    assert srt.read_text().startswith("1\n00:00:00,000 --> ")


def test_replay_realtime_world_clip_to_jsonl_and_errors(engine, tmp_path) -> None:
    out_path = tmp_path / "captions.jsonl"

    async def body(server, target):
        code, out, err = await run_client(
            "--world-seed", "5", "--seconds", "3", "--server", target, "--realtime", "--every", "1.5",
            "--max-tokens", "3", "--out", str(out_path),
        )
        assert code == 0, err
        assert "2 captions" in out
        code, _, err = await run_client(str(tmp_path / "missing.mp4"), "--server", target)
        assert code == 2 and "no such file" in err
        code, _, err = await run_client("--seconds", "1", "--server", target, "--max-tokens", "100000")
        assert code == 1 and "INVALID_ARGUMENT" in err

    support.run_with_server(engine, body)
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [r["segment_id"] for r in rows] == [0, 1]
    assert rows[0]["start_s"] == 0.0 and rows[0]["end_s"] == rows[1]["start_s"] < rows[1]["end_s"]
