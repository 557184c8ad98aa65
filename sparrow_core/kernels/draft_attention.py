"""Single-pass Triton tree attention for short prefixes (`dispatch` picks it when the prefix fits one split).

A prefix of a few hundred keys, contiguous or gathered from a larger buffer by an index tensor, then the
tree nodes under the tree mask (convention: reference.py). That is too little work to split, so one
program owns a block of query rows of one (batch, kv head) and walks all keys. (The gathered-prefix path,
`kv_index`, serves the drafter: `dispatch.rows_attention` gives each node of a tree level the committed
KV and its own ancestors as its gathered prefix.)

    grid = (cdiv(G * Q, BLOCK_M), B * Hkv)

GQA: the G = Hq / Hkv query heads that share a kv head are stacked with the Q tree nodes into
M = G * Q rows (row r is query head hkv * G + r // Q, tree node r % Q), so each key block is loaded once
for all of them and the scores are one [BLOCK_M, BLOCK_N] tensor-core product.

Online softmax in base 2 (FlashAttention): with s = q.k * sm_scale * log2(e), running max m, sum l and
accumulator acc, each key block updates
    m' = max(m, max_j s_j);  l' = l * 2^(m - m') + sum_j 2^(s_j - m');  acc' = acc * 2^(m - m') + sum_j 2^(s_j - m') v_j
and out = acc / l at the end. Masked keys get s = -1e30 (finite, so a fully masked block gives m' - m = 0
instead of inf - inf) and their probabilities are zeroed explicitly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparrow_core.kernels.reference import check_tree_args
from sparrow_core.kernels.runtime import (
    autotune_enabled,
    batched_kv_index,
    batched_tree_mask_u8,
    dot_flags,
    interpreted,
    make_kernel,
    next_pow2,
)


def _draft_attention_kernel(
    Q, K, V, IDX, TM, OUT,  # pointers
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_in,
    stride_tb, stride_ti, stride_tj,
    stride_ob, stride_oh, stride_oq, stride_od,
    n_prefix, prefix_len, qk_scale,
    H_KV, GROUP, Q_LEN, M_ROWS, M_BUCKET,  # M_BUCKET: autotune key only
    HEAD_DIM: tl.constexpr,
    GATHER: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = (pid_bh % H_KV).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] stacked (query head, tree node)
    row_ok = rows < M_ROWS
    hq = hkv * GROUP + rows // Q_LEN
    qi = rows % Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + b * stride_qb + hq[:, None] * stride_qh + qi[:, None] * stride_qq + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    # prefix: every key visible to every row (unless it is a hole in the index)
    for start in range(0, n_prefix, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_prefix
        if GATHER:
            slot = tl.load(IDX + b * stride_ib + offs_n * stride_in, mask=n_ok, other=-1)
            n_ok = n_ok & (slot >= 0)
            slot = tl.where(n_ok, slot, 0).to(tl.int64)
        else:
            slot = offs_n.to(tl.int64)
        kt = tl.load(
            k_base + slot[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        vb = tl.load(
            v_base + slot[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if DOT_F32:
            kt = kt.to(tl.float32)
            vb = vb.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        s = tl.where(n_ok[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(n_ok[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new

    # tree: slots [prefix_len, prefix_len + Q), row (hq, i) sees node j iff tree_mask[b, i, j]
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < Q_LEN
    tslot = prefix_len + offs_t.to(tl.int64)
    kt = tl.load(
        k_base + tslot[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=t_ok[None, :] & d_ok[:, None], other=0.0,
    )  # [BLOCK_D, BLOCK_T]
    vb = tl.load(
        v_base + tslot[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=t_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_T, BLOCK_D]
    allowed = tl.load(
        TM + b * stride_tb + qi[:, None] * stride_ti + offs_t[None, :] * stride_tj,
        mask=row_ok[:, None] & t_ok[None, :], other=0,
    ) != 0  # [BLOCK_M, BLOCK_T]
    if DOT_F32:
        kt = kt.to(tl.float32)
        vb = vb.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    s = tl.where(allowed, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
    alpha = tl.exp2(m_i - m_new)
    p = tl.where(allowed, tl.exp2(s - m_new[:, None]), 0.0)
    l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # a row that saw nothing stays 0
    tl.store(
        OUT + b * stride_ob + hq[:, None] * stride_oh + qi[:, None] * stride_oq + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (16, 32, 64, 128)
    for bn in (32, 64)
    for w in (4,)
    for s in (2, 3)
]
_GPU_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
_KERNEL = make_kernel(_draft_attention_kernel, _CONFIGS, key=["M_BUCKET", "HEAD_DIM", "GATHER"])


def draft_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    kv_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree attention in one pass over the prefix (convention: reference.py). Returns [B, Hq, Q, D].

    q [B, Hq, Q, D]; k, v [B, Hkv, S, D]; tree_mask [Q, Q] / [B, Q, Q] bool; kv_index None or int [L] / [B, L]
    (entries < 0 skipped). CUDA tensors run compiled (autotuned unless SPARROW_TRITON_AUTOTUNE=0), CPU
    tensors through the Triton interpreter.
    """
    check_tree_args(q, k, v, prefix_len)
    batch, hq, q_len, d = q.shape
    h_kv = k.shape[1]
    group = hq // h_kv
    m_rows = group * q_len
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    mask, stb, sti, stj = batched_tree_mask_u8(tree_mask, batch, q_len, q.device)
    idx, sib, sin, n_index = batched_kv_index(kv_index, batch, q.device, dummy=mask)
    n_prefix = n_index if kv_index is not None else prefix_len
    on_interp = interpreted(q)
    args = (
        q, k, v, idx, mask, out,
        *q.stride(), *k.stride(), *v.stride(), sib, sin, stb, sti, stj, *out.stride(),
        n_prefix, prefix_len, sm_scale * math.log2(math.e),
        h_kv, group, q_len, m_rows, next_pow2(m_rows),
    )
    consts = {
        "GATHER": kv_index is not None,
        "HEAD_DIM": d,
        "BLOCK_D": next_pow2(d),
        "BLOCK_T": next_pow2(q_len),
        **dot_flags(q.dtype, on_interp),
    }
    if on_interp:
        # few, large programs: the interpreter pays per program x iteration
        block_m = min(128, next_pow2(m_rows))
        grid = (triton.cdiv(m_rows, block_m), batch * h_kv)
        _KERNEL.interpreted[grid](*args, **consts, BLOCK_M=block_m, BLOCK_N=128)
    elif autotune_enabled(q):
        grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]), batch * h_kv)  # noqa: E731
        _KERNEL.autotuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(m_rows, _GPU_DEFAULT["BLOCK_M"]), batch * h_kv)
        _KERNEL.compiled[grid](*args, **consts, **_GPU_DEFAULT)
    return out
