"""A user's own checkpoint (tiny random ones of the three classes, laid out as a local download, with no
sparrow_stream.json): bounded stream memory derived from the checkpoint's context."""

from __future__ import annotations

import pytest

from sparrow_core.cli.caption import main as caption_main
from sparrow_core.session import CaptionEngine, SessionConfig
from sparrow_core.world.video_io import write_video
from tiny_models import TINY_TARGETS, random_frames, save_tiny_checkpoint

CONTEXT = 512  # the tiny checkpoints' max_position_embeddings: a context a test can overrun

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_tiny_checkpoint(arch, root / arch, max_positions=CONTEXT) for arch in TINY_TARGETS}


@pytest.mark.parametrize("arch", sorted(TINY_TARGETS))
def test_a_stream_past_the_derived_budget_stays_bounded(checkpoints, arch):
    """No sparrow_stream.json: the visual budget and caption history are derived from the context, the
    worst case fits it, and a stream fed several budgets' worth of frames never holds more KV than that."""
    engine = CaptionEngine.load(checkpoints[arch])
    assert not (checkpoints[arch] / "sparrow_stream.json").exists()
    budget, history = engine.defaults.visual_token_budget, engine.defaults.caption_history
    assert budget and history  # derived, not "keep everything"
    config = SessionConfig(max_caption_tokens=6)
    bound = engine.kv_tokens_bound(config)
    assert bound is not None and bound <= CONTEXT
    assert engine.kv_tokens_bound(SessionConfig()) == CONTEXT  # the defaults fill the context, no more
    per_token = engine.target.kv_bytes_per_token
    config.max_kv_bytes = bound * per_token
    session = engine.open_session(config)
    stream = session.stream
    peak = [0]
    forward = stream._forward

    def watched_forward(*args, **kwargs):  # the real forward, recording the stream's length after it
        out = forward(*args, **kwargs)
        peak[0] = max(peak[0], stream.length)
        return out

    stream._forward = watched_forward
    frames = random_frames(3 * budget // engine.target.max_tokens_per_frame + 8, seed=1)
    for i, rgb in enumerate(frames):
        session.ingest(rgb[None], [i * 0.5])
        assert stream.frame_slot_count() <= budget
        if i % 6 == 5:
            session.caption()
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
