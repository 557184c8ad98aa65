"""Speculative decoding against AR decoding (`ARDecoder`) on tiny random targets with untrained random drafters.

Greedy decoding must be lossless for every method: the same tokens as AR, and the stream afterwards
holding the same tokens at the same positions. Sampling must preserve the target distribution.
"""

from __future__ import annotations

import pytest
import torch

from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.draft_tree import TreeConfig, build_tree, root_only
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.proposers.ngram import NgramProposer
from sparrow_core.decoding.sampling import SamplingConfig, probabilities, sample
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.decoding.verify import verify_tree
from sparrow_core.engine.stream import TargetStream
from speculative_support import (
    CAPTION_PREFIX,
    CAPTION_SUFFIX,
    CAPTIONS,
    GREEDY,
    MAX_TOKENS,
    SYSTEM,
    TARGETS,
    assert_same_stream,
    run_captions,
    target_for,
)
from tiny_models import EOS_ID, VOCAB, random_frames

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL_TREE = TreeConfig(total_tokens=8, depth=3, top_k=3)


def proposer_for(method: str, target):
    if method == "ngram":
        return NgramProposer()
    variant, _, extra = method.partition("-")
    cfg = DrafterConfig(variant=variant)
    if extra == "compact":  # compacted positions, a short text window with sinks
        cfg = DrafterConfig(variant=variant, position_mode="compact", text_window=6, sink_tokens=2)
    if extra == "ivsb":  # attends to the frames' L/2 states (ablation "MTP+IVSB" without VATA)
        cfg = DrafterConfig(variant=variant, visual_span="mid_hidden")
    tree = TreeConfig() if extra == "default" else SMALL_TREE
    torch.manual_seed(1)
    return DrafterProposer(TextAnchoredDrafter(target, cfg), tree)


METHODS = ["sparrow", "sparrow-compact", "sparrow-default", "sparrow-ivsb", "eagle", "msd", "ngram"]


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_lossless(arch, method):
    target = target_for(arch)
    want, ref, _ = run_captions(target, ARDecoder())
    decoder = SpeculativeDecoder(proposer_for(method, target))
    got, s, m = run_captions(target, decoder)
    assert got == want
    assert_same_stream(s, ref)
    assert m.emitted_tokens == sum(map(len, want)) and m.tau >= 1.0


HISTORY_CAPTIONS = 4
KEEP_TURNS = 1  # every caption turn but the latest is evicted: the drafters must drop them too


@pytest.mark.parametrize("method", ["sparrow", "sparrow-compact", "msd"])
def test_greedy_is_lossless_while_caption_turns_are_evicted(method):
    target = target_for("qwen2_5_vl")
    want, ref, _ = run_captions(target, ARDecoder(), captions_n=HISTORY_CAPTIONS, history=KEEP_TURNS)
    decoder = SpeculativeDecoder(proposer_for(method, target))
    got, s, _ = run_captions(target, decoder, captions_n=HISTORY_CAPTIONS, history=KEEP_TURNS)
    assert got == want
    assert_same_stream(s, ref)
    assert s.text_slots_evicted > 0
    # the drafter's entries are the stream's relevant slots, evicted turns gone
    state = decoder.proposer.state(s)
    state.sync(s)
    slots = state.relevant_slots(s)
    assert torch.equal(state.tok, s.token_ids()[slots]) and torch.equal(state.pos, s.positions()[:, slots].T)


class OracleProposer:
    """Proposes the known AR continuation as a chain, with a wrong sibling beside every true node.

    `ignore_cap` drafts `depth` deep whatever `max_depth` says, so the decoder's own cut is exercised.
    """

    name = "oracle"

    def __init__(self, continuation: list[int], start_length: int, depth: int, ignore_cap: bool = False):
        self.cont, self.start, self.depth, self.ignore_cap = continuation, start_length, depth, ignore_cap
        self.metrics = DecodeMetrics()

    def prefill(self, stream) -> None:
        return None

    def observe(self, ranks, context) -> None:
        return None

    def propose_many(self, requests):
        return [self.propose(*request) for request in requests]

    def propose(self, stream, root_token: int, max_depth: int):
        done = stream.length - self.start  # tokens emitted so far; the root is cont[done]
        depth = self.depth if self.ignore_cap else min(self.depth, max_depth)
        truth = self.cont[done + 1 : done + 1 + depth]
        if not truth:
            return root_only(root_token)
        # node 2d+1 = the true token at depth d+1, node 2d+2 = a wrong sibling of it
        tokens, parents = [root_token], [-1]
        for d, tok in enumerate(truth):
            parent = 0 if d == 0 else 2 * d - 1
            tokens += [tok, (tok + 1) % VOCAB]
            parents += [parent, parent]
        return build_tree(torch.tensor(tokens), torch.tensor(parents))


ORACLE_TOKENS = 12


def ar_caption(target, max_tokens, stop_ids):
    s = TargetStream(target)
    s.append_text(SYSTEM)
    s.append_frames(random_frames(2, seed=12), [0.0, 0.5])
    logits = s.append_text(CAPTION_PREFIX)
    start = s.length
    tokens = [t for st in ARDecoder().decode(s, logits, max_tokens, stop_ids, GREEDY) for t in st.tokens]
    return tokens, s, start


def spec_caption(target, proposer, max_tokens, stop_ids):
    s = TargetStream(target)
    s.append_text(SYSTEM)
    s.append_frames(random_frames(2, seed=12), [0.0, 0.5])
    logits = s.append_text(CAPTION_PREFIX)
    steps = list(SpeculativeDecoder(proposer).decode(s, logits, max_tokens, stop_ids, GREEDY, metrics=proposer.metrics))
    return [t for st in steps for t in st.tokens], s, steps


def test_oracle_drafts_are_accepted_several_per_forward():
    target = target_for("llava_onevision")
    cont, ref, start = ar_caption(target, ORACLE_TOKENS, [])
    oracle = OracleProposer(cont, start, depth=4)
    got, s, steps = spec_caption(target, oracle, ORACLE_TOKENS, [])
    assert got == cont
    assert_same_stream(s, ref)
    # every step accepts root + 4 drafts until the cap: 12 tokens = 5 + 5 + 2
    assert [len(st.tokens) for st in steps] == [5, 5, 2]
    assert oracle.metrics.accepted_tokens == 4 + 4 + 1 and oracle.metrics.tau == ORACLE_TOKENS / 3


def test_stop_token_inside_an_accepted_path():
    target = target_for("llava_onevision")
    cont, _, start = ar_caption(target, ORACLE_TOKENS, [])
    # the first token from index 2 on that did not occur before it: AR stops right there
    stop_at = next(i for i in range(2, len(cont)) if cont[i] not in cont[:i])
    want, ref, _ = ar_caption(target, ORACLE_TOKENS, [cont[stop_at]])
    assert want == cont[: stop_at + 1]
    got, s, steps = spec_caption(target, OracleProposer(cont, start, depth=8), ORACLE_TOKENS, [cont[stop_at]])
    assert got == want and steps[-1].done and len(steps) == 1  # the stop sat inside the first path
    assert_same_stream(s, ref)  # what followed the stop in the accepted path was rolled back


MAX_MID_PATH = 5


def test_max_tokens_hit_mid_path():
    target = target_for("qwen2_5_vl")
    cont, _, start = ar_caption(target, ORACLE_TOKENS, [])
    want, ref, _ = ar_caption(target, MAX_MID_PATH, [])
    # the oracle drafts 8 deep regardless, so the first accepted path (9 tokens) overshoots the cap of 5
    got, s, steps = spec_caption(target, OracleProposer(cont, start, depth=8, ignore_cap=True), MAX_MID_PATH, [])
    assert got == want == cont[:MAX_MID_PATH] and len(steps) == 1
    assert_same_stream(s, ref)


SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9)
SAMPLING_DRAWS = 4000
SAMPLING_TV_BOUND = 0.08


def test_first_sampled_token_under_sparrow_matches_the_target_softmax():
    """One sparrow tree below a fixed root, verified many times: the first token after the root
    (an accepted draft or the bonus) must follow the target's own sampling distribution after the root."""
    target = target_for("llava_onevision")
    proposer = proposer_for("sparrow", target)
    s = TargetStream(target)
    s.append_text(SYSTEM)
    s.append_frames(random_frames(2, seed=13), [0.0, 0.5])
    logits = s.append_text(CAPTION_PREFIX)
    root = int(logits.argmax())
    ref = TargetStream(target)
    ref.append_text(SYSTEM)
    ref.append_frames(random_frames(2, seed=13), [0.0, 0.5])
    ref.append_text(CAPTION_PREFIX)
    p_target = probabilities(ref.append_text([root]), SAMPLING)  # AR's distribution of the next token

    tree = proposer.propose(s, root, max_depth=3)
    tree_logits = s.append_tree(tree.tokens.tolist(), tree.depths.tolist(), tree.mask)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB)
    accepted = 0
    for _ in range(SAMPLING_DRAWS):
        res = verify_tree(tree, tree_logits, SAMPLING, g)
        first = int(tree.tokens[res.accepted[1]]) if len(res.accepted) > 1 else res.bonus
        accepted += len(res.accepted) > 1
        counts[first] += 1
    tv = 0.5 * (counts / SAMPLING_DRAWS - p_target).abs().sum().item()
    assert tv < SAMPLING_TV_BOUND, tv
    # the drafts carried real probability mass, so acceptance was exercised, not only the residual
    draft_mass = float(p_target[[int(tree.tokens[c]) for c in tree.children(0)]].sum())
    assert abs(accepted / SAMPLING_DRAWS - draft_mass) < SAMPLING_TV_BOUND


def test_sampling_run_keeps_the_stream_consistent():
    target = target_for("qwen2_5_vl")
    decoder = SpeculativeDecoder(proposer_for("sparrow", target))
    captions, s, _ = run_captions(target, decoder, sampling=SAMPLING)
    # replaying the emitted tokens with plain appends gives the same stream
    ref = TargetStream(target)
    ref.append_text(SYSTEM)
    frames = random_frames(2 + CAPTIONS, seed=11)
    ref.append_frames(frames[:2], [0.0, 0.5])
    for c, tokens in enumerate(captions):
        assert 1 <= len(tokens) <= MAX_TOKENS
        end = [] if tokens[-1] == EOS_ID else [EOS_ID]  # a caption cut at the cap is closed by the turn
        ref.append_text(CAPTION_PREFIX + tokens + end + CAPTION_SUFFIX)
        ref.append_frames(frames[2 + c : 3 + c], [1.0 + c])
    assert_same_stream(s, ref)


@pytest.mark.parametrize("temperature", [1e-40, 1.4e-45, 5e-324, 1e-7, 0.5, 5.0])
def test_sampling_distribution_is_finite_and_exact_at_every_temperature(temperature):
    """softmax(logits / T) without overflow: a tiny T is the argmax (ties split evenly), never nan."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 8
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1.0  # a tie for the best token
    for top_p in (1.0, 0.9):
        cfg = SamplingConfig(temperature, top_p)
        p = probabilities(logits, cfg)
        assert torch.isfinite(p).all() and (p >= 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(3))
        if temperature >= 0.5 and top_p == 1.0:
            assert torch.allclose(p, torch.softmax(logits.double() / temperature, -1).float(), atol=1e-6)
        if temperature <= 1e-7:
            assert torch.equal(p[:2], torch.nn.functional.one_hot(logits[:2].argmax(-1), 50).float())
            assert p[2, 7] == p[2, 9] == 0.5
        tok = sample(logits[0], cfg, torch.Generator().manual_seed(1))
        assert 0 <= tok < 50 and p[0, tok] > 0
