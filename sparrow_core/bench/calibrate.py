"""`sparrow-bench calibrate`: what verifying and drafting cost here, and how often each drafter's
candidates are accepted; writes the profile `decoding/tree_policy.py` sizes the draft tree from.

    sparrow-bench calibrate --threads 2                 # -> <model>/tree_profile.json, read by default
    sparrow-bench calibrate --threads 2 --out FILE      # then --tree-profile FILE on caption / serve / bench

Measured on this process's device, dtype and threads, at each `--contexts` length (visual tokens of a
world stream grown as `sparrow-bench speculative` grows it), on the stream just after a caption turn's
opening, where every decoding step of a caption starts:

    verify ms   one target forward over a drafted tree of N nodes (N in --nodes, root included) + greedy
                verification + acceptance
    draft ms    per drafter, one proposal: the catch-up on the previous step's accepted tokens, then
                `depth` tree levels, for each --top-k and every depth 0 .. --max-depth, and for chains
                (top-k 1) every depth 0 .. --max-chain (null in the profile where not measured)
                (both timed in real steps, each after another step: what a decoding loop pays)
    acceptance  each drafter decodes --captions held-out segments per length (world seed --seed, not the
                speculative bench's) with a probe tree (the largest top-k and depth, every node --nodes
                allows), and again with a chain of --max-chain; the sibling-rank counts of the first and
                the chain counts of the second go into the profile (greedy), one set per length, at the
                stream's mean length over those captions: acceptance changes with the context as the
                costs do, and the policy interpolates both

Each timing is the median of --repeats. `--quick`: the few sizes the test suite runs in seconds.
The numbers change whenever the drafter or the target forward does: re-run this one command.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparrow_core.bench.speculative import WorldHistory, caption_once, load_decoders, random_default_target
from sparrow_core.cli.device import add_run_flags, apply_run_flags
from sparrow_core.cli.drafter_flag import add_drafter_flag, parse_drafter_flags
from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.decoding.drafter import TextAnchoredDrafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.drafter import DrafterProposer, DrafterState
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.decoding.tree_policy import (
    PROFILE_NAME,
    AcceptanceStats,
    ContextAcceptance,
    DeviceProfile,
    DraftCost,
    DrafterProfile,
    VerifyCost,
)
from sparrow_core.decoding.verify import verify_tree
from sparrow_core.engine.caption_history import CaptionTurn
from sparrow_core.engine.checkpoint import load_target
from sparrow_core.engine.stream import StreamNeeds, TargetStream
from sparrow_core.engine.target import TargetModel
from sparrow_core.session import StreamDefaults

FULL = {"contexts": "500,5000,25000", "nodes": "1,2,3,4,6,8,12,16,24,32,48,64", "top_k": "1,2,4,8",
        "max_depth": 6, "max_chain": 12, "captions": 4, "max_tokens": 32, "repeats": 5}
QUICK = {"contexts": "40,80", "nodes": "1,4,8", "top_k": "1,2", "max_depth": 2, "max_chain": 3, "captions": 2,
         "max_tokens": 8, "repeats": 1}
HELD_OUT_SEED = 1000  # world seeds from here on: not the speculative bench's (0) nor a trainer's default


GREEDY = SamplingConfig()


def step(stream: TargetStream, state: DrafterState, root: int, tree: TreeConfig) -> tuple[float, float, int, int]:
    """One speculative step as `SpeculativeDecoder` takes it: the proposal (the drafter's catch-up, then
    the tree's levels), then the target's tree forward, greedy verification and acceptance.
    -> (draft s, verify s, tokens the stream kept, the bonus token)."""
    t0 = time.perf_counter()
    draft = state.propose(stream, root, tree, tree.depth)
    t1 = time.perf_counter()
    logits = stream.append_tree(draft.tokens.tolist(), draft.depths.tolist(), draft.mask)
    result = verify_tree(draft, logits, GREEDY)
    stream.accept_tree(draft.size, result.accepted)
    return t1 - t0, time.perf_counter() - t1, len(result.accepted), result.bonus


def step_ms(stream: TargetStream, state: DrafterState, root: int, tree: TreeConfig, repeats: int) -> tuple[float, float]:
    """Median draft and verify ms of a step under `tree` that follows another step under it (so the drafter
    catches up on that step's accepted tokens, and the caches hold what a decoding loop leaves in them);
    the stream is rolled back after each pair."""
    drafts, verifies = [], []
    for _ in range(repeats):
        _, _, kept, bonus = step(stream, state, root, tree)
        draft_s, verify_s, kept_next, _ = step(stream, state, bonus, tree)
        stream.rollback(kept + kept_next)
        drafts.append(1000 * draft_s)
        verifies.append(1000 * verify_s)
    return statistics.median(drafts), statistics.median(verifies)


def nodes_tree(nodes: int, max_depth: int, top_k: int) -> TreeConfig:
    """A tree of `nodes` nodes, root included (1: the root alone), as deep and wide as measured."""
    return TreeConfig(nodes - 1, max_depth if nodes > 1 else 0, top_k)


def grid_tree(top_k: int, depth: int, max_nodes: int) -> TreeConfig:
    """Every node `depth` levels of `top_k` grow, up to `max_nodes` with the root."""
    grown = top_k + max(depth - 1, 0) * top_k * top_k
    return TreeConfig(min(grown, max_nodes - 1), depth, top_k)


def calibrate(target: TargetModel, drafters: dict[str, TextAnchoredDrafter], contexts: list[int], nodes: list[int],
              top_ks: list[int], max_depth: int, max_chain: int, captions: int, max_tokens: int, repeats: int,
              caption_history: int | None, seed: int = HELD_OUT_SEED,
              log: Callable[[str], None] = lambda line: print(line, flush=True)) -> DeviceProfile:
    """The profile of `target` and `drafters` on this process's device, dtype and threads (module docstring)."""
    needs = StreamNeeds()
    for d in drafters.values():
        needs = needs | d.config.stream_needs()
    world = WorldHistory(target, needs, caption_history, seed)
    stream = world.stream
    depths = list(range(max(max_depth, max_chain) + 1))
    probe = nodes_tree(max(nodes), max_depth, max(top_ks))
    chain_probe = TreeConfig.chain(min(max_chain, max(nodes) - 1))
    probes = {name: (SpeculativeDecoder(DrafterProposer(d, probe)), SpeculativeDecoder(DrafterProposer(d, chain_probe)))
              for name, d in drafters.items()}
    slots: list[int] = []
    verify_rows: list[tuple[float, ...]] = []
    draft_rows: dict[str, list] = {name: [] for name in drafters}
    accept_slots: list[int] = []  # the stream's mean length over each length's acceptance captions
    acceptance: dict[str, list[AcceptanceStats]] = {name: [] for name in drafters}
    warm = False
    for length in sorted(contexts):
        t0 = time.perf_counter()
        world.grow_to(length, captions)
        turn = CaptionTurn(stream, world.layout, world.history)  # where a caption's steps start
        root = int(turn.logits.argmax())  # the caption's first token, the first step's root
        states = {name: DrafterState(d) for name, d in drafters.items()}
        for st in states.values():
            st.sync(stream)  # level with the stream, as a session's drafter is when a caption is due
        timer = next(iter(states.values()))  # verify is the target's: any drafter grows the trees
        if not warm:  # first-call costs (allocations, kernel selection) stay out of the numbers
            step_ms(stream, timer, root, nodes_tree(max(nodes), max_depth, max(top_ks)), 1)
            warm = True
        slots.append(stream.length)
        verify_rows.append(tuple(step_ms(stream, timer, root, nodes_tree(n, max_depth, max(top_ks)), repeats)[1]
                                 for n in nodes))
        for name, st in states.items():
            draft_rows[name].append(tuple(tuple(
                step_ms(stream, st, root, grid_tree(k, depth, max(nodes)), repeats)[0]
                if depth <= (max_chain if k == 1 else max_depth) else None
                for depth in depths) for k in top_ks))
        turn.cancel()
        metrics = {name: (DecodeMetrics(), DecodeMetrics()) for name in drafters}  # (probe tree, probe chain)
        lengths = []
        for c in range(captions):  # acceptance on held-out captions, the stream as a live session has it
            seg = world.next_segment()
            stream.append_frames(seg.frames, seg.times)
            lengths.append(stream.length)
            for name, decs in probes.items():
                for dec, total in zip(decs, metrics[name]):
                    dec.prefill(stream)
                    turn, _, _, m = caption_once(stream, world.layout, world.history, dec, max_tokens, SamplingConfig(),
                                                 seed + c)
                    total.merge(m)
                    turn.cancel()
            world.add_caption_turn(seg)
        mean_length = round(statistics.mean(lengths)) if lengths else stream.length
        accept_slots.append(max(mean_length, accept_slots[-1] + 1) if accept_slots else mean_length)  # increasing
        for name in drafters:
            acceptance[name].append(AcceptanceStats.from_metrics(*metrics[name]))
        row = " ".join(f"{n}:{ms:.1f}" for n, ms in zip(nodes, verify_rows[-1]))
        log(f"[{length} visual tokens, {slots[-1]} slots] verify ms by nodes {row} ({time.perf_counter() - t0:.1f}s)")
        for name in drafters:
            chain = " ".join(f"{ms:.1f}" for ms in draft_rows[name][-1][0] if ms is not None)
            widest = " ".join(f"{ms:.1f}" for ms in draft_rows[name][-1][-1] if ms is not None)
            tree_m, chain_m = metrics[name]
            log(f"  {name}: draft ms by depth, top-k {top_ks[0]}: {chain}; top-k {top_ks[-1]}: {widest}; "
                f"accepted per depth {tree_m.accepted_per_depth} of {tree_m.steps} steps (tree), "
                f"{chain_m.accepted_per_depth} of {chain_m.steps} (chain of {chain_probe.depth}), "
                f"at {accept_slots[-1]} slots")
    verify = VerifyCost(tuple(slots), tuple(nodes), tuple(verify_rows))
    return DeviceProfile(
        device=target.device.type, dtype=str(target.dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        model=target.name(), verify=verify,
        drafters={name: DrafterProfile(DraftCost(tuple(slots), tuple(top_ks), tuple(depths), tuple(draft_rows[name])),
                                       ContextAcceptance(tuple(accept_slots), tuple(acceptance[name])))
                  for name in drafters},
    )


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-bench calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target checkpoint dir (default: the embedded model)")
    p.add_argument("--random-target", action="store_true", help="the default architecture with random weights")
    add_drafter_flag(p)
    p.add_argument("--methods", default="sparrow", help="the drafter methods to measure (comma-separated)")
    p.add_argument("--quick", action="store_true", help="a few sizes, seconds (what the test suite runs)")
    p.add_argument("--contexts", default=None, help=f"visual tokens (default {FULL['contexts']})")
    p.add_argument("--nodes", default=None, help=f"verify tree sizes, root included (default {FULL['nodes']})")
    p.add_argument("--top-k", default=None, help=f"draft widths (default {FULL['top_k']})")
    p.add_argument("--max-depth", type=int, default=None, help=f"deepest draft tree (default {FULL['max_depth']})")
    p.add_argument("--max-chain", type=int, default=None, help=f"longest draft chain (default {FULL['max_chain']})")
    p.add_argument("--captions", type=int, default=None, help=f"held-out captions per length (default {FULL['captions']})")
    p.add_argument("--max-tokens", type=int, default=None, help=f"tokens per caption (default {FULL['max_tokens']})")
    p.add_argument("--repeats", type=int, default=None, help=f"timings per size, median kept (default {FULL['repeats']})")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="first world seed of the held-out stream")
    p.add_argument("--out", default=None, help=f"write the profile here (default: <model>/{PROFILE_NAME})")
    add_run_flags(p)
    args = p.parse_args(argv)
    device, dtype = apply_run_flags(args, p)
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.random_target:
        target = random_default_target(device, dtype)
    else:
        target = load_target(args.model, device=device, dtype=dtype)
    out = Path(args.out) if args.out else (target.path / PROFILE_NAME if target.path and not args.random_target else None)
    if out is None:
        p.error("--out FILE is needed for a target without a checkpoint directory")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ar" in methods or "ngram" in methods:
        p.error("--methods names drafter methods (ar and ngram have no drafter to size a tree for)")
    try:
        decoders, untrained = load_decoders(target, methods, parse_drafter_flags(args.drafter))
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    drafters = {name: dec.proposer.drafter for name, dec in decoders.items()}
    if untrained:
        print(f"warning: no trained drafter for {sorted(untrained)}: measuring random ones")
    nodes, top_ks = _ints(str(sizes["nodes"])), _ints(str(sizes["top_k"]))
    if not nodes or nodes[0] < 1 or not top_ks or top_ks[0] < 1 or int(sizes["max_depth"]) < 0 or int(sizes["max_chain"]) < 0:
        p.error("--nodes and --top-k are positive integers, --max-depth and --max-chain >= 0")
    history = StreamDefaults.for_model(target.path).caption_history
    profile = calibrate(target, drafters, _ints(str(sizes["contexts"])), nodes, top_ks, int(sizes["max_depth"]),
                        int(sizes["max_chain"]), int(sizes["captions"]), int(sizes["max_tokens"]), int(sizes["repeats"]), history or None,
                        args.seed)
    profile.save(out)
    print(f"profile: {out} ({profile.device}/{profile.dtype}, {profile.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
