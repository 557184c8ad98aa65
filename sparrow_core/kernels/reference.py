"""PyTorch references for tree attention: the semantics every kernel in this package must reproduce.

One convention for every kernel of this package (the engine's target verification passes a contiguous
prefix; the drafter's tree levels pass a gathered one, `kv_index` per row, through `dispatch.rows_attention`):

    q      [B, Hq, Q, D]    queries of the Q draft-tree nodes (RoPE already applied)
    k, v   [B, Hkv, S, D]   a KV buffer; Hq % Hkv == 0 and query head h reads kv head h // (Hq // Hkv)
                            (transformers' `repeat_kv` order). S is the buffer capacity: slots that are
                            neither prefix nor tree are never read.
    prefix_len  int         slot of the first tree node. The tree's own keys/values sit in slots
                            [prefix_len, prefix_len + Q), node i in slot prefix_len + i.
    tree_mask   [Q, Q] or [B, Q, Q] bool: tree_mask[..., i, j] is True when node i may see node j
                            (its ancestors and itself). The diagonal should be True.
    kv_index    None, or int [L] / [B, L]: which slots form the prefix.
                  None      -> the prefix is the contiguous slots [0, prefix_len).
                  given     -> the prefix is the slots kv_index[b, :] (order is irrelevant to attention);
                               entries < 0 are holes (evicted positions, or padding so that batch rows
                               can have different prefix lengths) and are skipped. Entries must lie in
                               [0, prefix_len) so that no tree slot is counted twice.
    sm_scale    float       softmax scale, usually D ** -0.5.

Every tree query sees every valid prefix key plus the tree keys its mask row allows:

    out[b, h, i] = softmax_j(q[b, h, i] . key_j * sm_scale) @ value_j,  j over visible keys

returned as [B, Hq, Q, D] in q's dtype. A query that sees no key at all (only possible with a mask row
that is all False and an empty prefix) gets zeros rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _batched_tree_mask(tree_mask: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
    # [Q, Q] or [B, Q, Q] -> [B, Q, Q] bool (a broadcast view, no copy)
    if tree_mask.shape[-2:] != (q_len, q_len):
        raise ValueError(f"tree_mask must be [Q, Q] or [B, Q, Q] with Q={q_len}, got {tuple(tree_mask.shape)}")
    mask = tree_mask.to(torch.bool)
    return mask.expand(batch, q_len, q_len) if mask.dim() == 2 else mask


def _batched_index(kv_index: torch.Tensor, batch: int) -> torch.Tensor:
    # [L] or [B, L] -> [B, L] int64
    idx = kv_index.to(torch.long)
    return idx.expand(batch, idx.shape[-1]) if idx.dim() == 1 else idx


def check_tree_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int) -> None:
    """Shape checks shared by the reference and the kernels."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: q [B, Hq, Q, D], k/v [B, Hkv, S, D]")
    b, hq, q_len, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} / {tuple(v.shape)} does not match q {tuple(q.shape)}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if prefix_len < 0 or prefix_len + q_len > k.shape[2]:
        raise ValueError(f"prefix_len {prefix_len} + Q {q_len} exceeds the KV buffer ({k.shape[2]} slots)")


def gather_prefix_and_tree(
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    tree_mask: torch.Tensor,
    q_len: int,
    kv_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense keys, values and visibility for the convention above.

    Returns keys, values [B, Hkv, L + Q, D] (prefix first, then the Q tree slots; a view of the buffer
    when kv_index is None, a copy otherwise) and allowed [B, Q, L + Q] bool.
    """
    batch, h_kv, _, d = k.shape
    tree = _batched_tree_mask(tree_mask, batch, q_len).to(k.device)
    if kv_index is None:
        keys, values = k[:, :, : prefix_len + q_len], v[:, :, : prefix_len + q_len]
        visible_prefix = torch.ones(batch, q_len, prefix_len, dtype=torch.bool, device=k.device)
    else:
        idx = _batched_index(kv_index, batch).to(k.device)  # [B, L]
        valid = idx >= 0
        gather_at = idx.clamp(min=0)[:, None, :, None].expand(batch, h_kv, idx.shape[1], d)
        tree_slots = slice(prefix_len, prefix_len + q_len)
        hole = ~valid[:, None, :, None]  # zero the stand-in rows: 0-probability x NaN would still be NaN
        keys = torch.cat([k.gather(2, gather_at).masked_fill(hole, 0), k[:, :, tree_slots]], dim=2)
        values = torch.cat([v.gather(2, gather_at).masked_fill(hole, 0), v[:, :, tree_slots]], dim=2)
        visible_prefix = valid[:, None, :].expand(batch, q_len, idx.shape[1])
    return keys, values, torch.cat([visible_prefix, tree], dim=2)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    tree_mask: torch.Tensor,
    sm_scale: float,
    kv_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit-math ground truth in fp32 (see the module docstring for the convention). Slow, exact."""
    check_tree_args(q, k, v, prefix_len)
    batch, hq, q_len, d = q.shape
    h_kv = k.shape[1]
    group = hq // h_kv
    keys, values, allowed = gather_prefix_and_tree(k, v, prefix_len, tree_mask, q_len, kv_index)
    # query head h = kv_head * group + g, so a view [B, Hkv, G*Q, D] shares each kv head's keys
    qf = q.float().reshape(batch, h_kv, group * q_len, d)
    scores = qf @ keys.float().transpose(-1, -2) * sm_scale  # [B, Hkv, G*Q, L+Q]
    allowed = allowed[:, None].repeat(1, 1, group, 1).reshape(batch, 1, group * q_len, -1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)  # -inf rows -> finite
    p = torch.exp(scores - row_max)  # masked entries: exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ values.float()) / denom.clamp(min=torch.finfo(torch.float32).tiny)  # empty rows: 0 / tiny = 0
    return out.reshape(batch, hq, q_len, d).to(q.dtype)


def tree_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    tree_mask: torch.Tensor,
    sm_scale: float,
    kv_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same semantics through `F.scaled_dot_product_attention` (the fast non-Triton path).

    Without kv_index the keys are a view of the buffer (no copy) and the mask is [B|1, Q, P + Q] bool:
    all True over the prefix, the tree mask over the last Q. GQA folds each kv head's G query heads into
    its query rows (see `grouped_sdpa`), so the KV is read once per kv head and never copied. Requires
    every mask row to see at least one key (true whenever the tree mask's diagonal is set).
    """
    check_tree_args(q, k, v, prefix_len)
    q_len = q.shape[2]
    if kv_index is None and tree_mask.dim() == 2:
        # one mask for the whole batch: [1, Q, P + Q]
        keys, values = k[:, :, : prefix_len + q_len], v[:, :, : prefix_len + q_len]
        allowed = prefix_tree_visibility(prefix_len, tree_mask.to(device=q.device, dtype=torch.bool))[None]
    else:
        keys, values, allowed = gather_prefix_and_tree(k, v, prefix_len, tree_mask, q_len, kv_index)
    return grouped_sdpa(q, keys, values, allowed, sm_scale)


def prefix_tree_visibility(prefix_len: int, tree_mask: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """tree_mask [Q, Q] bool -> [groups * Q, prefix_len + Q] bool: every row sees the whole prefix, then its
    tree row; the Q rows tiled `groups` times down (the folded GQA layout of `grouped_sdpa`)."""
    q_len = tree_mask.shape[-1]
    allowed = torch.ones(q_len, prefix_len + q_len, dtype=torch.bool, device=tree_mask.device)
    allowed[:, prefix_len:] = tree_mask
    return allowed.repeat(groups, 1) if groups > 1 else allowed


def grouped_sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None, sm_scale: float
) -> torch.Tensor:
    """SDPA of q [B, Hq, Q, D] over keys/values [B, Hkv, S, D] with allowed [B|1, Q, S] bool (or None),
    query head h reading kv head h // G (G = Hq / Hkv) -> [B, Hq, Q, D].

    The G query heads of a kv head become G * Q query rows of one head: [B, Hkv, G * Q, D], row g * Q + i
    being head g's query i, and the mask is tiled G times down the rows. That is the flash-decoding
    layout: SDPA reads each kv head once for all its query heads. (`enable_gqa=True` measured 1.5-2x
    slower on CPU at 34k keys, as it expands the KV.)
    """
    batch, hq, q_len, d = q.shape
    h_kv = keys.shape[1]
    groups = hq // h_kv
    mask = None if allowed is None else allowed.repeat(1, groups, 1)[:, None]  # [B|1, 1, G * Q, S]
    rows = q.reshape(batch, h_kv, groups * q_len, d)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=sm_scale)
    return out.reshape(batch, hq, q_len, d)
