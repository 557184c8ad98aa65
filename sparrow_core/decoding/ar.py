"""Autoregressive decoding from a stream: the target alone, one token per forward.

The baseline every speed-up is measured against, and the path used when no drafter is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.sampling import SamplingConfig, sample
from sparrow_core.engine.stream import StreamNeeds, TargetStream


@dataclass
class DecodeStep:
    """What one target forward added: verified tokens (1 for AR), and whether decoding has ended."""

    tokens: list[int]
    done: bool
    draft_tail: list[int]  # unverified continuation shown to clients; empty for AR


class ARDecoder:
    """The target alone as a `Decoder` (see decoders.py): one token per forward."""

    name = "ar"
    needs = StreamNeeds()
    max_tree_tokens = 1  # one token per forward

    def prefill(self, stream: TargetStream) -> None:
        return None

    def decode(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
               sampling: SamplingConfig, generator: torch.Generator | None = None,
               metrics: DecodeMetrics | None = None) -> Iterator[DecodeStep]:
        """Decode from `logits` [V] (the stream's next-token logits); one yield per target forward.

        Each emitted token is appended to the stream, a stop token included, so the stream always holds
        exactly the decoded text. `metrics`, when given, records each forward (a step of one token).
        """
        for i in range(max_new_tokens):
            tok = sample(logits, sampling, generator)
            last = tok in stop_ids or i == max_new_tokens - 1
            t0 = time.perf_counter()
            logits = stream.append_text([tok])
            if metrics is not None:
                metrics.record(1, 0, 1, 0.0, time.perf_counter() - t0)
            yield DecodeStep(tokens=[tok], done=last, draft_tail=[])
            if last:
                return
