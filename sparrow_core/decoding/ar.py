"""Autoregressive decoding from a stream: the target alone, one token per forward.

The baseline every speed-up is measured against, and the path used when no drafter is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparrow_core.decoding.sampling import SamplingConfig, sample
from sparrow_core.engine.stream import TargetStream


@dataclass
class DecodeStep:
    """What one target forward added: verified tokens (1 for AR), and whether decoding has ended."""

    tokens: list[int]
    done: bool
    draft_tail: list[int]  # unverified continuation shown to clients; empty for AR


def decode_ar(
    stream: TargetStream,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Iterator[DecodeStep]:
    """Decode from `logits` [V] (the stream's next-token logits); one yield per target forward.

    Each emitted token is appended to the stream, a stop token included, so the stream always holds
    exactly the decoded text.
    """
    for i in range(max_new_tokens):
        tok = sample(logits, sampling, generator)
        last = tok in stop_ids or i == max_new_tokens - 1
        logits = stream.append_text([tok])
        yield DecodeStep(tokens=[tok], done=last, draft_tail=[])
        if last:
            return
