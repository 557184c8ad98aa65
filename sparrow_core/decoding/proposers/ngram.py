"""Prompt-lookup drafting (`ngram`), training-free: find the latest earlier occurrence of the last n
text tokens of the stream (root included) and propose what followed it, as a chain."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparrow_core.decoding.draft_tree import DraftTree, build_tree, root_only
from sparrow_core.decoding.proposers.base import DraftRequest
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.stream import StreamNeeds, TargetStream


class NgramProposer:
    name = "ngram"
    needs = StreamNeeds()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 6) -> None:
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self.max_tree_tokens = num_tokens + 1  # nodes of one proposed chain, root included

    def prefill(self, stream: TargetStream) -> None:
        return None

    def observe(self, ranks: Sequence[tuple[int, int]], context: int) -> None:
        return None  # a lookup has no tree size to learn

    def propose_many(self, requests: Sequence[DraftRequest]) -> list[DraftTree]:
        return [self.propose(*request) for request in requests]  # a lookup per stream: nothing to batch

    def propose(self, stream: TargetStream, root_token: int, max_depth: int) -> DraftTree:
        k = min(self.num_tokens, max_depth)
        if k <= 0:
            return root_only(root_token)
        text = stream.token_ids()[stream.kinds() == int(TokenKind.TEXT)]
        seq = torch.cat([text, torch.tensor([root_token], device="cpu")])  # [L], the root is the newest token
        cont = lookup_continuation(seq, self.max_ngram, self.min_ngram, k)
        tokens = torch.cat([torch.tensor([root_token], device="cpu"), cont])
        return build_tree(tokens, torch.arange(tokens.numel(), device="cpu") - 1)  # a chain: parent of i is i - 1


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
