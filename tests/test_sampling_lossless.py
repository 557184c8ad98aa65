"""Sampled decoding is lossless as a whole: for every method `build_decoders` offers, the first three
tokens it emits are distributed as AR decoding's, on a tiny LLaVA-OneVision and a tiny Qwen2.5-VL target.

What is compared. Each method decodes the same caption turn from the same stream under `SEEDS` seeds
(its own seed set), three tokens each; AR decodes it under two other seed sets, A and B. The statistic is
the total variation distance to AR's A + B (2,000 draws) of (1) the joint distribution of the three
tokens and (2) each position's marginal, averaged over the three positions. The joint is what
losslessness means (token 2 must follow the target after the token 1 actually emitted, token 3 after
both); it spreads over many outcomes at 1,000 draws, so the per-position marginals, with few outcomes
each, are the sharper test of a bias at one position. The noise band is the same statistic between AR's
A and B, measured here: a method must stay within `BAND_SLACK` times it (against A + B a lossless method
lands near 0.87 of the band: sqrt(1/1000 + 1/2000) against sqrt(2/1000)). A verifier that accepts every
draft fails every method here (joint TV 2.2 times the band on LLaVA-OneVision, 4.2 on Qwen2.5-VL).

Each method goes through one draft-verify step, and usually two (three tokens, tau < 3): verification
after an accepted draft, after a rejected one, and the bonus draw. The drafters are trained for a few
steps on the target's own samples from this very context (`train_briefly`), so that they propose the
target's likely tokens and verification accepts drafts as well as rejecting them (checked: at least
`MIN_ACCEPTED`; a random drafter's drafts are almost always rejected). `ngram` drafts from an earlier
caption turn that the target sampled. Every seed decodes from the same stream, rolled back afterwards.

The temperatures make the distributions non-trivial and still concentrated enough for 1,000 draws (the
tiny random targets' logits span < 1, so temperature 1 would be close to uniform over 128 tokens); the
Qwen case also cuts the nucleus (top_p < 1). The targets have two text layers (`TEXT_LAYERS`), for time.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.decoders import Decoder, build_decoders
from sparrow_core.decoding.drafter import VARIANTS, DrafterConfig, TextAnchoredDrafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.engine.caption_history import CaptionHistory, CaptionTurn
from sparrow_core.engine.layout import CaptionLayout
from sparrow_core.engine.stream import StreamConfig, TargetStream
from sparrow_core.train.drafter import unrolled_loss
from sparrow_core.train.drafter_config import Recipe
from sparrow_core.train.drafter_data import _read_stream, make_batch
from tiny_models import EOS_ID, random_frames, tiny_llava_onevision, tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CASES = {
    "llava_onevision": (tiny_llava_onevision, SamplingConfig(temperature=0.055)),
    "qwen2_5_vl": (tiny_qwen2_5_vl, SamplingConfig(temperature=0.05, top_p=0.8)),
}
TEXT_LAYERS = 2  # half the tiny targets' depth: a third less time per forward, and 12,000 decodes to run
SEEDS = 1000
TOKENS = 3  # emitted tokens compared per seed
BAND_SLACK = 1.5  # a method's TV to AR's sets A + B may be this many times the TV between A and B
MIN_ACCEPTED = 50  # drafts accepted over the SEEDS runs of a method: verification's accepting branch ran
SEED_SETS = {"ar_a": 0, "ar_b": 1, "method": 2}  # seeds of a set: base * SEEDS .. base * SEEDS + SEEDS - 1

SYSTEM = [3, 4, 5, 6]
LAYOUT = CaptionLayout(prefix=[7, 8], end_id=EOS_ID, suffix=[9], stop_ids=[EOS_ID])
EARLIER_CAPTION_TOKENS, EARLIER_CAPTION_SEED = 24, 99
TREE = dict(tree_total_tokens=6, tree_depth=2, tree_top_k=2)  # at most two drafts deep: three tokens per seed
TRAIN_SAMPLES, TRAIN_STEPS, TRAIN_CONTINUATION = 16, 40, 6


def context(target, sampling: SamplingConfig) -> tuple[TargetStream, torch.Tensor]:
    """System text, two frames, an earlier caption turn the target sampled (`sampling`, a fixed seed), one
    more frame, and the caption turn under test opened. Returns the stream and its next-token logits [V].
    The stream keeps what every decoder needs (msd: the frames' embeddings) and what the trainer reads."""
    frames = random_frames(3, seed=21)
    stream = TargetStream(target, StreamConfig(keep_visual_embeds=True, keep_visual_mid_hidden=True))
    stream.append_text(SYSTEM)
    stream.append_frames(frames[:2], [0.0, 0.5])
    history = CaptionHistory(None)
    turn = CaptionTurn(stream, LAYOUT, history)
    gen = torch.Generator().manual_seed(EARLIER_CAPTION_SEED)
    earlier = [t for step in ARDecoder().decode(stream, turn.logits, EARLIER_CAPTION_TOKENS, [], sampling, gen)
               for t in step.tokens]
    turn.close(earlier)
    stream.append_frames(frames[2:], [1.0])
    return stream, CaptionTurn(stream, LAYOUT, history).logits


def train_briefly(target, variant: str, sampling: SamplingConfig) -> TextAnchoredDrafter:
    """A drafter trained for a few steps (the trainer's own loss) on the target's sampled continuations of
    the context: it proposes the target's likely tokens there."""
    gen = torch.Generator().manual_seed(7)
    stream, logits = context(target, sampling)
    start = stream.length
    samples = []
    for _ in range(TRAIN_SAMPLES):
        learn = [start - 1]  # rows whose next token the target decoded
        for _step in ARDecoder().decode(stream, logits, TRAIN_CONTINUATION, [], sampling, gen):
            learn.append(stream.length - 1)
        samples.append(_read_stream(target, stream, learn[:-1]))
        stream.rollback(stream.length - start)
    recipe = Recipe("embeds", 1.0, 1, "embeds") if variant == "msd" else Recipe(None, 0.0, TREE["tree_depth"], None)
    torch.manual_seed(VARIANTS.index(variant))
    drafter = TextAnchoredDrafter(target, DrafterConfig(variant=variant, **TREE))
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    drafter.train()
    for _ in range(TRAIN_STEPS):
        loss, _agree = unrolled_loss(drafter, make_batch(samples, recipe, "last", "target", rng), recipe.mtp_steps, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


def first_tokens(target, decoder: Decoder, sampling: SamplingConfig, seed_set: str,
                 metrics: DecodeMetrics | None = None) -> list[tuple[int, ...]]:
    """The first TOKENS tokens `decoder` emits from the context under each seed of `seed_set`."""
    stream, logits = context(target, sampling)
    start = stream.length
    gen = torch.Generator()
    out = []
    first_seed = SEED_SETS[seed_set] * SEEDS
    for seed in range(first_seed, first_seed + SEEDS):
        gen.manual_seed(seed)
        tokens = [t for step in decoder.decode(stream, logits, TOKENS, [], sampling, gen, metrics) for t in step.tokens]
        assert len(tokens) == TOKENS
        out.append(tuple(tokens))
        stream.rollback(stream.length - start)  # the next seed decodes from the same stream
    return out


def total_variation(a: list, b: list) -> float:
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in ca.keys() | cb.keys())


def distances(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> tuple[float, float]:
    """(TV of the joint, mean over positions of the TV of that position's marginal)."""
    per_position = [total_variation([x[i] for x in a], [x[i] for x in b]) for i in range(TOKENS)]
    return total_variation(a, b), sum(per_position) / TOKENS


class Case:
    """One target with its drafters, decoders and AR's two reference samples, built once per module."""

    def __init__(self, arch: str) -> None:
        build, self.sampling = CASES[arch]
        self.target = build(text_layers=TEXT_LAYERS)
        self.decoders = build_decoders({v: train_briefly(self.target, v, self.sampling) for v in VARIANTS})
        self.ar_a = first_tokens(self.target, self.decoders["ar"], self.sampling, "ar_a")
        self.ar_b = first_tokens(self.target, self.decoders["ar"], self.sampling, "ar_b")
        self.band = distances(self.ar_a, self.ar_b)


_cases: dict[str, Case] = {}


def case_for(arch: str) -> Case:
    if arch not in _cases:
        _cases[arch] = Case(arch)
    return _cases[arch]


METHODS = ["sparrow", "eagle", "msd", "ngram"]


def test_every_offered_method_is_tested():
    assert set(case_for("qwen2_5_vl").decoders) == {"ar", *METHODS}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_the_reference_distribution_is_not_trivial(arch):
    case = case_for(arch)
    first = Counter(x[0] for x in case.ar_a)
    assert len(first) >= 5 and max(first.values()) < 0.9 * SEEDS  # sampling, not greedy
    assert len(set(case.ar_a)) >= 20  # the joint spreads over many outcomes
    joint_band, position_band = case.band
    assert position_band < 0.15 and joint_band < 0.6  # 1,000 draws resolve these distributions


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_sampled_tokens_follow_ar(arch, method):
    case = case_for(arch)
    metrics = DecodeMetrics()
    got = first_tokens(case.target, case.decoders[method], case.sampling, "method", metrics)
    joint, position = distances(got, case.ar_a + case.ar_b)
    joint_band, position_band = case.band
    assert joint <= BAND_SLACK * joint_band, (joint, joint_band)
    assert position <= BAND_SLACK * position_band, (position, position_band)
    # verification accepted drafts as well as rejecting them
    assert MIN_ACCEPTED <= metrics.accepted_tokens < metrics.draft_tokens, metrics
