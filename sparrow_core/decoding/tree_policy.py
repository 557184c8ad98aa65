"""The draft tree sized for the device: the (total, depth, top_k) that maximises accepted tokens per second.

EAGLE-2 grows the tree from the drafter's confidence; how large it should be depends on what a verify
forward costs on this device (a GPU verifies 64 nodes for about the price of one; on a few CPU cores
every node adds to the forward). Two measured inputs decide it:

  DeviceProfile (JSON, written by `sparrow-bench calibrate`): the target's verify ms against tree nodes
      and each drafter's ms per (top_k, depth) at a few context lengths, on one device / dtype / threads,
      with each drafter's AcceptanceStats.
  AcceptanceStats: the sibling-rank counts of `DecodeMetrics` (`rank_hits`, `rank_offered`), from
      calibrate's held-out captions or from any run's metrics (`AcceptanceStats.from_metrics`).

The model (Sequoia's positional acceptance vector, EAGLE-2's growth rule):

    p[d][r] = rank_hits[d][r] / rank_offered[d][r]
            = P(the target's token at depth d+1 is the drafter's rank-(r+1) child | its parent was accepted)

  A node v reached through sibling ranks r_1 .. r_n is accepted iff every node on its path is; taking
  the depths as independent,

    P(v) = p[0][r_1] * p[1][r_2] * ... * p[n-1][r_n]

  Verification accepts one root-to-node path and counts each of its nodes once, so

    E[accepted drafts] = sum over the drafted nodes v of P(v).

  A config grows the tree `draft_tree.propose_tree` grows: children ranked by score, the top_k of each
  level expanded, the `total` best kept. With the score taken to be log P(v) (EAGLE-2's premise: the
  drafter's path confidence tracks acceptance), that tree is propose_tree itself run over ranks, and
  E[accepted] is the sum of exp(score) over its kept nodes. A step then costs

    step_ms = draft_ms(top_k, depth) + verify_ms(total + 1 nodes)        at the stream's context

  and emits 1 + E[accepted] tokens (the root is the previous step's bonus token), so the policy picks

    argmax over configs of (1 + E[accepted]) / step_ms.

  A chain of n is (n, n, 1); (0, 0, 1) is the root alone: one token per step through the verify path.
  Depths are not independent (a span the drafter knows is easy all the way through), so the product of
  a wide tree's rank-1 rates undervalues chains; a chain's value comes from chains measured as chains
  (AcceptanceStats.chain_*):

    E[accepted drafts of a chain of n] = sum over d = 1..n of pc[0] * ... * pc[d-1]
    pc[d] = P(the chain's node at depth d+1 is accepted | every node above it was)

  Costs between measured context lengths are interpolated linearly, beyond them extrapolated from the
  last two (attention grows linearly in the context); tree sizes and depths outside what was measured
  are not candidates, so nothing here is a number of its own.

  Acceptance depends on the context too (a target out of its training range at 25,000 visual tokens
  accepted a 12-chain's first draft 48 of 86 times there, 12 of 16 at 500), so the profile keeps one
  AcceptanceStats per context calibrate probed (`ContextAcceptance`). At a stream of c slots, p and pc are interpolated linearly between the
  two probed contexts around c, and held at the nearest one outside them (a rate is not extrapolated):

    p(c) = (1 - w) p(c_i) + w p(c_i+1),   w = (c - c_i) / (c_i+1 - c_i),   c_i <= c <= c_i+1

  and each candidate's E[accepted] is taken from p(c), pc(c). A profile of format 1 has one estimate
  pooled over every context: it loads as one context, the same acceptance everywhere (with a warning).

Online: the decoder reports each step's ranks and the stream's length (`observe`); they count towards
the probed context nearest that length. Every REFIT_STEPS steps p is re-estimated from the counts, and
the counts of each context that saw steps since the last re-estimate are weighed down by
OLD_COUNTS_WEIGHT, so the profile's acceptance is a prior and the text actually being captioned decides.
The candidates, and so `max_tree_tokens`, never change.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparrow_core.decoding.draft_tree import DraftTree, TreeConfig, propose_tree
from sparrow_core.decoding.metrics import DecodeMetrics, count_ranks

PROFILE_FORMAT = 2  # written; 2: acceptance per probed context
OLD_FORMATS = (1,)  # still read: 1, acceptance pooled over the contexts (one estimate for all)
PROFILE_NAME = "tree_profile.json"  # a checkpoint's own profile, next to its config (read when present)
MIN_OFFERED = 8  # fewer observations of a (depth, rank) than this: take the depth above's estimate
LOG_FLOOR = math.log(1e-12)  # log P of a never-accepted rank: the node exists, it adds nothing
CONTEXT_BUCKET = 256  # the choice is cached per this many stream slots
REFIT_STEPS = 32  # observed steps between re-estimates of the acceptance
OLD_COUNTS_WEIGHT = 0.5  # at a re-estimate, the counts so far weigh this much against the next ones


def rank_observations(tree: DraftTree, accepted: Sequence[int]) -> list[tuple[int, int]]:
    """Per depth along the accepted path (root first): (children the node offered, the 1-based sibling
    rank of the accepted child, 0 when none was), stopping at the first node that offered none (the
    tree's depth, or a node not expanded / whose children were not kept). Ranks are by draft score, ties
    in creation order, as `DraftTree.children` orders them."""
    on_path = set(accepted)
    parents, scores = tree.parents.tolist(), tree.scores.tolist()
    kids: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        if parent in on_path:
            kids.setdefault(parent, []).append(node)
    out = []
    for d, node in enumerate(accepted):
        children = sorted(kids.get(node, []), key=lambda i: -scores[i])  # stable: creation order on ties
        if not children:
            break
        nxt = accepted[d + 1] if d + 1 < len(accepted) else None
        out.append((len(children), children.index(nxt) + 1 if nxt is not None else 0))
    return out


@dataclass
class AcceptanceStats:
    """Sibling-rank counts of a drafter (see `DecodeMetrics`): [depth][rank] ragged lists."""

    rank_hits: list[list[float]] = field(default_factory=list)
    rank_offered: list[list[float]] = field(default_factory=list)
    # chains measured as chains: [d] steps whose chain offered a node at depth d+1 below an accepted one, and
    # those where it was accepted (see `chain_probabilities`)
    chain_hits: list[float] = field(default_factory=list)
    chain_offered: list[float] = field(default_factory=list)

    @classmethod
    def from_metrics(cls, metrics: DecodeMetrics, chains: DecodeMetrics | None = None) -> AcceptanceStats:
        """The rank counts of `metrics`; `chains`: a run's metrics that drafted chains (top-k 1), whose rank-1
        counts are the chain counts."""
        stats = cls([list(r) for r in metrics.rank_hits], [list(r) for r in metrics.rank_offered])
        if chains is not None:
            stats.chain_hits = [row[0] if row else 0 for row in chains.rank_hits]
            stats.chain_offered = [row[0] if row else 0 for row in chains.rank_offered]
        return stats

    def observe(self, ranks: Sequence[tuple[int, int]]) -> None:
        """One verified step's ranks (`rank_observations`). A step whose accepted path offered one child at
        every depth (a chain's steps always do) counts as a chain's too."""
        count_ranks(self.rank_hits, self.rank_offered, ranks)
        if ranks and all(n == 1 for n, _ in ranks):
            for d, (_, rank) in enumerate(ranks):
                for table, add in ((self.chain_offered, 1), (self.chain_hits, 1 if rank else 0)):
                    table.extend([0] * (d + 1 - len(table)))
                    table[d] += add

    @property
    def observed(self) -> bool:
        return any(n >= MIN_OFFERED for row in self.rank_offered for n in row)

    def probabilities(self, depths: int, ranks: int) -> list[list[float]]:
        """p [depths][ranks] as in the module docstring. A (depth, rank) seen fewer than MIN_OFFERED
        times takes the depth above's estimate (acceptance only falls with depth), 0 at the first depth."""
        p: list[list[float]] = []
        for d in range(depths):
            row = []
            for r in range(ranks):
                offered = self.rank_offered[d][r] if d < len(self.rank_offered) and r < len(self.rank_offered[d]) else 0
                hits = self.rank_hits[d][r] if d < len(self.rank_hits) and r < len(self.rank_hits[d]) else 0
                if offered >= MIN_OFFERED:
                    row.append(hits / offered)
                else:
                    row.append(p[d - 1][r] if d > 0 else 0.0)
            p.append(row)
        return p

    def chain_probabilities(self, depths: int) -> list[float]:
        """pc [depths]: P(a chain's node at depth d+1 is accepted | every node above it was), from the chain
        counts. Acceptance is not independent along a path (a span the drafter knows is easy all the way
        through), so the tree's rank-1 estimate p[d][0] (whatever ranks were accepted above) undervalues
        chains; it stands in only where no chain was seen (fewer than MIN_OFFERED steps at depth 1). A depth
        seen fewer times takes the depth above's estimate."""
        if not (self.chain_offered and self.chain_offered[0] >= MIN_OFFERED):
            return [row[0] for row in self.probabilities(depths, 1)]
        pc: list[float] = []
        for d in range(depths):
            offered = self.chain_offered[d] if d < len(self.chain_offered) else 0
            hits = self.chain_hits[d] if d < len(self.chain_hits) else 0  # ragged: no hit at depth d yet
            pc.append(hits / offered if offered >= MIN_OFFERED else pc[d - 1])
        return pc

    def weigh(self, factor: float) -> None:
        """Scale every count by `factor` (older observations count less)."""
        for table in (self.rank_hits, self.rank_offered):
            for row in table:
                row[:] = [factor * n for n in row]
        for row in (self.chain_hits, self.chain_offered):
            row[:] = [factor * n for n in row]

    def copy(self) -> AcceptanceStats:
        return AcceptanceStats([list(r) for r in self.rank_hits], [list(r) for r in self.rank_offered],
                               list(self.chain_hits), list(self.chain_offered))

    def as_dict(self) -> dict:
        return {"rank_hits": self.rank_hits, "rank_offered": self.rank_offered, "chain_hits": self.chain_hits,
                "chain_offered": self.chain_offered}

    @classmethod
    def from_dict(cls, data: dict) -> AcceptanceStats:
        return cls(data.get("rank_hits", []), data.get("rank_offered", []), data.get("chain_hits", []),
                   data.get("chain_offered", []))


@dataclass
class ContextAcceptance:
    """A drafter's AcceptanceStats at each context calibrate probed (stream slots, increasing)."""

    contexts: tuple[int, ...]
    stats: tuple[AcceptanceStats, ...]

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.stats) or list(self.contexts) != sorted(set(self.contexts)):
            raise ValueError(f"acceptance contexts {self.contexts}: one increasing context per estimate")

    @classmethod
    def everywhere(cls, stats: AcceptanceStats, context: int = 0) -> ContextAcceptance:
        """One estimate for every context (held at the ends: `context` does not matter)."""
        return cls((context,), (stats,))

    def observed_only(self) -> ContextAcceptance:
        """The contexts whose estimate rests on enough observations (`AcceptanceStats.observed`)."""
        kept = [(c, s) for c, s in zip(self.contexts, self.stats) if s.observed]
        return ContextAcceptance(tuple(c for c, _ in kept), tuple(s for _, s in kept))

    def nearest(self, context: int) -> int:
        """The index of the probed context nearest `context` (the lower one on a tie)."""
        return min(range(len(self.contexts)), key=lambda i: abs(self.contexts[i] - context))

    def weights(self, context: float) -> list[tuple[int, float]]:
        """(index, weight) of the probed contexts whose estimates make the one at `context`: the two
        around it, linearly; the nearest end alone outside them."""
        xs = self.contexts
        if context <= xs[0]:
            return [(0, 1.0)]
        if context >= xs[-1]:
            return [(len(xs) - 1, 1.0)]
        i = next(i for i in range(1, len(xs)) if context <= xs[i])
        w = (context - xs[i - 1]) / (xs[i] - xs[i - 1])
        return [(i - 1, 1.0 - w), (i, w)]

    def copy(self) -> ContextAcceptance:
        return ContextAcceptance(self.contexts, tuple(s.copy() for s in self.stats))

    def as_list(self) -> list[dict]:
        return [{"context": c, **s.as_dict()} for c, s in zip(self.contexts, self.stats)]

    @classmethod
    def from_list(cls, rows: list[dict]) -> ContextAcceptance:
        return cls(tuple(int(r["context"]) for r in rows), tuple(AcceptanceStats.from_dict(r) for r in rows))


def _mix(weights: Sequence[tuple[int, float]], rows: Sequence[list]) -> list:
    """sum of w * rows[i] elementwise over (i, w) in `weights`; rows are equal-shaped lists (1-D or 2-D)."""
    first = rows[weights[0][0]]
    if first and isinstance(first[0], list):
        return [_mix(weights, [row[d] for row in rows]) for d in range(len(first))]
    return [sum(w * rows[i][j] for i, w in weights) for j in range(len(first))]


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear y(x) through (xs, ys), xs increasing; linear from the end pairs outside, >= 0."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class VerifyCost:
    """The target's verify ms (tree forward + verification + acceptance) at each context x tree size."""

    contexts: tuple[int, ...]  # stream slots before the tree, increasing
    nodes: tuple[int, ...]  # tree nodes, root included, increasing
    ms: tuple[tuple[float, ...], ...]  # [context][nodes]

    def at(self, context: int, nodes: int) -> float:
        per_context = [_interp(nodes, self.nodes, row) for row in self.ms]
        return _interp(context, self.contexts, per_context)


@dataclass(frozen=True)
class DraftCost:
    """A drafter's ms to propose one tree (catch-up on the new tokens, then `depth` tree levels)."""

    contexts: tuple[int, ...]
    top_ks: tuple[int, ...]
    depths: tuple[int, ...]  # 0 = the catch-up alone (the root, no drafter forward)
    ms: tuple[tuple[tuple[float | None, ...], ...], ...]  # [context][top_k][depth], None: not measured

    def measured(self, top_k: int, depth: int) -> bool:
        """Whether (top_k, depth) was timed (calibrate drafts chains deeper than trees)."""
        if top_k not in self.top_ks or depth not in self.depths:
            return False
        k, d = self.top_ks.index(top_k), self.depths.index(depth)
        return all(row[k][d] is not None for row in self.ms)

    def at(self, context: int, top_k: int, depth: int) -> float:
        k, d = self.top_ks.index(top_k), self.depths.index(depth)
        return _interp(context, self.contexts, [row[k][d] for row in self.ms])


@dataclass(frozen=True)
class DrafterProfile:
    draft: DraftCost
    acceptance: ContextAcceptance


@dataclass(frozen=True)
class DeviceProfile:
    """What `sparrow-bench calibrate` measured on one device / dtype / thread count (see the docstring)."""

    device: str  # torch device type, e.g. "cpu", "cuda"
    dtype: str  # e.g. "float32"
    threads: int
    model: str
    verify: VerifyCost
    drafters: dict[str, DrafterProfile]

    def check_runs_on(self, device: torch.device, dtype: torch.dtype, source: str = "the tree profile") -> None:
        """ValueError unless this profile was measured on `device`'s type in `dtype`."""
        have = str(dtype).removeprefix("torch.")
        if device.type != self.device or have != self.dtype:
            raise ValueError(f"{source} was measured on {self.device}/{self.dtype}, this run is {device.type}/{have}: "
                             "re-run `sparrow-bench calibrate` with this --device and --dtype")

    # --- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        v = self.verify
        return {
            "format": PROFILE_FORMAT, "device": self.device, "dtype": self.dtype, "threads": self.threads,
            "model": self.model,
            "verify_ms": {"contexts": list(v.contexts), "nodes": list(v.nodes), "ms": [list(r) for r in v.ms]},
            "drafters": {
                name: {"draft_ms": {"contexts": list(d.draft.contexts), "top_k": list(d.draft.top_ks),
                                    "depth": list(d.draft.depths),
                                    "ms": [[list(r) for r in per_k] for per_k in d.draft.ms]},
                       "acceptance": d.acceptance.as_list()}
                for name, d in self.drafters.items()
            },
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: dict, source: str = "tree profile") -> DeviceProfile:
        fmt = data.get("format")
        if fmt != PROFILE_FORMAT and fmt not in OLD_FORMATS:
            raise ValueError(f"{source}: format {fmt!r}, this version reads formats "
                             f"{', '.join(map(str, (*OLD_FORMATS, PROFILE_FORMAT)))}: re-run `sparrow-bench calibrate`")
        if fmt == 1:
            warnings.warn(f"{source}: format 1, acceptance pooled over every context, one estimate for all; "
                          "re-run `sparrow-bench calibrate` for acceptance per context", stacklevel=3)
        try:
            v = data["verify_ms"]
            verify = VerifyCost(tuple(v["contexts"]), tuple(v["nodes"]), tuple(tuple(map(float, r)) for r in v["ms"]))
            _check_grid(verify.ms, (len(verify.contexts), len(verify.nodes)), f"{source}: verify_ms")
            drafters = {}
            for name, d in data["drafters"].items():
                dm = d["draft_ms"]
                draft = DraftCost(tuple(dm["contexts"]), tuple(dm["top_k"]), tuple(dm["depth"]),
                                  tuple(tuple(tuple(None if x is None else float(x) for x in r) for r in per_k)
                                        for per_k in dm["ms"]))
                _check_grid(draft.ms, (len(draft.contexts), len(draft.top_ks), len(draft.depths)),
                            f"{source}: drafters.{name}.draft_ms")
                acc = d.get("acceptance", [] if fmt == PROFILE_FORMAT else {})
                try:
                    acceptance = (ContextAcceptance.from_list(acc) if fmt == PROFILE_FORMAT
                                  else ContextAcceptance.everywhere(AcceptanceStats.from_dict(acc), verify.contexts[0]))
                except ValueError as exc:
                    raise ValueError(f"{source}: drafters.{name}.acceptance: {exc}") from None
                drafters[name] = DrafterProfile(draft, acceptance)
            return cls(str(data["device"]), str(data["dtype"]), int(data["threads"]), str(data.get("model", "")),
                       verify, drafters)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{source}: not a tree profile ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"tree profile {path}: {exc}") from None
        return cls.from_json(data, f"tree profile {path}")


def _check_grid(values, shape: tuple[int, ...], what: str) -> None:
    """ValueError unless the nested tuples `values` have exactly `shape`."""
    if len(values) != shape[0]:
        raise ValueError(f"{what}: expected a grid of shape {shape}")
    for v in values if len(shape) > 1 else ():
        _check_grid(v, shape[1:], what)


@dataclass(frozen=True)
class TreeChoice:
    tree: TreeConfig
    expected_tokens: float  # 1 + E[accepted drafts] per step
    step_ms: float  # draft + verify ms per step

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.expected_tokens / self.step_ms


class TreePolicy:
    """One drafter's tree choice from a DeviceProfile: `tree_for(context)` (see the module docstring).

    A `DrafterProposer` takes it in place of a fixed TreeConfig and asks once per step (cached per
    CONTEXT_BUCKET slots); `max_tree_tokens` bounds every tree it can pick, for the stream's KV bound.
    `acceptance`: per probed context (one estimate for every context: `ContextAcceptance.everywhere`)."""

    def __init__(self, verify: VerifyCost, draft: DraftCost, acceptance: ContextAcceptance) -> None:
        acceptance = acceptance.observed_only()  # a context probed too briefly says nothing: its neighbours do
        if not acceptance.contexts:
            raise ValueError(f"no acceptance statistics (a depth and rank seen >= {MIN_OFFERED} times): "
                             "calibrate the drafter on captions first")
        self.verify, self.draft = verify, draft
        self.acceptance = acceptance.copy()
        max_nodes = max(verify.nodes)
        self.depths = [d for d in draft.depths if d <= max_nodes - 1]
        # every candidate config: a chain keeps every level it drafts (fewer would be a shorter chain drafted
        # at more cost); a tree of top_k > 1 keeps 1 .. all of the nodes its levels grow, up to max_nodes
        self.grown: dict[tuple[int, int], TreeConfig] = {}  # (depth, top_k) -> the tree of all its nodes
        self.candidates_cfg: list[TreeConfig] = []
        for depth in self.depths:
            for k in draft.top_ks:
                if not draft.measured(k, depth):
                    continue
                if depth == 0:
                    if k == 1:
                        self.candidates_cfg.append(TreeConfig(0, 0, 1))
                    continue
                cap = min(k + (depth - 1) * k * k, max_nodes - 1)  # nodes propose_tree keeps at most
                self.grown[(depth, k)] = TreeConfig(cap, depth, k)
                self.candidates_cfg += [TreeConfig(total, depth, k) for total in ([depth] if k == 1 else range(1, cap + 1))]
        if not self.candidates_cfg:
            raise ValueError("the profile measured no tree this policy could pick")
        self.max_tree_tokens = 1 + max(cfg.total_tokens for cfg in self.candidates_cfg)
        self._since_refit = 0
        self._seen: set[int] = set()  # the probed contexts (indices) that saw steps since the last refit
        self.refit()

    def refit(self) -> None:
        """p and pc of every probed context from the current counts; the cached values and choices are dropped."""
        depths, ranks = max(self.depths, default=0), max(self.draft.top_ks)
        self._p = [s.probabilities(depths, ranks) for s in self.acceptance.stats]
        self._p_chain = [s.chain_probabilities(depths) for s in self.acceptance.stats]
        self._candidates: dict[tuple[tuple[int, float], ...], list[tuple[TreeConfig, float]]] = {}
        self._cache: dict[int, TreeChoice] = {}

    def acceptance_at(self, context: float) -> tuple[list[list[float]], list[float]]:
        """(p [depth][rank], pc [depth]) at a stream of `context` slots: interpolated between the probed
        contexts around it, the nearest one's outside them (module docstring)."""
        weights = self.acceptance.weights(context)
        return _mix(weights, self._p), _mix(weights, self._p_chain)

    def candidates_at(self, context: float) -> list[tuple[TreeConfig, float]]:
        """(config, E[accepted drafts]) of every candidate at `context` slots."""
        key = tuple((i, round(w, 9)) for i, w in self.acceptance.weights(context))
        if key not in self._candidates:
            p, pc = self.acceptance_at(context)
            values = {grown: self.node_values(cfg, p, pc) for grown, cfg in self.grown.items()}
            # the kept nodes of a smaller total are the best of the grown ones
            self._candidates[key] = [
                (cfg, sum(values[(cfg.depth, cfg.top_k)][: cfg.total_tokens]) if cfg.depth else 0.0)
                for cfg in self.candidates_cfg
            ]
        return self._candidates[key]

    def observe(self, ranks: Sequence[tuple[int, int]], context: int) -> None:
        """One verified step's sibling ranks (`rank_observations`) below a stream of `context` slots: counted
        at the probed context nearest it; re-estimates every REFIT_STEPS steps."""
        i = self.acceptance.nearest(context)
        self.acceptance.stats[i].observe(ranks)
        self._seen.add(i)
        self._since_refit += 1
        if self._since_refit >= REFIT_STEPS:
            self.refit()
            for i in self._seen:
                self.acceptance.stats[i].weigh(OLD_COUNTS_WEIGHT)
            self._seen.clear()
            self._since_refit = 0

    @classmethod
    def from_profile(cls, profile: DeviceProfile, drafter: str) -> TreePolicy:
        if drafter not in profile.drafters:
            raise ValueError(f"the tree profile has no drafter {drafter!r} (it has {', '.join(profile.drafters) or 'none'})")
        d = profile.drafters[drafter]
        return cls(profile.verify, d.draft, d.acceptance)

    def node_values(self, tree: TreeConfig, p: list[list[float]], p_chain: list[float]) -> list[float]:
        """P(v) of the drafted nodes propose_tree keeps under `tree`, largest first (module docstring), from
        p [depth][rank] (`acceptance_at`); a chain's from the chain rates: P(node d) = pc[0] ... pc[d-1]."""
        if tree.top_k == 1:
            return list(itertools.accumulate(p_chain[: min(tree.depth, tree.total_tokens)], operator.mul))

        def expand(node_ids: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, level: int) -> torch.Tensor:
            row = [max(math.log(q), LOG_FLOOR) if q > 0 else LOG_FLOOR for q in p[level]]
            return torch.tensor(row, dtype=torch.float32, device="cpu").expand(node_ids.numel(), -1)  # [m, ranks]

        grown = propose_tree(0, expand, tree)
        return sorted((math.exp(s) for s in grown.scores[1:].tolist()), reverse=True)

    def choose(self, context: int) -> TreeChoice:
        """The candidate with the most expected tokens per second at `context` stream slots."""
        bucket = context // CONTEXT_BUCKET
        if bucket not in self._cache:
            at = (bucket + 0.5) * CONTEXT_BUCKET
            best = None
            for cfg, accepted in self.candidates_at(at):
                ms = self.draft.at(at, cfg.top_k, cfg.depth) + self.verify.at(at, cfg.total_tokens + 1)
                choice = TreeChoice(cfg, 1.0 + accepted, max(ms, 1e-9))
                if best is None or choice.tokens_per_s > best.tokens_per_s:
                    best = choice
            self._cache[bucket] = best
        return self._cache[bucket]

    def tree_for(self, context: int) -> TreeConfig:
        return self.choose(context).tree


def served_policy(profile: DeviceProfile | None, drafter: str) -> TreePolicy | None:
    """The tree source a drafter is served with: a TreePolicy over `profile` when it measured `drafter`;
    None (the drafter grows its own tree, its config's) otherwise."""
    if profile is None or drafter not in profile.drafters:
        return None
    return TreePolicy.from_profile(profile, drafter)
