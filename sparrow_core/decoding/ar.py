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
              metrics: DecodeMetrics | None = None) -> ARSteps:
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
    """One AR decode as a `ragged.Step`: prepare samples the next token and appends it; finish keeps
    the logits after it."""

    def __init__(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
                 sampling: SamplingConfig, generator: torch.Generator | None, metrics: DecodeMetrics | None) -> None:
        self.stream, self.logits, self.left, self.stop_ids = stream, logits, max_new_tokens, stop_ids
        self.sampling, self.generator, self.metrics = sampling, generator, metrics
        self.done = max_new_tokens < 1
        self._token, self._t0 = -1, 0.0

    def prepare(self) -> StreamForward:
        self._token = sample(self.logits, self.sampling, self.generator)
        self._t0 = time.perf_counter()
        return self.stream.text_forward([self._token])

    def finish(self, forward: StreamForward) -> DecodeStep:
        self.logits = forward.logits[-1]
        self.left -= 1
        if self.metrics is not None:
            self.metrics.record(1, 0, 1, 0.0, time.perf_counter() - self._t0)
        self.done = self._token in self.stop_ids or self.left == 0
        return DecodeStep(tokens=[self._token], done=self.done, draft_tail=[])
