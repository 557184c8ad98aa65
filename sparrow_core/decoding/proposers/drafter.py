"""Draft proposers: what `speculative_decode` asks for a tree below the stream's last token.

A proposer is stateless towards the caller: it keeps whatever it needs per stream itself (a drafter's
KV, keyed weakly by the stream, so a closed session's state goes with it) and catches up with the
stream on every call. Two kinds:

- `DrafterProposer`: a `TextAnchoredDrafter` (sparrow / eagle / msd) grown into an EAGLE-2 tree.
- `NgramProposer`: prompt lookup over the stream's text tokens, training-free: find the latest earlier
  occurrence of the last n tokens (root included) and propose what followed it, as a chain.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch

from sparrow_core.decoding.draft_tree import DraftTree, TreeConfig, build_tree, propose_tree, root_only
from sparrow_core.decoding.drafter import DrafterState, TextAnchoredDrafter
from sparrow_core.decoding.metrics import SpecMetrics
from sparrow_core.engine.target import TokenKind


class Proposer(Protocol):
    name: str
    metrics: SpecMetrics  # cumulative counters of the decoders built on it
    stream_options: dict  # StreamConfig fields its streams need beyond the defaults

    def propose(self, stream, root_token: int, max_depth: int) -> DraftTree:
        """A tree rooted at `root_token` (the next, already verified token), at most `max_depth` deep."""
        ...

    def prefill(self, stream) -> None:
        """Catch up with the stream now (e.g. while frames arrive) rather than at the next caption."""
        ...


class DrafterProposer:
    def __init__(self, drafter: TextAnchoredDrafter, tree: TreeConfig | None = None) -> None:
        self.drafter = drafter
        self.tree = tree or drafter.config.tree()
        self.name = drafter.config.variant
        self.stream_options = drafter.config.stream_options()
        self.metrics = SpecMetrics()
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # stream -> DrafterState

    def state(self, stream) -> DrafterState:
        st = self._states.get(stream)
        if st is None:
            st = self._states[stream] = self.drafter.new_state()
        return st

    def prefill(self, stream) -> None:
        self.drafter.sync(self.state(stream), stream)

    @torch.no_grad()
    def propose(self, stream, root_token: int, max_depth: int) -> DraftTree:
        state = self.state(stream)
        self.drafter.sync(state, stream)
        expand, committed = self.drafter.tree_expander(state, stream)
        try:
            return propose_tree(root_token, expand, self.tree, max_depth)
        finally:
            state.cache.crop(committed - state.cache.length)  # drop the tree's drafter KV


class NgramProposer:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 6) -> None:
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self.metrics = SpecMetrics()
        self.stream_options: dict = {}

    def prefill(self, stream) -> None:
        return None

    def propose(self, stream, root_token: int, max_depth: int) -> DraftTree:
        k = min(self.num_tokens, max_depth)
        if k <= 0:
            return root_only(root_token)
        text = stream.token_ids()[stream.kinds() == int(TokenKind.TEXT)]
        seq = torch.cat([text, torch.tensor([root_token])])  # [L], the root is the newest token
        cont = lookup_continuation(seq, self.max_ngram, self.min_ngram, k)
        tokens = torch.cat([torch.tensor([root_token]), cont])
        return build_tree(tokens, torch.arange(tokens.numel()) - 1)  # a chain: parent of i is i - 1


def lookup_continuation(seq: torch.Tensor, max_ngram: int, min_ngram: int, k: int) -> torch.Tensor:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n tokens (n from
    max_ngram down to min_ngram; the first n with a match wins). Empty if none."""
    length = seq.numel()
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        pattern = seq[length - n :]
        windows = seq[: length - 1].unfold(0, n, 1)  # [L-n, n]: start i covers seq[i : i+n], i + n < L
        hits = (windows == pattern).all(dim=1).nonzero().squeeze(1)
        if hits.numel():
            start = int(hits[-1]) + n  # what followed the latest match
            return seq[start : start + k]
    return seq[:0]
