"""Ragged attention: one attention call over the tokens of many streams, each stream over its own KV.

A ragged forward (`engine/ragged.py`) runs the text stack once over the concatenated new tokens of
several streams, [1, N, H] with N = n_1 + ... + n_k. Linear layers, norms and RoPE are per token, so
they need nothing; attention must not mix streams. The forward carries a `RaggedBatch` in the
attention kwargs (`ragged=`), and the registered attention function (dispatch.py) hands the call here:

    for each segment s = query rows [start, stop) of stream s:
        K_s, V_s = cache_s.layers[layer].update(key[:, :, start:stop], value[:, :, start:stop])
        out[:, start:stop] = attention(query[:, :, start:stop], K_s, V_s)   # as that stream's own forward

The forward runs without a transformers cache (the per-stream caches are written here, each its own
keys and values, in place: no stream's KV is copied to build the batch), and each segment's attention
is the call the stream's single forward would have made: the same mask for a causal chunk (`causal_mask`:
None where transformers' sdpa mask builder skips it), the tree kwargs for a draft tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class KVLayer(Protocol):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [1, Hkv, n, D] new keys/values in place; return the layer's whole keys/values [1, Hkv, S, D]."""
        ...


class KVCache(Protocol):
    layers: Sequence[KVLayer]


@dataclass
class Segment:
    """One stream's query rows [start, stop) of a ragged forward, its cache, and its attention kwargs
    (empty: a causal chunk after the cached slots; tree_mask / tree_prefix_len: a draft tree)."""

    start: int
    stop: int
    cache: KVCache
    attn: dict[str, Any] = field(default_factory=dict)


@dataclass
class RaggedBatch:
    segments: list[Segment]

    @property
    def tokens(self) -> int:
        return self.segments[-1].stop if self.segments else 0


def causal_mask(past: int, n: int, device: torch.device) -> torch.Tensor | None:
    """The mask a stream's own forward of n causal slots after `past` cached ones gets from transformers'
    sdpa mask builder: None when it skips it (n == 1: no mask; past == 0: sdpa's is_causal), else bool
    [1, 1, n, past + n], row i sees slots <= past + i."""
    if n == 1 or past == 0:
        return None
    rows = torch.arange(n, device=device)[:, None] + past
    return (torch.arange(past + n, device=device)[None, :] <= rows)[None, None]


def ragged_attention(
    attend: Callable[..., tuple[torch.Tensor, None]],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch: RaggedBatch,
    scaling: float | None,
    dropout: float,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] (the new tokens only) -> ([1, N, Hq, D], None); each
    segment through `attend` (the registered attention function) over its stream's keys and values."""
    if query.shape[0] != 1 or query.shape[2] != batch.tokens:
        raise ValueError(f"a ragged batch of {batch.tokens} tokens got a query of shape {tuple(query.shape)}")
    layer = module.layer_idx
    outs = []
    for seg in batch.segments:
        rows = slice(seg.start, seg.stop)
        kv = seg.cache.layers[layer]
        keys, values = kv.update(key[:, :, rows], value[:, :, rows])
        q = query[:, :, rows]
        n = seg.stop - seg.start
        mask = None if seg.attn else causal_mask(keys.shape[2] - n, n, q.device)
        out, _ = attend(module, q, keys, values, mask, scaling=scaling, dropout=dropout, **seg.attn, **kwargs)
        outs.append(out)  # [1, n, Hq, D]
    return torch.cat(outs, dim=1), None
