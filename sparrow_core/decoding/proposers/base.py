"""Draft proposers: what `SpeculativeDecoder` asks for a tree below the stream's last token.

A proposer is stateless towards the caller: it keeps whatever it needs per stream itself (a drafter's
KV, keyed weakly by the stream, so a closed session's state goes with it) and catches up with the
stream on every call. Two kinds: `drafter.DrafterProposer` (a trained drafter grown into an EAGLE-2
tree: sparrow / eagle / msd) and `ngram.NgramProposer` (prompt lookup, a chain).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sparrow_core.decoding.draft_tree import DraftTree
from sparrow_core.engine.stream import StreamNeeds, TargetStream

# One stream's request for a tree: (the stream, the root token, the most depth).
DraftRequest = tuple[TargetStream, int, int]


class Proposer(Protocol):
    name: str
    needs: StreamNeeds  # what its streams must keep beyond the defaults
    max_tree_tokens: int  # the most nodes one proposed tree has, root included (KV slots a verify step adds)

    def propose(self, stream: TargetStream, root_token: int, max_depth: int) -> DraftTree:
        """A tree rooted at `root_token` (the next, already verified token), at most `max_depth` deep."""
        ...

    def propose_many(self, requests: Sequence[DraftRequest]) -> list[DraftTree]:
        """`propose` for many streams (at most one request each) at once: a drafter batches them, one
        forward per depth for all; the trees are each stream's own `propose`'s."""
        ...

    def prefill(self, stream: TargetStream) -> None:
        """Catch up with the stream now (e.g. while frames arrive) rather than at the next caption."""
        ...

    def observe(self, ranks: Sequence[tuple[int, int]], context: int) -> None:
        """What verification kept of the last proposed tree: per depth, (children offered, the accepted
        one's sibling rank or 0), see `tree_policy.rank_observations`; `context`: the stream's slots below
        the tree. A tree sized online learns from it."""
        ...
