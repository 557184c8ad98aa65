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
from collections.abc import Iterator

import torch

from sparrow_core.decoding.ar import DecodeStep
from sparrow_core.decoding.draft_tree import DraftTree
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.base import Proposer
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
              metrics: DecodeMetrics | None = None) -> SpeculativeSteps:
        return SpeculativeSteps(self.proposer, stream, logits, max_new_tokens, stop_ids, sampling, generator, metrics)

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
    """One speculative decode as a `ragged.Step`: prepare is the tree's forward (drafted by the previous
    finish, or at the start), finish verifies it, keeps the accepted path and drafts the next tree."""

    def __init__(self, proposer: Proposer, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int,
                 stop_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None,
                 metrics: DecodeMetrics | None) -> None:
        self.proposer, self.stream, self.max_new_tokens = proposer, stream, max_new_tokens
        self.stops = set(stop_ids)
        self.sampling, self.generator, self.metrics = sampling, generator, metrics
        self.emitted = 0
        self.done = max_new_tokens < 1
        self._t0 = 0.0
        if not self.done:
            self.tree, self.draft_s = self._draft(sample(logits, sampling, generator))

    def _draft(self, root: int) -> tuple[DraftTree, float]:
        t0 = time.perf_counter()
        tree = self.proposer.propose(self.stream, root, self.max_new_tokens - self.emitted - 1)
        return tree, time.perf_counter() - t0

    def prepare(self) -> StreamForward:
        self._t0 = time.perf_counter()
        tree = self.tree
        return self.stream.tree_forward(tree.tokens.tolist(), tree.depths.tolist(), tree.mask)

    def finish(self, forward: StreamForward) -> DecodeStep:
        stream, tree = self.stream, self.tree
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
        self.proposer.observe(ranks)
        if self.metrics is not None:
            self.metrics.record(tree.size, len(result.accepted) - 1, keep, self.draft_s, verify_s, ranks)
        if self.done:
            return DecodeStep(tokens=tokens, done=True, draft_tail=[])
        self.tree, self.draft_s = self._draft(result.bonus)
        return DecodeStep(tokens=tokens, done=False, draft_tail=self.tree.tokens[self.tree.best_path()].tolist())
