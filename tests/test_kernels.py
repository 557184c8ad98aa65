"""Tree-attention kernels (sparrow_core/kernels) against the PyTorch reference.

On CPU the Triton kernels run through the Triton interpreter (small shapes, large blocks); where CUDA is
available the same cases also run compiled on the GPU. Also: the transformers attention function inside
a tiny Qwen2, the GPU compile of the kernels (cross-compiled for sm_90, no GPU needed), and the
benchmark's CPU smoke mode.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from sparrow_core.decoding.draft_tree import build_tree
from sparrow_core.kernels.dispatch import BACKEND_ENV, register_attention, resolve_backend, tree_attention
from sparrow_core.kernels.draft_attention import draft_attention
from sparrow_core.kernels.reference import tree_attention_reference, tree_attention_sdpa
from sparrow_core.kernels.runtime import AUTOTUNE_ENV
from sparrow_core.kernels.tree_verify import tree_verify_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[Q, Q] bool: node i sees itself and its ancestors (parents[i] < i, -1 for the root)."""
    return build_tree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents)).mask


CHAIN = [-1, 0, 1, 2, 3]
BRANCH = [-1, 0, 0, 1, 1, 2, 4]  # root with two children, a grandchild fan-out
SINGLE = [-1]


def make_inputs(batch, hq, h_kv, prefix_len, q_len, head_dim, dtype, device, extra_slots=5, seed=0):
    """q [B, Hq, Q, D] as a transposed view (like a projection output), k/v as views of a bigger buffer
    whose slots past prefix + tree are NaN: a kernel that reads outside the valid part returns NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, hq, head_dim, generator=g).transpose(1, 2).to(device=device, dtype=dtype)
    cap = prefix_len + q_len + extra_slots
    k = torch.randn(batch, h_kv, cap + 3, head_dim, generator=g)
    v = torch.randn(batch, h_kv, cap + 3, head_dim, generator=g)
    k[:, :, prefix_len + q_len :] = float("nan")
    v[:, :, prefix_len + q_len :] = float("nan")
    k, v = k.to(device=device, dtype=dtype)[:, :, :cap], v.to(device=device, dtype=dtype)[:, :, :cap]
    return q, k, v


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


@pytest.fixture(autouse=True)
def fixed_gpu_configs(monkeypatch):
    # on a GPU, autotuning every small test shape would compile dozens of configs; one test below autotunes
    monkeypatch.setenv(AUTOTUNE_ENV, "0")


def run_kernel(kernel, q, k, v, prefix_len, mask, kv_index=None, num_splits=None):
    scale = q.shape[-1] ** -0.5
    if kernel == "split":
        return tree_verify_attention(q, k, v, prefix_len, mask, scale, kv_index=kv_index, num_splits=num_splits)
    return draft_attention(q, k, v, prefix_len, mask, scale, kv_index=kv_index)


# ---------------------------------------------------------------- the reference itself


def test_reference_semantics_by_hand():
    # Q=1 over an empty prefix: one visible key, so the output is exactly its value
    q, k, v = make_inputs(1, 2, 1, 0, 1, 8, torch.float32, "cpu")
    out = tree_attention_reference(q, k, v, 0, torch.ones(1, 1, dtype=torch.bool), 0.5)
    torch.testing.assert_close(out, v[:, :, :1].expand(1, 2, 1, 8))
    # a chain node with prefix P: plain causal attention over P + i + 1 keys, head h -> kv head h // 2
    q, k, v = make_inputs(1, 4, 2, 6, 3, 8, torch.float32, "cpu")
    out = tree_attention_reference(q, k, v, 6, ancestor_mask([-1, 0, 1]), 8**-0.5)
    for h in range(4):
        for i in range(3):
            keys, vals = k[0, h // 2, : 6 + i + 1], v[0, h // 2, : 6 + i + 1]
            p = torch.softmax(keys @ q[0, h, i] * 8**-0.5, dim=0)
            torch.testing.assert_close(out[0, h, i], p @ vals)


def test_reference_holes_equal_compacted_index():
    q, k, v = make_inputs(2, 4, 2, 20, 7, 16, torch.float32, "cpu")
    mask = ancestor_mask(BRANCH)
    contiguous = tree_attention_reference(q, k, v, 20, mask, 0.25)
    torch.testing.assert_close(tree_attention_reference(q, k, v, 20, mask, 0.25, kv_index=torch.arange(20)), contiguous)
    # holes (-1) and order do not matter; only the set of valid slots does
    kept = torch.tensor([3, 17, 0, 9, 11])
    holed = torch.tensor([[3, -1, 17, 0, -1, 9, 11], [11, 9, -1, -1, 0, 17, 3]])
    torch.testing.assert_close(
        tree_attention_reference(q, k, v, 20, mask, 0.25, kv_index=holed),
        tree_attention_reference(q, k, v, 20, mask, 0.25, kv_index=kept),
    )


@pytest.mark.parametrize("kv_index", [None, torch.tensor([[4, -1, 0, 7], [-1, -1, 2, 1]])])
@pytest.mark.parametrize("batched_mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_path_matches_reference(kv_index, batched_mask, dtype):
    q, k, v = make_inputs(2, 6, 2, 9, 7, 16, dtype, "cpu")
    mask = ancestor_mask(BRANCH)
    if batched_mask:
        mask = torch.stack([mask, ancestor_mask([-1, 0, 1, 2, 3, 4, 5])])
    ref = tree_attention_reference(q, k, v, 9, mask, 0.3, kv_index=kv_index)
    assert_close(tree_attention_sdpa(q, k, v, 9, mask, 0.3, kv_index=kv_index), ref, dtype)


# ---------------------------------------------------------------- Triton kernels vs reference

KERNEL_CASES = [
    # batch, Hq, Hkv, prefix, tree, D, num_splits (split kernel only)
    pytest.param(1, 2, 2, 37, CHAIN, 16, None, id="gqa1-p37-chain"),
    pytest.param(2, 4, 2, 129, BRANCH, 32, 2, id="gqa2-p129-branch-2splits"),
    pytest.param(1, 8, 2, 0, BRANCH, 16, None, id="gqa4-empty-prefix"),
    pytest.param(1, 4, 1, 129, SINGLE, 16, 3, id="gqa4-p129-single-node"),
    pytest.param(1, 4, 2, 300, CHAIN, 24, 3, id="gqa2-p300-d24-3splits"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kernel", ["split", "single"])
@pytest.mark.parametrize(("batch", "hq", "h_kv", "prefix", "parents", "head_dim", "splits"), KERNEL_CASES)
def test_kernel_contiguous_prefix(kernel, dtype, device, batch, hq, h_kv, prefix, parents, head_dim, splits):
    q, k, v = make_inputs(batch, hq, h_kv, prefix, len(parents), head_dim, dtype, device)
    mask = ancestor_mask(parents).to(device)
    ref = tree_attention_reference(q, k, v, prefix, mask, head_dim**-0.5)
    assert_close(run_kernel(kernel, q, k, v, prefix, mask, num_splits=splits), ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["split", "single"])
def test_kernel_bf16(kernel, device):
    q, k, v = make_inputs(1, 4, 2, 129, len(BRANCH), 32, torch.bfloat16, device)
    mask = ancestor_mask(BRANCH).to(device)
    ref = tree_attention_reference(q, k, v, 129, mask, 32**-0.5)
    assert_close(run_kernel(kernel, q, k, v, 129, mask, num_splits=2), ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kernel", ["split", "single"])
def test_kernel_gathered_index_with_holes(kernel, dtype, device):
    # per-batch text windows of different lengths, unordered, with evicted holes (-1); the evicted
    # slots themselves hold NaN so reading one would poison the output
    prefix = 150
    q, k, v = make_inputs(2, 4, 2, prefix, len(BRANCH), 16, dtype, device)
    index = torch.full((2, 140), -1, dtype=torch.int32)
    index[0, :131] = torch.randperm(prefix, generator=torch.Generator().manual_seed(1))[:131].int()
    index[1, 7:47] = torch.arange(60, 100, dtype=torch.int32).flip(0)
    index[0, ::9] = -1
    evicted = torch.ones(prefix, dtype=torch.bool)
    evicted[index[index >= 0].long()] = False
    k[:, :, :prefix][:, :, evicted.to(device)] = float("nan")
    v[:, :, :prefix][:, :, evicted.to(device)] = float("nan")
    mask = torch.stack([ancestor_mask(BRANCH), ancestor_mask([-1, 0, 1, 2, 3, 4, 5])]).to(device)  # [B, Q, Q]
    index = index.to(device)
    ref = tree_attention_reference(q, k, v, prefix, mask, 0.25, kv_index=index)
    out = run_kernel(kernel, q, k, v, prefix, mask, kv_index=index, num_splits=2)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["split", "single"])
def test_kernel_empty_text_window(kernel, device):
    # the drafter before any text: a zero-length index, only tree nodes are visible
    q, k, v = make_inputs(1, 4, 2, 10, len(CHAIN), 16, torch.float32, device)
    mask = ancestor_mask(CHAIN).to(device)
    index = torch.empty(0, dtype=torch.int64, device=device)
    ref = tree_attention_reference(q, k, v, 10, mask, 0.25, kv_index=index)
    torch.testing.assert_close(ref, tree_attention_reference(q[:, :, :], k[:, :, 10:], v[:, :, 10:], 0, mask, 0.25))
    assert_close(run_kernel(kernel, q, k, v, 10, mask, kv_index=index), ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_row_without_keys_is_zero(device):
    # a mask row with nothing visible (and no prefix) gives zeros, not NaN, in reference and kernels
    q, k, v = make_inputs(1, 2, 1, 0, 3, 16, torch.float32, device)
    mask = ancestor_mask([-1, 0, 1]).to(device)
    mask[2] = False
    ref = tree_attention_reference(q, k, v, 0, mask, 0.25)
    assert (ref[:, :, 2] == 0).all() and ref[:, :, :2].abs().sum() > 0
    for kernel in ("split", "single"):
        assert_close(run_kernel(kernel, q, k, v, 0, mask), ref, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning needs a GPU")
@pytest.mark.parametrize("kernel", ["split", "single"])
def test_kernel_autotuned_gpu(kernel, monkeypatch):
    monkeypatch.setenv(AUTOTUNE_ENV, "1")
    q, k, v = make_inputs(1, 28, 4, 3000, 30, 128, torch.bfloat16, "cuda")
    mask = torch.tril(torch.ones(30, 30, dtype=torch.bool, device="cuda"))
    index = torch.arange(0, 3000, 3, device="cuda")
    for kv_index in (None, index):
        ref = tree_attention_reference(q, k, v, 3000, mask, 128**-0.5, kv_index=kv_index)
        assert_close(run_kernel(kernel, q, k, v, 3000, mask, kv_index=kv_index), ref, torch.bfloat16)


# ---------------------------------------------------------------- dispatch


def test_backend_resolution(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(t) == "torch"  # CPU tensors: no Triton driver
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(t) == "triton"
    assert resolve_backend(t, "torch") == "torch"  # the argument wins
    with pytest.raises(ValueError):
        resolve_backend(t, "cudnn")


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_split", "triton_single"])
def test_tree_attention_backends_agree(backend):
    q, k, v = make_inputs(1, 4, 2, 40, len(BRANCH), 16, torch.float16, "cpu")
    mask = ancestor_mask(BRANCH)
    ref = tree_attention_reference(q, k, v, 40, mask, 0.25)
    assert_close(tree_attention(q, k, v, 40, mask, 0.25, backend=backend), ref, torch.float16)


# ---------------------------------------------------------------- transformers integration

ATTN_NAME = "sparrow_test"


@pytest.fixture(scope="module")
def qwen_pair():
    register_attention(ATTN_NAME)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    stock = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ours = Qwen2ForCausalLM._from_config(cfg, attn_implementation=ATTN_NAME).eval()
    ours.load_state_dict(stock.state_dict())
    return cfg, stock, ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_function_ordinary_calls(qwen_pair, backend, monkeypatch):
    # prefill, a cached multi-token chunk (needs the registered mask builder) and a 1-token step
    monkeypatch.setenv(BACKEND_ENV, backend)
    cfg, stock, ours = qwen_pair
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    c_stock, c_ours = DynamicCache(config=cfg), DynamicCache(config=cfg)
    with torch.no_grad():
        for chunk in (ids[:, :10], ids[:, 10:16], ids[:, 16:]):
            a = stock(input_ids=chunk, cache=c_stock).logits
            b = ours(input_ids=chunk, cache=c_ours).logits
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_split"])
def test_attention_function_tree_verify(qwen_pair, backend, monkeypatch):
    # stock sdpa with a hand-built 4-D additive mask == our function with tree kwargs through forward()
    monkeypatch.setenv(BACKEND_ENV, backend)
    cfg, stock, ours = qwen_pair
    prefix, parents, depth = 13, BRANCH, [0, 1, 1, 2, 2, 2, 3]
    q_len = len(parents)
    mask = ancestor_mask(parents)
    g = torch.Generator().manual_seed(4)
    ids, tree_ids = torch.randint(0, 97, (1, prefix), generator=g), torch.randint(0, 97, (1, q_len), generator=g)
    position_ids = (prefix + torch.tensor(depth))[None]  # [1, Q]: node depth after the prefix
    additive = torch.zeros(1, 1, q_len, prefix + q_len)
    additive[..., prefix:] = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        stock(input_ids=ids, cache=cache)
        c_stock, c_ours, c_causal = copy.deepcopy(cache), copy.deepcopy(cache), copy.deepcopy(cache)
        want = stock(input_ids=tree_ids, position_ids=position_ids, cache=c_stock, attention_mask=additive).logits
        got = ours(
            input_ids=tree_ids,
            position_ids=position_ids,
            cache=c_ours,
            attention_mask={"full_attention": None},  # skip building the (ignored) causal mask
            tree_mask=mask,
            tree_prefix_len=prefix,
        ).logits
        causal = ours(input_ids=tree_ids, position_ids=position_ids, cache=c_causal).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (causal - want).abs().max() > 1e-3  # the tree mask really changed the result: kwargs arrived


# ---------------------------------------------------------------- GPU compile, benchmark smoke


@pytest.mark.skipif(shutil.which("ptxas") is None and not any(
    (Path(p) / "backends/nvidia/bin/ptxas").exists() for p in __import__("triton").__path__
), reason="no ptxas in the triton wheel")
def test_kernels_compile_for_sm90():
    """The compiled (non-interpreted) path cannot run here, but it can be compiled: bf16, D=128, the fixed
    GPU configs, strides specialised as at a real launch. Catches code the interpreter accepts and the
    compiler does not, and checks that loads are software-pipelined and fit Hopper's shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparrow_core.kernels import draft_attention as da
    from sparrow_core.kernels import tree_verify as tv

    def compile_sm90(kernel, consts, options):
        fn = kernel.compiled
        unit = {n: 1 for n in fn.arg_names if n.endswith(("_qd", "_kd", "_vd", "_ad", "_od", "_ms", "_in", "_tj"))}
        consts = {**consts, **unit, "HEAD_DIM": 128, "BLOCK_D": 128, "DOT_F32": False, "PRECISION": "tf32"}
        ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "IDX": "*i32", "TM": "*u8"}
        sig = {
            n: "constexpr" if n in consts else ptrs.get(n, "*fp32" if n.isupper() and n.endswith(("_OUT", "_IN")) else "i32")
            for n in fn.arg_names
        }
        sig["qk_scale"] = "fp32"
        aligned = [n for n in fn.arg_names if sig[n].startswith("*") or (n.startswith("stride") and n not in consts)]
        src = ASTSource(
            fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): c for n, c in consts.items()},
            attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
        )
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

    split = compile_sm90(tv._SPLIT, {"GATHER": False, "BLOCK_M": 64, "BLOCK_N": 64}, {"num_warps": 4, "num_stages": 3})
    reduce = compile_sm90(tv._REDUCE, {"BLOCK_M": 32, "BLOCK_T": 64}, {"num_warps": 4})
    draft = compile_sm90(da._KERNEL, {"GATHER": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 64}, {"num_warps": 4})
    for k in (split, reduce, draft):
        assert k.metadata.shared <= 227 * 1024
    assert "async_copy_global_to_local" in split.asm["ttgir"]  # K/V loads pipelined
    assert "warp_group_dot" in split.asm["ttgir"]  # Hopper tensor cores


def test_benchmark_smoke(tmp_path):
    from sparrow_core.bench.kernels import main

    out = tmp_path / "kernels.json"
    assert main(["--smoke", "--kv", "70", "--tree", "5", "--reps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    methods = {r["method"] for r in report["results"] if "ms" in r}
    assert {"split", "single", "dispatch", "sdpa"} <= methods
    assert all(r["max_err"] < 1e-4 for r in report["results"])
    assert (tmp_path / "kernels.png").stat().st_size > 1000
