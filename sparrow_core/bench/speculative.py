"""`sparrow-bench speculative`: decode speed of speculative methods against AR as the video grows.

One stream per run grows through the requested visual-token lengths (world frames, with the world's
own caption turns between segments as earlier captions; every visual token stays in the KV, and the
earlier caption turns are kept as a live session keeps them: the model's caption history,
`--caption-history`, 0 = all). At each length, `--captions` new segments are
ingested and each is captioned by every method side by side from the same stream state (the stream is
rolled back between methods; AR runs last and its caption stays, as in a live session). Per method and
length:

    tau                  tokens per target forward (1 for AR)
    decode_tokens_per_s  emitted tokens / decoding wall time (caption prefix + decoding)
    dsr                  decode speed-up: decode_tokens_per_s / AR's
    esr                  end-to-end speed-up incl. prefill: AR's (frame prefill + decode) time over the
                         method's (frame prefill + its drafter's catch-up on the new frames + decode)
    identical_to_ar      greedy only: every caption token-identical to AR's (null when sampling)
    draft / verify / other ms per step   where a step's time goes: proposing the tree (drafter catch-up and
                         levels), the target's tree forward with verification and acceptance, and the rest
                         of the decoding wall time (the caption prefix's forward, sampling, bookkeeping)
    nodes                tree nodes per step, root included; tree: the tree the last step grew

Trees: `--trees SPEC,...` runs every drafter method once per SPEC, as METHOD:SPEC rows (one SPEC: plain
METHOD rows). SPEC is `own` (the drafter's own tree, the default), `auto` (what the engine serves: sized for this
device by `decoding/tree_policy.py` from `--tree-profile FILE`, or the checkpoint's tree_profile.json, as
`sparrow-bench calibrate` writes it; a drafter the profile did not measure grows its own tree), `chainN`,
or `TOTAL/DEPTH/TOP_K` (e.g. 30/4/8).

Drafters: `--drafter [NAME=]DIR`, repeatable (a bare DIR is sparrow's; `eagle=DIR`, `msd=DIR`); by default
`<model>/drafter`, `<model>/drafter-eagle`, `<model>/drafter-msd`. A NAME that is not one of the methods adds
a method of its own (e.g. the paper's Table 6 ablation rows, trained with `sparrow-train drafter
--ablation`). A method whose drafter is missing runs with an untrained random drafter and is flagged
`untrained` (useful only to check the plumbing and the draft cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparrow_core.cli.device import add_run_flags, apply_run_flags, kv_dtype
from sparrow_core.cli.drafter_flag import add_drafter_flag, parse_drafter_flags
from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.decoders import Decoder
from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.drafter import DrafterProposer, TreeSource
from sparrow_core.decoding.proposers.ngram import NgramProposer
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.decoding.tree_policy import DeviceProfile, served_policy
from sparrow_core.engine.caption_history import CaptionHistory, CaptionTurn
from sparrow_core.engine.checkpoint import build_target, default_dtype, load_target
from sparrow_core.engine.default_model import default_config, preprocessor_config
from sparrow_core.engine.layout import CaptionLayout
from sparrow_core.engine.stream import StreamConfig, StreamNeeds, TargetStream
from sparrow_core.engine.target import TargetModel
from sparrow_core.session import DEFAULT_DRAFTER_DIRS, StreamDefaults, load_tree_profile
from sparrow_core.train.data import WorldStreamSpec, world_segments
from sparrow_core.world.tokenizer import build_tokenizer, load_tokenizer

METHODS = ("ar", "ngram", "eagle", "msd", "sparrow")
SEGMENT_SECONDS, FPS = 4.0, 1.0


def random_default_target(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                          kv_dtype: torch.dtype | None = None) -> TargetModel:
    """The default model's architecture with random weights and a freshly built world tokenizer."""
    from transformers import LlavaOnevisionForConditionalGeneration

    tok = load_tokenizer(build_tokenizer(tempfile.mkdtemp(prefix="sparrow-tok-"), segments=300))
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(
        default_config(tok), attn_implementation="sdpa", dtype=torch.float32
    )
    return build_target(model.to(device, dtype or default_dtype(device)).eval(), tok, preprocessor_config(),
                        kv_dtype=kv_dtype)


OWN_TREE, AUTO_TREE = "own", "auto"


def tree_spec(text: str) -> str | TreeConfig:
    """One --trees entry: "own", "auto", "chainN" or "TOTAL/DEPTH/TOP_K" -> OWN_TREE, AUTO_TREE or a TreeConfig."""
    text = text.strip()
    if text in (OWN_TREE, AUTO_TREE):
        return text
    if text.startswith("chain") and text[5:].isdigit():
        return TreeConfig.chain(int(text[5:]))
    try:
        return TreeConfig.parse(text.replace("/", ","))
    except ValueError:
        raise ValueError(f"--trees {text!r}: a tree is own, auto, chainN or TOTAL/DEPTH/TOP_K (e.g. 30/4/8)") from None


def tree_for(spec: str | TreeConfig, method: str, profile: DeviceProfile | None) -> TreeConfig | TreeSource | None:
    """What a drafter method's proposer grows under `spec` (None: the drafter's own tree)."""
    if spec == OWN_TREE:
        return None
    if spec == AUTO_TREE:
        if profile is None:
            raise ValueError("--trees auto needs a profile: --tree-profile FILE (written by sparrow-bench calibrate)")
        return served_policy(profile, method)  # as the engine serves it: the drafter's own tree when not measured
    return spec


def load_decoders(target: TargetModel, methods: list[str], drafter_dirs: dict[str, Path],
                  trees: list[str] | None = None, profile: DeviceProfile | None = None,
                  ) -> tuple[dict[str, Decoder], set[str]]:
    """`methods` and every drafter in `drafter_dirs` (method name -> directory; a name outside `methods`
    is a method of its own), each drafter once per `trees` entry (see `tree_spec`; default: its own tree)
    -> (row name -> decoder, the methods running an untrained random drafter)."""
    specs = [tree_spec(t) for t in (trees or [OWN_TREE])]
    decoders: dict[str, Decoder] = {}
    untrained: set[str] = set()
    drafters: dict[str, TextAnchoredDrafter] = {}
    for m in methods:
        if m == "ar":
            decoders[m] = ARDecoder()
        elif m == "ngram":
            decoders[m] = SpeculativeDecoder(NgramProposer())
        else:
            path = drafter_dirs.get(m) or (target.path / DEFAULT_DRAFTER_DIRS[m] if target.path else None)
            if path is not None and path.is_dir():
                drafters[m] = load_drafter(path, target)
            else:
                torch.manual_seed(0)
                drafters[m] = TextAnchoredDrafter(target, DrafterConfig(variant=m))
                untrained.add(m)
    for name, path in drafter_dirs.items():
        if name not in methods:  # more drafter directories, methods of their own
            drafters[name] = load_drafter(path, target)
    for name, drafter in drafters.items():
        for text, spec in zip(trees or [OWN_TREE], specs):
            row = name if len(specs) == 1 else f"{name}:{text.strip()}"
            decoders[row] = SpeculativeDecoder(DrafterProposer(drafter, tree_for(spec, name, profile)))
    return decoders, untrained


def caption_once(stream: TargetStream, layout: CaptionLayout, history: CaptionHistory, decoder: Decoder,
                 max_tokens: int, sampling: SamplingConfig, seed: int) -> tuple[CaptionTurn, list[int], float, DecodeMetrics]:
    """Open a caption turn (its prefix) and decode; returns (the open turn, tokens, decode seconds, metrics)."""
    g = torch.Generator(stream.target.device).manual_seed(seed)  # draws where the logits are
    metrics = DecodeMetrics()
    t0 = time.perf_counter()
    turn = CaptionTurn(stream, layout, history)
    steps = decoder.decode(stream, turn.logits, max_tokens, layout.stop_ids, sampling, g, metrics)
    tokens = [t for st in steps for t in st.tokens]
    return turn, tokens, time.perf_counter() - t0, metrics


WORLD_SEGMENTS = 256


class WorldHistory:
    """One stream grown through world segments, each followed by the world's own caption turn as an earlier
    caption (kept as a live session keeps them: `caption_history` turns, None = all), the prompt first."""

    def __init__(self, target: TargetModel, needs: StreamNeeds, caption_history: int | None, seed: int) -> None:
        self.target = target
        self.layout = target.caption_layout()
        self.stream = TargetStream(target, StreamConfig(initial_capacity=4096).with_needs(needs))
        self.stream.append_text(self.layout.preamble)
        self.history = CaptionHistory(caption_history)
        self.size = target.image_size or 64
        self._segments = iter(())
        self._world_seed = seed
        self._worlds_done = -1  # media time keeps running across worlds: each new one starts where the last ended

    def next_segment(self):
        for seg in self._segments:
            return dataclasses.replace(seg, times=seg.times + self._worlds_done * WORLD_SEGMENTS * SEGMENT_SECONDS)
        self._world_seed += 1  # a fresh world every WORLD_SEGMENTS segments keeps generation lazy and cheap
        self._worlds_done += 1
        spec = WorldStreamSpec(self._world_seed, WORLD_SEGMENTS, SEGMENT_SECONDS, FPS, size=self.size)
        self._segments = iter(world_segments(spec))
        return self.next_segment()

    def add_caption_turn(self, seg) -> None:
        """The segment's own world caption, as an earlier caption turn."""
        self.history.append_turn(self.stream, self.layout.caption_turn(self.target.encode_text(seg.caption)))

    def grow_to(self, visual_tokens: int, segments_after: int = 0) -> None:
        """Frames and caption turns until the stream holds `visual_tokens` frame slots, less what
        `segments_after` more segments will add."""
        stream = self.stream
        per_segment = max(1, stream.frame_slot_count() // max(stream.frames_ingested, 1)) * int(SEGMENT_SECONDS * FPS)
        while stream.frame_slot_count() + segments_after * per_segment < visual_tokens:
            seg = self.next_segment()
            stream.append_frames(seg.frames, seg.times)
            self.add_caption_turn(seg)
            per_segment = stream.frame_slot_count() // stream.frames_ingested * len(seg.frames)


def run(target: TargetModel, decoders: dict[str, Decoder], lengths: list[int], captions: int, max_tokens: int,
        sampling: SamplingConfig, seed: int, caption_history: int | None = None, log=print) -> list[dict]:
    needs = StreamNeeds()
    for d in decoders.values():
        needs = needs | d.needs
    world = WorldHistory(target, needs, caption_history, seed)
    stream, layout, history = world.stream, world.layout, world.history

    order = [m for m in decoders if m != "ar"] + (["ar"] if "ar" in decoders else [])
    rows = []
    for length in sorted(lengths):
        # history: frames and earlier caption turns up to the length, less what the measured captions add
        t0 = time.perf_counter()
        world.grow_to(length, captions)
        for d in decoders.values():
            d.prefill(stream)  # the drafters catch up with the history (as they would while it streamed)
        log(f"[{length} visual tokens] history built in {time.perf_counter() - t0:.1f}s "
            f"({stream.frame_slot_count()} visual slots, {stream.length} slots)")
        if not rows:  # warm-up (allocations, first-call costs): one untimed caption per method
            for m in order:
                caption_once(stream, layout, history, decoders[m], max_tokens, sampling, seed)[0].cancel()
        acc = {m: {"tokens": 0, "decode_s": 0.0, "e2e_s": 0.0, "metrics": DecodeMetrics(), "captions": [],
                   "tree": None} for m in order}
        visual = []
        for c in range(captions):
            seg = world.next_segment()
            t0 = time.perf_counter()
            stream.append_frames(seg.frames, seg.times)
            frame_s = time.perf_counter() - t0
            visual.append(stream.frame_slot_count())
            for m in order:  # every method captions the same stream state; AR's turn (run last) stays
                d = decoders[m]
                t0 = time.perf_counter()
                d.prefill(stream)  # msd ingests the new frames; sparrow has nothing to do
                catch_up = time.perf_counter() - t0
                turn, tokens, decode_s, metrics = caption_once(stream, layout, history, d, max_tokens, sampling, seed + c)
                a = acc[m]
                a["tokens"] += len(tokens)
                a["decode_s"] += decode_s
                a["e2e_s"] += frame_s + catch_up + decode_s
                a["captions"].append(tokens)
                a["metrics"].merge(metrics)
                proposer = getattr(d, "proposer", None)
                if isinstance(proposer, DrafterProposer):
                    a["tree"] = proposer.tree_for(stream)  # the tree its steps grow at this length
                if m == "ar":
                    turn.close(tokens)
                else:
                    turn.cancel()
            if "ar" not in decoders:  # every caption was rolled back: the world's own caption stands in
                world.add_caption_turn(seg)
        ar = acc.get("ar")
        for m in order:
            a = acc[m]
            spec = a["metrics"] if m != "ar" else None
            tps = a["tokens"] / a["decode_s"]
            row = {
                "method": m,
                "visual_tokens": length,
                "visual_tokens_measured": int(np.mean(visual)),
                "tau": a["metrics"].tau,
                "decode_tokens_per_s": tps,
                "dsr": tps / (ar["tokens"] / ar["decode_s"]) if ar else None,
                "esr": (ar["e2e_s"] / ar["tokens"]) / (a["e2e_s"] / a["tokens"]) if ar else None,
                "identical_to_ar": (a["captions"] == ar["captions"]) if ar and sampling.greedy else None,
                "acceptance_rate": spec.acceptance_rate if spec else None,
                # where the time goes: speed-up = tau * ar_s_per_token / (draft + verify + other per step)
                "draft_s_per_step": spec.draft_s / spec.steps if spec and spec.steps else None,
                "verify_s_per_step": spec.verify_s / spec.steps if spec and spec.steps else None,
                "other_s_per_step": ((a["decode_s"] - spec.draft_s - spec.verify_s) / spec.steps
                                     if spec and spec.steps else None),
                "nodes_per_step": 1 + spec.draft_tokens / spec.steps if spec and spec.steps else None,
                "tree": None if a["tree"] is None else "/".join(
                    str(x) for x in (a["tree"].total_tokens, a["tree"].depth, a["tree"].top_k)),
                "accepted_per_depth": spec.accepted_per_depth if spec else None,
                "ar_s_per_token": ar["decode_s"] / ar["tokens"] if ar else None,
                "captions": captions,
                "caption_history": caption_history,
                "text_slots": stream.length - stream.frame_slot_count(),
                "tokens": a["tokens"],
            }
            rows.append(row)
            log(format_row(row))
    return rows


HEADER = (f"{'method':16s} {'visual':>7s} {'tau':>5s} {'tok/s':>7s} {'dsr':>6s} {'esr':>6s} {'identical':>9s}"
          f" {'draft ms':>8s} {'verify ms':>9s} {'other ms':>8s} {'nodes':>5s} {'tree':>8s} {'ar ms/tok':>9s}")


def format_row(r: dict) -> str:
    f = lambda x: "   n/a" if x is None else f"{x:6.2f}"  # noqa: E731
    same = "n/a" if r["identical_to_ar"] is None else str(r["identical_to_ar"])
    ms = lambda x, w: " " * (w - 3) + "n/a" if x is None else f"{1000 * x:{w}.1f}"  # noqa: E731
    nodes = "  n/a" if r.get("nodes_per_step") is None else f"{r['nodes_per_step']:5.1f}"
    return (f"{r['method']:16s} {r['visual_tokens']:7d} {r['tau']:5.2f} {r['decode_tokens_per_s']:7.1f} "
            f"{f(r['dsr'])} {f(r['esr'])} {same:>9s} {ms(r.get('draft_s_per_step'), 8)} "
            f"{ms(r.get('verify_s_per_step'), 9)} {ms(r.get('other_s_per_step'), 8)} {nodes} "
            f"{r.get('tree') or '-':>8s} {ms(r.get('ar_s_per_token'), 9)}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["visual_tokens"], r["dsr"]) for r in rows if r["method"] == m and r["dsr"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens in the stream")
    ax.set_ylabel("decode speed-up over AR (dsr)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-bench speculative", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target checkpoint dir (default: the embedded model)")
    p.add_argument("--random-target", action="store_true", help="the default architecture with random weights")
    add_drafter_flag(p)
    p.add_argument("--visual-tokens", default="500,1500,5000,10000,25000")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--captions", type=int, default=3, help="captions per length (per method)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--trees", default=OWN_TREE,
                   help="the drafters' trees, one row each: own, auto (needs a tree profile), chainN, TOTAL/DEPTH/TOP_K")
    p.add_argument("--caption-history", type=int, default=None,
                   help="earlier caption turns kept in the KV (default: the model's; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="PNG of dsr vs visual tokens (default: next to --json)")
    add_run_flags(p)
    args = p.parse_args(argv)
    device, dtype = apply_run_flags(args, p)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    if args.random_target:
        target = random_default_target(device, dtype, kv_dtype(args))
    else:
        target = load_target(args.model, device=device, dtype=dtype, kv_dtype=kv_dtype(args))
    try:
        profile = load_tree_profile(target, args.tree_profile)
        decoders, untrained = load_decoders(target, methods, parse_drafter_flags(args.drafter),
                                            args.trees.split(","), profile)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    if untrained:
        print(f"warning: no trained drafter for {sorted(untrained)}: using random ones", file=sys.stderr)
    sampling = SamplingConfig(args.temperature, args.top_p)
    lengths = [int(x) for x in args.visual_tokens.split(",")]
    print(HEADER)
    history = args.caption_history
    if history is None:
        history = StreamDefaults.for_model(target.path).caption_history
    rows = run(target, decoders, lengths, args.captions, args.max_tokens, sampling, args.seed, history or None)
    for r in rows:
        r["untrained"] = r["method"].partition(":")[0] in untrained
        r["model"] = target.name()
        r["temperature"] = args.temperature
        r["kv_dtype"] = str(target.kv_dtype or target.dtype).removeprefix("torch.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    png = Path(args.plot) if args.plot else (Path(args.json).with_suffix(".png") if args.json else None)
    if png is not None:
        plot(rows, png, f"{target.name()}, T={args.temperature}")
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
