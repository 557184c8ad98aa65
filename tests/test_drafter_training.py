"""Drafter training end to end on a tiny world target: data from the target's own captions, the unrolled
(MTP) loss, checkpoints, resume, and a saved drafter that loads and decodes losslessly."""

from __future__ import annotations

import json
import time

import pytest

from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.decoders import build_decoders
from sparrow_core.decoding.drafter import load_drafter
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.stream import TargetStream
from sparrow_core.train.drafter import DrafterTrainConfig, train
from sparrow_core.train.drafter_config import recipe_for
from sparrow_core.train.drafter_data import build_data

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_config(out, **kw) -> DrafterTrainConfig:
    base = dict(samples=3, eval_samples=1, min_segments=1, max_segments=2, max_caption_tokens=8, steps=STEPS,
                probe_steps=1, batch=2, mtp_steps=2, checkpoint_every=2, warmup=1)
    base.update(kw)
    return DrafterTrainConfig(out=str(out), **base)


def test_train_resume_and_load(world_target, tmp_path):
    out = train(small_config(tmp_path / "d"), target=world_target)
    cfg = json.loads((out / "config.json").read_text())
    training = cfg["training"]
    assert training["steps"] == STEPS and set(training["feature_layer_probe_top1"]) == {"last", "penultimate"}
    assert cfg["feature_layer"] in ("last", "penultimate") and cfg["visual_span"] is None  # "all": VATA at inference
    assert len(training["held_out_top1_per_step"]) == 2  # one agreement figure per unroll step
    # resume: the same directory with more steps continues from the checkpoint
    out = train(small_config(tmp_path / "d", steps=STEPS + 2), target=world_target)
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == STEPS + 2

    drafter = load_drafter(out, world_target)
    decoder = build_decoders({"sparrow": drafter})["sparrow"]
    prefix = world_target.encode_text("<|im_start|>assistant\n")
    runs = []
    for dec in (ARDecoder(), decoder):
        s = TargetStream(world_target)
        logits = s.append_text(prefix)
        runs.append([t for st in dec.decode(s, logits, 8, [], SamplingConfig()) for t in st.tokens])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("variant, ablation", [("eagle", "all"), ("msd", "all"), ("sparrow", "mtp_ivsb")])
def test_variants_train(world_target, tmp_path, variant, ablation):
    out = train(small_config(tmp_path / variant, variant=variant, ablation=ablation, feature_layer="last", steps=2),
                target=world_target)
    cfg = json.loads((out / "config.json").read_text())
    want_span = {"eagle": None, "msd": "embeds", "sparrow": "mid_hidden"}[variant]
    assert cfg["variant"] == variant and cfg["visual_span"] == want_span


def test_eagle_learns_from_text_alone_and_is_measured_on_the_streams_it_serves(world_target, tmp_path):
    """The eagle baseline's training streams are the target re-run without frames; its held-out streams, like
    every variant's, keep the frames: held-out top-1 is agreement with the target as it serves."""
    cfg = small_config(tmp_path / "e", variant="eagle", samples=2, feature_layer="last")
    recipe = recipe_for("eagle", "all", cfg.mtp_steps, cfg.ivsb_visible)
    (tmp_path / "e").mkdir()
    train_streams, held_out = build_data(world_target, cfg, recipe, tmp_path / "e", time.time() + 600)
    text = int(TokenKind.TEXT)
    assert len(train_streams) == 2 and all(bool((s.kinds == text).all()) for s in train_streams)
    assert len(held_out) == 1 and all(bool((s.kinds != text).any()) and s.vis for s in held_out)
