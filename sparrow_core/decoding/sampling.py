"""Next-token distributions: greedy, temperature, nucleus (top-p). One definition used by every decoder,
so that speculative sampling verifies against exactly the distribution autoregressive decoding samples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [..., V] -> the sampling distribution [..., V] (fp32). Greedy gives a one-hot."""
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # softmax((l - max l) / T) = softmax(l / T), computed where it cannot overflow: every scaled logit lies in
    # [-inf, 0] whatever T > 0 (a tiny T sends the others to -inf, never to nan), the best is exactly 0.
    # In float64, where any positive temperature a float32 or a double can carry is nonzero.
    scaled = (logits - logits.amax(-1, keepdim=True)).double() / cfg.temperature
    probs = torch.softmax(scaled, dim=-1).float()
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """One token from logits [V], drawn on their device: `generator` must be on it (a session's is)."""
    if cfg.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, cfg), 1, generator=generator))
