"""Counters of decoding: what was drafted, what the target kept, what it cost. One type for every
decoder (AR is a step of one token and no draft), every caption, every session and the benchmarks.

One *step* is one target forward (for speculative decoding a verify forward over a draft tree, whose
root is the bonus token sampled from the target's previous logits, so a step always emits >= 1 token):

    tau = emitted tokens / steps = 1 + accepted drafts / steps           (tokens per target forward)
    acceptance rate = accepted drafts / drafted tokens                    (drafted: tree nodes minus roots)

Stop tokens and the max-token cap may cut an accepted path short; `emitted_tokens` counts what was
actually emitted, `accepted_tokens` what verification accepted before the cut.

Sibling ranks (what `decoding/tree_policy.py` sizes the tree from): below each accepted node that offered
children, `rank_offered[d][r]` counts the steps whose node at depth d offered a rank-(r+1) child (children
ranked by draft score), and `rank_hits[d][r]` those where the target's token was that child (depth d+1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class DecodeMetrics:
    steps: int = 0  # target forwards (for speculative decoding: verify forwards = draft trees proposed)
    draft_tokens: int = 0  # drafted nodes, roots excluded
    accepted_tokens: int = 0  # accepted drafted nodes, roots excluded
    emitted_tokens: int = 0  # tokens emitted (roots included, after stop/max cuts; a stop token included)
    draft_s: float = 0.0  # wall time proposing trees (drafter sync + tree expansion)
    verify_s: float = 0.0  # wall time of target tree forwards + verification + acceptance
    accepted_per_depth: list[int] = field(default_factory=list)  # [d] steps that accepted a node at depth d+1
    rank_hits: list[list[int]] = field(default_factory=list)  # [d][r] accepted child of rank r+1 at depth d+1
    rank_offered: list[list[int]] = field(default_factory=list)  # [d][r] a rank-(r+1) child was offered there

    def record(self, tree_size: int, accepted: int, emitted: int, draft_s: float, verify_s: float,
               ranks: Sequence[tuple[int, int]] = ()) -> None:
        """One step: a tree of `tree_size` nodes (root included) of which `accepted` drafts were kept.
        `ranks`, per depth along the accepted path: (children offered, rank of the accepted one, 1-based,
        or 0 when none was), see `tree_policy.rank_observations`."""
        self.steps += 1
        self.draft_tokens += tree_size - 1
        self.accepted_tokens += accepted
        self.emitted_tokens += emitted
        self.draft_s += draft_s
        self.verify_s += verify_s
        while len(self.accepted_per_depth) < accepted:
            self.accepted_per_depth.append(0)
        for d in range(accepted):
            self.accepted_per_depth[d] += 1
        count_ranks(self.rank_hits, self.rank_offered, ranks)

    @property
    def tau(self) -> float | None:
        """Tokens per target forward; None before the first step."""
        return self.emitted_tokens / self.steps if self.steps else None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def merge(self, other: DecodeMetrics) -> None:
        self.steps += other.steps
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self.emitted_tokens += other.emitted_tokens
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        for d, n in enumerate(other.accepted_per_depth):
            if d < len(self.accepted_per_depth):
                self.accepted_per_depth[d] += n
            else:
                self.accepted_per_depth.append(n)
        for d, row in enumerate(other.rank_offered):
            _add_rank_counts(self.rank_offered, d, row)
        for d, row in enumerate(other.rank_hits):
            _add_rank_counts(self.rank_hits, d, row)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tau"] = self.tau
        d["acceptance_rate"] = self.acceptance_rate
        return d


def count_ranks(hits: list[list[float]], offered: list[list[float]], ranks: Sequence[tuple[int, int]]) -> None:
    """Add one step's (children offered, accepted rank or 0) per depth to the [depth][rank] counts."""
    for d, (n, rank) in enumerate(ranks):
        _add_rank_counts(offered, d, [1] * n)
        if rank:
            _add_rank_counts(hits, d, [0] * (rank - 1) + [1])


def _add_rank_counts(table: list[list[float]], depth: int, counts: Sequence[float]) -> None:
    """table[depth][r] += counts[r], growing the ragged table as needed."""
    while len(table) <= depth:
        table.append([])
    row = table[depth]
    row.extend([0] * (len(counts) - len(row)))
    for r, n in enumerate(counts):
        row[r] += n
