"""Where a Triton kernel runs: compiled on CUDA, or the Triton interpreter for CPU tensors.

`@triton.jit` decides between compiling and interpreting once, when the decorator runs, from
TRITON_INTERPRET. Decorating at import would make CPU tests depend on whether some other module imported
the kernels before the variable was set, so each kernel here is written as a plain function and wrapped
twice: `triton.jit` (GPU, optionally autotuned) and the interpreter (CPU); CPU tensors then work
whether or not TRITON_INTERPRET is set. The price: kernels must not call any `@triton.jit` function,
which the interpreter refuses unless TRITON_INTERPRET was set before `import triton`. That includes
triton's own tl.zeros / tl.max / tl.sum, so the kernels use tl.full and
tl.reduce(x, axis, tl.standard._elementwise_max / _sum_combine) (the interpreter maps those two
combine functions straight to numpy; compiled, they are exactly what tl.max / tl.sum lower to).

Interpreter facts (measured on CPU): ~2.3 ms per program x loop iteration, so use large
blocks; `triton.autotune` does not run there; bf16 `tl.dot` is wrong there, so operands are cast to
fp32 first (`DOT_F32`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

# SPARROW_TRITON_AUTOTUNE=0 launches the fixed GPU config instead of autotuning.
AUTOTUNE_ENV = "SPARROW_TRITON_AUTOTUNE"


@dataclass(frozen=True)
class Kernel:
    """One Triton kernel in its three launchable forms."""

    compiled: Any  # triton.jit(fn)
    autotuned: Any  # triton.autotune(...)(compiled)
    interpreted: Any  # runs on CPU tensors through the Triton interpreter


def make_kernel(fn, configs: list[triton.Config], key: list[str]) -> Kernel:
    compiled = triton.jit(fn)
    prune_by = {"early_config_prune": prune_configs}
    # cache_results: the chosen config is stored next to the compiled kernels (TRITON_CACHE_DIR), so a
    # restarted service does not re-benchmark
    autotuned = triton.autotune(configs=configs, key=key, prune_configs_by=prune_by, cache_results=True)(compiled)
    return Kernel(compiled=compiled, autotuned=autotuned, interpreted=InterpretedFunction(fn))


# Hopper's per-block shared memory limit; Ampere's (164 KB) configs fail to compile and the autotuner skips them.
SHARED_MEMORY_BYTES = 227 * 1024


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune pruning shared by the kernels (they all take M_BUCKET, HEAD_DIM and a Q pointer):
    - BLOCK_M above next_pow2(G * Q) only wastes registers;
    - the pipelined K and V tiles, num_stages x 2 x [BLOCK_N, D], plus the q tile must fit in shared
      memory (this estimate matched the sm_90 compiler exactly for the largest tiles)."""
    args = {**named_args, **kwargs}
    elem = args["Q"].element_size()
    head_dim = args["HEAD_DIM"]
    kept = []
    for c in configs:
        block_m, block_n = c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0)
        smem = c.num_stages * 2 * block_n * head_dim * elem + block_m * head_dim * elem
        if block_m <= max(args["M_BUCKET"], 16) and smem <= SHARED_MEMORY_BYTES:
            kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0), c.num_stages))]


def has_triton_driver() -> bool:
    """True when Triton can compile for the machine (a GPU backend is present)."""
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception:  # "0 active drivers" on CPU-only machines
        return False
    return True


def interpreted(t: torch.Tensor) -> bool:
    """CPU tensors go through the Triton interpreter."""
    return t.device.type == "cpu"


def autotune_enabled(t: torch.Tensor) -> bool:
    return not interpreted(t) and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def dot_flags(dtype: torch.dtype, on_interpreter: bool) -> dict[str, Any]:
    """Constexprs controlling `tl.dot`: fp32 operands in the interpreter (its bf16 dot is broken),
    IEEE fp32 products for fp32 inputs on GPU (tf32 would lose ~3 digits against the reference)."""
    return {"DOT_F32": on_interpreter or dtype == torch.float32, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def next_pow2(n: int, minimum: int = 16) -> int:
    """tl.dot needs every block dim >= 16 and a power of two."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def gpu_sm_count(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def batched_tree_mask_u8(tree_mask: torch.Tensor, batch: int, q_len: int, device: torch.device):
    """tree_mask [Q, Q] / [B, Q, Q] -> (uint8 tensor, stride_b, stride_i, stride_j); stride_b 0 when shared."""
    if tree_mask.shape[-2:] != (q_len, q_len) or tree_mask.dim() not in (2, 3):
        raise ValueError(f"tree_mask must be [Q, Q] or [B, Q, Q] with Q={q_len}, got {tuple(tree_mask.shape)}")
    mask = tree_mask.to(device=device, dtype=torch.bool).view(torch.uint8)
    if mask.dim() == 2:
        return mask, 0, mask.stride(0), mask.stride(1)
    if mask.shape[0] != batch:
        raise ValueError(f"tree_mask batch {mask.shape[0]} != {batch}")
    return mask, mask.stride(0), mask.stride(1), mask.stride(2)


def batched_kv_index(kv_index: torch.Tensor | None, batch: int, device: torch.device, dummy: torch.Tensor):
    """kv_index [L] / [B, L] -> (int tensor, stride_b, stride_l, L); a dummy pointer when None."""
    if kv_index is None:
        return dummy, 0, 0, 0
    if kv_index.dtype not in (torch.int32, torch.int64) or kv_index.dim() not in (1, 2):
        raise ValueError("kv_index must be an int32/int64 tensor [L] or [B, L]")
    idx = kv_index.to(device)
    if idx.dim() == 1:
        return idx, 0, idx.stride(0), idx.shape[0]
    if idx.shape[0] != batch:
        raise ValueError(f"kv_index batch {idx.shape[0]} != {batch}")
    return idx, idx.stride(0), idx.stride(1), idx.shape[1]
