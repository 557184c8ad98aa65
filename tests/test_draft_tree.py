"""Draft-tree metadata, EAGLE-2 growth, and verification, walked through by hand on small trees."""

from __future__ import annotations

import math

import pytest
import torch

from sparrow_core.decoding.draft_tree import TreeConfig, build_tree, propose_tree
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.verify import rejection_sample, verify_tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# A hand-built tree (node index: token):
#
#   0: ROOT
#   ├── 1: TOK_A
#   │   ├── 3: TOK_C
#   │   └── 4: TOK_D
#   └── 2: TOK_B
#       └── 5: TOK_E
ROOT, TOK_A, TOK_B, TOK_C, TOK_D, TOK_E, TOK_X = 10, 11, 12, 13, 14, 15, 16
VOCAB = 20
TOKENS = [ROOT, TOK_A, TOK_B, TOK_C, TOK_D, TOK_E]
PARENTS = [-1, 0, 0, 1, 1, 2]
WANT_DEPTHS = [0, 1, 1, 2, 2, 2]
WANT_MASK = [  # row i: node i sees its ancestors and itself
    [1, 0, 0, 0, 0, 0],  # 0
    [1, 1, 0, 0, 0, 0],  # 1: 0, 1
    [1, 0, 1, 0, 0, 0],  # 2: 0, 2
    [1, 1, 0, 1, 0, 0],  # 3: 0, 1, 3
    [1, 1, 0, 0, 1, 0],  # 4: 0, 1, 4
    [1, 0, 1, 0, 0, 1],  # 5: 0, 2, 5
]
WANT_PATHS = [[0, 1, 3], [0, 1, 4], [0, 2, 5]]  # one per leaf (3, 4, 5), root first


def hand_tree():
    return build_tree(torch.tensor(TOKENS), torch.tensor(PARENTS))


def test_mask_depths_and_retrieve_paths_by_hand():
    tree = hand_tree()
    assert tree.depths.tolist() == WANT_DEPTHS
    assert torch.equal(tree.mask, torch.tensor(WANT_MASK, dtype=torch.bool))
    assert tree.paths.tolist() == WANT_PATHS
    assert tree.children(0) == [1, 2] and tree.children(2) == [5] and tree.children(3) == []


def test_best_path_follows_the_best_scored_child():
    # scores: below the root 2 (-0.5) beats 1 (-1.0); below 1, 3 and 4 tie: the first created wins
    tree = build_tree(torch.tensor(TOKENS), torch.tensor(PARENTS), torch.tensor([0.0, -1.0, -0.5, -2.0, -2.0, -0.9]))
    assert tree.best_path() == [0, 2, 5]
    assert tree.best_path(1) == [1, 3] == [1, tree.children(1)[0]]
    assert hand_tree().best_path() == [0, 1, 3]  # scores -depth: every tie goes to the first child


def test_paths_are_padded_for_uneven_leaves():
    # 0 -> 1 -> 2 and 0 -> 3: leaf 3 is shallower, its path is padded with -1
    tree = build_tree(torch.tensor([ROOT, TOK_A, TOK_B, TOK_C]), torch.tensor([-1, 0, 1, 0]))
    assert tree.paths.tolist() == [[0, 1, 2], [0, 3, -1]]


def one_hot_logits(argmax_after: dict[int, int], q: int) -> torch.Tensor:
    """Target logits [q, VOCAB] whose argmax after node i is argmax_after[i] (TOK_X elsewhere)."""
    logits = torch.zeros(q, VOCAB)
    for i in range(q):
        logits[i, argmax_after.get(i, TOK_X)] = 1.0
    return logits


def test_greedy_verification_walks_the_matching_branch():
    tree = hand_tree()
    # target: after ROOT comes TOK_B (node 2), after TOK_B comes TOK_E (node 5), after TOK_E TOK_X
    res = verify_tree(tree, one_hot_logits({0: TOK_B, 2: TOK_E, 5: TOK_X}, len(TOKENS)), SamplingConfig())
    assert res.accepted == [0, 2, 5] and res.bonus == TOK_X
    # target: after ROOT comes TOK_A (node 1), then TOK_B, which is no child of node 1
    res = verify_tree(tree, one_hot_logits({0: TOK_A, 1: TOK_B}, len(TOKENS)), SamplingConfig())
    assert res.accepted == [0, 1] and res.bonus == TOK_B
    # nothing below the root matches: the root alone, and the target's own token as bonus
    res = verify_tree(tree, one_hot_logits({0: TOK_X}, len(TOKENS)), SamplingConfig())
    assert res.accepted == [0] and res.bonus == TOK_X


# EAGLE-2 growth with a fake drafter over 6 tokens whose next-token probabilities depend on the
# current token only:
T0, T1, T2, T3, T4, T5 = range(6)
DRAFT_P = {
    T0: {T1: 0.60, T2: 0.35, T3: 0.05},
    T1: {T3: 0.50, T4: 0.40, T5: 0.10},
    T2: {T5: 0.90, T3: 0.05, T4: 0.05},
}
# top_k = 2, depth = 2, total_tokens = 3. Path probabilities of the candidates:
#   T1 0.60, T2 0.35 (level 1; both expanded: the frontier is the top 2)
#   T1>T3 0.30, T1>T4 0.24, T2>T5 0.315, T2>T3 0.0175 (level 2)
# best 3: T1 (0.60), T2 (0.35), T2>T5 (0.315): the greedy chain T1>T3 (0.30) loses to a branch under T2.
WANT_GROWN_TOKENS = [T0, T1, T2, T5]
WANT_GROWN_PARENTS = [-1, 0, 0, 2]


def fake_expand(calls: list):
    def expand(node_ids, tokens, parents, depth):
        calls.append((node_ids.tolist(), parents.tolist(), depth))
        out = torch.full((tokens.numel(), 6), -math.inf)
        for i, t in enumerate(tokens.tolist()):
            for nxt, p in DRAFT_P.get(t, {}).items():
                out[i, nxt] = math.log(p)
        return out

    return expand


def test_eagle2_growth_by_hand():
    calls: list = []
    tree = propose_tree(T0, fake_expand(calls), TreeConfig(total_tokens=3, depth=2, top_k=2))
    assert tree.tokens.tolist() == WANT_GROWN_TOKENS and tree.parents.tolist() == WANT_GROWN_PARENTS
    # level 0 expands the root (node id 0); level 1 expands the two level-1 nodes, created as ids 1, 2
    assert calls == [([0], [-1], 0), ([1, 2], [0, 0], 1)]
    assert math.isclose(float(tree.scores[3].exp()), 0.35 * 0.90, rel_tol=1e-5)


def test_chain_and_depth_cap():
    chain = propose_tree(T0, fake_expand([]), TreeConfig.chain(2))  # top_k 1: T0 > T1 > T3
    assert chain.tokens.tolist() == [T0, T1, T3] and chain.parents.tolist() == [-1, 0, 1]
    capped = propose_tree(T0, fake_expand([]), TreeConfig(total_tokens=3, depth=2, top_k=2), max_depth=1)
    assert capped.tokens.tolist() == [T0, T1, T2] and int(capped.depths.max()) == 1
    assert propose_tree(T0, fake_expand([]), TreeConfig(), max_depth=0).tokens.tolist() == [T0]


# Multi-candidate rejection sampling on a synthetic target distribution: whatever the candidates, the
# emitted token (accepted candidate or residual draw) must be distributed as P_TARGET.
P_TARGET = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
CANDIDATE_SETS = [[3, 0, 5], [5], [0, 1, 2, 3, 4, 5]]
DRAWS = 8_000
TV_BOUND = 0.03  # expected TV at 8k draws over 6 tokens is ~0.01


def test_rejection_sampling_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    for cands in CANDIDATE_SETS:
        counts = torch.zeros(6)
        accepted_first = 0
        for _ in range(DRAWS):
            j, tok = rejection_sample(P_TARGET, cands, g)
            counts[tok] += 1
            accepted_first += j == 0
        tv = 0.5 * (counts / DRAWS - P_TARGET).abs().sum().item()
        assert tv < TV_BOUND, (cands, tv)
        # the first candidate is accepted exactly when the draw is it: probability p(x_1)
        assert abs(accepted_first / DRAWS - float(P_TARGET[cands[0]])) < TV_BOUND
