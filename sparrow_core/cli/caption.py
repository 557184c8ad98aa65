"""`sparrow-caption VIDEO`: timed running captions of a video file, printed as they are decoded.

Decodes any file PyAV reads, streams it through the engine frame by frame (the frames' KV is prefilled
as they arrive, so each caption only decodes), and prints WebVTT (default), SRT or JSONL. With no
VIDEO, `--world-seed N` renders a procedural-world clip to a temporary mp4 and captions that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from sparrow_core.cli.device import add_run_flags, apply_run_flags, kv_dtype
from sparrow_core.cli.drafter_flag import add_drafter_flag, parse_drafter_flags
from sparrow_core.offline import caption_frames
from sparrow_core.session import CaptionEngine, SessionConfig
from sparrow_core.subtitles import Cue, render


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-caption", description=__doc__.split("\n\n")[0])
    p.add_argument("video", nargs="?", help="video file (mp4, webm, mkv, ...)")
    p.add_argument("--world-seed", type=int, default=None, help="no file: caption a generated world clip")
    p.add_argument("--seconds", type=float, default=24.0, help="length of the generated clip")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    add_drafter_flag(p)
    p.add_argument("--format", choices=["vtt", "srt", "jsonl"], default="vtt")
    p.add_argument("--decoding", default="auto",
                   help="ar, ngram, a loaded drafter's name (sparrow, eagle, msd, ...) or auto (sparrow if loaded, else ar)")
    p.add_argument("--every", type=float, default=None, help="seconds of media per caption")
    p.add_argument("--fps", type=float, default=None, help="frames per second sent to the model")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--instruction", default=None, help="the user turn captions answer (default: the layout's)")
    p.add_argument("--visual-token-budget", type=int, default=None)
    p.add_argument("--caption-history", type=int, default=None, help="earlier caption turns kept (0 = all)")
    p.add_argument("--max-kv-mb", type=float, default=None,
                   help="the most MB the stream's KV may reach in the worst case; a config over it is refused")
    p.add_argument("--out", default=None, help="also write the captions to this file")
    add_run_flags(p)
    args = p.parse_args(argv)
    device, dtype = apply_run_flags(args, p)
    if (args.video is None) == (args.world_seed is None):
        p.error("give a VIDEO file or --world-seed N")
    from sparrow_core.world.video_io import read_video, write_world_clip

    tmp = None
    video = args.video
    if video is None:
        tmp = tempfile.TemporaryDirectory()
        video = str(Path(tmp.name) / f"world-{args.world_seed}.mp4")
        write_world_clip(video, seed=args.world_seed, seconds=args.seconds, fps=30, size=256)
    elif not Path(video).is_file():
        p.error(f"no such file: {video}")

    try:  # a bad checkpoint or drafter is one line, not a traceback
        engine = CaptionEngine.load(args.model, parse_drafter_flags(args.drafter), device=device, dtype=dtype,
                                    tree_profile=args.tree_profile, kv_dtype=kv_dtype(args))
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    defaults = engine.defaults
    config = SessionConfig(
        instruction=args.instruction,
        max_caption_tokens=args.max_tokens,  # None: the model's default
        temperature=args.temperature,
        decoding=args.decoding,
        visual_token_budget=args.visual_token_budget,  # None: the model's default; 0: no budget
        caption_history=args.caption_history,  # None: the model's default; 0: every caption stays
        max_kv_bytes=None if args.max_kv_mb is None else int(args.max_kv_mb * 2**20),
    )
    try:
        print(f"# {engine.describe_defaults(config)}", file=sys.stderr, flush=True)
        session = engine.open_session(config)
    except ValueError as exc:  # a config the KV cap refuses, an unknown decoding method
        print(f"sparrow-caption: {exc}", file=sys.stderr)
        return 2
    every = args.every if args.every is not None else defaults.caption_every_s
    fps = args.fps if args.fps is not None else defaults.sampling_fps
    cues: list[Cue] = []
    t0 = time.perf_counter()
    try:
        if args.format == "vtt":
            print("WEBVTT\n", flush=True)
        for cue in caption_frames(session, read_video(video), every, fps):
            cues.append(cue)
            body = render([cue], args.format)
            if args.format == "vtt":
                body = body.removeprefix("WEBVTT\n\n")
            elif args.format == "srt":
                body = body.replace("1\n", f"{len(cues)}\n", 1)
            print(body.rstrip("\n") + ("\n" if args.format != "jsonl" else ""), flush=True)
    finally:
        st = session.stats()
        session.close()
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t0
    media_s = cues[-1].end_s if cues else 0.0  # the captions tile the media from 0 (timeline's span rule)
    print(
        f"# {len(cues)} captions, {media_s:.1f}s of media in {wall:.1f}s, decoding={session.decoding}, "
        f"tau={session.metrics.tau or 0:.2f}, KV tokens={st.slots}",
        file=sys.stderr,
    )
    if args.out:
        from sparrow_core.subtitles import write_subtitles

        write_subtitles(args.out, cues)
    return 0


if __name__ == "__main__":
    sys.exit(main())
