"""`sparrow-bench device-check [--device cuda] [--quick] [--json FILE]`: one command for a lent GPU.

Four checks, one JSON (exit status 1 when a check fails):

    lossless   greedy sparrow against greedy AR in bf16, on the default model (its shipped drafter) and a tiny
               random Qwen2.5-VL (a random drafter): identical tokens, or identical up to a step where AR's two
               best logits tie within bf16 resolution and sparrow took one of the tied tokens (`lossless`)
    sampling   the first `SAMPLED_TOKENS` tokens sampled (temperature 1) by sparrow and by AR over N seeds each:
               the total variation between their per-position distributions, against the AR-vs-AR band (two
               AR runs over disjoint seeds); sparrow passes within 1.5 x the band + 0.05
    kernels    the Triton tree-attention kernels against the fp32 reference (`bench/kernels.py`: compiled on
               CUDA, the Triton interpreter on CPU)
    speed      AR ms/token, sparrow's draft and verify ms per step and dsr at 0.5k / 5k / 25k visual tokens, and
               verify ms against tree size (1 to 64 nodes), on the default model (`bench/speculative.py`'s run)

`--quick` shrinks every check to seconds on a CPU (the suite runs `--device cpu --quick`); a full run is sized
for at most 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparrow_core.bench import kernels as kernel_bench
from sparrow_core.bench import speculative as speculative_bench
from sparrow_core.cli.device import add_device_flags, device_and_dtype
from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.decoders import Decoder
from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.engine.checkpoint import DEFAULT_MODEL_DIR, default_dtype, load_target
from sparrow_core.engine.stream import StreamConfig, TargetStream
from sparrow_core.engine.target import TargetModel
from sparrow_core.engine.tiny_targets import on, random_frames, tiny_qwen2_5_vl
from sparrow_core.kernels.runtime import AUTOTUNE_ENV
from sparrow_core.train.data import WorldStreamSpec, world_segments

# two logits closer than this (relative to their size, at least 1) are a tie in bf16: 4 units in its last place
BF16_TIE = 4 * torch.finfo(torch.bfloat16).eps
SAMPLED_TOKENS = 3
BAND_FACTOR, BAND_SLACK = 1.5, 0.05


@dataclass(frozen=True)
class Sizes:
    lossless_tokens: int
    seeds: int  # per sampled run
    visual_tokens: tuple[int, ...]
    tree_sizes: tuple[int, ...]  # draft-tree nodes, root included
    captions: int
    caption_tokens: int
    kernel_flags: tuple[str, ...]


FULL = Sizes(32, 400, (500, 5000, 25000), (1, 8, 16, 32, 64), 2, 32,
             ("--kv", "1024,5120,25600", "--tree", "1,8,30,64", "--reps", "20", "--methods", "split,single,dispatch,sdpa"))
QUICK = Sizes(8, 24, (40,), (1, 8), 1, 3, ("--smoke", "--kv", "64", "--tree", "4"))


# --- a stream to decode from ----------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """Text, then frames at media times, then text: the stream every decoder starts from."""

    text: list[int]
    frames: np.ndarray
    times: list[float]
    tail: list[int]

    def stream(self, target: TargetModel, config: StreamConfig | None = None) -> tuple[TargetStream, torch.Tensor]:
        """A fresh stream holding the prompt, and its next-token logits [V]."""
        stream = TargetStream(target, config)
        stream.append_text(self.text)
        stream.append_frames(self.frames, self.times)
        return stream, stream.append_text(self.tail)


def world_prompt(target: TargetModel, seed: int = 11) -> Prompt:
    """The checkpoint's own layout (the default model's: the streaming one): preamble, one world segment,
    a caption turn's prefix."""
    seg = next(iter(world_segments(WorldStreamSpec(seed=seed, segments=1, size=target.image_size or 64))))
    layout = target.caption_layout()
    return Prompt(layout.preamble, seg.frames, [float(t) for t in seg.times], layout.prefix)


def tiny_prompt(seed: int = 0) -> Prompt:
    """For a target without a tokenizer: a few ids, two random frames, a few ids."""
    return Prompt([3, 4, 5], random_frames(2, seed=seed), [0.0, 0.5], [6, 7])


def greedy(target: TargetModel, decoder: Decoder, prompt: Prompt, n: int) -> tuple[list[int], DecodeMetrics]:
    stream, logits = prompt.stream(target, StreamConfig().with_needs(decoder.needs))
    metrics = DecodeMetrics()
    tokens = [t for step in decoder.decode(stream, logits, n, [], SamplingConfig(), None, metrics) for t in step.tokens]
    return tokens, metrics


# --- lossless ---------------------------------------------------------------------------------------
def lossless(target: TargetModel, decoder: Decoder, prompt: Prompt, n: int) -> dict:
    """Greedy `decoder` against greedy AR for n tokens from `prompt` (see the module docstring)."""
    want, _ = greedy(target, ARDecoder(), prompt, n)
    got, metrics = greedy(target, decoder, prompt, n)
    row = {"tokens": n, "identical": got == want, "first_difference": None, "at_a_tie": None, "tau": metrics.tau}
    if got != want:
        i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        stream, logits = prompt.stream(target)
        for t in want[:i]:
            logits = stream.append_text([t])
        best = logits.max()
        tied = (best - logits <= BF16_TIE * best.abs().clamp(min=1.0)).nonzero().squeeze(1).tolist()
        row.update(first_difference=i, at_a_tie=len(tied) > 1 and got[i] in tied,
                   ar_token=want[i], token=got[i], ar_margin=float(best - logits[got[i]]))
    row["passed"] = row["identical"] or bool(row["at_a_tie"])
    return row


def sparrow_decoder(target: TargetModel, drafter_dir: Path | None, seed: int = 0) -> SpeculativeDecoder:
    if drafter_dir is not None and drafter_dir.is_dir():
        drafter = load_drafter(drafter_dir, target)
    else:  # an untrained drafter: acceptance is low, the plumbing is all exercised
        torch.manual_seed(seed)
        drafter = TextAnchoredDrafter(target, DrafterConfig())
    return SpeculativeDecoder(DrafterProposer(drafter))


# --- sampling ---------------------------------------------------------------------------------------
def sampled_tokens(target: TargetModel, decoder: Decoder, prompt: Prompt, seeds: range, k: int) -> list[tuple[int, ...]]:
    """The first k tokens sampled at temperature 1 from `prompt`, one run per seed (the stream is rolled back)."""
    stream, logits = prompt.stream(target, StreamConfig().with_needs(decoder.needs))
    sampling = SamplingConfig(1.0)
    out = []
    for seed in seeds:
        g = torch.Generator(target.device).manual_seed(seed)
        tokens = [t for step in decoder.decode(stream, logits, k, [], sampling, g) for t in step.tokens]
        stream.rollback(len(tokens))
        out.append(tuple(tokens))
    return out


def total_variation(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> list[float]:
    """Per position, the total variation between the empirical distributions of a's and b's tokens."""
    tvs = []
    for j in range(min(len(a[0]), len(b[0]))):
        ca, cb = Counter(x[j] for x in a), Counter(x[j] for x in b)
        tvs.append(0.5 * sum(abs(ca[t] / len(a) - cb[t] / len(b)) for t in set(ca) | set(cb)))
    return tvs


def sampling_check(target: TargetModel, decoder: Decoder, prompt: Prompt, n: int) -> dict:
    ar = sampled_tokens(target, ARDecoder(), prompt, range(n), SAMPLED_TOKENS)
    ar_again = sampled_tokens(target, ARDecoder(), prompt, range(n, 2 * n), SAMPLED_TOKENS)
    spec = sampled_tokens(target, decoder, prompt, range(2 * n, 3 * n), SAMPLED_TOKENS)
    band, tv = max(total_variation(ar, ar_again)), max(total_variation(ar, spec))
    return {"seeds": n, "tokens": SAMPLED_TOKENS, "tv_ar_vs_ar": band, "tv_sparrow_vs_ar": tv,
            "passed": tv <= BAND_FACTOR * band + BAND_SLACK}


# --- speed --------------------------------------------------------------------------------------------
def tree_of(nodes: int) -> TreeConfig:
    """An EAGLE-2 tree of `nodes` nodes, root included (1: the root alone, i.e. verify one token)."""
    drafted = nodes - 1
    return TreeConfig(total_tokens=drafted, depth=min(max(drafted, 1), 6), top_k=min(max(drafted, 1), 8))


def speed(target: TargetModel, drafter_dir: Path, sizes: Sizes) -> dict:
    drafter = load_drafter(drafter_dir, target) if drafter_dir.is_dir() else TextAnchoredDrafter(target, DrafterConfig())
    decoders: dict[str, Decoder] = {"ar": ARDecoder(), "sparrow": SpeculativeDecoder(DrafterProposer(drafter))}
    for nodes in sizes.tree_sizes:
        decoders[f"tree-{nodes}"] = SpeculativeDecoder(DrafterProposer(drafter, tree_of(nodes)))
    rows = speculative_bench.run(target, decoders, list(sizes.visual_tokens), sizes.captions, sizes.caption_tokens,
                                 SamplingConfig(), seed=0, log=lambda line: print(line, flush=True))
    ms = lambda x: None if x is None else 1000 * x  # noqa: E731
    out = {"visual_tokens": {}, "verify_ms_by_tree_nodes": {}}
    for length in sizes.visual_tokens:
        at = {r["method"]: r for r in rows if r["visual_tokens"] == length}
        out["visual_tokens"][str(length)] = {
            "ar_ms_per_token": ms(at["ar"]["ar_s_per_token"]),
            "sparrow_draft_ms": ms(at["sparrow"]["draft_s_per_step"]),
            "sparrow_verify_ms": ms(at["sparrow"]["verify_s_per_step"]),
            "sparrow_tau": at["sparrow"]["tau"],
            "sparrow_dsr": at["sparrow"]["dsr"],
            "identical_to_ar": at["sparrow"]["identical_to_ar"],
        }
        out["verify_ms_by_tree_nodes"][str(length)] = {
            str(n): ms(at[f"tree-{n}"]["verify_s_per_step"]) for n in sizes.tree_sizes
        }
    return out


# --- the command --------------------------------------------------------------------------------------
def run(device: torch.device, dtype: torch.dtype | None, sizes: Sizes, quick: bool) -> dict:
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                    "torch": torch.__version__, "quick": quick}
    t0 = time.perf_counter()
    drafter_dir = DEFAULT_MODEL_DIR / "drafter"

    print("== lossless: greedy sparrow vs AR in bf16", flush=True)
    default_bf16 = load_target(None, device=device, dtype=torch.bfloat16)
    qwen_bf16 = on(tiny_qwen2_5_vl(), device, torch.bfloat16)
    report["lossless"] = {
        "default_model": lossless(default_bf16, sparrow_decoder(default_bf16, drafter_dir), world_prompt(default_bf16),
                                  sizes.lossless_tokens),
        "tiny_qwen2_5_vl": lossless(qwen_bf16, sparrow_decoder(qwen_bf16, None), tiny_prompt(), sizes.lossless_tokens),
    }
    print(json.dumps(report["lossless"]), flush=True)
    del default_bf16

    print("== sampling: first tokens of sparrow vs AR", flush=True)
    speed_dtype = dtype or default_dtype(device)
    target = load_target(None, device=device, dtype=speed_dtype)
    report["sampling"] = sampling_check(target, sparrow_decoder(target, drafter_dir), world_prompt(target), sizes.seeds)
    report["sampling"]["model"] = target.name()
    print(json.dumps(report["sampling"]), flush=True)

    print("== kernels against the fp32 reference", flush=True)
    kernel_args = kernel_bench.parse_args([*sizes.kernel_flags, "--device", str(device)])
    autotune = os.environ.get(AUTOTUNE_ENV)
    os.environ[AUTOTUNE_ENV] = "0"  # fixed configs: correctness in seconds (autotuning every shape takes minutes)
    try:
        kernels = kernel_bench.run(kernel_args)
    finally:
        if autotune is None:
            os.environ.pop(AUTOTUNE_ENV)
        else:
            os.environ[AUTOTUNE_ENV] = autotune
    bad = kernel_bench.failures(kernels)
    report["kernels"] = {"passed": not bad, "failures": bad, "report": kernels}

    print(f"== speed ({str(speed_dtype).removeprefix('torch.')})", flush=True)
    report["speed"] = {"dtype": str(speed_dtype).removeprefix("torch."), **speed(target, drafter_dir, sizes)}

    checks = [*report["lossless"].values(), report["sampling"], report["kernels"]]
    report["passed"] = all(c["passed"] for c in checks)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-bench device-check", description=__doc__.split("\n\n")[0])
    add_device_flags(p, default_device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="every check in seconds (the suite runs --device cpu --quick)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    device, dtype = device_and_dtype(args, p)
    report = run(device, dtype, QUICK if args.quick else FULL, args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"device-check {'passed' if report['passed'] else 'FAILED'} in {report['seconds']}s on {report['device']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
