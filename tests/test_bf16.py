"""bf16 on CPU: greedy sparrow gives greedy AR's tokens in bf16, for the three transformers classes (tiny
random checkpoints) and the embedded default model with its shipped drafter; the KV cache, the kept hidden
states and the drafter all run in the model's dtype.

What "identical" can mean in bf16: verification computes a token's attention among the tree's rows, AR
alone, and bf16 rounds the two sums differently (measured: up to 4e-3 on one attention output), so where AR's
two best logits are tied within bf16 resolution the two may break the tie differently, and from there they
decode different (equally likely) continuations. The test holds them to identical tokens up to such a tie,
and at the tie to one of the tied tokens; anywhere else a difference fails (`bench.device_check.lossless`,
which the GPU check runs too).
"""

from __future__ import annotations

import pytest
import torch

from sparrow_core.bench.device_check import lossless, tiny_prompt, world_prompt
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.engine.checkpoint import DEFAULT_MODEL_DIR, load_target
from sparrow_core.engine.stream import TargetStream
from sparrow_core.engine.tiny_targets import on
from tests.tiny_models import TINY_TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOKENS = 16


@pytest.mark.parametrize("family", sorted(TINY_TARGETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_targets_greedy_sparrow_is_ar_in_bf16(family, seed):
    target = on(TINY_TARGETS[family](seed), "cpu", torch.bfloat16)
    torch.manual_seed(seed)
    drafter = TextAnchoredDrafter(target, DrafterConfig())
    assert drafter.fc.weight.dtype == torch.bfloat16
    row = lossless(target, SpeculativeDecoder(DrafterProposer(drafter)), tiny_prompt(seed), TOKENS)
    assert row["passed"], row
    # the stream keeps everything in the model's dtype
    stream = TargetStream(target)
    stream.append_text([3, 4])
    assert stream.cache.layers[0].keys.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in stream.hidden().layers.values())


def test_default_model_greedy_sparrow_is_ar_in_bf16():
    target = load_target(None, dtype=torch.bfloat16)
    drafter = load_drafter(DEFAULT_MODEL_DIR / "drafter", target)
    assert drafter.fc.weight.dtype == torch.bfloat16
    row = lossless(target, SpeculativeDecoder(DrafterProposer(drafter)), world_prompt(target), TOKENS)
    assert row["passed"] and row["tau"] > 1.0, row  # the shipped drafter gets drafts accepted
