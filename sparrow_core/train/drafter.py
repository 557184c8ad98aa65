"""Train a drafter by self-distillation from the target on procedural-world streams (`sparrow-train drafter`).

Data. For each training stream the target itself captions world segments in the streaming layout of
`engine/layout.py` (greedy or sampled, never ground truth), through the stream engine, so every slot's hidden
states are exactly what inference sees. The stream keeps, per slot: token, kind, position, the target's
last / penultimate / L/2 hidden states of non-visual slots, the L/2 states of visual slots (IVSB) and the
frames' raw projector embeddings (msd / ablation "none"). The teacher distribution after text slot t is
softmax(lm_head(h_last(t))): the target's own next-token distribution, so no logits are stored.

Rows. A training sequence is the drafter's view of one stream: its text slots, plus (with a visual span)
its frame slots in stream order. Text row t: x = FC([embed(tok_t); h(t-1)]); frame row: the visual
span's state (L/2 hidden = IVSB, or raw embeddings) fed to the layer as it is.

Multi-token prediction (EAGLE-3 training-time test). Step 0 runs the layer over all rows (causal). Step
k >= 1 re-runs it with row r fed FC([embed(tok_{r+k}); o^{k-1}_r]): the drafter's own output replaces the
target's feature, as when drafting a tree k deep. Step k's row r attends to step 0's rows <= r and to its
own chain (row r of steps 1..k): one attention over the concatenated keys [K^0; K^1; ..; K^k] with mask

    [ causal(N) | eye(N) | ... | eye(N) ]          [N, (k+1) N]

and predicts token r+k+1. Loss = sum_k 0.8^k * soft-CE(teacher(r+k), q^k(r)) over caption rows (the
target's decoding positions), plus `hidden_weight` * smooth-L1(o^k_r, h_feature(r+k)).

Recipes (paper Table 6 rows via --ablation; --variant for the baselines):
    none      visual span = raw embeddings, attended in training and inference, K = 1
    vata      text rows only (text-anchored), K = 1
    mtp       raw-embedding span attended, K steps
    mtp_ivsb  span = the target's L/2 states, attended in training and inference, K steps
    all       sparrow: IVSB span visible in a fraction `ivsb_visible` of training sequences (the rest
              text-only), K steps; inference text-anchored (VATA) with hidden-state reuse
    --variant msd:   raw-embedding span attended everywhere, K = 1
    --variant eagle: text-only: the target re-run over the same text without any frame, K = 1; inference as sparrow
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from sparrow_core.cli.device import add_device_flags, device_and_dtype
from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.decoding.drafter import POSITION_MODES, VARIANTS, DrafterConfig, TextAnchoredDrafter
from sparrow_core.engine.checkpoint import CheckpointError, load_target
from sparrow_core.engine.target import TargetModel
from sparrow_core.train.drafter_config import (
    ABLATIONS,
    FEATURE_CHOICES,
    DrafterDataError,
    DrafterTrainConfig,
    Recipe,
    recipe_for,
)
from sparrow_core.train.drafter_data import Batch, build_data, make_batch, shift_rows
from sparrow_core.train.flags import add_config_flags
from sparrow_core.train.schedule import run_progress, warmup_cosine
from sparrow_core.train.video_data import VideoClips, find_videos

__all__ = ["DrafterTrainConfig", "main", "train"]

STEP_DECAY = 0.8  # weight of unroll step k is STEP_DECAY ** k


def unrolled_loss(drafter: TextAnchoredDrafter, batch: Batch, mtp_steps: int, hidden_weight: float) -> tuple[torch.Tensor, list[float]]:
    """Sum over steps k of STEP_DECAY^k * (soft CE + hidden_weight * smooth L1); and per-step top-1 agreement."""
    b, n = batch.tok.shape
    dev = batch.tok.device  # the drafter's (Batch.to)
    cache = DynamicCache()
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    base = causal.unsqueeze(0) & batch.valid.unsqueeze(1)  # [B, N, N] step-0 keys: valid rows <= r
    base |= torch.eye(n, dtype=torch.bool, device=dev).unsqueeze(0)  # padding rows see themselves (no empty softmax)
    eye = torch.eye(n, dtype=torch.bool, device=dev).expand(b, n, n)
    lm_head = drafter.target.lm_head
    total = torch.zeros((), device=dev)
    agree: list[float] = []
    o_prev = None
    text_run = batch.is_text & batch.valid  # rows r..r+k all text and at consecutive slots
    for k in range(mtp_steps):
        tok_k = shift_rows(batch.tok, k)
        if k == 0:
            x = drafter.fuse(batch.tok, batch.h_prev)
            x = torch.where(batch.is_text.unsqueeze(-1), x, batch.vis_in.to(x.dtype))
            pos = batch.pos
            ok = text_run
        else:
            x = drafter.fuse(tok_k, o_prev)
            pos = torch.cat([batch.pos[:, :, k:], batch.pos[:, :, -1:].expand(-1, -1, k) + torch.arange(1, k + 1, device=dev)], 2)
            ok = ok & shift_rows(text_run, k, False) & (shift_rows(batch.slot, k, -2) == batch.slot + k)
        mask = torch.cat([base] + [eye] * k, dim=2)  # [B, N, (k+1) N]
        o = drafter.layer_forward(x, pos, mask, cache)  # [B, N, H]
        sel = ok & shift_rows(batch.learn, k, False)
        if bool(sel.any()):
            with torch.no_grad():
                teacher_h = shift_rows(batch.teacher_h, k)[sel].to(lm_head.weight.dtype)
                teacher = torch.softmax(lm_head(teacher_h).float(), -1)  # [M, V]
            logq = torch.log_softmax(drafter.head(o[sel]).float(), -1)
            ce = -(teacher * logq).sum(-1).mean()
            reg = F.smooth_l1_loss(o[sel].float(), shift_rows(batch.feat, k)[sel])
            total = total + STEP_DECAY**k * (ce + hidden_weight * reg)
            agree.append(float((logq.argmax(-1) == teacher.argmax(-1)).float().mean()))
        else:
            agree.append(float("nan"))
        o_prev = o
    return total, agree


# --- the loop -----------------------------------------------------------------------------------
def evaluate(drafter: TextAnchoredDrafter, held_out: list, recipe: Recipe, cfg: DrafterTrainConfig, feature: str) -> list[float]:
    """Per unroll step, how often the drafter's top-1 equals the target's (an acceptance proxy)."""
    rng = np.random.default_rng([cfg.seed, 2])
    eval_recipe = Recipe(recipe.infer_span, 1.0 if recipe.infer_span else 0.0, recipe.mtp_steps, recipe.infer_span)
    drafter.eval()
    with torch.no_grad():
        batch = make_batch(held_out, eval_recipe, feature, cfg.position_mode, rng).to(drafter.target.device)
        _, agree = unrolled_loss(drafter, batch, max(cfg.mtp_steps, 1), cfg.hidden_weight)
    return agree


def train_steps(drafter, opt, data, recipe, cfg, feature, first, last, total_steps, deadline, save, desc):
    losses: list[float] = []
    bar = tqdm(range(first, last), desc=desc, unit="step")
    started = time.time()  # the cosine ends at total_steps or at the deadline, whichever comes first
    time_spent = lambda: (time.time() - started) / max(deadline - started, 1e-9)  # noqa: E731
    schedule = warmup_cosine(opt, [cfg.lr] * len(opt.param_groups), cfg.warmup,
                             run_progress(cfg.warmup, total_steps, time_spent), floor=0.05, start_step=first)
    step = first
    for step in bar:
        if time.time() > deadline:
            break
        rng = np.random.default_rng([cfg.seed, 3, step])
        idx = rng.choice(len(data), size=min(cfg.batch, len(data)), replace=False)
        batch = make_batch([data[i] for i in idx], recipe, feature, cfg.position_mode, rng).to(drafter.target.device)
        drafter.train()
        loss, agree = unrolled_loss(drafter, batch, recipe.mtp_steps, cfg.hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", top1=f"{agree[0]:.2f}")
        if save is not None and (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1, losses)
    else:
        step = last
    bar.close()
    return step, losses


def new_drafter(target, cfg: DrafterTrainConfig, recipe: Recipe, feature: str) -> TextAnchoredDrafter:
    torch.manual_seed(cfg.seed)
    tree = TreeConfig.parse(cfg.tree) if cfg.tree else TreeConfig()
    dcfg = DrafterConfig(variant=cfg.variant, visual_span=recipe.infer_span, feature_layer=feature,
                         position_mode=cfg.position_mode, tree_total_tokens=tree.total_tokens,
                         tree_depth=tree.depth, tree_top_k=tree.top_k)
    drafter = TextAnchoredDrafter(target, dcfg)
    drafter.float()
    return drafter


def _optimizer(drafter) -> torch.optim.Optimizer:
    return torch.optim.AdamW(drafter.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)


def train(cfg: DrafterTrainConfig, target: TargetModel | None = None) -> Path:
    start = time.time()
    deadline = start + cfg.minutes * 60
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.ablation not in ABLATIONS or cfg.feature_layer not in FEATURE_CHOICES:
        raise ValueError(f"ablation must be one of {ABLATIONS}, feature layer one of {FEATURE_CHOICES}")
    if cfg.tree:
        TreeConfig.parse(cfg.tree)  # a bad --tree fails now, not after the data is generated
    clips = VideoClips.split(find_videos(cfg.videos), cfg.held_out_fraction, cfg.seed) if cfg.videos else None
    target = target or load_target(cfg.model)
    for p in target.model.parameters():
        p.requires_grad_(False)
    recipe = recipe_for(cfg.variant, cfg.ablation, cfg.mtp_steps, cfg.ivsb_visible)
    out = Path(cfg.out)
    work = out / "train_state"
    work.mkdir(parents=True, exist_ok=True)
    if clips is not None:
        print(f"videos: {len(clips.train)} files for training, {len(clips.held_out)} held out "
              f"({', '.join(p.name for p, _ in clips.held_out)})")
    elif cfg.model is not None:
        print("data: the procedural world (--videos PATH ... trains on your own videos)")
    data, held_out = build_data(target, cfg, recipe, work, deadline, clips)
    state_path = work / "state.pt"
    probe: dict[str, list[float]] = {}
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        feature, step, losses, probe = st["feature"], st["step"], st["losses"], st["probe"]
        drafter = new_drafter(target, cfg, recipe, feature)
        opt = _optimizer(drafter)
        drafter.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        print(f"resumed at step {step} (feature layer {feature})")
    else:
        feature = cfg.feature_layer
        if feature == "auto":  # a short probe of both, then train the better one
            for name in ("last", "penultimate"):
                d = new_drafter(target, cfg, recipe, name)
                o = _optimizer(d)
                train_steps(d, o, data, recipe, cfg, name, 0, cfg.probe_steps, cfg.probe_steps, deadline, None, f"probe {name}")
                probe[name] = evaluate(d, held_out, recipe, cfg, name)
            feature = max(probe, key=lambda n: np.nan_to_num(probe[n][0]))
        drafter = new_drafter(target, cfg, recipe, feature)
        opt = _optimizer(drafter)
        step, losses = 0, []

    def save(at: int, new_losses: list[float]) -> None:
        torch.save({"model": drafter.state_dict(), "opt": opt.state_dict(), "step": at, "feature": feature,
                    "losses": losses + new_losses, "probe": probe}, work / "state.tmp")
        (work / "state.tmp").replace(state_path)

    step, new_losses = train_steps(drafter, opt, data, recipe, cfg, feature, step, cfg.steps, cfg.steps, deadline, save, "train drafter")
    losses += new_losses
    save(step, [])
    agree = evaluate(drafter, held_out, recipe, cfg, feature)
    training = {
        "recipe": asdict(recipe),
        "config": asdict(cfg),
        "feature_layer_probe_top1": probe,
        "steps": step,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "held_out_top1_per_step": agree,
        "train_streams": len(data),
        "held_out_streams": len(held_out),
        "held_out_files": [str(p) for p, _ in clips.held_out] if clips is not None else [],
        "minutes": round((time.time() - start) / 60, 1),
    }
    drafter.config = replace(drafter.config, training=training)
    drafter.to(target.dtype)
    drafter.save_pretrained(out)
    where = f"{len(clips.held_out)} held-out files" if clips is not None else "the world"
    print(f"held-out top-1 agreement with the target per draft step ({len(held_out)} streams from {where}): "
          + "  ".join(f"{k + 1}: {a:.3f}" for k, a in enumerate(agree)))
    print(json.dumps({"out": str(out), "feature_layer": feature, "steps": step, "held_out_top1": agree}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparrow-train drafter", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="drafter directory to write (resumes from its train_state)")
    p.add_argument("--videos", nargs="+", default=(), metavar="PATH",
                   help="train on your own videos: files, folders or globs of anything PyAV reads, captioned by "
                   "the target itself (default: the procedural world)")
    add_config_flags(p, DrafterTrainConfig, skip=("out", "videos"),
                     choices={"variant": VARIANTS, "ablation": ABLATIONS, "feature_layer": FEATURE_CHOICES,
                              "position_mode": POSITION_MODES},
                     helps={"model": "target checkpoint directory (default: the embedded model)",
                            "tree": "draft tree served with, total,depth,top_k (default: TreeConfig's)",
                            "instruction": "the user turn the target captions under (default: the layout's)"})
    add_device_flags(p)
    parsed = p.parse_args(argv)
    device, dtype = device_and_dtype(parsed, p)
    args = {k: v for k, v in vars(parsed).items() if k not in ("device", "dtype")}
    try:
        cfg = DrafterTrainConfig(**{**args, "videos": tuple(args["videos"])})
        train(cfg, load_target(cfg.model, device=device, dtype=dtype))
    except (DrafterDataError, CheckpointError) as exc:
        print(f"sparrow-train drafter: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
