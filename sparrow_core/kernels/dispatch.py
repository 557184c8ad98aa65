"""Tree attention entry points: pick a kernel, and plug it into transformers.

Semantics (full convention in reference.py):
    q [B, Hq, Q, D], k/v [B, Hkv, S, D] with Hq % Hkv == 0; the Q tree nodes' keys/values sit in slots
    [prefix_len, prefix_len + Q) of k/v; the prefix is slots [0, prefix_len), or the slots listed in
    kv_index ([L] or [B, L] int, entries < 0 skipped: evicted positions / padding); every tree query
    sees the whole prefix plus the tree nodes its tree_mask row allows (tree_mask [Q, Q] or [B, Q, Q]
    bool, node i sees its ancestors and itself).

Direct use (tests, benchmarks; the engine goes through the transformers attention function below):
    out = tree_attention(q, k, v, prefix_len, tree_mask, sm_scale, kv_index=None)   # [B, Hq, Q, D]

Backend: `backend=` argument, else the SPARROW_ATTN_BACKEND environment variable, else "auto":
    "auto"           Triton when the tensors are on CUDA and Triton has a GPU driver, else "torch"
    "torch"          SDPA, GQA query heads folded per kv head (reference.tree_attention_sdpa)
    "triton"         Triton; single pass (draft_attention.py) when the prefix fits one split, else
                     split-K (tree_verify.py). CPU tensors run through the Triton interpreter (slow:
                     tests only)
    "triton_split" / "triton_single"   force one of the two Triton kernels
SPARROW_TRITON_AUTOTUNE=0 skips autotuning on GPU (fixed configs).

Inside a transformers model (Qwen2 and the Qwen2-VL / LLaVA text stacks call the attention function
with **kwargs from the top-level forward):

    name = register_attention("sparrow")     # once per process; returns the name
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=name)   # or model.set_attn_implementation(name)
    vlm.set_attn_implementation({"text_config": name})   # Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision: text
                                                         # stack only, the vision tower stays on sdpa
                                                         # (checked: tree kwargs reach the text attention)

- Ordinary forwards (prefill, anything without `tree_mask`) are exactly transformers' "sdpa" path: the
  same attention function and the same mask builder (registered under `name` too; without it
  transformers would pass attention_mask=None for an unknown implementation). One exception, same
  result: an unmasked one-token decode with GQA folds the query heads per kv head (`grouped_sdpa`).
- Tree verification: write the tree tokens into the cache like any forward (they land in slots
  [P, P + Q) after the P cached tokens) and pass the tree through the model's forward kwargs:

      model(input_ids=tree_ids,                     # [B, Q]; node i's key lands in slot P + i and
                                                    # tree_mask indexes nodes in this order
            position_ids=P_pos + depth,             # [B, Q] (or (3, B, Q) M-RoPE positions for Qwen-VL)
            cache=cache,
            tree_mask=tree_mask,                    # [Q, Q] or [B, Q, Q] bool on the model's device, required
            tree_prefix_len=P,                      # optional int, default key_len - Q
            tree_kv_index=idx)                      # optional [L] / [B, L] int prefix slots, -1 = hole
                                                    # (the stream does not pass it: its prefix is contiguous)

  The attention mask transformers builds for that forward is ignored (Qwen2: pass
  `attention_mask={"full_attention": None}` to skip building it). Every layer sees the same kwargs, so
  build tree_mask / tree_kv_index once per step. Afterwards keep only the accepted path in the cache
  (kv_cache.py `keep`) or crop the rejected tail.
- Verification forwards carry no pixels, so the tree kwargs only meet text attention; keep vision towers
  on sdpa anyway (a tree_mask whose size differs from the call's query length raises).
- A KV cache in another dtype than the model (a bf16 KV under fp32 weights, kv_cache.py): the query is
  rounded to the KV's dtype and the output comes back in the query's.

The stream's own forward (engine/text_stack.py) skips transformers' per-layer plumbing and calls
`stream_attention` with a `Visibility` built once per forward:

    vis = Visibility.build(prefix_len, q_len, tree_mask, groups, device)   # tree_mask None: causal
    out = stream_attention(q, keys, values, vis, scale)                     # [B, Q, Hq * D], q's dtype

`q` [B, Hq, Q, D] are the forward's Q queries, `keys`/`values` [B, Hkv, prefix_len + Q, D] a view of one
stream's KV (its first prefix_len slots, then the Q new ones). A one-token decode needs no mask; a
prefill or a draft tree sees the whole prefix and its own tree_mask row (causal: the chain). Several
streams in one batched forward each bring their own view and Visibility (ragged prefixes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparrow_core.kernels.draft_attention import draft_attention
from sparrow_core.kernels.ragged import ragged_attention
from sparrow_core.kernels.reference import grouped_sdpa, tree_attention_sdpa
from sparrow_core.kernels.runtime import gpu_sm_count, has_triton_driver, interpreted
from sparrow_core.kernels.tree_verify import choose_split_size, tree_verify_attention

BACKEND_ENV = "SPARROW_ATTN_BACKEND"
BACKENDS = ("auto", "torch", "triton", "triton_split", "triton_single")


def resolve_backend(t: torch.Tensor, backend: str | None = None) -> str:
    """The backend that will run for tensor `t`: "torch", "triton", "triton_split" or "triton_single"."""
    name = backend or os.environ.get(BACKEND_ENV, "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        return "triton" if t.is_cuda and has_triton_driver() else "torch"
    return name


def _single_pass_is_enough(q: torch.Tensor, k: torch.Tensor, n_prefix: int) -> bool:
    # On GPU a prefix that would get one split anyway needs no reduce launch; the interpreter always
    # prefers the one-launch kernel.
    if interpreted(q):
        return True
    batch, hq, q_len, _ = q.shape
    h_kv = k.shape[1]
    split = choose_split_size(n_prefix, batch, h_kv, (hq // h_kv) * q_len, gpu_sm_count(q))
    return triton.cdiv(n_prefix, split) <= 1


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    kv_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of Q tree queries over prefix + tree (module docstring). Returns [B, Hq, Q, D], q's dtype."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    prefix_len = int(prefix_len)
    name = resolve_backend(q, backend)
    if name == "torch":
        return tree_attention_sdpa(q, k, v, prefix_len, tree_mask, sm_scale, kv_index)
    n_prefix = prefix_len if kv_index is None else kv_index.shape[-1]
    if name == "triton_single" or (name == "triton" and _single_pass_is_enough(q, k, n_prefix)):
        return draft_attention(q, k, v, prefix_len, tree_mask, sm_scale, kv_index)
    return tree_verify_attention(q, k, v, prefix_len, tree_mask, sm_scale, kv_index)


def visible_slots(allowed: torch.Tensor) -> torch.Tensor:
    """allowed [Q, S] bool (query i may read key slot j) -> [Q, L] int64: each row's visible slots in slot
    order, padded with -1 (L = the most any row sees). The per-row index `rows_attention` reads."""
    counts = allowed.sum(1)  # [Q]
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = torch.argsort((~allowed).to(torch.uint8), dim=1, stable=True)[:, :width]  # visible slots first, in order
    pad = torch.arange(width, device=allowed.device) >= counts[:, None]
    return order.masked_fill(pad, -1)


def rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows_kv_index: torch.Tensor,
    sm_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Query i of q [1, Hq, Q, D] attends to the key slots rows_kv_index[i] ([Q, L], -1 skipped) of k/v
    [1, Hkv, S, D] -> [1, Hq, Q, D]. For masks that are no prefix + tree, e.g. a drafter's tree level, where
    each new node sees the committed KV and its own ancestors among the nodes of earlier levels.

    Through `tree_attention`'s gathered prefix with the queries as the batch: row i is batch i with one
    query, k/v broadcast over the batch (stride 0, no copy), its prefix the slots it sees, and its one tree
    slot masked off (every slot it reads is in its index)."""
    if q.shape[0] != 1:
        raise ValueError(f"rows_attention takes one sequence (batch 1), got a batch of {q.shape[0]}")
    n = q.shape[2]
    rows = q.transpose(0, 2)  # [Q, Hq, 1, D]
    keys, values = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
    nothing = torch.zeros((n, 1, 1), dtype=torch.bool, device=q.device)
    out = tree_attention(rows, keys, values, k.shape[2] - 1, nothing, sm_scale, kv_index=rows_kv_index, backend=backend)
    return out.transpose(0, 2)  # [1, Hq, Q, D]


# Above this many folded query rows (query heads x queries) a prefill repeats the kv heads instead of
# folding the queries, as transformers' sdpa does: the folded mask grows with G x Q x keys.
FOLD_ROWS_LIMIT = 512


@dataclass(frozen=True)
class Visibility:
    """Which KV slots the Q queries of one stream forward see: built once per forward, read by every layer.

    `mask` None: every query sees every slot (a one-token decode). Else additive [1, 1, rows, prefix + Q]
    in the attention's dtype, 0 where a query sees a slot and -inf where not (what SDPA would make of a
    bool mask in every call): rows = G * Q when `folded` (the G query heads of a kv head stacked as G * Q
    rows, `grouped_sdpa`), rows = Q otherwise (kv heads repeated per query head, for long prefills)."""

    mask: torch.Tensor | None
    folded: bool = True
    # a draft tree on a Triton backend: its prefix length and [Q, Q] bool mask, read by the tree kernels
    # (kernels/tree_verify.py, draft_attention.py) in place of `mask`
    tree: tuple[int, torch.Tensor] | None = None

    @classmethod
    def build(cls, prefix_len: int, q_len: int, tree_mask: torch.Tensor | None, groups: int,
              device: torch.device | str, dtype: torch.dtype) -> Visibility:
        """Q new queries after `prefix_len` slots; tree_mask [Q, Q] bool (node i sees node j), or None for
        an ordinary causal forward; groups = query heads per kv head; dtype = the KV's (attention runs in it)."""
        if tree_mask is None:
            if q_len == 1:
                return cls(None)
            tree_mask = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril_()
        elif resolve_backend(torch.empty(0, device=device)) != "torch":
            return cls(None, tree=(prefix_len, tree_mask.to(device, torch.bool)))
        folded = groups * q_len <= FOLD_ROWS_LIMIT
        tiles = groups if folded else 1
        # every query sees the whole prefix: only the Q new columns can be masked, so fill those of each of
        # the `tiles` copies of the Q rows (building the whole [rows, prefix + Q] mask by repeating a bool one
        # cost more than the attention itself at 25k slots)
        additive = torch.zeros((tiles, q_len, prefix_len + q_len), dtype=dtype, device=device)
        additive[:, :, prefix_len:].masked_fill_(~tree_mask.to(device, torch.bool), float("-inf"))
        return cls(additive.view(1, 1, tiles * q_len, prefix_len + q_len), folded)  # [1, 1, rows, prefix + Q]


def stream_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visibility: Visibility,
                     scale: float) -> torch.Tensor:
    """q [B, Hq, Q, D] over keys/values [B, Hkv, S, D] as `visibility` says -> [B, Q, Hq * D] in q's dtype
    (the layout o_proj takes). Runs in the KV's dtype (a bf16 KV rounds the query to bf16)."""
    batch, hq, q_len, d = q.shape
    h_kv = keys.shape[1]
    groups = hq // h_kv
    qk = q.to(keys.dtype)
    if visibility.tree is not None:  # a draft tree on a Triton backend: the tree kernels
        prefix_len, tree_mask = visibility.tree
        out = tree_attention(qk, keys, values, prefix_len, tree_mask, scale)  # [B, Hq, Q, D]
        return out.transpose(1, 2).reshape(batch, q_len, hq * d).to(q.dtype)
    if visibility.folded:
        rows = qk.reshape(batch, h_kv, groups * q_len, d)
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=visibility.mask, scale=scale)
        out = out.view(batch, hq, q_len, d)
    else:
        keys = keys[:, :, None].expand(batch, h_kv, groups, *keys.shape[2:]).reshape(batch, hq, -1, d)
        values = values[:, :, None].expand(batch, h_kv, groups, *values.shape[2:]).reshape(batch, hq, -1, d)
        out = F.scaled_dot_product_attention(qk, keys, values, attn_mask=visibility.mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, q_len, hq * d).to(q.dtype)


def sparrow_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, Q, D], key/value [B, Hkv, K, D] (after the cache
    update) -> ([B, Q, Hq, D], None). Tree mode when kwargs carry `tree_mask`, else transformers' sdpa;
    a `ragged` batch (kernels/ragged.py: many streams' tokens, no cache) runs each stream's segment here."""
    ragged = kwargs.pop("ragged", None)
    if ragged is not None:
        return ragged_attention(sparrow_attention_forward, module, query, key, value, ragged, scaling, dropout, **kwargs)
    if key.dtype != query.dtype:  # a KV kept in another dtype (kv_cache.py): attend in the KV's dtype
        out, weights = sparrow_attention_forward(
            module, query.to(key.dtype), key, value, attention_mask, scaling, dropout, **kwargs
        )
        return out.to(query.dtype), weights
    tree_mask = kwargs.pop("tree_mask", None)
    tree_prefix_len = kwargs.pop("tree_prefix_len", None)
    tree_kv_index = kwargs.pop("tree_kv_index", None)
    rows_kv_index = kwargs.pop("rows_kv_index", None)
    if rows_kv_index is not None:  # per-query visible slots (a drafter's tree level): rows_attention
        if dropout:
            raise ValueError("rows attention does not implement dropout (drafting runs in eval mode)")
        return rows_attention(query, key, value, rows_kv_index, scaling).transpose(1, 2).contiguous(), None
    if tree_mask is None:
        if query.shape[2] == 1 and attention_mask is None and not dropout and query.shape[1] != key.shape[1]:
            # one-token decode with GQA: the query heads folded per kv head, KV read once, never expanded
            # (transformers' sdpa takes enable_gqa here, which expands it on CPU). Same result.
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            return grouped_sdpa(query, key, value, None, scale).transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    q_len = query.shape[2]
    if tree_mask.shape[-1] != q_len:
        raise ValueError(f"tree_mask is for {tree_mask.shape[-1]} nodes but this attention call has {q_len} queries")
    if dropout:
        raise ValueError("tree attention does not implement dropout (verification runs in eval mode)")
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise NotImplementedError("tree attention over a sliding-window layer is not implemented")
    prefix_len = key.shape[2] - q_len if tree_prefix_len is None else int(tree_prefix_len)
    out = tree_attention(query, key, value, prefix_len, tree_mask, scaling, kv_index=tree_kv_index)  # [B, Hq, Q, D]
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str = "sparrow") -> str:
    """Register `sparrow_attention_forward` (and sdpa's mask builder) with transformers under `name`."""
    AttentionInterface.register(name, sparrow_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
