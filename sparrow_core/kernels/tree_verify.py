"""Split-K (flash-decoding) Triton tree attention for target verification over a long KV cache.

Verification runs Q tree queries (Q <= ~64) against a prefix of up to 100k keys: far too few queries to
fill a GPU with one program per query block, so the prefix is split across programs (convention:
reference.py):

1. `_split_kernel`, grid (cdiv(G*Q, BLOCK_M), n_splits, B * Hkv). A program owns one prefix chunk of
   `split_size` keys of one (batch, kv head) and BLOCK_M of the M = G * Q stacked rows (the G = Hq / Hkv
   query heads that share the kv head, times the Q tree nodes; row r = query head hkv * G + r // Q, node
   r % Q). Every key block is loaded once for all those rows: GQA and the tree together turn decoding's
   matrix-vector product into a [BLOCK_M, D] x [D, BLOCK_N] tensor-core product. The row-block axis is
   the fastest-varying grid axis, so when M needs several row blocks they run back to back on the same
   chunk and the repeated reads hit L2, not HBM. It writes online-softmax partials per row and split:
       m_s = max_j s_j,   l_s = sum_j 2^(s_j - m_s),   acc_s = sum_j 2^(s_j - m_s) v_j
   with s = q.k * sm_scale * log2(e) (base-2 softmax, as FlashAttention).
2. `_reduce_kernel`, grid (cdiv(G*Q, BLOCK_M), B * Hkv), merges the splits and the tree block:
       m = max_s m_s,  l = sum_s 2^(m_s - m) l_s,  acc = sum_s 2^(m_s - m) acc_s
   then attends to the Q tree keys (slots prefix_len ..) under the tree mask, folds them in the same way
   and writes out = acc / l.

Masked scores use -1e30 rather than -inf so that an all-masked block gives 2^(m - m') = 1 with zero sums
instead of NaN, and their probabilities are zeroed explicitly.
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
    gpu_sm_count,
    interpreted,
    make_kernel,
    next_pow2,
)

# Split chunks are a multiple of the largest BLOCK_N any config uses, so every config tiles them exactly.
SPLIT_ALIGN = 128


def _split_kernel(
    Q, K, V, IDX, M_OUT, L_OUT, ACC_OUT,  # pointers
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_in,
    stride_mb, stride_mh, stride_mq, stride_ms,  # m/l scratch [B, Hq, Q, n_splits]
    stride_ab, stride_ah, stride_aq, stride_as, stride_ad,  # acc scratch [B, Hq, Q, n_splits, D]
    n_prefix, split_size, qk_scale,
    H_KV, GROUP, Q_LEN, M_ROWS, M_BUCKET,  # M_BUCKET: autotune key only
    HEAD_DIM: tl.constexpr,
    GATHER: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
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

    # tl.full / tl.reduce with the standard combine functions instead of tl.zeros / tl.max / tl.sum: those
    # are @triton.jit helpers that the interpreter refuses unless TRITON_INTERPRET was set before
    # `import triton` (runtime.py); the interpreter maps these two combine functions to numpy directly.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, n_prefix)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if GATHER:
            slot = tl.load(IDX + b * stride_ib + offs_n * stride_in, mask=n_ok, other=-1)
            n_ok = n_ok & (slot >= 0)  # holes (< 0) are skipped
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

    ml_off = b * stride_mb + hq * stride_mh + qi * stride_mq + pid_s * stride_ms  # [BLOCK_M]
    tl.store(M_OUT + ml_off, m_i, mask=row_ok)
    tl.store(L_OUT + ml_off, l_i, mask=row_ok)
    acc_off = b * stride_ab + hq[:, None] * stride_ah + qi[:, None] * stride_aq + pid_s * stride_as
    tl.store(ACC_OUT + acc_off + offs_d[None, :] * stride_ad, acc, mask=row_ok[:, None] & d_ok[None, :])


def _reduce_kernel(
    Q, K, V, TM, M_IN, L_IN, ACC_IN, OUT,  # pointers
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_ti, stride_tj,
    stride_mb, stride_mh, stride_mq, stride_ms,
    stride_ab, stride_ah, stride_aq, stride_as, stride_ad,
    stride_ob, stride_oh, stride_oq, stride_od,
    n_splits, prefix_len, qk_scale,
    H_KV, GROUP, Q_LEN, M_ROWS, M_BUCKET,  # M_BUCKET: autotune key only
    HEAD_DIM: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = (pid_bh % H_KV).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M_ROWS
    hq = hkv * GROUP + rows // Q_LEN
    qi = rows % Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rd_ok = row_ok[:, None] & d_ok[None, :]

    # 1. merge the prefix splits: rescale every partial to the common running max
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    ml_base = b * stride_mb + hq * stride_mh + qi * stride_mq  # [BLOCK_M]
    acc_base = b * stride_ab + hq[:, None] * stride_ah + qi[:, None] * stride_aq + offs_d[None, :] * stride_ad
    for s_idx in range(0, n_splits):
        m_s = tl.load(M_IN + ml_base + s_idx * stride_ms, mask=row_ok, other=-1.0e30)
        l_s = tl.load(L_IN + ml_base + s_idx * stride_ms, mask=row_ok, other=0.0)
        acc_s = tl.load(ACC_IN + acc_base + s_idx * stride_as, mask=rd_ok, other=0.0)  # [BLOCK_M, BLOCK_D]
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new

    # 2. the tree block: slots [prefix_len, prefix_len + Q), row (hq, i) sees node j iff tree_mask[b, i, j]
    q = tl.load(
        Q + b * stride_qb + hq[:, None] * stride_qh + qi[:, None] * stride_qq + offs_d[None, :] * stride_qd,
        mask=rd_ok, other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < Q_LEN
    tslot = prefix_len + offs_t.to(tl.int64)
    kt = tl.load(
        K + b * stride_kb + hkv * stride_kh + tslot[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=t_ok[None, :] & d_ok[:, None], other=0.0,
    )  # [BLOCK_D, BLOCK_T]
    vb = tl.load(
        V + b * stride_vb + hkv * stride_vh + tslot[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=t_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_T, BLOCK_D]
    allowed = tl.load(
        TM + b * stride_tb + qi[:, None] * stride_ti + offs_t[None, :] * stride_tj,
        mask=row_ok[:, None] & t_ok[None, :], other=0,
    ) != 0  # [BLOCK_M, BLOCK_T]
    if DOT_F32:
        q = q.to(tl.float32)
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
        mask=rd_ok,
    )


# kept small: every config compiles (~2 s) and runs on the first call of each (M bucket, D, gather) key
_SPLIT_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (32, 64, 128)
    for bn in (64, 128)
    for w in (4, 8)
    for s in (2, 3)
]
_REDUCE_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (16, 32, 64) for w in (4, 8)]
_SPLIT_GPU_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_REDUCE_GPU_DEFAULT = {"BLOCK_M": 32, "num_warps": 4}
_SPLIT = make_kernel(_split_kernel, _SPLIT_CONFIGS, key=["M_BUCKET", "HEAD_DIM", "GATHER"])
_REDUCE = make_kernel(_reduce_kernel, _REDUCE_CONFIGS, key=["M_BUCKET", "HEAD_DIM"])


def choose_split_size(n_prefix: int, batch: int, h_kv: int, m_rows: int, sm_count: int) -> int:
    """Prefix keys per split: enough splits that the split kernel has ~2 programs per SM (counting
    64-row blocks), but chunks of at least 256 keys so partials stay a small fraction of the KV bytes."""
    if n_prefix <= 0:
        return SPLIT_ALIGN
    programs_per_split = batch * h_kv * triton.cdiv(m_rows, 64)
    n_splits = max(1, min(triton.cdiv(2 * sm_count, programs_per_split), triton.cdiv(n_prefix, 256)))
    return triton.cdiv(triton.cdiv(n_prefix, n_splits), SPLIT_ALIGN) * SPLIT_ALIGN


def tree_verify_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    kv_index: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Split-K tree attention (convention: reference.py). Returns [B, Hq, Q, D] in q's dtype.

    q [B, Hq, Q, D]; k, v [B, Hkv, S, D] (any strides, e.g. a view of a preallocated cache);
    tree_mask [Q, Q] / [B, Q, Q] bool; kv_index None or int [L] / [B, L] (entries < 0 skipped).
    num_splits: upper bound on prefix splits (default: sized for the GPU; 1 split per 128 keys on CPU).
    CUDA tensors run compiled (autotuned unless SPARROW_TRITON_AUTOTUNE=0), CPU tensors interpreted.
    """
    check_tree_args(q, k, v, prefix_len)
    batch, hq, q_len, d = q.shape
    h_kv = k.shape[1]
    group = hq // h_kv
    m_rows = group * q_len
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    qk_scale = sm_scale * math.log2(math.e)
    mask, stb, sti, stj = batched_tree_mask_u8(tree_mask, batch, q_len, q.device)
    idx, sib, sin, n_index = batched_kv_index(kv_index, batch, q.device, dummy=mask)
    n_prefix = n_index if kv_index is not None else prefix_len
    on_interp = interpreted(q)

    if num_splits is not None:
        split_size = triton.cdiv(triton.cdiv(max(n_prefix, 1), max(num_splits, 1)), SPLIT_ALIGN) * SPLIT_ALIGN
    elif on_interp:
        split_size = max(SPLIT_ALIGN, triton.cdiv(max(n_prefix, 1), SPLIT_ALIGN) * SPLIT_ALIGN)  # one split
    else:
        split_size = choose_split_size(n_prefix, batch, h_kv, m_rows, gpu_sm_count(q))
    n_splits = triton.cdiv(n_prefix, split_size)  # 0 for an empty prefix: only the tree block is reduced

    # partials per (row, split); fp32 whatever the input dtype
    m_part = torch.empty(batch, hq, q_len, max(n_splits, 1), device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(batch, hq, q_len, max(n_splits, 1), d, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    flags = dot_flags(q.dtype, on_interp)
    block_d = next_pow2(d)

    split_args = (
        q, k, v, idx, m_part, l_part, acc_part,
        *q.stride(), *k.stride(), *v.stride(), sib, sin, *m_part.stride(), *acc_part.stride(),
        n_prefix, split_size, qk_scale, h_kv, group, q_len, m_rows, next_pow2(m_rows),
    )
    split_consts = {"GATHER": kv_index is not None, "HEAD_DIM": d, "BLOCK_D": block_d, **flags}
    reduce_args = (
        q, k, v, mask, m_part, l_part, acc_part, out,
        *q.stride(), *k.stride(), *v.stride(), stb, sti, stj, *m_part.stride(), *acc_part.stride(), *out.stride(),
        n_splits, prefix_len, qk_scale, h_kv, group, q_len, m_rows, next_pow2(m_rows),
    )
    reduce_consts = {"HEAD_DIM": d, "BLOCK_D": block_d, "BLOCK_T": next_pow2(q_len), **flags}

    if on_interp:
        block_m = min(128, next_pow2(m_rows))  # few, large programs: the interpreter pays per program
        if n_splits:
            grid = (triton.cdiv(m_rows, block_m), n_splits, batch * h_kv)
            _SPLIT.interpreted[grid](*split_args, **split_consts, BLOCK_M=block_m, BLOCK_N=SPLIT_ALIGN)
        grid = (triton.cdiv(m_rows, block_m), batch * h_kv)
        _REDUCE.interpreted[grid](*reduce_args, **reduce_consts, BLOCK_M=block_m)
    elif autotune_enabled(q):
        if n_splits:
            grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]), n_splits, batch * h_kv)  # noqa: E731
            _SPLIT.autotuned[grid](*split_args, **split_consts)
        grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]), batch * h_kv)  # noqa: E731
        _REDUCE.autotuned[grid](*reduce_args, **reduce_consts)
    else:
        if n_splits:
            grid = (triton.cdiv(m_rows, _SPLIT_GPU_DEFAULT["BLOCK_M"]), n_splits, batch * h_kv)
            _SPLIT.compiled[grid](*split_args, **split_consts, **_SPLIT_GPU_DEFAULT)
        grid = (triton.cdiv(m_rows, _REDUCE_GPU_DEFAULT["BLOCK_M"]), batch * h_kv)
        _REDUCE.compiled[grid](*reduce_args, **reduce_consts, **_REDUCE_GPU_DEFAULT)
    return out
