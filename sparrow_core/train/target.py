"""Train the embedded default target on procedural-world streams (`sparrow-train target`).

Two stages share the `minutes` budget. Stage 1 (`vision.py`, `vision_minutes`) trains the
SigLIP tower alone on labelled scenes, as real video LLMs start from a pretrained vision encoder. Stage 2,
below, trains the whole model on captioned streams, the tower at `vision_lr_mult` of the learning rate.

A training sequence is a stream in the layout of `engine/layout.py`:

    [preamble] ([frames of segment i] [caption turn i])  for i = 1..n

Loss is next-token cross-entropy on caption tokens and their end token only. Frames are encoded per
frame exactly as the stream engine does (one-frame videos through the model's own video path), so
training and inference see the same slots.

Long streams without long sequences. Under a visual budget the engine's KV holds the preamble, the text
of every earlier caption, and only the newest frames — at positions that keep growing. Half the
sequences are built in that shape: the first segments keep their captions but lose their frames, and
the recent part is shifted by a random gap of up to `max_gap` positions, as if thousands of frames had
been evicted in between. The model thus learns to caption the newest frames at any stream position,
with old captions far behind it.

Grounding. Trained on captions alone, a small model from scratch learns the caption language long before
it learns to look: the frames are noise to it at first, it learns to ignore them, and the projector's
output drifts to a large constant vector (norm ~1000 against text embeddings of ~2) that no layer can
write into. A dense auxiliary objective prevents that from the first step: at every visual slot the
LM's own head, applied to its last hidden state, must name what the frame shows (colour, shape, size,
texture of every object of the segment, and the background), as a bag of words. The target over those
content words is uniform over the ones present; a frame's logits are the log-sum-exp over its slots.
Nothing is added to the model: the checkpoint stays a plain LLaVA-OneVision, and captions can copy the
words the frames' slots already carry.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparrow_core.cli.device import add_device_flags, device_and_dtype, parse_device, parse_dtype
from sparrow_core.engine.checkpoint import build_target
from sparrow_core.engine.default_model import default_config, preprocessor_config
from sparrow_core.engine.layout import CAPTION_END, CAPTION_PREFIX, CAPTION_SUFFIX, preamble_text
from sparrow_core.session import STREAM_DEFAULTS_FILE, StreamDefaults
from sparrow_core.train.data import CaptionedSegment, WorldStreamSpec, backed_by, world_segments
from sparrow_core.train.flags import add_config_flags
from sparrow_core.train.schedule import run_progress, warmup_cosine
from sparrow_core.train.vision import VisionPretrainConfig, pretrain_vision
from sparrow_core.world.config import CAMERA_FPS, CAMERA_FRAME_SIZES, CAMERA_WORLD
from sparrow_core.world.facts import SegmentFacts
from sparrow_core.world.lexicon import BACKGROUND_WORDS, COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, TEXTURE_WORDS
from sparrow_core.world.tokenizer import build_tokenizer

IGNORE = -100


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    minutes: float = 45.0
    max_steps: int = 100000
    batch: int = 6
    lr: float = 1.5e-3
    warmup: int = 60
    min_segments: int = 3
    max_segments: int = 6
    segment_seconds: float = 4.0
    fps: float = 1.0
    history_prob: float = 0.5
    single_segment_prob: float = 0.0  # share of one-segment samples (grounding: nothing to copy from)
    vision_minutes: float = 8.0  # stage 1 (`vision.py`), part of `minutes`; 0 = none
    vision_max_steps: int = 1_000_000  # stage 1 also stops here
    vision_lr_mult: float = 0.2  # stage 2 learning-rate factor for the vision tower (projector: 1)
    init: str = ""  # start from this checkpoint's weights (and tokenizer) instead of random
    max_gap: int = 30000
    # the long-context stage: a share of the sequences hold many segments' frames in view, as a stream under a
    # large visual budget does, and keep only the newest caption turns, as the stream's caption history does
    long_prob: float = 0.0  # share of long sequences (0 = the short-context recipe alone)
    long_min_tokens: int = 408  # visual tokens in view of a long sequence: log-uniform in [min, max]
    long_max_tokens: int = 4096
    caption_history: int = 5  # a long sequence keeps this many earlier caption turns (older ones evicted)
    camera_prob: float = 0.0  # share of sequences from the camera-like world (world.config.CAMERA_WORLD)
    attention: str = "eager"  # the LM's attention kernel in training ("sdpa" holds long sequences in less memory)
    checkpoint_every: int = 50
    snapshot_every: int = 0  # also export a loadable checkpoint to OUT/snapshot every this many steps (0 = never)
    grounding_weight: float = 0.5  # weight of the auxiliary frame-naming loss (0 = captions only)
    grounding_regions: bool = False  # a frame also names the 3x3 region of each object in it (where, not only what)
    threads: int = 0  # 0 = torch default
    device: str = "cpu"
    dtype: str | None = None  # autocast dtype of the forward (bfloat16 / float16); weights and optimizer stay fp32


@dataclass
class Sample:
    """One sequence: interleaved pieces, already laid out."""

    ids: list[int]  # [T] token ids (frame slots hold the video placeholder id)
    labels: list[int]  # [T] next-token targets (IGNORE where no loss)
    positions: list[int]  # [T]
    frame_slots: list[int]  # indices in ids where frame blocks start
    frames: np.ndarray  # [F, H, W, 3] uint8, in order
    frame_words: list[list[str]]  # [F] canonical content words of each frame's segment (grounding loss)
    stream: list[SegmentFacts]  # [n] facts of the stream's segments, in order
    caption_turns: list[tuple[int, str, bool]]  # (segment in `stream`, caption, learned) of each turn it holds, in order


CONTENT_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys([*COLOUR_WORDS, *SHAPE_WORDS, *SIZE_WORDS, *TEXTURE_WORDS, *BACKGROUND_WORDS])
)


REGION_WORDS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")


def grounding_words(cfg: TrainConfig) -> tuple[str, ...]:
    """The words the grounding loss has frames name."""
    return CONTENT_WORDS + REGION_WORDS if cfg.grounding_regions else CONTENT_WORDS


def frame_region_words(seg: CaptionedSegment) -> list[list[str]]:
    """[n] per frame of the segment: the region words of the objects in it ('top left' -> top, left)."""
    return [sorted({w for region in regions for w in region.split()}) for regions in seg.segment.regions]


def segment_words(seg: CaptionedSegment) -> list[str]:
    """What a frame of this segment shows, as canonical words: objects' colours, shapes, sizes, textures,
    and the background."""
    facts = seg.segment.facts
    words = {facts.background, facts.background_start}
    for obj in facts.objects:
        words.update(obj.colours)
        words.update((obj.shape, obj.size, obj.texture))
    return sorted(words)


def content_word_ids(tokenizer, words: tuple[str, ...] = CONTENT_WORDS) -> torch.Tensor:
    """[C] token id of each of `words` as it appears mid-caption (one token each)."""
    ids = []
    for w in words:
        enc = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"content word {w!r} is not one token for this tokenizer: {enc}")
        ids.append(enc[0])
    return torch.tensor(ids)


def _stream_spec(rng: np.random.Generator, cfg: TrainConfig, camera: bool) -> WorldStreamSpec:
    """Where a training stream comes from (its world, frame size and rate); `segments` is set by the caller.
    Half the streams start mid-world (their captions refer back only to what is inside them)."""
    seed = int(rng.integers(1 << 31))
    start = float(rng.uniform(0, 40)) if rng.random() < 0.5 else 0.0
    if not camera:
        return WorldStreamSpec(seed=seed, segments=0, segment_seconds=cfg.segment_seconds, fps=cfg.fps,
                               start_seconds=start)
    size = CAMERA_FRAME_SIZES[int(rng.integers(len(CAMERA_FRAME_SIZES)))]
    fps = CAMERA_FPS[int(rng.integers(len(CAMERA_FPS)))]
    return WorldStreamSpec(seed=seed, segments=0, segment_seconds=cfg.segment_seconds, fps=fps, start_seconds=start,
                           size=size, config=CAMERA_WORLD)


def build_sample(tokenizer, video_token_id: int, tokens_per_frame: int, rng: np.random.Generator, cfg: TrainConfig) -> Sample:
    """One training stream. Three shapes: short (3 to 6 segments, or one with `single_segment_prob`), the
    same with its first segments' frames evicted behind a position gap (`history_prob`), and long
    (`long_prob`): every segment's frames in view, `long_min_tokens`..`long_max_tokens` visual tokens, and
    only the newest `caption_history` earlier caption turns kept."""
    camera = rng.random() < cfg.camera_prob
    spec = _stream_spec(rng, cfg, camera)
    frames_per_segment = max(1, round(spec.segment_seconds * spec.fps))
    long = rng.random() < cfg.long_prob
    if long:
        low, high = np.log(cfg.long_min_tokens), np.log(max(cfg.long_max_tokens, cfg.long_min_tokens))
        in_view = float(np.exp(rng.uniform(low, high)))
        n_seg = max(1, int(in_view // (tokens_per_frame * frames_per_segment)))
    elif rng.random() < cfg.single_segment_prob:
        n_seg = 1  # a first caption: no earlier captions to copy from, only the frames
    else:
        n_seg = int(rng.integers(cfg.min_segments, cfg.max_segments + 1))
    # a long stream's caption turns older than the caption history are evicted (frames kept). Each caption is
    # written as a live session writes it, holding the `caption_history` turns before it, so a kept turn may
    # refer to an event whose own turn is evicted now: such a turn stays as history, unlearned, and the
    # learned turns after it (which refer back only to events whose turn the sequence holds) do not repeat it
    first_caption = max(0, n_seg - 1 - cfg.caption_history) if long else 0
    segments = world_segments(replace(spec, segments=n_seg), rng, caption_history=cfg.caption_history if long else None)
    evict = not long and rng.random() < cfg.history_prob and n_seg > 1
    n_old = int(rng.integers(1, n_seg)) if evict else 0  # segments whose frames are evicted (captions kept)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    prefix, end, suffix = enc(CAPTION_PREFIX), enc(CAPTION_END), enc(CAPTION_SUFFIX)

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    frame_slots: list[int] = []
    frames: list[np.ndarray] = []
    frame_words: list[list[str]] = []
    caption_turns: list[tuple[int, str, bool]] = []
    pos = 0

    def put(tokens: list[int], learn: bool) -> None:
        nonlocal pos
        ids.extend(tokens)
        positions.extend(range(pos, pos + len(tokens)))
        pos += len(tokens)
        labels.extend([IGNORE] * len(tokens))
        if learn:  # label slot j with token j+1: the model predicts each learned token from the one before
            start = len(ids) - len(tokens)
            for j in range(len(tokens)):
                labels[start + j - 1] = tokens[j]

    put(enc(preamble_text()), learn=False)
    if evict or (long and rng.random() < cfg.history_prob):
        pos += int(rng.integers(0, cfg.max_gap))  # evicted history before what the sequence holds
    for i, seg in enumerate(segments):
        n_frames = len(seg.frames)
        if i < n_old:
            pos += n_frames * tokens_per_frame  # frames evicted: their positions stay taken
        else:
            frame_slots.append(len(ids))
            ids.extend([video_token_id] * (n_frames * tokens_per_frame))
            labels.extend([IGNORE] * (n_frames * tokens_per_frame))
            positions.extend(range(pos, pos + n_frames * tokens_per_frame))
            pos += n_frames * tokens_per_frame
            frames.append(seg.frames)  # at the stream's own size: the target's processor resizes them
            if cfg.grounding_regions:
                frame_words.extend(segment_words(seg) + where for where in frame_region_words(seg))
            else:
                frame_words.extend([segment_words(seg)] * n_frames)
        caption = enc(seg.caption)
        if i < first_caption:  # caption turn evicted: its positions stay taken
            pos += len(prefix) + len(caption) + len(end) + len(suffix)
            continue
        learn = i >= n_old and backed_by(seg, [s.segment.facts for s in segments[first_caption:i]])
        put(prefix, learn=False)
        put(caption + end, learn=learn)
        put(suffix, learn=False)
        caption_turns.append((i, seg.caption, learn))
    return Sample(ids, labels, positions, frame_slots, np.concatenate(frames, axis=0), frame_words,
                  [seg.segment.facts for seg in segments], caption_turns)


def grounding_loss(target, hidden: torch.Tensor, frame_mask: torch.Tensor, samples: list[Sample],
                   word_ids: torch.Tensor, words: tuple[str, ...] = CONTENT_WORDS) -> torch.Tensor:
    """Cross-entropy of each frame's pooled content-word logits against the words it shows.

    hidden [B, T, H]; frame_mask [B, T] marks visual slots, `tokens_per_frame` per frame in frame order.
    """
    per_frame = target.tokens_per_frame
    vis = hidden[frame_mask].reshape(-1, per_frame, hidden.shape[-1])  # [F, S, H]
    logits = target.lm_head(vis)[..., word_ids].float()  # [F, S, C]
    frame_logits = torch.logsumexp(logits, dim=1)  # [F, C]: "some slot of this frame shows word c"
    index = {w: i for i, w in enumerate(words)}
    want = torch.zeros_like(frame_logits)  # [F, C] uniform over the words present
    words = [ws for s in samples for ws in s.frame_words]
    for f, ws in enumerate(words):
        want[f, [index[w] for w in ws]] = 1.0 / len(ws)
    return torch.nn.functional.cross_entropy(frame_logits, want)


def batch_loss(target, samples: list[Sample], pad_id: int, word_ids: torch.Tensor | None = None,
               words: tuple[str, ...] = CONTENT_WORDS) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Mean next-token loss over labelled slots of a batch of samples, the grounding loss (when the
    content words' ids are given) and the number of labels."""
    model = target.model
    max_len = max(len(s.ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, max_len), pad_id, dtype=torch.long)
    labels = torch.full((b, max_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, max_len), dtype=torch.long)
    attn = torch.zeros((b, max_len), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        labels[i, :n] = torch.tensor(s.labels)
        pos[i, :n] = torch.tensor(s.positions)
        attn[i, :n] = 1
    dev = target.device
    ids, labels, pos, attn = ids.to(dev), labels.to(dev), pos.to(dev), attn.to(dev)
    embeds = target.embed_tokens(ids)  # [B, T, H]
    # each sample's frames resized and normalised by the serving path (samples may differ in frame size)
    pixels = torch.cat([target.pixel_values(torch.from_numpy(s.frames)) for s in samples])
    cfg = model.config
    vis = model.model.get_video_features(
        pixel_values_videos=pixels,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True,
    ).pooler_output  # [F, tokens_per_frame, H]
    vis = vis.reshape(-1, vis.shape[-1])
    frame_mask = ids == target.video_token_id
    embeds = embeds.masked_scatter(frame_mask.unsqueeze(-1), vis.to(embeds.dtype))
    out = target.language_model(inputs_embeds=embeds, position_ids=pos, attention_mask=attn, use_cache=False)
    hidden = out.last_hidden_state  # [B, T, H]
    sel = labels != IGNORE
    logits = target.lm_head(hidden[sel])  # [N, V]
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[sel])
    ground = None if word_ids is None else grounding_loss(target, hidden, frame_mask, samples, word_ids, words)
    return loss, ground, int(sel.sum())


def train(cfg: TrainConfig) -> Path:
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    work = out / "train_state"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(cfg.init) if cfg.init else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(tok_dir, seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(cfg.seed)
    # eager attention trains fastest here on short unpadded sequences; inference loads with sdpa
    model = LlavaOnevisionForConditionalGeneration._from_config(
        default_config(tokenizer), attn_implementation=cfg.attention, dtype=torch.float32
    )
    if cfg.init:  # transformers maps the checkpoint's key names onto the model's
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            cfg.init, attn_implementation=cfg.attention, dtype=torch.float32
        )
    device, autocast_dtype = parse_device(cfg.device), parse_dtype(cfg.dtype)
    target = build_target(model.to(device), tokenizer, preprocessor_config())
    vision_summary = None
    if cfg.vision_minutes > 0 and not cfg.init:
        vision_cfg = VisionPretrainConfig(seconds=cfg.vision_minutes * 60, seed=cfg.seed, max_steps=cfg.vision_max_steps)
        vision_summary = pretrain_vision(target, CONTENT_WORDS, vision_cfg, work)
    model.train()
    # as in LLaVA-OneVision's later stages, the pretrained tower moves slower than the rest
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    rest = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr_mult": 1.0}, {"params": vision, "lr_mult": cfg.vision_lr_mult}],
        lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01,
    )
    state_path = work / "state.pt"
    step, elapsed_before, losses, grounds = 0, 0.0, [], []
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed_before, losses = st["step"], st["elapsed"], st["losses"]
        grounds = st.get("grounds", [])
        print(f"resumed at step {step} ({elapsed_before / 60:.1f} min done)")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    words = grounding_words(cfg)
    word_ids = content_word_ids(tokenizer, words)
    budget_s = (cfg.minutes - (cfg.vision_minutes if vision_summary else 0.0)) * 60  # stage 2
    elapsed = elapsed_before
    # the cosine ends where the run does: at --max-steps or at the end of the time budget, whichever comes first
    schedule = warmup_cosine(opt, [cfg.lr * g["lr_mult"] for g in opt.param_groups], cfg.warmup,
                             run_progress(cfg.warmup, cfg.max_steps, lambda: elapsed / budget_s), floor=0.1,
                             start_step=step)
    t0 = time.time()
    bar = tqdm(total=int(budget_s), unit="s", desc="stage 2: captions", initial=int(elapsed_before))

    def save_state() -> None:
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "losses": losses,
             "grounds": grounds},
            work / "state.tmp",
        )
        (work / "state.tmp").replace(state_path)

    while step < cfg.max_steps and elapsed < budget_s:
        rng = np.random.default_rng([cfg.seed, step])
        samples = [build_sample(tokenizer, target.video_token_id, target.tokens_per_frame, rng, cfg) for _ in range(cfg.batch)]
        # one sequence at a time, gradients accumulated: padding a batch to one length costs several
        # times more on CPU than the sequences themselves (measured: 3.8 s vs 17 s for 6 sequences)
        opt.zero_grad(set_to_none=True)
        n_labels = [sum(x != IGNORE for x in s.labels) for s in samples]
        loss_sum = ground_sum = 0.0
        for s, n in zip(samples, n_labels):
            share = n / sum(n_labels)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype not in (None, torch.float32)):
                loss, ground, _ = batch_loss(target, [s], pad_id, word_ids if cfg.grounding_weight > 0 else None, words)
            total = loss if ground is None else loss + cfg.grounding_weight * ground
            (total * share).backward()
            loss_sum += float(loss.detach()) * share
            ground_sum += 0.0 if ground is None else float(ground.detach()) * share
        loss = torch.tensor(loss_sum)
        grounds.append(ground_sum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        elapsed = elapsed_before + time.time() - t0
        schedule.step()  # the next step's lr, by the steps and the time spent so far
        bar.n = int(elapsed)  # seconds of the budget spent (set, not summed: no rounding drift)
        bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.3f}", ground=f"{np.mean(grounds[-20:]):.3f}")
        with open(work / "steps.jsonl", "a") as log:  # one line a step: what a long run did, readable while it runs
            log.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 1), "loss": round(losses[-1], 4),
                                  "grounding": round(grounds[-1], 4), "lr": opt.param_groups[0]["lr"],
                                  "visual_tokens": [s.ids.count(target.video_token_id) for s in samples]}) + "\n")
        if step % cfg.checkpoint_every == 0:
            save_state()
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            snapshot(target, tokenizer, out, cfg, step, losses, elapsed, grounds)
    bar.close()
    save_state()
    export(target, tokenizer, out, cfg, step, losses, elapsed, grounds, vision_summary)
    return out


def snapshot(target, tokenizer, out: Path, cfg: TrainConfig, step: int, losses: list[float], elapsed: float,
             grounds: list[float]) -> None:
    """Export the model as it is now to OUT/snapshot (written aside, then swapped in whole), so a long run
    can be evaluated while it goes on."""
    fresh, final = out / "snapshot.tmp", out / "snapshot"
    shutil.rmtree(fresh, ignore_errors=True)
    export(target, tokenizer, fresh, cfg, step, losses, elapsed, grounds)
    shutil.rmtree(final, ignore_errors=True)
    fresh.replace(final)


def export(target, tokenizer, out: Path, cfg: TrainConfig, step: int, losses: list[float], elapsed: float,
           grounds: list[float], vision_summary: dict | None = None) -> None:
    """Write a normal HF checkpoint directory: config.json, fp16 safetensors, tokenizer, preprocessor."""
    # an fp16 copy is written: the weights being trained stay fp32 (a snapshot mid-run must not round them)
    copy.deepcopy(target.model).eval().to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    (out / STREAM_DEFAULTS_FILE).write_text(json.dumps(asdict(stream_defaults(cfg, target.tokens_per_frame)), indent=2))
    summary = {
        "steps": step,
        "train_minutes": round(elapsed / 60 + (vision_summary["minutes"] if vision_summary else 0.0), 1),
        "caption_stage_minutes": round(elapsed / 60, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,  # captions only
        "final_grounding_loss": round(float(np.mean(grounds[-50:])), 4) if grounds else None,
        "vision_stage": vision_summary,
        "config": asdict(cfg),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2))


def stream_defaults(cfg: TrainConfig, tokens_per_frame: int) -> StreamDefaults:
    """How the trained model wants to be fed: as it was trained. A training stream shows at most
    `max_segments` segments of frames and `max_segments - 1` earlier captions; a live stream kept to the
    same (visual budget, caption history) stays in that distribution however long it runs (the model
    card measures what more frames in view cost)."""
    frames_in_view = int(round(cfg.max_segments * cfg.segment_seconds * cfg.fps))
    if cfg.long_prob > 0:  # the long-context stage showed up to long_max_tokens in view, whole frames
        frames_in_view = max(frames_in_view, cfg.long_max_tokens // tokens_per_frame)
        return StreamDefaults(sampling_fps=cfg.fps, caption_every_s=cfg.segment_seconds,
                              visual_token_budget=frames_in_view * tokens_per_frame,
                              caption_history=cfg.caption_history)
    return StreamDefaults(sampling_fps=cfg.fps, caption_every_s=cfg.segment_seconds,
                          visual_token_budget=frames_in_view * tokens_per_frame,
                          caption_history=cfg.max_segments - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-train target", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write (resumes if it holds a train_state)")
    add_config_flags(p, TrainConfig, skip=("out", "device", "dtype"))
    add_device_flags(p)
    parsed = p.parse_args(argv)
    device_and_dtype(parsed, p)
    args = vars(parsed)
    cfg = TrainConfig(**{k: v for k, v in args.items()})
    train(cfg)
    return 0
