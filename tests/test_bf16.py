"""bf16 on CPU: greedy sparrow gives greedy AR's tokens in bf16, for the three transformers classes (tiny
random checkpoints) and the embedded default model with its shipped drafter; the KV cache, the kept hidden
states and the drafter all run in the model's dtype.

What "identical" can mean in bf16: verification computes a token's attention among the tree's rows, AR
alone, and bf16 rounds the two sums differently (measured: up to 4e-3 on one attention output), so where AR's
two best logits are tied within bf16 resolution the two may break the tie differently, and from there they
decode different (equally likely) continuations. The test holds them to identical tokens up to such a tie,
and at the tie to one of the tied tokens; anywhere else a difference fails.
"""

from __future__ import annotations

import pytest
import torch

from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.decoders import Decoder
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.engine.checkpoint import DEFAULT_MODEL_DIR, load_target
from sparrow_core.engine.layout import preamble_text
from sparrow_core.engine.stream import TargetStream
from sparrow_core.engine.target import TargetModel
from sparrow_core.train.data import WorldStreamSpec, world_segments
from tests.tiny_models import TINY_TARGETS, random_frames

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOKENS = 16
# two logits closer than this (relative to their size) are a tie in bf16: 4 units in its last place
BF16_TIE = 4 * torch.finfo(torch.bfloat16).eps


def decode(target: TargetModel, decoder: Decoder, prompt: list[int], frames, times, tail: list[int]) -> list[int]:
    stream = TargetStream(target)
    stream.append_text(prompt)
    stream.append_frames(frames, times)
    logits = stream.append_text(tail)
    return [t for step in decoder.decode(stream, logits, TOKENS, [], SamplingConfig()) for t in step.tokens]


def ar_logits_at(target: TargetModel, prompt, frames, times, tail, tokens: list[int]) -> torch.Tensor:
    """AR's next-token logits after `tokens` [V]."""
    stream = TargetStream(target)
    stream.append_text(prompt)
    stream.append_frames(frames, times)
    logits = stream.append_text(tail)
    for t in tokens:
        logits = stream.append_text([t])
    return logits


def assert_same_up_to_a_tie(target, prompt, frames, times, tail, want: list[int], got: list[int]) -> None:
    if got == want:
        return
    i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
    logits = ar_logits_at(target, prompt, frames, times, tail, want[:i])
    best = logits.max()
    tied = (best - logits <= BF16_TIE * best.abs().clamp(min=1.0)).nonzero().squeeze(1).tolist()
    assert got[i] in tied and len(tied) > 1, (
        f"sparrow left AR at token {i} ({got[i]} for {want[i]}) where AR's logits are not tied: "
        f"best {float(best):.5f}, sparrow's token {float(logits[got[i]]):.5f}"
    )


def bf16(target: TargetModel) -> TargetModel:
    target.model.to(torch.bfloat16)
    return target


@pytest.mark.parametrize("family", sorted(TINY_TARGETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_targets_greedy_sparrow_is_ar_in_bf16(family, seed):
    target = bf16(TINY_TARGETS[family](seed))
    torch.manual_seed(seed)
    drafter = TextAnchoredDrafter(target, DrafterConfig())
    assert drafter.fc.weight.dtype == torch.bfloat16
    sparrow = SpeculativeDecoder(DrafterProposer(drafter))
    case = ([3, 4, 5], random_frames(2, seed=seed), [0.0, 0.5], [6, 7])
    want = decode(target, ARDecoder(), *case)
    got = decode(target, sparrow, *case)
    assert_same_up_to_a_tie(target, *case, want, got)
    # the stream keeps everything in the model's dtype
    stream = TargetStream(target)
    stream.append_text([3, 4])
    assert stream.cache.layers[0].keys.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in stream.hidden().layers.values())


def test_default_model_greedy_sparrow_is_ar_in_bf16():
    target = load_target(None, dtype=torch.bfloat16)
    drafter = load_drafter(DEFAULT_MODEL_DIR / "drafter", target)
    assert drafter.fc.weight.dtype == torch.bfloat16
    sparrow = SpeculativeDecoder(DrafterProposer(drafter))
    seg = next(iter(world_segments(WorldStreamSpec(seed=11, segments=1, size=target.image_size))))
    layout = target.caption_layout()
    case = (target.encode_text(preamble_text()), seg.frames, seg.times, layout.prefix)
    want = decode(target, ARDecoder(), *case)
    got = decode(target, sparrow, *case)
    assert_same_up_to_a_tie(target, *case, want, got)
