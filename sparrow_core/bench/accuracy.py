"""`sparrow-bench accuracy`: caption accuracy of a target on held-out procedural-world streams.

For each held-out seed, a stream of `--segments` captioned segments is decoded greedily through a
`CaptionSession` (the serving path) and each caption is scored against the segment's ground-truth facts
(`world.captions.score_caption`: colour / shape / object / motion / event / count, and word F1 against
a reference caption). Rows:

- `normal`: the stream from the start of the world.
- `blank`: the same streams with every frame replaced by a uniform grey frame (grounding control:
  accuracy must fall to what the text context alone gives).
- `ctx=K`: the evaluated segments sit behind K visual tokens of preceding stream of the same world
  (its frames prefilled, its captions in the stream as text, as a live stream would hold them), with the
  model's visual budget (`budget`) and caption history (`history`: earlier caption turns kept), and for
  the largest K without a visual budget (`nobudget`: all K in the KV) and, with `--all-captions`,
  keeping every earlier caption (`allcaptions`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np

from sparrow_core.cli.device import add_run_flags, apply_run_flags, kv_dtype
from sparrow_core.session import CaptionEngine, SessionConfig, StreamDefaults
from sparrow_core.train.data import WorldStreamSpec, world_segments
from sparrow_core.world.captions import score_caption

HELD_OUT_SEED_BASE = 1_000_000  # training draws seeds < 2**31 at random; eval seeds are fixed
ATTRIBUTES = ("colour", "shape", "object", "motion", "event", "count", "facts", "word_f1")


@dataclass
class Row:
    name: str
    context_visual_tokens: int
    budget: int | None
    caption_history: int | None
    captions: int
    scores: dict[str, float]
    seconds: float


def eval_row(engine: CaptionEngine, name: str, seeds: list[int], segments: int, context_tokens: int,
             budget: int | None, history: int | None, blank: bool, defaults: StreamDefaults) -> Row:
    tpf = engine.target.tokens_per_frame
    fps = defaults.sampling_fps or 1.0
    seg_s = defaults.caption_every_s
    context_segments = int(round(context_tokens / (tpf * fps * seg_s)))
    totals = {k: 0.0 for k in ATTRIBUTES}
    n = 0
    t0 = time.perf_counter()
    for seed in seeds:
        segs = world_segments(WorldStreamSpec(seed=seed, segments=context_segments + segments,
                                              segment_seconds=seg_s, fps=fps))
        session = engine.open_session(SessionConfig(decoding="ar", visual_token_budget=budget, caption_history=history))
        try:
            for i, seg in enumerate(segs):
                frames = seg.frames
                if blank:
                    frames = np.full_like(frames, 128)
                session.ingest(frames, seg.times)
                if i < context_segments:
                    # the preceding stream's captions, as a live stream would already hold them
                    session.append_caption(seg.caption, seg.segment.t1)
                    continue
                pred = session.caption(seg.segment.t1).text
                s = score_caption(pred, seg.segment.facts, reference=seg.caption)
                for k in ATTRIBUTES:
                    totals[k] += s[k]
                n += 1
        finally:
            session.close()
    return Row(name, context_segments * int(seg_s * fps) * tpf, budget, history, n,
               {k: round(v / max(n, 1), 4) for k, v in totals.items()}, round(time.perf_counter() - t0, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-bench accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--context", default="1000,5000,10000,25000", help="visual tokens of preceding stream")
    p.add_argument("--all-captions", action="store_true", help="add a row keeping every earlier caption at the largest K")
    p.add_argument("--json", default=None)
    add_run_flags(p)
    args = p.parse_args(argv)
    device, dtype = apply_run_flags(args, p)
    engine = CaptionEngine.load(args.model, device=device, dtype=dtype)
    engine.target.kv_dtype = kv_dtype(args)
    defaults = engine.defaults
    seeds = [HELD_OUT_SEED_BASE + i for i in range(args.streams)]
    contexts = [int(x) for x in args.context.split(",") if x]
    budget, history = defaults.visual_token_budget, defaults.caption_history
    # budget 0 = no budget: every visual token of the context stays in the KV; history 0 = every caption
    plan = [("normal", 0, budget, history, False), ("blank", 0, budget, history, True)]
    plan += [(f"ctx={k}", k, budget, history, False) for k in contexts]
    if contexts:
        plan.append((f"ctx={max(contexts)} nobudget", max(contexts), 0, history, False))
        if args.all_captions:
            plan.append((f"ctx={max(contexts)} allcaptions", max(contexts), budget, 0, False))
    rows = []
    print(f"{'row':26s} {'ctx tokens':>10s} {'budget':>7s} {'history':>7s} {'n':>3s} " + " ".join(f"{a:>7s}" for a in ATTRIBUTES) + "   secs")
    for name, ctx, bud, hist, blank in plan:
        r = eval_row(engine, name, seeds, args.segments, ctx, bud, hist, blank, defaults)
        rows.append(r)
        print(f"{r.name:26s} {r.context_visual_tokens:10d} {str(r.budget):>7s} {str(r.caption_history):>7s} {r.captions:3d} "
              + " ".join(f"{r.scores[a]:7.3f}" for a in ATTRIBUTES) + f" {r.seconds:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)
    return 0
