"""`sparrow-caption` end to end: a video file in, timed WebVTT out."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service_support import SHIPPED, model_dir
from sparrow_core.cli.caption import main as caption_main
from sparrow_core.engine.checkpoint import DEFAULT_MODEL_DIR
from sparrow_core.world.caption_parse import parse_caption
from sparrow_core.world.render import render_frame
from sparrow_core.world.state import Body
from sparrow_core.world.video_io import write_video

TRAINED = SHIPPED  # the trained default model and its drafter
needs_model = pytest.mark.skipif(not TRAINED, reason="the trained default model and its drafter are not in sparrow_core/assets")

CLIP_FPS = 10
CLIP_SECONDS = 8.0  # two 4-second captions
COLOUR, SHAPE, BACKGROUND = "red", "circle", "black"
CUE_TIMING = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


def single_object_clip(path, colour: str = COLOUR) -> None:
    """One circle (red by default) drifting right across a black screen: one object, one motion."""
    frames = []
    for i in range(int(CLIP_SECONDS * CLIP_FPS)):
        t = i / CLIP_FPS
        body = Body(oid=0, shape=SHAPE, colour=colour, texture="plain", x=0.25 + 0.05 * t, y=0.5,
                    vx=0.05, vy=0.0, size=0.3, target_size=0.3, phase="free")
        frames.append(render_frame(BACKGROUND, [body], 128, 128))
    write_video(path, frames, fps=CLIP_FPS)


def seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def run_cli(capsys, *args: str) -> list[tuple[float, float, str]]:
    assert caption_main(list(args)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "WEBVTT"
    cues, i = [], 1
    while i < len(out):
        m = CUE_TIMING.match(out[i])
        if m:
            start, end = seconds(*m.groups()[:4]), seconds(*m.groups()[4:])
            cues.append((start, end, out[i + 1] if i + 1 < len(out) else ""))
            i += 2
        else:
            assert out[i] == "", f"unexpected line {out[i]!r}"
            i += 1
    return cues


@needs_model
def test_caption_cli_names_colour_and_shape(tmp_path, capsys):
    clip = tmp_path / "red-circle.mp4"
    single_object_clip(clip)
    cues = run_cli(capsys, str(clip), "--decoding", "ar", "--threads", "1")
    assert len(cues) == 2
    assert cues[0][0] == 0.0 and all(a[1] <= b[0] + 1e-3 for a, b in zip(cues, cues[1:]))
    for _, _, text in cues:
        facts = parse_caption(text)
        named = {(colour, shape) for colour, shape in (f.obj for f in facts.facts if f.obj)}
        assert (COLOUR, SHAPE) in named, text


@needs_model
def test_caption_cli_colour_follows_the_frames(tmp_path, capsys):
    """The same clip in three colours: the same text context, different frames, different words."""
    for colour in ("red", "blue", "yellow"):
        clip = tmp_path / f"{colour}-circle.mp4"
        single_object_clip(clip, colour)
        cues = run_cli(capsys, str(clip), "--decoding", "ar", "--threads", "1")
        for _, _, text in cues:
            named = {f.obj[0] for f in parse_caption(text).facts if f.obj}
            assert named == {colour}, (colour, text)


@needs_model
def test_caption_cli_ar_and_sparrow_agree(tmp_path, capsys):
    args = ["--world-seed", "5", "--seconds", "12", "--threads", "1"]
    ar = run_cli(capsys, *args, "--decoding", "ar")
    sparrow = run_cli(capsys, *args, "--decoding", "sparrow")
    assert len(ar) == 3 and ar == sparrow


def test_caption_cli_spans_include_the_last_frame(tmp_path, capsys):
    """An 8 s clip at 8 fps, a caption every 4 s: cues 0-4 and 4-8 (each frame lasts until the next), and
    the run reports the 8 s of media it captioned."""
    clip = tmp_path / "eight-fps.mp4"
    write_video(clip, [np.full((64, 64, 3), 16 * i % 256, np.uint8) for i in range(64)], fps=8)
    assert caption_main([str(clip), "--model", str(model_dir(tmp_path)), "--decoding", "ar", "--every", "4",
                         "--max-tokens", "2", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    timings = [line for line in out.splitlines() if CUE_TIMING.match(line)]
    assert timings == ["00:00:00.000 --> 00:00:04.000", "00:00:04.000 --> 00:00:08.000"]
    assert "2 captions, 8.0s of media" in err


@needs_model
def test_caption_cli_reaches_every_method_and_named_drafters(tmp_path, capsys):
    """ngram needs no drafter, and --drafter NAME=DIR adds a method under a name of one's own (beside the
    shipped drafters); greedy, each gives AR's captions."""
    args = ["--world-seed", "5", "--seconds", "4", "--threads", "1", "--max-tokens", "12"]
    ar = run_cli(capsys, *args, "--decoding", "ar")
    assert run_cli(capsys, *args, "--decoding", "ngram") == ar
    assert run_cli(capsys, *args, "--drafter", f"mine={DEFAULT_MODEL_DIR / 'drafter-msd'}", "--decoding", "mine") == ar


@needs_model
@pytest.mark.parametrize("args, message", [
    (["--decoding", "nope"], "decoding method 'nope' is not available; available: ar, eagle, msd, ngram, sparrow"),
    (["--drafter", "ngram=."], "'ngram' is not a drafter's name"),
    (["--drafter", "/no/such/dir"], "no such directory: /no/such/dir"),
    (["--drafter", "a=/tmp", "--drafter", "a=/tmp"], "the method 'a' was given a drafter twice"),
])
def test_caption_cli_errors_are_one_line(capsys, args, message):
    try:  # a usage error (argparse) exits 2, a refused session config returns 2
        code = caption_main(["--world-seed", "5", "--seconds", "1", *args])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err), err


def test_caption_cli_refuses_missing_file(tmp_path):
    with pytest.raises(SystemExit):
        caption_main([str(tmp_path / "nope.mp4")])
    with pytest.raises(SystemExit):
        caption_main([])


def test_single_object_clip_is_what_it_says(tmp_path):
    """The fixture clip itself: one red object on black, moving right."""
    from sparrow_core.world.video_io import read_video

    clip = tmp_path / "c.mp4"
    single_object_clip(clip)
    frames = [f for f, _ in read_video(clip)]
    assert len(frames) == CLIP_SECONDS * CLIP_FPS
    red = [np.argwhere((f[..., 0] > 150) & (f[..., 1] < 80)) for f in (frames[0], frames[-1])]
    assert red[0].size and red[1].size and red[1][:, 1].mean() > red[0][:, 1].mean() + 20
