"""What a checkpoint's own processor feeds its model, rebuilt independently of the stream engine's
adapters (no tests here): Qwen's video patching as its video processor does it, each model's video
features from its own `get_video_features`, and the model's own positions.

transformers' *VideoProcessor classes need torchvision, which does not work beside this CPU torch, so
`qwen_video_patches` is the Qwen2-VL video processor's `patchify` written out; resizing and normalising
(the image processors' part) are shared with the engine (`preprocess.resize_and_normalize`).
"""

from __future__ import annotations

import numpy as np
import torch

from sparrow_core.engine.preprocess import resize_and_normalize


def qwen_video_patches(video: torch.Tensor, patch: int, merge: int, temporal_patch: int) -> tuple[torch.Tensor, list[int]]:
    """fp32 [T, C, H, W] -> (flat patches [t * gh * gw, C * tp * p * p], [t, gh, gw]) as
    Qwen2VLVideoProcessor.patchify makes them (last frame repeated to a whole temporal patch)."""
    videos = video.unsqueeze(0)
    batch, frames, channel, height, width = videos.shape
    if pad := -frames % temporal_patch:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        frames += pad
    grid_t, grid_h, grid_w = frames // temporal_patch, height // patch, width // patch
    patches = videos.view(
        batch, grid_t, temporal_patch, channel, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch * patch * patch)
    return flat, [grid_t, grid_h, grid_w]


def model_inputs(target, frames: np.ndarray, ids: list[int], clips: list[list[int]], fps: float = 2.0) -> dict:
    """Inputs of the model's own forward over `ids`, whose runs of video tokens are `clips` (lists of
    frame indices into `frames`), in order. LLaVA-OneVision: every clip has as many frames (one tensor).
    Qwen2.5-VL: the clips' frames are `fps` apart (second_per_grid_ts = temporal_patch / fps)."""
    fr = torch.from_numpy(frames)
    input_ids = torch.tensor([ids])
    if target.architecture == "llava_onevision":
        px = resize_and_normalize(fr, target.input_height, target.input_width, target.norm, torch.float32)
        if target.newline_per_frame:  # the streaming layout: every frame a one-frame video
            return dict(input_ids=input_ids, pixel_values_videos=px.unsqueeze(1))
        return dict(input_ids=input_ids, pixel_values_videos=torch.stack([px[c] for c in clips]))
    patches, grids = [], []
    for c in clips:
        size = target.resized_size(*frames.shape[1:3])
        video = resize_and_normalize(fr[c], *size, target.norm, torch.float32)
        p, g = qwen_video_patches(video, target.patch, target.merge, target.temporal_patch)
        patches.append(p)
        grids.append(g)
    out = dict(
        input_ids=input_ids,
        pixel_values_videos=torch.cat(patches),
        video_grid_thw=torch.tensor(grids),
        mm_token_type_ids=(input_ids == target.video_token_id).int() * 2,  # 0 text, 2 video
    )
    if target.architecture == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([target.temporal_patch / fps] * len(clips))
    return out


@torch.no_grad()
def video_embeds(target, inputs: dict) -> torch.Tensor:
    """The model's own video features for `inputs`, in the order its forward scatters them [n, H]."""
    m = target.model.model
    if target.architecture == "llava_onevision":
        cfg = target.model.config
        out = m.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])
    out = m.get_video_features(
        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"], return_dict=True
    )
    return torch.cat(list(out.pooler_output))


@torch.no_grad()
def rope_positions(target, inputs: dict) -> torch.Tensor:
    """The model's own positions [P, n] for `inputs` (Qwen: get_rope_index; LLaVA: 0..n-1)."""
    ids = inputs["input_ids"]
    if target.position_rows == 1:
        return torch.arange(ids.shape[1]).unsqueeze(0)
    kw = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    pos, _ = target.model.model.get_rope_index(ids, inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"], **kw)
    return pos[:, 0]
