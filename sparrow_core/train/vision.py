"""Stage 1 of `sparrow-train target`: teach the default target's vision tower to see the world's objects.

Real video LLMs start from a pretrained vision encoder (LLaVA-OneVision from SigLIP). Ours is trained
from scratch, and trained only through captions and the LM's grounding loss its SigLIP tower learnt
colour and presence but not form: a linear probe read the shape of a single object from the visual
tokens barely above chance (the model card has the numbers). The signal for form reached the tower too weakly,
through twelve LM layers and a bag-of-words target dominated by the easier colour words.

So, like SigLIP's own pretraining, the tower first learns on its own from labelled images: scenes drawn
by the world's own scene sampler (0 to 3 objects, every size the world uses, any background), each
labelled with the content words it shows (colours, shapes, sizes, textures of its objects, and the
background). A temporary linear head reads every patch token of the layer the LM is fed from; a frame's
logit for word c is the log-sum-exp over its patch tokens ("some patch shows c"), trained with binary
cross-entropy per word. Reading the patch tokens, not a pooled vector, asks each token to carry what its
own part of the frame shows: that is what the 2x2 pooling and the LM later read. The head is dropped
afterwards; the checkpoint stays a plain LLaVA-OneVision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparrow_core.train.schedule import warmup_cosine
from sparrow_core.world.config import WorldConfig
from sparrow_core.world.director import DirectorMemory
from sparrow_core.world.palette import COLOURS, SHAPES, size_word
from sparrow_core.world.render import render_frame
from sparrow_core.world.scene import initial_scene

VISION_SEED_TAG = 1  # rng streams of this stage are [seed, VISION_SEED_TAG, step]: apart from stage 2's
HELD_OUT_SEED_TAG = 2
HELD_OUT_SCENES = 400


@dataclass
class VisionPretrainConfig:
    seconds: float
    seed: int = 0
    max_steps: int = 1_000_000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    checkpoint_every: int = 200


def scene_words(bodies, background: str) -> list[str]:
    """Canonical content words a scene shows: its background and each object's colour, shape, size, texture."""
    words = {background}
    for b in bodies:
        words.update((b.colour, b.shape, b.texture, size_word(b.size)))
    return sorted(words)


def sample_scenes(rng: np.random.Generator, n: int, words: tuple[str, ...],
                  size: int = 64) -> tuple[np.ndarray, torch.Tensor, list[list]]:
    """n scenes from the world's scene sampler, over every object size the world uses.

    Returns frames [n, size, size, 3] uint8, labels [n, C] (1 where the scene shows words[c]) and each
    scene's bodies."""
    base = WorldConfig()
    cfg = replace(base, size_range=base.size_limits)
    index = {w: i for i, w in enumerate(words)}
    frames, labels, all_bodies = [], torch.zeros(n, len(words)), []
    for i in range(n):
        bodies, background = initial_scene(rng, cfg, DirectorMemory())
        frames.append(render_frame(background, bodies, size, size))
        labels[i, [index[w] for w in scene_words(bodies, background)]] = 1.0
        all_bodies.append(bodies)
    return np.stack(frames), labels, all_bodies


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's tokens at the layer the LM is fed from: pixel_values [N, 1, 3, S, S] (one-frame
    videos, as the target adapter makes them) -> [N, P, Dv]."""
    layer = model.config.vision_feature_layer
    out = model.model.vision_tower(pixel_values.flatten(0, 1), output_hidden_states=True)
    return out.hidden_states[layer]


def frame_word_logits(model, head: torch.nn.Linear, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, C]: per word, log-sum-exp over the frame's patch tokens of the head's logit."""
    return torch.logsumexp(head(patch_features(model, pixel_values)), dim=1)


@torch.no_grad()
def shape_colour_accuracy(target, head: torch.nn.Linear, words: tuple[str, ...], frames: np.ndarray,
                          bodies: list[list]) -> dict[str, float]:
    """On the single-object scenes among `frames`: how often the head's top shape / colour word is right."""
    single = [i for i, b in enumerate(bodies) if len(b) == 1]
    logits = frame_word_logits(target.model, head, target.pixel_values(torch.from_numpy(frames[single])))
    out = {"single_object_scenes": len(single)}
    for name, vocab in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        cols = [words.index(w) for w in vocab]
        pred = [vocab[j] for j in logits[:, cols].argmax(-1).tolist()]
        truth = [getattr(bodies[i][0], name) for i in single]
        out[f"{name}_accuracy"] = round(float(np.mean([p == t for p, t in zip(pred, truth)])), 3)
    return out


def pretrain_vision(target, words: tuple[str, ...], cfg: VisionPretrainConfig, work: Path) -> dict:
    """Train the vision tower (and a temporary head) for `cfg.seconds`; resumable from `work`.

    Returns the stage's summary: steps, minutes, final loss, held-out shape / colour accuracy."""
    model = target.model
    tower = model.model.vision_tower
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(words), device=target.device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    state_path = work / "vision_state.pt"
    step, elapsed_before, losses, done = 0, 0.0, [], False
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        tower.load_state_dict(st["tower"])
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, elapsed_before, losses, done = st["step"], st["elapsed"], st["losses"], st["done"]
    held_out = sample_scenes(np.random.default_rng([cfg.seed, HELD_OUT_SEED_TAG]), HELD_OUT_SCENES, words)
    elapsed = elapsed_before

    def save(finished: bool) -> None:
        torch.save({"tower": tower.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "losses": losses, "done": finished}, work / "vision_state.tmp")
        (work / "vision_state.tmp").replace(state_path)

    if not done:
        tower.train()
        t0 = time.time()
        bar = tqdm(total=int(cfg.seconds), unit="s", desc="stage 1: vision", initial=int(elapsed_before))
        # cosine over the stage's time, not its steps: the stage is given minutes
        schedule = warmup_cosine(opt, [cfg.lr] * len(opt.param_groups), cfg.warmup,
                                 lambda _step: min(1.0, elapsed / cfg.seconds), floor=0.1, start_step=step,
                                 decay_in_warmup=True)
        while elapsed < cfg.seconds and step < cfg.max_steps:
            frames, labels, _ = sample_scenes(np.random.default_rng([cfg.seed, VISION_SEED_TAG, step]), cfg.batch, words)
            logits = frame_word_logits(model, head, target.pixel_values(torch.from_numpy(frames)))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            elapsed = elapsed_before + time.time() - t0
            schedule.step()
            bar.n = int(min(elapsed, cfg.seconds))
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.4f}")
            if step % cfg.checkpoint_every == 0:
                save(False)
        bar.close()
        save(True)
    tower.eval()
    summary = {"steps": step, "minutes": round(elapsed / 60, 1),
               "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
               **shape_colour_accuracy(target, head, words, held_out[0], held_out[2])}
    print(f"stage 1 (vision): {summary}")
    return summary
