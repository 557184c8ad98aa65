"""The draft tree sized for the device (`decoding/tree_policy.py`) and `sparrow-bench calibrate`.

The policy's arithmetic is walked through by hand with named constants: acceptance probabilities per
(depth, sibling rank) and linear costs, every candidate's expected tokens and ms written out below; then
acceptance per context length, interpolated between the probed contexts, and the choice it moves.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from sparrow_core.bench import calibrate, speculative
from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.draft_tree import TreeConfig, build_tree
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.decoding.tree_policy import (
    CONTEXT_BUCKET,
    MIN_OFFERED,
    OLD_COUNTS_WEIGHT,
    PROFILE_NAME,
    REFIT_STEPS,
    AcceptanceStats,
    ContextAcceptance,
    DeviceProfile,
    DraftCost,
    DrafterProfile,
    TreePolicy,
    VerifyCost,
    rank_observations,
)
from sparrow_core.session import CaptionEngine, load_tree_profile
from speculative_support import run_captions, target_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# --- the hand-worked policy -----------------------------------------------------------------------------
# acceptance: P(target's token is the drafter's rank-r child | parent accepted), per depth
P_D1_R1, P_D1_R2 = 0.8, 0.1  # depth 1
P_D2_R1, P_D2_R2 = 0.5, 0.2  # depth 2
TRIALS = 1000  # observations per (depth, rank): exact fractions, well above MIN_OFFERED
CONTEXT = 100  # one measured context: the costs do not depend on where in the stream the step is
NODES = (1, 2, 3, 4)
DEPTHS = (0, 1, 2)
TOP_KS = (1, 2)
VERIFY_BASE_MS = 10.0
STEEP_MS_PER_NODE = 2.0  # a CPU-like verify: every node adds to the forward
DRAFT_BASE_MS = 1.0
DRAFT_LEVEL_MS = {1: 1.0, 2: 1.2}  # ms per tree level at top-k 1 and 2


def stats() -> AcceptanceStats:
    hits = [[round(P_D1_R1 * TRIALS), round(P_D1_R2 * TRIALS)], [round(P_D2_R1 * TRIALS), round(P_D2_R2 * TRIALS)]]
    return AcceptanceStats(rank_hits=hits, rank_offered=[[TRIALS, TRIALS], [TRIALS, TRIALS]])


# acceptance per context: at a long context the drafter's candidates are accepted far less often
C_SHORT = CONTEXT_BUCKET // 2  # the middle of the first bucket the policy caches its choice for
C_LONG = C_SHORT + 4 * CONTEXT_BUCKET  # the middle of the fifth
C_MID = (C_SHORT + C_LONG) // 2  # the middle of the third: halfway between the two probed contexts
LONG_D1_R1, LONG_D1_R2 = 0.3, 0.1  # depth 1 at C_LONG
LONG_D2_R1, LONG_D2_R2 = 0.2, 0.1  # depth 2 at C_LONG


def long_stats() -> AcceptanceStats:
    hits = [[round(LONG_D1_R1 * TRIALS), round(LONG_D1_R2 * TRIALS)], [round(LONG_D2_R1 * TRIALS), round(LONG_D2_R2 * TRIALS)]]
    return AcceptanceStats(rank_hits=hits, rank_offered=[[TRIALS, TRIALS], [TRIALS, TRIALS]])


def approx_rows(rows: list[list[float]]) -> list:
    """[depth][rank] rates compared row by row (pytest.approx takes flat sequences)."""
    return [pytest.approx(row) for row in rows]


def by_context() -> ContextAcceptance:
    """stats() at C_SHORT, long_stats() at C_LONG."""
    return ContextAcceptance((C_SHORT, C_LONG), (stats(), long_stats()))


def policy(ms_per_node: float, acceptance: AcceptanceStats | ContextAcceptance | None = None) -> TreePolicy:
    """A policy over a made-up profile; one AcceptanceStats stands for every context."""
    verify = VerifyCost((CONTEXT,), NODES, (tuple(VERIFY_BASE_MS + ms_per_node * n for n in NODES),))  # [context][nodes]
    draft = DraftCost((CONTEXT,), TOP_KS, DEPTHS,  # [context][top_k][depth]
                      (tuple(tuple(DRAFT_BASE_MS + DRAFT_LEVEL_MS[k] * d for d in DEPTHS) for k in TOP_KS),))
    acceptance = stats() if acceptance is None else acceptance
    if isinstance(acceptance, AcceptanceStats):
        acceptance = ContextAcceptance.everywhere(acceptance)
    return TreePolicy(verify, draft, acceptance)


def test_expected_accepted_tokens_by_hand():
    p = policy(STEEP_MS_PER_NODE)
    rates = p.acceptance_at(CONTEXT)  # one estimate: the same at every context
    # a chain of 2: P(d1 r1) + P(d1 r1) P(d2 r1) = 0.8 + 0.4
    assert sum(p.node_values(TreeConfig.chain(2), *rates)) == pytest.approx(P_D1_R1 + P_D1_R1 * P_D2_R1)
    # top-k 2, depth 2: level 1 = {0.8, 0.1}, both expanded; level 2 = {0.4, 0.16, 0.05, 0.02};
    # the 3 best kept: 0.8 + 0.4 + 0.16
    assert p.node_values(TreeConfig(3, 2, 2), *rates) == pytest.approx([P_D1_R1, P_D1_R1 * P_D2_R1, P_D1_R1 * P_D2_R2])
    expected = dict(p.candidates_at(CONTEXT))
    assert expected[TreeConfig(0, 0, 1)] == 0.0  # the root alone drafts nothing
    assert expected[TreeConfig(2, 1, 2)] == pytest.approx(P_D1_R1 + P_D1_R2)
    assert p.max_tree_tokens == max(NODES)  # the widest candidate fills every measured node


def test_steep_verify_picks_the_chain():
    # tokens / ms with verify = 10 + 2n, draft = 1 + level_ms * depth:
    #   root alone   1    / (1 + 12)        = 0.0769
    #   chain 1      1.8  / (2 + 14)        = 0.1125
    #   chain 2      2.2  / (3 + 16)        = 0.1158   <- best
    #   2/2/2        2.2  / (3.4 + 16)      = 0.1134   (same nodes as chain 2, dearer draft)
    #   3/2/2        2.36 / (3.4 + 18)      = 0.1103
    #   2/1/2        1.9  / (2.2 + 16)      = 0.1044
    choice = policy(STEEP_MS_PER_NODE).choose(CONTEXT)
    assert choice.tree == TreeConfig.chain(2)
    assert choice.expected_tokens == pytest.approx(2.2)
    assert choice.step_ms == pytest.approx(DRAFT_BASE_MS + 2 * DRAFT_LEVEL_MS[1] + VERIFY_BASE_MS + 3 * STEEP_MS_PER_NODE)


def test_flat_verify_picks_the_wide_tree():
    # a GPU-like verify (10 ms whatever the size):
    #   chain 2      2.2  / (3 + 10)        = 0.1692
    #   3/2/2        2.36 / (3.4 + 10)      = 0.1761   <- best
    choice = policy(0.0).choose(CONTEXT)
    assert choice.tree == TreeConfig(3, 2, 2)
    assert choice.expected_tokens == pytest.approx(1 + P_D1_R1 + P_D1_R1 * P_D2_R1 + P_D1_R1 * P_D2_R2)


# chains measured as chains: the rank-1 rates along a chain whose every node above was accepted
PC_D1, PC_D2 = 0.9, 0.8  # above the tree's P_D1_R1, P_D2_R1: acceptance runs in easy spans


def test_chains_are_valued_from_chain_counts():
    s = stats()
    s.chain_hits, s.chain_offered = [round(PC_D1 * TRIALS), round(PC_D2 * TRIALS)], [TRIALS, TRIALS]
    verify = policy(STEEP_MS_PER_NODE).verify
    p = TreePolicy(verify, policy(STEEP_MS_PER_NODE).draft, ContextAcceptance.everywhere(s))
    rates = p.acceptance_at(CONTEXT)
    assert p.node_values(TreeConfig.chain(2), *rates) == pytest.approx([PC_D1, PC_D1 * PC_D2])  # not 0.8, 0.4
    assert p.node_values(TreeConfig(3, 2, 2), *rates) == pytest.approx([P_D1_R1, P_D1_R1 * P_D2_R1, P_D1_R1 * P_D2_R2])
    # chain 2 = (1 + 0.9 + 0.72) / 19 = 0.138 beats chain 1 = 1.9 / 16 = 0.119 and 3/2/2 = 2.36 / 21.4
    assert p.choose(CONTEXT).expected_tokens == pytest.approx(1 + PC_D1 + PC_D1 * PC_D2)
    # a step whose accepted path offered one child per depth counts as a chain's; a tree's does not
    s.observe([(1, 1), (1, 0)])
    s.observe([(2, 1), (1, 1)])
    assert s.chain_offered == [TRIALS + 1, TRIALS + 1]
    assert s.chain_hits == [round(PC_D1 * TRIALS) + 1, round(PC_D2 * TRIALS)]
    s.chain_offered = [MIN_OFFERED - 1]  # too few chains seen: the tree's rank-1 rates stand in
    assert s.chain_probabilities(2) == [row[0] for row in s.probabilities(2, 1)]


def test_costs_interpolate_in_context_and_nodes():
    v = VerifyCost((100, 300), (1, 5), ((10.0, 30.0), (20.0, 60.0)))
    assert v.at(100, 3) == pytest.approx(20.0)  # halfway between 1 and 5 nodes
    assert v.at(200, 1) == pytest.approx(15.0)  # halfway between the contexts
    assert v.at(500, 1) == pytest.approx(30.0)  # beyond: the last two contexts' line


def test_unseen_ranks_and_depths_fall_back_to_the_depth_above():
    few = MIN_OFFERED - 1
    s = AcceptanceStats(rank_hits=[[8, 1], [few]], rank_offered=[[10, 10], [few, few]])
    assert s.probabilities(depths=3, ranks=3) == [[0.8, 0.1, 0.0], [0.8, 0.1, 0.0], [0.8, 0.1, 0.0]]
    with pytest.raises(ValueError, match="no acceptance statistics"):
        TreePolicy(policy(0.0).verify, policy(0.0).draft, ContextAcceptance.everywhere(AcceptanceStats()))


def test_rank_observations_and_their_counts():
    # root 0 -> 1 (score -0.1), 2 (-1.0); node 1 -> 3 (-0.5), 4 (-0.3): below node 1, 4 ranks first
    tree = build_tree(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([-1, 0, 0, 1, 1]),
                      torch.tensor([0.0, -0.1, -1.0, -0.5, -0.3]))
    assert rank_observations(tree, [0, 1, 3]) == [(2, 1), (2, 2)]  # node 3 offers nothing below it
    assert rank_observations(tree, [0, 2]) == [(2, 2)]
    assert rank_observations(tree, [0]) == [(2, 0)]  # neither child was the target's token
    m = DecodeMetrics()
    m.record(5, 2, 3, 0.0, 0.0, rank_observations(tree, [0, 1, 3]))
    m.record(5, 0, 1, 0.0, 0.0, rank_observations(tree, [0]))
    assert m.rank_offered == [[2, 2], [1, 1]] and m.rank_hits == [[1], [0, 1]]
    other = DecodeMetrics()
    other.merge(m)
    other.merge(m)
    assert other.rank_offered == [[4, 4], [2, 2]] and other.rank_hits == [[2], [0, 2]]


def test_profile_round_trip_and_refusals(tmp_path):
    p = policy(STEEP_MS_PER_NODE)
    profile = DeviceProfile("cpu", "float32", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, by_context())})
    path = tmp_path / "profile.json"
    profile.save(path)
    again = DeviceProfile.load(path)
    assert again == profile
    assert TreePolicy.from_profile(again, "sparrow").choose(C_SHORT).tree == TreeConfig.chain(2)
    assert TreePolicy.from_profile(again, "sparrow").choose(C_LONG).tree == TreeConfig.chain(1)
    with pytest.raises(ValueError, match="cpu/float32, this run is cpu/bfloat16"):
        again.check_runs_on(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="no drafter 'eagle'"):
        TreePolicy.from_profile(again, "eagle")
    data = json.loads(path.read_text())
    data["verify_ms"]["ms"][0] = data["verify_ms"]["ms"][0][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="verify_ms: expected a grid"):
        DeviceProfile.load(path)


@pytest.mark.parametrize("ms_per_node", [STEEP_MS_PER_NODE, 0.0])
def test_the_chosen_tree_is_lossless(ms_per_node):
    """Greedy decoding with the policy's tree (a chain, or the widest tree) gives AR's tokens."""
    target = target_for("qwen2_5_vl")
    want, _, _ = run_captions(target, ARDecoder())
    torch.manual_seed(1)
    chooser = policy(ms_per_node)
    proposer = DrafterProposer(TextAnchoredDrafter(target, DrafterConfig()), chooser)
    assert proposer.max_tree_tokens == chooser.max_tree_tokens
    got, _, m = run_captions(target, SpeculativeDecoder(proposer))
    assert got == want
    assert m.rank_offered  # the decoder's own metrics count what the policy reads


def test_calibrate_quick_then_the_bench_and_the_engine_read_it(tmp_path, capsys):
    """`sparrow-bench calibrate --quick` writes a profile; `speculative --trees auto,...` uses it and every
    tree stays token-identical to AR; an engine given it sizes sparrow's tree from it."""
    profile_path = tmp_path / "tree_profile.json"
    assert calibrate.main(["--random-target", "--quick", "--out", str(profile_path)]) == 0
    profile = DeviceProfile.load(profile_path)
    assert set(profile.drafters) == {"sparrow"} and profile.verify.nodes == (1, 4, 8)
    sparrow = profile.drafters["sparrow"]
    # acceptance per probed length (--quick: 40 and 80 visual tokens), each where the captions ran
    acc = sparrow.acceptance
    assert len(acc.contexts) == len(profile.verify.contexts) == 2 and acc.contexts[0] < acc.contexts[1]
    assert acc.contexts[1] > profile.verify.contexts[0]
    assert sparrow.draft.depths == (0, 1, 2, 3) and any(st.observed for st in acc.stats)
    # chains are timed to --max-chain (3), trees to --max-depth (2); chains' acceptance counted as chains
    assert sparrow.draft.measured(1, 3) and not sparrow.draft.measured(2, 3)
    assert all(st.chain_offered[0] > 0 for st in acc.stats)
    out = tmp_path / "spec.json"
    assert speculative.main(["--random-target", "--visual-tokens", "40", "--methods", "ar,sparrow", "--captions", "1",
                             "--max-tokens", "4", "--trees", "auto,chain2,6/2/3", "--tree-profile", str(profile_path),
                             "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"ar", "sparrow:auto", "sparrow:chain2", "sparrow:6/2/3"}
    for r in rows:
        assert r["identical_to_ar"] is True
        if r["method"] != "ar":
            assert r["draft_s_per_step"] > 0 and r["verify_s_per_step"] > 0 and r["other_s_per_step"] is not None
    assert {r["method"]: r["tree"] for r in rows}["sparrow:6/2/3"] == "6/2/3"
    assert "other ms" in capsys.readouterr().out
    target = speculative.random_default_target()
    torch.manual_seed(0)
    engine = CaptionEngine(target, {"sparrow": TextAnchoredDrafter(target, DrafterConfig())}, profile)
    assert isinstance(engine.decoders["sparrow"].proposer.tree, TreePolicy)
    with pytest.raises(SystemExit):
        speculative.main(["--random-target", "--trees", "auto", "--visual-tokens", "40"])  # auto needs a profile


def test_where_the_profile_comes_from(world_target, tmp_path):
    """--tree-profile FILE is read and must match the run's device and dtype; without it the checkpoint's
    own tree_profile.json is read when it matches and passed over (a warning) when it does not."""
    p = policy(STEEP_MS_PER_NODE)
    fp32 = DeviceProfile("cpu", "float32", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, by_context())})
    bf16 = DeviceProfile("cpu", "bfloat16", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, by_context())})
    target = copy.copy(world_target)  # float32 on the CPU
    target.path = tmp_path
    assert load_tree_profile(target) is None  # no profile anywhere: the drafters' own trees
    fp32.save(tmp_path / PROFILE_NAME)
    assert load_tree_profile(target) == fp32
    bf16.save(tmp_path / PROFILE_NAME)
    with pytest.warns(UserWarning, match="grow their own trees"):
        assert load_tree_profile(target) is None
    bf16.save(tmp_path / "given.json")
    with pytest.raises(ValueError, match="--tree-profile .*given.json was measured on cpu/bfloat16"):
        load_tree_profile(target, tmp_path / "given.json")


def test_online_acceptance_moves_the_choice():
    """The profile (a small sample) says depth 2 is never right; a stream where every step accepts the
    rank-1 child at depths 1 and 2 moves the flat-verify policy deeper once REFIT_STEPS steps are seen."""
    prior = 40  # observations per (depth, rank) in the profile
    p = TreePolicy(policy(0.0).verify, policy(0.0).draft, ContextAcceptance.everywhere(
        AcceptanceStats(rank_hits=[[32, 4], [0, 0]], rank_offered=[[prior, prior], [prior, prior]])))
    # p = [[0.8, 0.1], [0, 0]]: 2/1/2 = (1 + 0.9) / (2.2 + 10) = 0.156 beats chain 2 = 1.8 / 13 = 0.138
    assert p.choose(CONTEXT).tree == TreeConfig(2, 1, 2)
    for _ in range(REFIT_STEPS):
        p.observe([(2, 1), (2, 1)], CONTEXT)  # rank 1 accepted at depth 1, then at depth 2
    # p = [[64/72, 4/72], [32/72, 0]]: chain 2 = (1 + 0.889 + 0.395) / 13 = 0.176
    #   beats 3/2/2 = (1 + 0.889 + 0.395 + 0.056) / 13.4 = 0.175 and 2/1/2 = 1.944 / 12.2 = 0.159
    assert p.choose(CONTEXT).tree == TreeConfig.chain(2)
    assert p.max_tree_tokens == max(NODES)  # the candidates (and so the KV bound) never change


# --- acceptance per context length ---------------------------------------------------------------------
def test_acceptance_interpolates_between_probed_contexts_and_holds_outside():
    p = policy(STEEP_MS_PER_NODE, by_context())
    rates, rates_chain = p.acceptance_at(C_SHORT)
    assert rates == approx_rows([[P_D1_R1, P_D1_R2], [P_D2_R1, P_D2_R2]])
    assert rates_chain == pytest.approx([P_D1_R1, P_D2_R1])  # no chain counts: the rank-1 rates stand in
    # halfway: the mean of the two, rank by rank
    rates, rates_chain = p.acceptance_at(C_MID)
    assert rates == approx_rows([[(P_D1_R1 + LONG_D1_R1) / 2, (P_D1_R2 + LONG_D1_R2) / 2],
                                   [(P_D2_R1 + LONG_D2_R1) / 2, (P_D2_R2 + LONG_D2_R2) / 2]])
    assert rates_chain == pytest.approx([(P_D1_R1 + LONG_D1_R1) / 2, (P_D2_R1 + LONG_D2_R1) / 2])
    # a quarter of the way from C_SHORT: 3/4 of the short rates, 1/4 of the long ones
    quarter = C_SHORT + (C_LONG - C_SHORT) / 4
    assert p.acceptance_at(quarter)[0][0][0] == pytest.approx(0.75 * P_D1_R1 + 0.25 * LONG_D1_R1)
    # outside the probed contexts the nearest one's rates hold (a line through 0.8 and 0.3 would reach 0 at 3.2 x C_LONG)
    assert p.acceptance_at(0)[0] == approx_rows([[P_D1_R1, P_D1_R2], [P_D2_R1, P_D2_R2]])
    assert p.acceptance_at(10 * C_LONG)[0] == approx_rows([[LONG_D1_R1, LONG_D1_R2], [LONG_D2_R1, LONG_D2_R2]])


def test_the_chosen_tree_follows_the_acceptance_at_the_streams_length():
    """The costs are the same at every context (one measured context); only acceptance moves the choice.
    verify = 10 + 2n, draft = 1 + level_ms * depth as in test_steep_verify_picks_the_chain:
      at C_SHORT (0.8, 0.1 / 0.5, 0.2):  chain 1 = 1.8 / 16 = 0.1125,  chain 2 = 2.2 / 19 = 0.1158   <- chain 2
      at C_LONG  (0.3, 0.1 / 0.2, 0.1):  chain 1 = 1.3 / 16 = 0.0813 <- chain 1,  chain 2 = 1.36 / 19 = 0.0716,
                                         1/1/2 = 1.3 / 16.2 = 0.0802,  root alone = 1 / 13 = 0.0769
      at C_MID   (0.55, 0.1 / 0.35, 0.15): chain 1 = 1.55 / 16 = 0.0969 <- chain 1,  chain 2 = 1.7425 / 19 = 0.0917
    """
    p = policy(STEEP_MS_PER_NODE, by_context())
    short, mid, long = p.choose(C_SHORT), p.choose(C_MID), p.choose(C_LONG)
    assert short.tree == TreeConfig.chain(2)
    assert short.expected_tokens == pytest.approx(1 + P_D1_R1 + P_D1_R1 * P_D2_R1)
    assert long.tree == TreeConfig.chain(1) and long.expected_tokens == pytest.approx(1 + LONG_D1_R1)
    assert mid.tree == TreeConfig.chain(1) and mid.expected_tokens == pytest.approx(1 + (P_D1_R1 + LONG_D1_R1) / 2)
    assert p.choose(20 * C_LONG).tree == TreeConfig.chain(1)  # held at the longest probed context
    # one estimate pooled over both contexts (what format 1 stored) picks one tree for both
    pooled = AcceptanceStats([[a + b for a, b in zip(ra, rb)] for ra, rb in zip(stats().rank_hits, long_stats().rank_hits)],
                             [[2 * TRIALS, 2 * TRIALS], [2 * TRIALS, 2 * TRIALS]])
    one = policy(STEEP_MS_PER_NODE, pooled)
    assert one.choose(C_SHORT).tree == one.choose(C_LONG).tree


def test_online_steps_count_at_the_nearest_probed_context():
    p = policy(STEEP_MS_PER_NODE, by_context())
    near_long = C_MID + 1  # nearer C_LONG than C_SHORT
    p.observe([(2, 1), (2, 1)], near_long)
    short, long = p.acceptance.stats
    assert short.rank_offered == [[TRIALS, TRIALS], [TRIALS, TRIALS]]  # untouched
    assert long.rank_offered == [[TRIALS + 1, TRIALS + 1], [TRIALS + 1, TRIALS + 1]]
    assert long.rank_hits[0][0] == round(LONG_D1_R1 * TRIALS) + 1
    for _ in range(REFIT_STEPS - 1):
        p.observe([(2, 1), (2, 1)], near_long)
    # the re-estimate weighs down the counts of the context that saw steps, not the other's
    assert short.rank_offered[0][0] == TRIALS
    assert long.rank_offered[0][0] == pytest.approx(OLD_COUNTS_WEIGHT * (TRIALS + REFIT_STEPS))
    assert p.acceptance_at(C_LONG)[0][0][0] == pytest.approx((LONG_D1_R1 * TRIALS + REFIT_STEPS) / (TRIALS + REFIT_STEPS))


def test_a_context_probed_too_briefly_is_passed_over():
    few = AcceptanceStats(rank_hits=[[1]], rank_offered=[[MIN_OFFERED - 1]])
    p = policy(STEEP_MS_PER_NODE, ContextAcceptance((C_SHORT, C_MID, C_LONG), (stats(), few, long_stats())))
    assert p.acceptance.contexts == (C_SHORT, C_LONG)
    assert p.choose(C_MID).tree == TreeConfig.chain(1)
    with pytest.raises(ValueError, match="one increasing context per estimate"):
        ContextAcceptance((C_LONG, C_SHORT), (stats(), long_stats()))


def test_a_format_1_profile_loads_as_one_estimate_for_every_context(tmp_path):
    p = policy(STEEP_MS_PER_NODE)
    data = DeviceProfile("cpu", "float32", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, by_context())}).to_json()
    assert data["format"] == 2
    data["format"] = 1
    data["drafters"]["sparrow"]["acceptance"] = stats().as_dict()  # format 1: one pooled estimate
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="format 1, acceptance pooled"):
        old = DeviceProfile.load(path)
    assert old.drafters["sparrow"].acceptance == ContextAcceptance.everywhere(stats(), CONTEXT)
    chooser = TreePolicy.from_profile(old, "sparrow")
    assert chooser.choose(C_SHORT).tree == chooser.choose(C_LONG).tree == TreeConfig.chain(2)
    data["format"] = 99
    path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused without the format-1 warning
        with pytest.raises(ValueError, match="format 99, this version reads formats 1, 2"):
            DeviceProfile.load(path)
