"""`sparrow-bench ingest`: frames per second prefilled into a stream, and KV bytes per frame.

Runs on the embedded default model and on a tiny random LLaVA-OneVision, or on `--model DIR`.
Prefill throughput is measured at several stream depths (the attention part grows with the KV).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sparrow_core.cli.device import add_run_flags, apply_run_flags, kv_dtype
from sparrow_core.engine.checkpoint import build_target, default_dtype, load_target
from sparrow_core.engine.stream import TargetStream


def tiny_target(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                kv_dtype: torch.dtype | None = None):
    """A 2-layer random LLaVA-OneVision with the default model's frame layout (17 slots per frame)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=65536),
        image_token_id=254, video_token_id=255, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    pre = {"size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return build_target(model.to(device, dtype or default_dtype(device)), None, pre, kv_dtype=kv_dtype)


def measure(target, frames_total: int, chunk: int, depths: list[int]) -> dict:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (chunk, 64, 64, 3), dtype=np.uint8)
    stream = TargetStream(target)
    rows, t_media, done = [], 0.0, 0
    for depth in depths:
        while done < depth:  # grow the stream to this depth (frames), timing each chunk
            n = min(chunk, depth - done)
            t0 = time.perf_counter()
            stream.append_frames(frames[:n], [t_media + 0.5 * i for i in range(n)])
            dt = time.perf_counter() - t0
            t_media += 0.5 * n
            done += n
        # time a fresh window of chunks at this depth
        t0 = time.perf_counter()
        reps = max(1, frames_total // chunk)
        for _ in range(reps):
            stream.append_frames(frames, [t_media + 0.5 * i for i in range(chunk)])
            t_media += 0.5 * chunk
        dt = time.perf_counter() - t0
        done += reps * chunk
        st = stream.stats()
        rows.append({
            "kv_tokens_before": depth * st.frame_slots // max(st.frames_ingested, 1),
            "frames_per_s": reps * chunk / dt,
            "kv_bytes_per_frame": st.kv_bytes / max(st.frames_ingested, 1),
            "slots_per_frame": st.frame_slots / max(st.frames_ingested, 1),
        })
    return {"model": target.name(), "layers": target.num_layers, "hidden": target.hidden_size,
            "dtype": str(target.dtype).replace("torch.", ""), "chunk": chunk, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-bench ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--chunk", type=int, default=8, help="frames per append_frames call")
    p.add_argument("--frames", type=int, default=32, help="frames timed at each depth")
    p.add_argument("--depths", default="0,512,1470", help="stream depths (frames already in the KV) to time at")
    p.add_argument("--json", default=None)
    add_run_flags(p)
    args = p.parse_args(argv)
    device, dtype = apply_run_flags(args, p)
    depths = [int(x) for x in args.depths.split(",")]
    targets = [tiny_target(device, dtype, kv_dtype(args)),
               load_target(args.model, device=device, dtype=dtype, kv_dtype=kv_dtype(args))]
    results = [measure(target, args.frames, args.chunk, depths) for target in targets]
    print(f"{'model':28s} {'layers':>6s} {'KV tokens':>10s} {'frames/s':>9s} {'KV bytes/frame':>15s}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['model']:28s} {r['layers']:6d} {row['kv_tokens_before']:10d} {row['frames_per_s']:9.1f} "
                  f"{row['kv_bytes_per_frame']:15,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
