"""Preallocated, in-place KV cache for one stream, usable as a transformers `Cache`.

transformers' `DynamicCache` concatenates on every forward, i.e. copies the whole KV each step: at 25k
tokens that copy costs more than the attention itself (measured on CPU). Here each layer
owns a buffer `[B, H_kv, capacity, D]` that grows by doubling; a forward writes its new keys/values in
place at slots `[length, length + n)` and attention reads the view `[:, :, :length + n]`.

Slots are storage order, not positions: RoPE is applied before keys reach the cache, so a key keeps its
position whatever slot it sits in. That is what makes the two stream edits cheap and exact:
- `crop(-n)`: forget the last n slots (rejected draft tokens, rollback).
- `keep(slot_index)`: compact the cache to the given slots, in order (evicting old frames, keeping the
  accepted path of a verified draft tree). Surviving keys keep their original positions.

KV dtype. By default the buffers take the dtype of the first keys written (the model's). A cache built
with `dtype=` (e.g. bf16 under an fp32 model) stores its keys and values rounded to that dtype: half the
bytes every attention pass reads. The attention function then runs in that dtype (the query is rounded to
it too, softmax accumulates in fp32) and hands its output back in the query's dtype.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_MIN_CAPACITY = 256


def common_prefix(slot_index: torch.Tensor) -> int:
    """How many leading entries of a sorted unique index equal their own position (0, 1, 2, ...)."""
    m = slot_index.numel()
    if m == 0:
        return 0
    same = slot_index == torch.arange(m, device=slot_index.device)
    return m if bool(same.all()) else int((~same).nonzero()[0])


class StreamKVLayer(CacheLayerMixin):
    """One attention layer's keys and values, `[B, H_kv, capacity, D]`, first `length` slots valid."""

    is_croppable = True
    is_sliding = False

    def __init__(self, initial_capacity: int = _MIN_CAPACITY, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.initial_capacity = max(int(initial_capacity), 1)
        self.kv_dtype = dtype  # None: the dtype of the first keys written
        self.length = 0
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        cap = self.initial_capacity
        self.device = key_states.device
        dtype = self.kv_dtype or key_states.dtype
        self._k_buf = key_states.new_empty((b, h, cap, d), dtype=dtype)
        self._v_buf = value_states.new_empty((b, value_states.shape[1], cap, value_states.shape[-1]), dtype=dtype)
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._k_buf[:, :, : self.length]
        self.values = self._v_buf[:, :, : self.length]

    def _ensure_capacity(self, needed: int) -> None:
        cap = self._k_buf.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        k_new = self._k_buf.new_empty((*self._k_buf.shape[:2], new_cap, self._k_buf.shape[3]))
        v_new = self._v_buf.new_empty((*self._v_buf.shape[:2], new_cap, self._v_buf.shape[3]))
        k_new[:, :, : self.length] = self._k_buf[:, :, : self.length]
        v_new[:, :, : self.length] = self._v_buf[:, :, : self.length]
        self._k_buf, self._v_buf = k_new, v_new

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, H_kv, n, D] for the n new tokens of this forward (rounded to the
        # cache's dtype as they are written)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._ensure_capacity(self.length + n)
        self._k_buf[:, :, self.length : self.length + n] = key_states
        self._v_buf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._refresh_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` slots (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of slots to drop")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.length:
            raise ValueError(f"cannot drop {n} slots from a cache of {self.length}")
        self.length -= n
        self._refresh_views()

    def keep(self, slot_index: torch.Tensor, prefix: int | None = None) -> None:
        """Compact to `slot_index` (sorted, unique, int64 [m], on any device): slot i becomes slot_index[i]'s
        content. `prefix`: `common_prefix(slot_index)` where the caller knows it already."""
        if not self.is_initialized:
            return
        m = int(slot_index.numel())
        p = common_prefix(slot_index) if prefix is None else prefix  # slots [0, p) stay: copy only the rest
        tail = slot_index[p:].to(self._k_buf.device)  # index_select wants its index beside the buffer
        # index_select copies out first, so overlapping source and destination ranges are safe.
        self._k_buf[:, :, p:m] = self._k_buf.index_select(2, tail)
        self._v_buf[:, :, p:m] = self._v_buf.index_select(2, tail)
        self.length = m
        self._refresh_views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh_views()

    def nbytes(self) -> int:
        """Bytes of the valid part (what the stream really holds), not the capacity."""
        if not self.is_initialized:
            return 0
        per_slot = self._k_buf[:, :, :1].numel() * self._k_buf.element_size()
        per_slot += self._v_buf[:, :, :1].numel() * self._v_buf.element_size()
        return per_slot * self.length


class StreamKVCache(Cache):
    """One `StreamKVLayer` per decoder layer; see the module docstring."""

    def __init__(self, num_layers: int, initial_capacity: int = _MIN_CAPACITY, dtype: torch.dtype | None = None) -> None:
        super().__init__(layers=[StreamKVLayer(initial_capacity, dtype) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def keep(self, slot_index: torch.Tensor, prefix: int | None = None) -> None:
        p = common_prefix(slot_index) if prefix is None else prefix
        for layer in self.layers:
            layer.keep(slot_index, p)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
