"""`sparrow-bench accuracy`: caption accuracy of a target on held-out procedural-world streams.

For each held-out seed, a stream of `--segments` captioned segments is decoded greedily through a
`CaptionSession` (the serving path) and each caption is scored against the segment's ground-truth facts
(`world.captions.score_caption`: colour / shape / object / motion / event / count, and word F1 against
a reference caption). Every row also counts invented references: captions with a relative clause about
an event ('the yellow square that was blue before') that is not in the caption's context, i.e. in no
segment whose caption or frames the session still holds (`world.facts.reference_supported`), split into
the stream's first caption (nothing is in its context) and later ones (`--json` lists each flagged caption
with its seed and segment); and self-contradictions (an object
said to enter from one side and to move toward that same side, with no bounce or collision). Rows:

- `normal`: the stream from the start of the world.
- `first`: `--first-streams` more streams, their first caption only (invented references need many).
- `blank`: the same streams with every frame replaced by a uniform grey frame (grounding control:
  accuracy must fall to what the text context alone gives).
- `camera`: robustness, streams of the camera-like world (`world.config.CAMERA_WORLD`: objects appear and
  vanish in place, jittered hues, brightness and sizes) at other frame sizes and aspect ratios (resized by
  the model's processor) and frame rates (`CAMERA_FRAME_SIZES`, `CAMERA_FPS`, cycled over the streams),
  from seeds of their own.
- `view=K`: K visual tokens in view: the visual budget set to K and K tokens of preceding stream to fill it.
- `ctx=K`: the evaluated segments sit behind K visual tokens of preceding stream of the same world
  (its frames prefilled, its captions in the stream as text, as a live stream would hold them: each written
  holding the `history` turns before it, `train.data.world_segments`), with the
  model's visual budget (`budget`) and caption history (`history`: earlier caption turns kept), and for
  the largest K without a visual budget (`nobudget`: all K in the KV) and, with `--all-captions`,
  keeping every earlier caption (`allcaptions`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import numpy as np

from sparrow_core.cli.device import add_run_flags, apply_run_flags, kv_dtype
from sparrow_core.session import CaptionEngine, SessionConfig, StreamDefaults
from sparrow_core.train.data import CaptionedSegment, WorldStreamSpec, world_segments
from sparrow_core.world.caption_parse import parse_caption
from sparrow_core.world.captions import score_caption
from sparrow_core.world.config import CAMERA_FPS, CAMERA_FRAME_SIZES, CAMERA_WORLD
from sparrow_core.world.facts import CaptionFacts, SegmentFacts, reference_supported
from sparrow_core.world.palette import SIDE_OF_DIRECTION

# training draws seeds < 2**31 at random (a few thousand a run); eval seeds are fixed, each row's own block
HELD_OUT_SEED_BASE = 1_000_000
FIRST_SEED_BASE = 1_500_000  # the `first` row's streams
CAMERA_SEED_BASE = 2_000_000  # the `camera` (robustness) row's streams
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
    first_captions: int = 0  # the streams' first captions among `captions`
    invented_first: float | None = None  # share of first captions with a reference to an event not in context
    invented_later: float | None = None  # the same over the later captions
    contradictions: float = 0.0  # share of captions that contradict themselves (enter from S, move toward S)
    invented: list[dict] = field(default_factory=list)  # each flagged caption: seed, segment, text (in --json)


@dataclass(frozen=True)
class StreamPlan:
    """How a row draws its streams: seeds, and the world, frame size and rate of stream k."""

    seeds: tuple[int, ...]
    camera: bool = False
    first_only: bool = False  # evaluate the first caption alone (the `first` row)

    def spec(self, k: int, segments: int, segment_seconds: float, fps: float) -> WorldStreamSpec:
        if not self.camera:
            return WorldStreamSpec(seed=self.seeds[k], segments=segments, segment_seconds=segment_seconds, fps=fps)
        return WorldStreamSpec(seed=self.seeds[k], segments=segments, segment_seconds=segment_seconds,
                               fps=CAMERA_FPS[k % len(CAMERA_FPS)], size=CAMERA_FRAME_SIZES[k % len(CAMERA_FRAME_SIZES)],
                               config=CAMERA_WORLD)


def in_context(segs: list[CaptionedSegment], i: int, budget: int | None, history: int | None,
               tokens_per_frame: int) -> list[SegmentFacts]:
    """Facts of the segments a session holds when it captions segment i: i itself, the `history` newest
    earlier captions (None: all) and the segments with a frame among the newest `budget` visual tokens."""
    first_caption = 0 if history is None else max(0, i - history)
    first_frames, frames = i, (budget // tokens_per_frame) if budget else None
    while first_frames > 0 and (frames is None or frames > len(segs[first_frames].frames)):
        if frames is not None:
            frames -= len(segs[first_frames].frames)
        first_frames -= 1
    return [s.segment.facts for s in segs[min(first_caption, first_frames):i + 1]]


def contradicts_itself(cf: CaptionFacts) -> bool:
    """An object said to enter from a side and to move toward that same side, with no bounce or collision
    of it said to turn it around."""
    for f in cf.facts:
        if f.kind != "enter":
            continue
        turned = any(g.kind in ("bounce", "collide") and f.obj in (g.obj, g.other) for g in cf.facts)
        toward = any(g.kind == "move" and g.obj == f.obj and SIDE_OF_DIRECTION[g.detail] == f.detail for g in cf.facts)
        if toward and not turned:
            return True
    return False


def eval_row(engine: CaptionEngine, name: str, plan: StreamPlan, segments: int, context_tokens: int,
             budget: int | None, history: int | None, blank: bool, defaults: StreamDefaults) -> Row:
    tpf = engine.target.tokens_per_frame
    fps = defaults.sampling_fps or 1.0
    seg_s = defaults.caption_every_s
    context_segments = int(round(context_tokens / (tpf * fps * seg_s)))
    config = SessionConfig(decoding="ar", visual_token_budget=budget, caption_history=history)
    kept_budget, kept_history = engine.visual_token_budget(config), engine.caption_history(config)
    totals = {k: 0.0 for k in ATTRIBUTES}
    n = 0
    invented = {True: [0, 0], False: [0, 0]}  # first caption? -> [with an invented reference, captions]
    flagged: list[dict] = []
    contradictions = 0
    t0 = time.perf_counter()
    for k in range(len(plan.seeds)):
        # captions as a session keeping `kept_history` turns writes them: the preceding stream's, fed as text,
        # refer back only to events whose own turn was held when they were written (as the model learnt)
        segs = world_segments(plan.spec(k, context_segments + segments, seg_s, fps), caption_history=kept_history)
        session = engine.open_session(config)
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
                for a in ATTRIBUTES:
                    totals[a] += s[a]
                n += 1
                parsed = parse_caption(pred)
                context = in_context(segs, i, kept_budget, kept_history, tpf)
                made_up = any(not reference_supported(r, seg.segment.facts, context) for r in parsed.references)
                invented[i == 0][0] += made_up
                if made_up:
                    flagged.append({"seed": plan.seeds[k], "segment": i, "caption": pred})
                invented[i == 0][1] += 1
                contradictions += contradicts_itself(parsed)
                if plan.first_only:
                    break
        finally:
            session.close()
    share = lambda first: round(invented[first][0] / invented[first][1], 4) if invented[first][1] else None  # noqa: E731
    return Row(name, context_segments * int(seg_s * fps) * tpf, budget, history, n,
               {k: round(v / max(n, 1), 4) for k, v in totals.items()}, round(time.perf_counter() - t0, 1),
               invented[True][1], share(True), share(False), round(contradictions / max(n, 1), 4), flagged)


def _fmt(share: float | None) -> str:
    return "    -" if share is None else f"{share:5.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-bench accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--first-streams", type=int, default=24, help="streams of the `first` row (0: no row)")
    p.add_argument("--camera-streams", type=int, default=None, help="streams of the `camera` row (default --streams; 0: no row)")
    p.add_argument("--rows", default="normal,first,blank,camera,view,ctx",
                   help="which row groups to run: normal, first, blank, camera, view, ctx")
    p.add_argument("--in-view", default="408,1024,2048,4096", help="visual tokens in view of the view=K rows")
    p.add_argument("--context", default="1000,5000,10000,25000", help="visual tokens of preceding stream")
    p.add_argument("--all-captions", action="store_true", help="add a row keeping every earlier caption at the largest K")
    p.add_argument("--json", default=None)
    add_run_flags(p)
    args = p.parse_args(argv)
    device, dtype = apply_run_flags(args, p)
    engine = CaptionEngine.load(args.model, device=device, dtype=dtype, kv_dtype=kv_dtype(args))
    defaults = engine.defaults
    groups = set(args.rows.split(","))
    streams = StreamPlan(tuple(HELD_OUT_SEED_BASE + i for i in range(args.streams)))
    first = StreamPlan(tuple(FIRST_SEED_BASE + i for i in range(args.first_streams)), first_only=True)
    n_camera = args.streams if args.camera_streams is None else args.camera_streams
    camera = StreamPlan(tuple(CAMERA_SEED_BASE + i for i in range(n_camera)), camera=True)
    in_view = [int(x) for x in args.in_view.split(",") if x]
    contexts = [int(x) for x in args.context.split(",") if x]
    budget, history = defaults.visual_token_budget, defaults.caption_history
    # budget 0 = no budget: every visual token of the context stays in the KV; history 0 = every caption
    plan = []
    if "normal" in groups:
        plan.append(("normal", streams, 0, budget, history, False))
    if "first" in groups and first.seeds:
        plan.append(("first", first, 0, budget, history, False))
    if "blank" in groups:
        plan.append(("blank", streams, 0, budget, history, True))
    if "camera" in groups and camera.seeds:
        plan.append(("camera", camera, 0, budget, history, False))
    if "view" in groups:
        plan += [(f"view={k}", streams, k, k, history, False) for k in in_view]
    if "ctx" in groups and contexts:
        plan += [(f"ctx={k}", streams, k, budget, history, False) for k in contexts]
        plan.append((f"ctx={max(contexts)} nobudget", streams, max(contexts), 0, history, False))
        if args.all_captions:
            plan.append((f"ctx={max(contexts)} allcaptions", streams, max(contexts), budget, 0, False))
    rows = []
    print(f"{'row':26s} {'ctx tokens':>10s} {'budget':>7s} {'history':>7s} {'n':>3s} "
          + " ".join(f"{a:>7s}" for a in ATTRIBUTES) + "  inv1st invlater contra   secs")
    for name, streams_of_row, ctx, bud, hist, blank in plan:
        r = eval_row(engine, name, streams_of_row, 1 if streams_of_row.first_only else args.segments, ctx, bud, hist,
                     blank, defaults)
        rows.append(r)
        print(f"{r.name:26s} {r.context_visual_tokens:10d} {str(r.budget):>7s} {str(r.caption_history):>7s} {r.captions:3d} "
              + " ".join(f"{r.scores[a]:7.3f}" for a in ATTRIBUTES)
              + f"   {_fmt(r.invented_first)}   {_fmt(r.invented_later)}  {r.contradictions:5.3f} {r.seconds:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)
    return 0
