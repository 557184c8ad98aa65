"""The drafter's training material: streams the target captions itself (read off the stream engine, so
every slot's hidden states are what inference sees), and batches of the drafter's rows over them (see
train/drafter.py for the layout of a training sequence)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparrow_core.decoding.ar import ARDecoder
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.engine.caption_history import CaptionHistory, CaptionTurn
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.stream import StreamConfig, TargetStream
from sparrow_core.engine.target import TargetModel
from sparrow_core.train.data import WorldStreamSpec, world_segments
from sparrow_core.train.drafter_config import DrafterDataError, DrafterTrainConfig, Recipe
from sparrow_core.train.video_data import VideoClips


# --- data ------------------------------------------------------------------------------------
@dataclass
class StreamSample:
    """One target-captioned stream, per slot (S slots)."""

    ids: torch.Tensor  # [S] int64
    kinds: torch.Tensor  # [S] uint8 TokenKind
    pos: torch.Tensor  # [S, P] int64 target positions
    learn: torch.Tensor  # [S] bool: text slots where the target decoded (loss rows)
    feats: dict[str, torch.Tensor]  # "last" / "penultimate" -> [S, H] (zeros on visual slots)
    vis: dict[str, torch.Tensor] = field(default_factory=dict)  # "embeds" / "mid_hidden" -> [S, H] on frame slots


def world_window(target: TargetModel, cfg: DrafterTrainConfig, rng: np.random.Generator
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A fresh world stream's caption segments (frames [n, H, W, 3] uint8, times [n])."""
    spec = WorldStreamSpec(
        seed=int(rng.integers(1 << 31)),
        segments=int(rng.integers(cfg.min_segments, cfg.max_segments + 1)),
        segment_seconds=cfg.segment_seconds,
        fps=cfg.fps,
        start_seconds=float(rng.uniform(0, 40)) if rng.random() < 0.5 else 0.0,
        size=target.image_size or 64,
    )
    return ((seg.frames, seg.times) for seg in world_segments(spec))


@torch.no_grad()
def generate_sample(target: TargetModel, cfg: DrafterTrainConfig, rng: np.random.Generator,
                    clips: VideoClips | None = None, held_out: bool = False) -> StreamSample:
    """The target captions a stream of caption segments (a window of one of `clips`, else a fresh world
    stream) after the preamble with `cfg.instruction`; everything the drafter trains on is read off the stream."""
    if clips is None:
        segments = world_window(target, cfg, rng)
    else:
        count = int(rng.integers(cfg.min_segments, cfg.max_segments + 1))
        segments = clips.window(rng, held_out, count, cfg.segment_seconds, cfg.fps)
    stream = TargetStream(target, StreamConfig(keep_visual_mid_hidden=True, keep_visual_embeds=True))
    layout = target.caption_layout(cfg.instruction)
    history = CaptionHistory(None)  # training streams are short: every turn stays
    gen = torch.Generator(target.device).manual_seed(int(rng.integers(1 << 31)))  # draws where the logits are
    learn: list[int] = []
    stream.append_text(layout.preamble)  # the checkpoint's own chat layout for cfg.instruction, as served
    for frames, times in segments:
        stream.append_frames(frames, times)
        turn = CaptionTurn(stream, layout, history)
        learn.append(stream.length - 1)
        sampling = SamplingConfig(cfg.temperature) if rng.random() < cfg.sample_prob else SamplingConfig()
        tokens: list[int] = []
        for step in ARDecoder().decode(stream, turn.logits, cfg.max_caption_tokens, layout.stop_ids, sampling, gen):
            learn.append(stream.length - 1)
            tokens += step.tokens
        learn.pop()  # nothing is decoded after the caption's last token
        turn.close(tokens)
    return _read_stream(target, stream, learn)


def _read_stream(target: TargetModel, stream, learn: list[int]) -> StreamSample:
    s, h = stream.length, target.hidden_size
    hv = stream.hidden()
    feats = {}
    for name in ("last", "penultimate"):
        full = torch.zeros(s, h, dtype=torch.float16, device="cpu")
        full[hv.slots] = hv.layers[target.layers.resolve(name)].to(torch.float16).cpu()
        feats[name] = full
    mid = torch.zeros(s, h, dtype=torch.float16, device="cpu")
    vslots, vmid = stream.visual_mid_hidden()
    mid[vslots] = vmid.to(torch.float16).cpu()
    is_frame = stream.frame_ids() >= 0
    sep = is_frame & (stream.kinds() != int(TokenKind.VISUAL))  # separators: their L/2 state from the hidden view
    sep_rows = torch.searchsorted(hv.slots, sep.nonzero().squeeze(1))
    mid[sep] = hv.layers[stream.mid_layer][sep_rows].to(torch.float16).cpu()
    emb = torch.zeros(s, h, dtype=torch.float16, device="cpu")
    eslots, embeds = stream.visual_embeds()
    emb[eslots] = embeds.to(torch.float16).cpu()
    learn_mask = torch.zeros(s, dtype=torch.bool, device="cpu")
    learn_mask[torch.tensor(learn, dtype=torch.long, device="cpu")] = True
    return StreamSample(
        ids=stream.token_ids().clone(),
        kinds=stream.kinds().clone(),
        pos=stream.positions().T.clone(),
        learn=learn_mask,
        feats=feats,
        vis={"embeds": emb, "mid_hidden": mid},
    )


@torch.no_grad()
def text_only(target: TargetModel, sample: StreamSample) -> StreamSample:
    """The same text, re-run through the target with no frame at all (the eagle baseline's data)."""
    text = sample.kinds == int(TokenKind.TEXT)
    stream = TargetStream(target)
    stream.append_text(sample.ids[text].tolist())
    learn = torch.cumsum(text.long(), 0)[sample.learn] - 1  # each learn slot's index among text slots
    return _read_stream_text(target, stream, learn.tolist())


def _read_stream_text(target: TargetModel, stream, learn: list[int]) -> StreamSample:
    hv = stream.hidden()  # a text-only stream: every slot has kept hidden states
    feats = {n: hv.layers[target.layers.resolve(n)].to(torch.float16).cpu().clone() for n in ("last", "penultimate")}
    learn_mask = torch.zeros(stream.length, dtype=torch.bool, device="cpu")
    learn_mask[torch.tensor(learn, dtype=torch.long, device="cpu")] = True
    return StreamSample(stream.token_ids().clone(), stream.kinds().clone(), stream.positions().T.clone(), learn_mask, feats)


# --- one batch ---------------------------------------------------------------------------------
@dataclass
class Batch:
    tok: torch.Tensor  # [B, N] token of each row
    h_prev: torch.Tensor  # [B, N, H] target feature of the slot before (text rows)
    vis_in: torch.Tensor  # [B, N, H] layer input of frame rows
    is_text: torch.Tensor  # [B, N] bool
    valid: torch.Tensor  # [B, N] bool (not padding)
    pos: torch.Tensor  # [B, P, N] drafter positions
    slot: torch.Tensor  # [B, N] stream slot of each row (-1 pad)
    learn: torch.Tensor  # [B, N] bool
    feat: torch.Tensor  # [B, N, H] target feature at the row's own slot (regression target)
    teacher_h: torch.Tensor  # [B, N, H] h_last at the row's slot (teacher = softmax(lm_head(.)))

    def to(self, device: torch.device) -> Batch:
        """The batch on `device` (assembled on CPU from the stored streams, moved once per step)."""
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})


def make_batch(samples: list[StreamSample], recipe: Recipe, feature: str, position_mode: str,
               rng: np.random.Generator) -> Batch:
    rows_per = []
    for smp in samples:
        text = smp.kinds == int(TokenKind.TEXT)
        with_vis = recipe.train_span is not None and rng.random() < recipe.visible
        keep = torch.ones_like(text) if with_vis else text
        rows_per.append(keep.nonzero().squeeze(1))
    b, n = len(samples), max(r.numel() for r in rows_per)
    h = samples[0].feats["last"].shape[1]
    p = samples[0].pos.shape[1]
    out = Batch(
        tok=torch.zeros(b, n, dtype=torch.long, device="cpu"),
        h_prev=torch.zeros(b, n, h, device="cpu"),
        vis_in=torch.zeros(b, n, h, device="cpu"),
        is_text=torch.zeros(b, n, dtype=torch.bool, device="cpu"),
        valid=torch.zeros(b, n, dtype=torch.bool, device="cpu"),
        pos=torch.zeros(b, p, n, dtype=torch.long, device="cpu"),
        slot=torch.full((b, n), -1, dtype=torch.long, device="cpu"),
        learn=torch.zeros(b, n, dtype=torch.bool, device="cpu"),
        feat=torch.zeros(b, n, h, device="cpu"),
        teacher_h=torch.zeros(b, n, h, device="cpu"),
    )
    for i, (smp, rows) in enumerate(zip(samples, rows_per)):
        m = rows.numel()
        prev = (rows - 1).clamp(min=0)
        out.tok[i, :m] = smp.ids[rows]
        out.h_prev[i, :m] = smp.feats[feature][prev].float() * (rows > 0).unsqueeze(1)
        if recipe.train_span is not None and smp.vis:
            out.vis_in[i, :m] = smp.vis[recipe.train_span][rows].float()
        out.is_text[i, :m] = smp.kinds[rows] == int(TokenKind.TEXT)
        out.valid[i, :m] = True
        if position_mode == "target":
            out.pos[i, :, :m] = smp.pos[rows].T
        else:
            out.pos[i, :, :m] = torch.arange(m, device="cpu")
        out.pos[i, :, m:] = out.pos[i, :, m - 1 : m] + 1
        out.slot[i, :m] = rows
        out.learn[i, :m] = smp.learn[rows]
        out.feat[i, :m] = smp.feats[feature][rows].float()
        out.teacher_h[i, :m] = smp.feats["last"][rows].float()
    return out


def shift_rows(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """x[:, r + k] at r (rows past the end: fill). Works on [B, N] and [B, N, H] (and [B, P, N] via dim)."""
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    out[:, : x.shape[1] - k] = x[:, k:]
    return out



def data_source(cfg: DrafterTrainConfig, clips: VideoClips | None) -> dict:
    """What the streams are generated from; a resumed run must have the same."""
    fields = ("model", "seed", "instruction", "fps", "segment_seconds", "min_segments", "max_segments", "max_caption_tokens",
              "sample_prob", "temperature", "eval_samples")
    source = {name: getattr(cfg, name) for name in fields}
    if clips is None:
        return source | {"data": "world"}
    files = {name: [[str(p), round(s, 3), p.stat().st_size] for p, s in part]
             for name, part in (("train", clips.train), ("held_out", clips.held_out))}
    return source | {"data": "videos", **files}


def build_data(target: TargetModel, cfg: DrafterTrainConfig, recipe: Recipe, work: Path, deadline: float,
               clips: VideoClips | None = None) -> tuple[list, list]:
    """Generate (or load) the training and held-out streams; deterministic from the seed, resumable. Streams
    0 .. eval_samples - 1 are held out (with `clips`: cut from the held-out files only)."""
    path, source_path = work / "data.pt", work / "data_source.json"
    source = data_source(cfg, clips)
    if source_path.is_file() and json.loads(source_path.read_text()) != source:
        raise DrafterDataError(f"{work} holds streams generated from other data or settings ({source_path}); "
                               "train into a new --out, or delete that train_state to start over")
    source_path.write_text(json.dumps(source, indent=1))
    data: list[StreamSample] = torch.load(path, weights_only=False) if path.is_file() else []
    want = cfg.samples + cfg.eval_samples
    bar = tqdm(total=want, initial=len(data), unit="stream", desc="target captions")
    while len(data) < want and time.time() < deadline:
        rng = np.random.default_rng([cfg.seed, 1, len(data)])
        data.append(generate_sample(target, cfg, rng, clips, held_out=len(data) < cfg.eval_samples))
        bar.update(1)
        if len(data) % 16 == 0 or len(data) == want:
            torch.save(data, work / "data.tmp")
            (work / "data.tmp").replace(path)
    bar.close()
    if len(data) <= cfg.eval_samples:
        raise DrafterDataError(f"only {len(data)} streams were generated before the time limit (--minutes), all of "
                               f"them held out (--eval-samples {cfg.eval_samples}); nothing to train on")
    train, held_out = data[cfg.eval_samples:], data[:cfg.eval_samples]
    if recipe.text_only_data:  # the baseline learns from text alone; it is measured, as every drafter is, against
        train = [text_only(target, smp) for smp in train]  # the target it serves (with the frames), not a frameless one
    return train, held_out


