"""Speculative decoding from a stream: draft a tree, verify it in one target forward, keep the accepted path.

One step (= one yield, = one target forward):

    root  = the next token, already sampled from the target (the previous step's bonus, or the incoming logits)
    tree  = proposer.propose(stream, root)                  Q nodes, root first
    L     = stream.append_tree(tree)                        [Q, V] target logits after each node
    path, bonus = verify_tree(tree, L)                      accepted nodes root first; the next root
    stream.accept_tree(Q, path)                             the stream keeps root..path[-1]

and emits the path's tokens, so tokens per forward tau = 1 + accepted drafts. The emitted tokens are
distributed exactly as `ARDecoder`'s (greedy: identical), see verify.py. Like AR decoding, every
emitted token is in the stream afterwards, a stop token included; a stop inside the accepted path ends
decoding there and the tokens after it are rolled back; the tree is never deeper than the tokens left
before `max_new_tokens`, so the cap is met exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from sparrow_core.decoding.ar import DecodeStep
from sparrow_core.decoding.draft_tree import DraftTree
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.base import DraftRequest, Proposer
from sparrow_core.decoding.sampling import SamplingConfig, sample
from sparrow_core.decoding.tree_policy import rank_observations
from sparrow_core.decoding.verify import verify_tree
from sparrow_core.engine.ragged import StreamForward, run_steps
from sparrow_core.engine.stream import StreamNeeds, TargetStream


class SpeculativeDecoder:
    """Speculative decoding over one proposer, as a `Decoder` (see decoders.py)."""

    def __init__(self, proposer: Proposer) -> None:
        self.proposer = proposer
        self.name: str = proposer.name

    @property
    def needs(self) -> StreamNeeds:
        return self.proposer.needs

    @property
    def max_tree_tokens(self) -> int:
        return self.proposer.max_tree_tokens

    def prefill(self, stream: TargetStream) -> None:
        self.proposer.prefill(stream)

    def start(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
              sampling: SamplingConfig, generator: torch.Generator | None = None,
              metrics: DecodeMetrics | None = None, draft_ahead: bool = True) -> SpeculativeSteps:
        return SpeculativeSteps(self.proposer, stream, logits, max_new_tokens, stop_ids, sampling, generator, metrics,
                                draft_ahead)

    def decode(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
               sampling: SamplingConfig, generator: torch.Generator | None = None,
               metrics: DecodeMetrics | None = None) -> Iterator[DecodeStep]:
        """Decode from `logits` [V] (the stream's next-token logits); one yield per target forward,
        recorded in `metrics` when given.

        `draft_tail` of a step is the next root (sampled, not yet emitted) and the drafter's best
        continuation below it: unverified text for display.
        """
        return run_steps(self.start(stream, logits, max_new_tokens, stop_ids, sampling, generator, metrics))


class SpeculativeSteps:
    """One speculative decode as a `ragged.Step`: prepare is the tree's forward, finish verifies it and keeps
    the accepted path. The next tree is drafted by finish itself (`draft_ahead`), or, for a caller that runs
    many streams' steps in one forward, by `draft_together` over all of them (one drafter forward per depth
    for every stream drafting); prepare drafts a tree still missing alone."""

    def __init__(self, proposer: Proposer, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int,
                 stop_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None,
                 metrics: DecodeMetrics | None, draft_ahead: bool = True) -> None:
        self.proposer, self.stream, self.max_new_tokens = proposer, stream, max_new_tokens
        self.stops = set(stop_ids)
        self.sampling, self.generator, self.metrics = sampling, generator, metrics
        self.draft_ahead = draft_ahead
        self.emitted = 0
        self.done = max_new_tokens < 1
        self._t0 = 0.0
        self.tree: DraftTree | None = None  # the next step's tree, once drafted
        self.draft_s = 0.0  # seconds its drafting took (all the streams drafted with it)
        # the next token, decided by the target (sampled from its logits) and emitted by the next step: the root
        self.next_token = -1 if self.done else sample(logits, sampling, generator)
        if not self.done and draft_ahead:
            draft_together([self])

    @property
    def draft_request(self) -> DraftRequest | None:
        """The tree the next step still needs drafted (stream, root, most depth); None: drafted, or done."""
        if self.done or self.tree is not None:
            return None
        return self.stream, self.next_token, self.max_new_tokens - self.emitted - 1

    def draft_tail(self) -> list[int]:
        """The next root and the drafter's best continuation below it: unverified text for display (just the
        root until the tree is drafted; empty when done)."""
        if self.done:
            return []
        if self.tree is None:
            return [self.next_token]
        return self.tree.tokens[self.tree.best_path()].tolist()

    def prepare(self) -> StreamForward:
        if self.tree is None:
            draft_together([self])
        self._t0 = time.perf_counter()
        tree = self.tree
        return self.stream.tree_forward(tree.tokens.tolist(), tree.depths.tolist(), tree.mask)

    def finish(self, forward: StreamForward) -> DecodeStep:
        stream, tree = self.stream, self.tree
        context = stream.length - tree.size  # the slots below the tree, the length its tree was chosen for
        result = verify_tree(tree, forward.logits, self.sampling, self.generator)  # logits [Q, V]
        stream.accept_tree(tree.size, result.accepted)
        tokens = tree.tokens[result.accepted].tolist()
        keep = next((i + 1 for i, t in enumerate(tokens) if t in self.stops), len(tokens))
        keep = min(keep, self.max_new_tokens - self.emitted)
        if keep < len(tokens):
            stream.rollback(len(tokens) - keep)  # tokens after a stop never happened
        tokens = tokens[:keep]
        self.emitted += keep
        self.done = tokens[-1] in self.stops or self.emitted >= self.max_new_tokens
        verify_s = time.perf_counter() - self._t0
        ranks = rank_observations(tree, result.accepted)
        self.proposer.observe(ranks, context)
        if self.metrics is not None:
            self.metrics.record(tree.size, len(result.accepted) - 1, keep, self.draft_s, verify_s, ranks)
        self.tree, self.next_token = None, -1 if self.done else result.bonus
        if self.draft_ahead and not self.done:
            draft_together([self])
        return DecodeStep(tokens=tokens, done=self.done, draft_tail=self.draft_tail())


def draft_together(steps: Sequence[object]) -> None:
    """Draft the next tree of every `SpeculativeSteps` among `steps` that still needs one, many streams' at
    once: one `propose_many` per proposer (a drafter: one forward per tree depth for all of them). Each
    stream's tree is the one it would draft alone."""
    groups: dict[int, list[SpeculativeSteps]] = {}
    for step in steps:
        if isinstance(step, SpeculativeSteps) and step.draft_request is not None:
            groups.setdefault(id(step.proposer), []).append(step)
    for group in groups.values():
        t0 = time.perf_counter()
        trees = group[0].proposer.propose_many([step.draft_request for step in group])
        seconds = time.perf_counter() - t0
        for step, tree in zip(group, trees):
            step.tree, step.draft_s = tree, seconds
