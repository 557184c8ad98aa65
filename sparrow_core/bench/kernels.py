"""GPU benchmark: tree-attention kernels vs SDPA and FlexAttention on the verification shape.

    python -m sparrow_core.bench.kernels --json out/kernels.json --plot out/kernels.png
    python -m sparrow_core.bench.kernels --smoke            # CPU, Triton interpreter, tiny shapes

On a GPU machine run `python -m pytest -q tests/test_kernels.py` first: the kernel tests then also run
compiled on CUDA (fixed configs, plus one autotuned case). Exit status 1 when one of our kernels fails
or disagrees with the reference.

For every KV length (prefix + tree, default 1k/5k/25k/100k) and tree size (8/30/64) it times, on one
layer's KV [B, Hkv, S, D] (default Qwen2-7B heads: 28 query heads, 4 kv heads, D=128, bf16):
    split      tree_verify.tree_verify_attention (split-K + reduce)
    single     draft_attention.draft_attention (one pass; skipped above --single-max keys)
    dispatch   dispatch.tree_attention (what the engine calls)
    sdpa       F.scaled_dot_product_attention with the equivalent dense bool mask, enable_gqa=True
    flex       torch.compile(flex_attention) with a prefix + tree BlockMask (built outside the timing)
Each is checked against the fp32 reference first (max_err). Times are CUDA-event medians over --reps
runs with the L2 cache flushed before each (a decoder layer's KV is never L2-resident in a real forward).
Bandwidth = bytes of KV read (prefix + tree, K and V) / time, as a fraction of the device's peak HBM
bandwidth (from the device name; --peak-tbps overrides). Q=64 at long context is compute-bound on a GPU,
so TFLOP/s (4 * B * Hq * Q * keys * D flops) is reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparrow_core.cli.device import add_device_flags, device_and_dtype
from sparrow_core.decoding.draft_tree import build_tree
from sparrow_core.kernels.dispatch import tree_attention
from sparrow_core.kernels.draft_attention import draft_attention
from sparrow_core.kernels.reference import tree_attention_reference
from sparrow_core.kernels.tree_verify import tree_verify_attention

# Peak HBM bandwidth in TB/s by device-name substring, most specific first.
PEAK_TBPS = [
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM
    ("H800", 3.35),
    ("GH200", 4.0),
    ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("RTX 4090", 1.008),
]
METHODS = ("split", "single", "dispatch", "sdpa", "flex")


def peak_bandwidth_tbps(device_name: str) -> float | None:
    for key, tbps in PEAK_TBPS:
        if key in device_name:
            return tbps
    return None


def random_tree_mask(q_len: int, generator: torch.Generator) -> torch.Tensor:
    """[Q, Q] bool ancestor mask of a random tree in which each node hangs off one of the 4 nodes before
    it: bushy near the root and deep, like an EAGLE-style top-k tree."""
    parent = [-1] + [int(torch.randint(max(0, i - 4), i, (1,), generator=generator)) for i in range(1, q_len)]
    return build_tree(torch.zeros(q_len, dtype=torch.long), torch.tensor(parent)).mask


def make_case(batch, hq, h_kv, kv_len, q_len, head_dim, dtype, device, seed=0):
    """Tensors for one verification step: the last q_len of kv_len cache slots are the tree."""
    g = torch.Generator().manual_seed(seed)
    capacity = kv_len + 256  # a preallocated cache is bigger than its valid part
    q = torch.randn(batch, hq, q_len, head_dim, generator=g).to(device=device, dtype=dtype)  # [B, Hq, Q, D]
    k = torch.randn(batch, h_kv, capacity, head_dim, generator=g).to(device=device, dtype=dtype)  # [B, Hkv, S, D]
    v = torch.randn(batch, h_kv, capacity, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k, v, random_tree_mask(q_len, g).to(device)


def method_fns(q, k, v, prefix_len, tree_mask, scale, device) -> dict[str, Callable[[], torch.Tensor]]:
    q_len = q.shape[2]
    kv_len = prefix_len + q_len
    k_valid, v_valid = k[:, :, :kv_len], v[:, :, :kv_len]
    dense = torch.cat([torch.ones(q_len, prefix_len, dtype=torch.bool, device=device), tree_mask], dim=1)
    dense = dense[None, None]  # [1, 1, Q, P + Q]
    fns = {
        "split": lambda: tree_verify_attention(q, k, v, prefix_len, tree_mask, scale),
        "single": lambda: draft_attention(q, k, v, prefix_len, tree_mask, scale),
        "dispatch": lambda: tree_attention(q, k, v, prefix_len, tree_mask, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(
            q, k_valid, v_valid, attn_mask=dense, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        ),
    }
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def mask_mod(b, h, q_idx, kv_idx):
            # prefix fully visible; tree slot P + j visible to node i iff tree_mask[i, j]
            j = (kv_idx - prefix_len).clamp(0, q_len - 1)
            return (kv_idx < prefix_len) | tree_mask[q_idx, j]

        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
        fns["flex"] = lambda: flex(q, k_valid, v_valid, block_mask=block_mask, scale=scale, enable_gqa=True)
    return fns


def time_cuda(fn: Callable[[], torch.Tensor], reps: int, warmup: int, flush: torch.Tensor) -> float:
    """Median milliseconds over `reps` CUDA-event-timed calls, L2 flushed before each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn: Callable[[], torch.Tensor], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    peak = args.peak_tbps or (peak_bandwidth_tbps(name) if device.type == "cuda" else None)
    flush = None
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        flush = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    elem = torch.finfo(dtype).bits // 8
    results = []
    for kv_len in args.kv:
        for q_len in args.tree:
            prefix_len = kv_len - q_len
            q, k, v, tree_mask = make_case(args.batch, args.heads, args.kv_heads, kv_len, q_len, args.head_dim, dtype, device)
            scale = args.head_dim**-0.5
            ref = tree_attention_reference(q, k, v, prefix_len, tree_mask, scale).float()
            kv_bytes = 2 * args.batch * args.kv_heads * kv_len * args.head_dim * elem
            flops = 4 * args.batch * args.heads * q_len * kv_len * args.head_dim
            for method, fn in method_fns(q, k, v, prefix_len, tree_mask, scale, device).items():
                if method not in args.methods or (method == "single" and kv_len > args.single_max):
                    continue
                row = {"kv_len": kv_len, "tree": q_len, "method": method}
                try:
                    row["max_err"] = (fn().float() - ref).abs().max().item()
                    if device.type == "cuda":
                        ms = time_cuda(fn, args.reps, args.warmup, flush)
                    else:
                        ms = time_cpu(fn, args.reps, args.warmup)
                except Exception as exc:  # a baseline that cannot run this shape is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    results.append(row)
                    print(f"{kv_len:>8} {q_len:>4} {method:>9}  error: {row['error']}", flush=True)
                    continue
                row["ms"] = ms
                row["gbps"] = kv_bytes / (ms * 1e-3) / 1e9
                row["peak_fraction"] = row["gbps"] / (peak * 1e3) if peak else None
                row["tflops"] = flops / (ms * 1e-3) / 1e12
                results.append(row)
                frac = f"{100 * row['peak_fraction']:6.1f}%" if peak else "     -"
                print(
                    f"{kv_len:>8} {q_len:>4} {method:>9} {ms:9.4f} ms {row['gbps']:9.1f} GB/s {frac} "
                    f"{row['tflops']:7.2f} TFLOP/s  err {row['max_err']:.2e}",
                    flush=True,
                )
            del q, k, v, ref
    return {
        "device": name,
        "peak_tbps": peak,
        "dtype": args.dtype,
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "reps": args.reps,
        "torch": torch.__version__,
        "results": results,
    }


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = sorted({r["tree"] for r in report["results"]})
    metric = "peak_fraction" if report["peak_tbps"] else "gbps"
    fig, axes = plt.subplots(2, len(trees), figsize=(5 * len(trees), 8), squeeze=False)
    for col, q_len in enumerate(trees):
        for method in METHODS:
            rows = [r for r in report["results"] if r["tree"] == q_len and r["method"] == method and "ms" in r]
            if rows:
                kv = [r["kv_len"] for r in rows]
                axes[0][col].plot(kv, [r["ms"] for r in rows], marker="o", label=method)
                axes[1][col].plot(kv, [r[metric] for r in rows], marker="o", label=method)
        axes[0][col].set_title(f"tree of {q_len} nodes")
        axes[0][col].set_ylabel("time per call (ms, median)")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("fraction of peak HBM bandwidth" if metric == "peak_fraction" else "KV GB/s")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_xlabel("KV length (prefix + tree)")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(f"{report['device']}, {report['dtype']}, {report['heads']}q/{report['kv_heads']}kv heads, D={report['head_dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparrow_core.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--kv", type=_ints, default=None, help="KV lengths, prefix + tree (default 1024,5120,25600,102400)")
    p.add_argument("--tree", type=_ints, default=None, help="tree sizes Q (default 8,30,64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--single-max", type=int, default=8192, help="skip the single-pass kernel above this KV")
    p.add_argument("--reps", type=int, default=None, help="timed calls per point (default 100; smoke 2)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--peak-tbps", type=float, default=None, help="override the peak HBM bandwidth")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (default: next to --json)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through the Triton interpreter")
    add_device_flags(p, default_device="cuda")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    elif torch.device(args.device).type != "cuda":
        p.error("the kernel benchmark times CUDA kernels; use --smoke for a tiny CPU run through the Triton interpreter")
    elif not torch.cuda.is_available():
        print("sparrow_core.bench.kernels needs a CUDA GPU (none visible). "
              "Use --smoke for a tiny CPU run through the Triton interpreter.", file=sys.stderr)
        raise SystemExit(2)
    device_and_dtype(args, p)  # a CUDA index this machine lacks is a usage error
    args.dtype = args.dtype or "bfloat16"
    if args.smoke:
        # tiny, so that the interpreter (~2 ms per program x iteration) finishes in seconds
        args.kv, args.tree, args.reps = args.kv or [64, 200], args.tree or [4, 9], args.reps or 2
        args.heads, args.kv_heads, args.head_dim, args.dtype, args.warmup = 4, 2, 32, "float32", 0
        args.methods = [m for m in args.methods if m != "flex"]
    args.kv, args.tree = args.kv or [1024, 5120, 25600, 102400], args.tree or [8, 30, 64]
    args.reps = args.reps or 100
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    plot_path = args.plot or (args.json.rsplit(".", 1)[0] + ".png" if args.json else None)
    if plot_path:
        plot(report, plot_path)
    for r in failures(report):
        print(f"FAILED (error, or mismatch vs the fp32 reference): {r}", file=sys.stderr)
    return 1 if failures(report) else 0


def failures(report: dict) -> list[dict]:
    """Rows of our kernels (split, single, dispatch) that raised or disagree with the fp32 reference."""
    ours = [r for r in report["results"] if r["method"] in ("split", "single", "dispatch")]
    return [r for r in ours if "error" in r or not r["max_err"] <= _tolerance(report["dtype"])]  # NaN fails too


def _tolerance(dtype: str) -> float:
    return {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}[dtype]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
