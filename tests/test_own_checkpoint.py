"""A user's own checkpoint (tiny random ones of the three classes, laid out as a local download, with no
sparrow_stream.json): a drafter trained on one's own video files, and bounded stream memory derived from
the checkpoint's context."""

from __future__ import annotations

import json

import pytest

from sparrow_core.cli.caption import main as caption_main
from sparrow_core.offline import caption_frames
from sparrow_core.session import CaptionEngine, SessionConfig
from sparrow_core.train.drafter import main as train_drafter_main
from sparrow_core.train.drafter_config import DrafterDataError
from sparrow_core.train.video_data import VideoClips, find_videos
from sparrow_core.world.video_io import read_video, write_video, write_world_clip
from tiny_models import TINY_TARGETS, random_frames, save_tiny_checkpoint

CONTEXT = 512  # the tiny checkpoints' max_position_embeddings: a context a test can overrun

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_tiny_checkpoint(arch, root / arch, max_positions=CONTEXT) for arch in TINY_TARGETS}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of three short clips (two formats) and a file that is not a video."""
    root = tmp_path_factory.mktemp("videos")
    for seed, name in ((1, "a.mp4"), (2, "b.webm"), (3, "c.mp4")):
        write_world_clip(root / name, seed=seed, seconds=9, fps=10, size=64)
    (root / "notes.txt").write_text("not a video")
    return root


def test_find_videos_takes_files_folders_and_globs(videos, tmp_path):
    names = [p.name for p, _ in find_videos([str(videos)])]
    assert names == ["a.mp4", "b.webm", "c.mp4"]  # the text file passed over
    assert [p.name for p, _ in find_videos([str(videos / "*.mp4"), str(videos / "a.mp4")])] == ["a.mp4", "c.mp4"]
    assert all(8 <= seconds <= 9 for _, seconds in find_videos([str(videos)]))
    with pytest.raises(DrafterDataError, match="notes.txt is not a video"):
        find_videos([str(videos / "notes.txt")])
    with pytest.raises(DrafterDataError, match="no file, folder or glob match"):
        find_videos([str(tmp_path / "missing*.mp4")])
    with pytest.raises(DrafterDataError, match="at least 2 video files"):
        VideoClips.split(find_videos([str(videos / "a.mp4")]), 0.1, seed=0)
    clips = VideoClips.split(find_videos([str(videos)]), 0.1, seed=0)
    assert len(clips.held_out) == 1 and len(clips.train) == 2 and clips.held_out[0] not in clips.train


@pytest.mark.parametrize("name", ["a.mp4", "b.webm"])
def test_read_video_from_a_start_time_is_the_tail_of_a_full_read(videos, name):
    full = list(read_video(videos / name, fps=2))
    tail = list(read_video(videos / name, fps=2, start_s=4.0))
    assert [t for _, t in tail] == [t for _, t in full if t >= 4.0] and tail
    assert all((a == b).all() for (a, _), (b, _) in zip(tail, [f for f in full if f[1] >= 4.0]))


def drafter_flags(model, videos, out, steps: int, instruction: str = "Say what you see.") -> list[str]:
    return ["--model", str(model), "--videos", str(videos), "--instruction", instruction, "--out", str(out),
            "--samples", "3", "--eval-samples", "1", "--steps", str(steps), "--probe-steps", "1", "--batch", "2",
            "--mtp-steps", "2", "--max-caption-tokens", "6", "--min-segments", "1", "--max-segments", "2",
            "--checkpoint-every", "2", "--warmup", "1", "--tree", "8,3,2"]


@pytest.mark.parametrize("arch", sorted(TINY_TARGETS))
def test_drafter_trained_on_own_videos(checkpoints, videos, tmp_path, capsys, arch):
    """sparrow-train drafter --videos: the target captions the clips, one file is held out, the run resumes,
    the report gives held-out top-1 per draft step, the served tree is recorded, and greedy sparrow with the
    drafter is token-identical to ar."""
    model, out = checkpoints[arch], tmp_path / "drafter"
    assert train_drafter_main(drafter_flags(model, videos, out, steps=2)) == 0
    first = capsys.readouterr().out
    assert "1 held out" in first and "held-out top-1 agreement with the target per draft step" in first
    assert train_drafter_main(drafter_flags(model, videos, out, steps=4)) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    training = cfg["training"]
    assert training["steps"] == 4 and len(training["held_out_top1_per_step"]) == 2
    assert len(training["held_out_files"]) == 1 and training["held_out_streams"] == 1
    assert (cfg["tree_total_tokens"], cfg["tree_depth"], cfg["tree_top_k"]) == (8, 3, 2)
    # the same train_state with other data settings is refused, in one line
    assert train_drafter_main(drafter_flags(model, videos, out, steps=4, instruction="Other.")) == 2
    assert "generated from other data or settings" in capsys.readouterr().err

    engine = CaptionEngine.load(model, {"sparrow": out})
    clip = next(p for p, _ in find_videos([str(videos)]) if str(p) in training["held_out_files"])
    streams = []
    for method in ("ar", "sparrow"):
        session = engine.open_session(SessionConfig(decoding=method, max_caption_tokens=8))
        list(caption_frames(session, read_video(clip, fps=2), caption_every_s=3))
        streams.append(session.stream.token_ids().tolist())
        session.close()
    assert streams[0] == streams[1]


@pytest.mark.parametrize("arch", sorted(TINY_TARGETS))
def test_a_stream_past_the_derived_budget_stays_bounded(checkpoints, arch, watch_peak_length):
    """No sparrow_stream.json: the visual budget and caption history are derived from the context, the
    worst case fits it, and a stream fed several budgets' worth of frames never holds more KV than that."""
    engine = CaptionEngine.load(checkpoints[arch])
    assert not (checkpoints[arch] / "sparrow_stream.json").exists()
    budget, history = engine.defaults.visual_token_budget, engine.defaults.caption_history
    assert budget and history  # derived, not "keep everything"
    config = SessionConfig(max_caption_tokens=6)
    bound = engine.kv_tokens_bound(config)
    assert bound is not None and bound <= CONTEXT
    # the defaults fill the context, no more, under the method with the largest draft tree (ngram: no drafter)
    assert max(engine.kv_tokens_bound(SessionConfig(decoding=m)) for m in engine.decoders) == CONTEXT
    per_token = engine.target.kv_bytes_per_token
    config.max_kv_bytes = bound * per_token
    session = engine.open_session(config)
    stream = session.stream
    peak = watch_peak_length(stream)
    frames = random_frames(3 * budget // engine.target.max_tokens_per_frame + 8, seed=1)
    for i, rgb in enumerate(frames):
        session.ingest(rgb[None], [i * 0.5])
        assert stream.frame_slot_count() <= budget
        if i % 6 == 5:
            session.caption((i + 1) * 0.5)
    st = session.stats()
    assert st.frames_ingested * engine.target.max_tokens_per_frame >= 3 * budget  # over the budget, several times
    assert st.frames_evicted > 0 and st.text_slots_evicted > 0
    assert peak[0] <= bound and st.kv_bytes <= config.max_kv_bytes
    session.close()


def test_caption_cli_prints_the_defaults_and_honours_max_kv_mb(checkpoints, tmp_path, capsys):
    model = checkpoints["qwen2_5_vl"]
    clip = tmp_path / "clip.mp4"
    write_video(clip, list(random_frames(8, seed=2)), fps=2)
    assert caption_main([str(clip), "--model", str(model), "--max-tokens", "4", "--every", "2"]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "stream defaults:" in ln)
    assert f"derived from the context of {CONTEXT} tokens" in line and "KV per stream <=" in line
    assert caption_main([str(clip), "--model", str(model), "--max-kv-mb", "0.375"]) == 2
    err = capsys.readouterr().err
    assert "over the limit of 0.375 MB of KV per stream" in err and "Traceback" not in err
    assert "a visual_token_budget of at most" in err  # what would fit
