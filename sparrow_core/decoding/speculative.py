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
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.base import Proposer
from sparrow_core.decoding.sampling import SamplingConfig, sample
from sparrow_core.decoding.tree_policy import rank_observations
from sparrow_core.decoding.verify import verify_tree
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

    def decode(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
               sampling: SamplingConfig, generator: torch.Generator | None = None,
               metrics: DecodeMetrics | None = None) -> Iterator[DecodeStep]:
        """Decode from `logits` [V] (the stream's next-token logits); one yield per target forward,
        recorded in `metrics` when given.

        `draft_tail` of a step is the next root (sampled, not yet emitted) and the drafter's best
        continuation below it: unverified text for display.
        """
        if max_new_tokens < 1:
            return
        stops = set(stop_ids)
        emitted = 0
        root = sample(logits, sampling, generator)
        t0 = time.perf_counter()
        tree = self.proposer.propose(stream, root, max_new_tokens - 1)
        draft_s = time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            tree_logits = stream.append_tree(tree.tokens.tolist(), tree.depths.tolist(), tree.mask)  # [Q, V]
            result = verify_tree(tree, tree_logits, sampling, generator)
            stream.accept_tree(tree.size, result.accepted)
            tokens = tree.tokens[result.accepted].tolist()
            keep = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
            keep = min(keep, max_new_tokens - emitted)
            if keep < len(tokens):
                stream.rollback(len(tokens) - keep)  # tokens after a stop never happened
            tokens = tokens[:keep]
            emitted += keep
            done = tokens[-1] in stops or emitted >= max_new_tokens
            verify_s = time.perf_counter() - t0
            ranks = rank_observations(tree, result.accepted)
            self.proposer.observe(ranks)
            if metrics is not None:
                metrics.record(tree.size, len(result.accepted) - 1, keep, draft_s, verify_s, ranks)
            if done:
                yield DecodeStep(tokens=tokens, done=True, draft_tail=[])
                return
            root = result.bonus
            t0 = time.perf_counter()
            tree = self.proposer.propose(stream, root, max_new_tokens - emitted - 1)
            draft_s = time.perf_counter() - t0
            yield DecodeStep(tokens=tokens, done=False, draft_tail=tree.tokens[tree.best_path()].tolist())
