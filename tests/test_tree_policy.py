"""The draft tree sized for the device (`decoding/tree_policy.py`) and `sparrow-bench calibrate`.

The policy's arithmetic is walked through by hand with named constants: acceptance probabilities per
(depth, sibling rank) and linear costs, every candidate's expected tokens and ms written out below.
"""

from __future__ import annotations

import copy
import json

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
    MIN_OFFERED,
    PROFILE_NAME,
    REFIT_STEPS,
    AcceptanceStats,
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


def policy(ms_per_node: float) -> TreePolicy:
    verify = VerifyCost((CONTEXT,), NODES, (tuple(VERIFY_BASE_MS + ms_per_node * n for n in NODES),))  # [context][nodes]
    draft = DraftCost((CONTEXT,), TOP_KS, DEPTHS,  # [context][top_k][depth]
                      (tuple(tuple(DRAFT_BASE_MS + DRAFT_LEVEL_MS[k] * d for d in DEPTHS) for k in TOP_KS),))
    return TreePolicy(verify, draft, stats())


def test_expected_accepted_tokens_by_hand():
    p = policy(STEEP_MS_PER_NODE)
    # a chain of 2: P(d1 r1) + P(d1 r1) P(d2 r1) = 0.8 + 0.4
    assert sum(p.node_values(TreeConfig.chain(2))) == pytest.approx(P_D1_R1 + P_D1_R1 * P_D2_R1)
    # top-k 2, depth 2: level 1 = {0.8, 0.1}, both expanded; level 2 = {0.4, 0.16, 0.05, 0.02};
    # the 3 best kept: 0.8 + 0.4 + 0.16
    assert p.node_values(TreeConfig(3, 2, 2)) == pytest.approx([P_D1_R1, P_D1_R1 * P_D2_R1, P_D1_R1 * P_D2_R2])
    expected = {cfg: acc for cfg, acc in p.candidates}
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
    p = TreePolicy(verify, policy(STEEP_MS_PER_NODE).draft, s)
    assert p.node_values(TreeConfig.chain(2)) == pytest.approx([PC_D1, PC_D1 * PC_D2])  # not 0.8, 0.4
    assert p.node_values(TreeConfig(3, 2, 2)) == pytest.approx([P_D1_R1, P_D1_R1 * P_D2_R1, P_D1_R1 * P_D2_R2])
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
        TreePolicy(policy(0.0).verify, policy(0.0).draft, AcceptanceStats())


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
    profile = DeviceProfile("cpu", "float32", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, stats())})
    path = tmp_path / "profile.json"
    profile.save(path)
    again = DeviceProfile.load(path)
    assert again == profile
    assert TreePolicy.from_profile(again, "sparrow").choose(CONTEXT).tree == TreeConfig.chain(2)
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
    assert sparrow.draft.depths == (0, 1, 2, 3) and sparrow.acceptance.observed
    # chains are timed to --max-chain (3), trees to --max-depth (2); chains' acceptance counted as chains
    assert sparrow.draft.measured(1, 3) and not sparrow.draft.measured(2, 3)
    assert sparrow.acceptance.chain_offered[0] > 0
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
    fp32 = DeviceProfile("cpu", "float32", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, stats())})
    bf16 = DeviceProfile("cpu", "bfloat16", 2, "m", p.verify, {"sparrow": DrafterProfile(p.draft, stats())})
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
    p = TreePolicy(policy(0.0).verify, policy(0.0).draft,
                   AcceptanceStats(rank_hits=[[32, 4], [0, 0]], rank_offered=[[prior, prior], [prior, prior]]))
    # p = [[0.8, 0.1], [0, 0]]: 2/1/2 = (1 + 0.9) / (2.2 + 10) = 0.156 beats chain 2 = 1.8 / 13 = 0.138
    assert p.choose(CONTEXT).tree == TreeConfig(2, 1, 2)
    for _ in range(REFIT_STEPS):
        p.observe([(2, 1), (2, 1)])  # rank 1 accepted at depth 1, then at depth 2
    # p = [[64/72, 4/72], [32/72, 0]]: chain 2 = (1 + 0.889 + 0.395) / 13 = 0.176
    #   beats 3/2/2 = (1 + 0.889 + 0.395 + 0.056) / 13.4 = 0.175 and 2/1/2 = 1.944 / 12.2 = 0.159
    assert p.choose(CONTEXT).tree == TreeConfig.chain(2)
    assert p.max_tree_tokens == max(NODES)  # the candidates (and so the KV bound) never change
