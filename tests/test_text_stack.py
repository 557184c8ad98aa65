"""The stream's lean forward (engine/text_stack.py) against transformers' forward, and the bf16 KV.

Every supported family (the three tiny transformers classes and the embedded default model) runs one
stream twice from the same target, once through `TextStack` and once through transformers
(`target.text_stack = None`): text, frames in chunks, a caption prefix, a draft tree whose accepted path
is not its first nodes, and greedy decoding. Logits, kept hidden states and the KV agree to fp32
rounding and the greedy tokens are identical.

bf16 KV (`StreamConfig.kv_dtype`): keys and values are stored rounded to bf16 and attention runs in bf16
(query rounded, fp32 accumulation, output rounded). Greedy speculative decoding must give exactly greedy
AR's tokens with the same KV dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparrow_core.bench.device_check import tiny_prompt, world_prompt
from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.engine.checkpoint import DEFAULT_MODEL_DIR, load_target
from sparrow_core.engine.stream import StreamConfig, TargetStream
from sparrow_core.engine.text_stack import TextStack
from tiny_models import IMAGE_ID, TINY_TARGETS, random_frames

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FP32_TOL = 2e-5
TOKENS = 16


@pytest.fixture(scope="module")
def default_target():
    return load_target(None)


def _targets(request) -> dict:
    return {**{f: TINY_TARGETS[f](0) for f in sorted(TINY_TARGETS)}, "default": request.getfixturevalue("default_target")}


def run_both_ways(target, script) -> tuple[dict, dict]:
    """`script(stream)` -> record, once through the text stack and once through transformers."""
    stack = target.text_stack
    assert stack is not None, f"{type(target.language_model).__name__} should run on the text stack"
    out = {}
    try:
        for name in ("stack", "transformers"):
            target.text_stack = stack if name == "stack" else None
            out[name] = script(TargetStream(target, StreamConfig(keep_visual_mid_hidden=True)))
    finally:
        target.text_stack = stack
    return out["stack"], out["transformers"]


def stream_script(frames: np.ndarray, text: list[int], prefix: list[int], vocab: int):
    def script(s: TargetStream) -> dict:
        logits = [s.append_text(text)]
        s.append_frames(frames[:1], [0.0])
        s.append_frames(frames[1:], [0.5 * i for i in range(1, len(frames))])
        logits.append(s.append_text(prefix))
        # a tree: root, two children, a grandchild under the second child; keep root -> second -> grandchild
        tokens = [int(logits[-1][:vocab].argmax()), 5, 6, 7]
        mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
        tree = s.append_tree(tokens, [0, 1, 1, 2], mask)
        s.accept_tree(4, [0, 2, 3])
        logits.append(tree[3])
        tokens = []
        for _ in range(6):
            tokens.append(int(logits[-1][:vocab].argmax()))
            logits.append(s.append_text([tokens[-1]]))
        hidden = s.hidden()
        return {
            "logits": torch.stack(logits),
            "tokens": tokens,
            "hidden": {k: v.clone() for k, v in hidden.layers.items()},
            "hidden_slots": hidden.slots.clone(),
            "visual_mid": s.visual_mid_hidden()[1].clone(),
            "keys": [layer.keys.clone() for layer in s.cache.layers],
            "positions": s.positions().clone(),
        }

    return script


@pytest.mark.parametrize("family", [*sorted(TINY_TARGETS), "default"])
def test_text_stack_matches_transformers(request, family):
    target = _targets(request)[family]
    if family == "default":
        prompt = world_prompt(target)
        frames, text, prefix, vocab = prompt.frames[:3], prompt.text, prompt.tail, target.vocab_size
    else:
        frames, text, prefix, vocab = random_frames(3, seed=1), [3, 4, 5], [6, 7], IMAGE_ID
    fast, ref = run_both_ways(target, stream_script(frames, text, prefix, vocab))
    assert fast["tokens"] == ref["tokens"]
    torch.testing.assert_close(fast["logits"], ref["logits"], atol=FP32_TOL, rtol=0)
    assert torch.equal(fast["hidden_slots"], ref["hidden_slots"])
    assert torch.equal(fast["positions"], ref["positions"])
    for layer in ref["hidden"]:
        torch.testing.assert_close(fast["hidden"][layer], ref["hidden"][layer], atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(fast["visual_mid"], ref["visual_mid"], atol=FP32_TOL, rtol=0)
    for a, b in zip(fast["keys"], ref["keys"]):
        torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=0)


def test_text_stack_follows_its_parameters():
    """The fused q/k/v and gate/up weights are derived: a parameter written in place (an optimizer step,
    load_state_dict) rebuilds them, and the stack still gives transformers' forward."""
    target = TINY_TARGETS["llava_onevision"](0)
    stack = target.text_stack
    w = stack.weights()
    assert stack.weights() is w
    with torch.no_grad():
        target.language_model.layers[0].self_attn.k_proj.weight.mul_(2.0)
        target.language_model.layers[-1].mlp.up_proj.weight.add_(0.01)
    assert stack.weights() is not w
    fast, ref = run_both_ways(target, stream_script(random_frames(3, seed=1), [3, 4, 5], [6, 7], IMAGE_ID))
    assert fast["tokens"] == ref["tokens"]
    torch.testing.assert_close(fast["logits"], ref["logits"], atol=FP32_TOL, rtol=0)


def test_text_stack_long_prefill_matches_transformers():
    """A prefill long enough to repeat the kv heads instead of folding the queries (FOLD_ROWS_LIMIT)."""
    target = TINY_TARGETS["qwen2_5_vl"](0)
    ids = [int(x) for x in torch.randint(3, IMAGE_ID, (300,), generator=torch.Generator().manual_seed(0))]

    def script(s: TargetStream) -> torch.Tensor:
        return torch.stack([*s.append_text_all(ids), s.append_text([5])])

    fast, ref = run_both_ways(target, script)
    torch.testing.assert_close(fast, ref, atol=FP32_TOL, rtol=0)


def test_text_stack_refuses_what_it_does_not_reproduce():
    target = TINY_TARGETS["llava_onevision"](0)
    lm = target.language_model
    assert TextStack.supports(lm)
    lm.train()
    try:
        assert not TextStack.supports(lm)
    finally:
        lm.eval()
    assert not TextStack.supports(target.model.model.vision_tower)


# --- bf16 KV ----------------------------------------------------------------------------------------
def greedy_tokens(target, decoder, prompt, kv_dtype) -> tuple[list[int], float]:
    stream, logits = prompt.stream(target, StreamConfig(kv_dtype=kv_dtype).with_needs(decoder.needs))
    steps = list(decoder.decode(stream, logits, TOKENS, [], SamplingConfig(), None))
    return [t for step in steps for t in step.tokens], TOKENS / len(steps)


@pytest.mark.parametrize("family", sorted(TINY_TARGETS))
def test_bf16_kv_greedy_sparrow_is_ar_on_tiny_targets(family):
    target = TINY_TARGETS[family](0)
    torch.manual_seed(0)
    decoder = SpeculativeDecoder(DrafterProposer(TextAnchoredDrafter(target, DrafterConfig())))
    want, _ = greedy_tokens(target, ARDecoder(), tiny_prompt(0), torch.bfloat16)
    got, _ = greedy_tokens(target, decoder, tiny_prompt(0), torch.bfloat16)
    assert got == want


def test_bf16_kv_greedy_sparrow_is_ar_on_the_default_model(default_target):
    target = default_target
    decoder = SpeculativeDecoder(DrafterProposer(load_drafter(DEFAULT_MODEL_DIR / "drafter", target)))
    for seed in (11, 12):
        want, _ = greedy_tokens(target, ARDecoder(), world_prompt(target, seed), torch.bfloat16)
        got, tau = greedy_tokens(target, decoder, world_prompt(target, seed), torch.bfloat16)
        assert got == want
        assert tau > 1.0  # drafts were accepted: the tree path ran


def test_bf16_kv_stores_bf16_and_stays_near_fp32(default_target):
    """The KV is bf16 under fp32 weights (half the bytes); logits move by bf16 rounding, not more."""
    target = default_target
    prompt = world_prompt(target)
    fp32, logits32 = prompt.stream(target)
    bf16, logits16 = prompt.stream(target, StreamConfig(kv_dtype=torch.bfloat16))
    assert bf16.cache.layers[0].keys.dtype == torch.bfloat16 and fp32.cache.layers[0].keys.dtype == torch.float32
    assert bf16.cache.nbytes() * 2 == fp32.cache.nbytes()
    assert logits16.dtype == torch.float32
    assert (logits16 - logits32).abs().max() < 0.05 * logits32.abs().max()
    assert int(logits16.argmax()) == int(logits32.argmax())
    # the transformers path reads the same bf16 KV (the attention function rounds the query to it)
    stack = target.text_stack
    try:
        target.text_stack = None
        _, logits_hf = prompt.stream(target, StreamConfig(kv_dtype=torch.bfloat16))
    finally:
        target.text_stack = stack
    assert (logits_hf - logits16).abs().max() < 0.05 * logits32.abs().max()
