"""The drafter's text-anchored attention through the tree-attention kernels (`kernels.dispatch`): per-row
visible slots (`visible_slots`, `rows_attention`) against a dense masked softmax, and a drafter drafting
with the Triton kernels (the Triton interpreter on CPU, SPARROW_ATTN_BACKEND=triton; on CUDA "auto" picks
them) grows the tree SDPA grows, while greedy sparrow stays AR with the target verifying through them too."""

from __future__ import annotations

import pytest
import torch

import sparrow_core.kernels.dispatch as dispatch
from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.engine.stream import TargetStream
from sparrow_core.kernels.dispatch import BACKEND_ENV, rows_attention, visible_slots
from sparrow_core.kernels.runtime import AUTOTUNE_ENV
from tests.tiny_models import random_frames, tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dense_reference(q, k, v, allowed, scale):
    """q [1, Hq, Q, D], k/v [1, Hkv, S, D], allowed [Q, S] -> [1, Hq, Q, D], fp32 softmax over allowed keys."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    scores = (q.float() @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ vv).to(q.dtype)


def test_visible_slots():
    allowed = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert visible_slots(allowed).tolist() == [[0, 2, -1, -1], [3, -1, -1, -1], [0, 1, 2, 3]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_attention_matches_a_dense_mask(backend):
    g = torch.Generator(device="cpu").manual_seed(0)
    q_len, slots, hq, h_kv, d = 6, 40, 4, 2, 16
    q = torch.randn(1, hq, q_len, d, generator=g)
    k, v = torch.randn(1, h_kv, slots, d, generator=g), torch.randn(1, h_kv, slots, d, generator=g)
    allowed = torch.rand(q_len, slots, generator=g) < 0.4
    allowed[:, 0] = True  # every row sees a key
    out = rows_attention(q, k, v, visible_slots(allowed), d**-0.5, backend=backend)
    want = dense_reference(q, k, v, allowed[None, None], d**-0.5)
    assert (out - want).abs().max().item() < 2e-5


def decode_run(target, decoder, frames):
    stream = TargetStream(target)
    stream.append_text([3, 4, 5])
    stream.append_frames(frames, [0.0, 0.5])
    logits = stream.append_text([6, 7, 8])
    return [t for step in decoder.decode(stream, logits, 8, [], SamplingConfig()) for t in step.tokens], stream


def test_drafter_drafts_through_the_kernels(monkeypatch):
    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    target = tiny_qwen2_5_vl()
    torch.manual_seed(0)
    drafter = TextAnchoredDrafter(target, DrafterConfig(tree_total_tokens=10, tree_depth=3, tree_top_k=3))
    frames = random_frames(2)
    want, stream = decode_run(target, ARDecoder(), frames)
    proposer = DrafterProposer(drafter)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    sdpa_tree = proposer.propose(stream, want[0], 3)

    calls = []
    kernel = dispatch.draft_attention

    def counted(*args, **kwargs):  # the real kernel, counted
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(dispatch, "draft_attention", counted)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    triton_tree = DrafterProposer(drafter).propose(stream, want[0], 3)
    assert calls, "the drafter did not reach the Triton kernel"
    assert torch.equal(triton_tree.tokens, sdpa_tree.tokens) and torch.equal(triton_tree.parents, sdpa_tree.parents)
    assert torch.allclose(triton_tree.scores, sdpa_tree.scores, atol=1e-4)

    calls.clear()
    got, _ = decode_run(target, SpeculativeDecoder(DrafterProposer(drafter)), frames)
    assert got == want
    assert any(shape[0] == 1 for shape in calls) and any(shape[0] > 1 for shape in calls)  # target and drafter
