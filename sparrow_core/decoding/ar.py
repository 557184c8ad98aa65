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
from sparrow_core.engine.ragged import StreamForward, run_steps
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

    def start(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
              sampling: SamplingConfig, generator: torch.Generator | None = None,
              metrics: DecodeMetrics | None = None, draft_ahead: bool = True) -> ARSteps:
        """`Decoder.start` (no drafts: `draft_ahead` changes nothing)."""
        return ARSteps(stream, logits, max_new_tokens, stop_ids, sampling, generator, metrics)

    def decode(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
               sampling: SamplingConfig, generator: torch.Generator | None = None,
               metrics: DecodeMetrics | None = None) -> Iterator[DecodeStep]:
        """Decode from `logits` [V] (the stream's next-token logits); one yield per target forward.

        Each emitted token is appended to the stream, a stop token included, so the stream always holds
        exactly the decoded text. `metrics`, when given, records each forward (a step of one token).
        """
        return run_steps(self.start(stream, logits, max_new_tokens, stop_ids, sampling, generator, metrics))


class ARSteps:
    """One AR decode as a `ragged.Step`: the next token is sampled as soon as the logits before it are known
    (at the start, then by each finish: `next_token`); prepare appends it, finish keeps the logits after it."""

    def __init__(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
                 sampling: SamplingConfig, generator: torch.Generator | None, metrics: DecodeMetrics | None) -> None:
        self.stream, self.left, self.stop_ids = stream, max_new_tokens, stop_ids
        self.sampling, self.generator, self.metrics = sampling, generator, metrics
        self.done = max_new_tokens < 1
        self._t0 = 0.0
        # the next token, decided by the target and emitted by the next step
        self.next_token = -1 if self.done else sample(logits, sampling, generator)

    def draft_tail(self) -> list[int]:
        return [] if self.done else [self.next_token]  # no continuation drafted below it

    def prepare(self) -> StreamForward:
        self._t0 = time.perf_counter()
        return self.stream.text_forward([self.next_token])

    def finish(self, forward: StreamForward) -> DecodeStep:
        token = self.next_token
        self.left -= 1
        if self.metrics is not None:
            self.metrics.record(1, 0, 1, 0.0, time.perf_counter() - self._t0)
        self.done = token in self.stop_ids or self.left == 0
        self.next_token = -1 if self.done else sample(forward.logits[-1], self.sampling, self.generator)
        return DecodeStep(tokens=[token], done=self.done, draft_tail=[])
