"""Frame preprocessing that follows a checkpoint's preprocessor config, without torchvision.

transformers' video processors need torchvision, which does not install beside CPU torch 2.13, so the
three steps are done here in torch: resize (with the config's resample filter), rescale, normalise.
Patchifying is model-specific and lives in the adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# PIL resample codes as written in preprocessor configs -> torch interpolate modes.
_RESAMPLE_MODES = {0: "nearest", 1: "bilinear", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}

MAX_FRAME_SIDE = 8192


@dataclass(frozen=True)
class NormalizeSpec:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1.0 / 255.0
    resample: int = 3

    @classmethod
    def from_config(cls, cfg: dict) -> NormalizeSpec:
        mean = cfg.get("image_mean", [0.5, 0.5, 0.5])
        std = cfg.get("image_std", [0.5, 0.5, 0.5])
        return cls(
            mean=tuple(float(x) for x in mean),
            std=tuple(float(x) for x in std),
            rescale_factor=float(cfg.get("rescale_factor", 1.0 / 255.0)),
            resample=int(cfg.get("resample", 3)),
        )


def validate_frames(frames: np.ndarray | torch.Tensor, timestamps: list[float] | None = None) -> torch.Tensor:
    """Check a chunk of frames and return it as a uint8 tensor [N, H, W, 3]; raise ValueError naming the fault."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    else:
        raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.ndim != 4:
        raise ValueError(f"frames must have shape [N, H, W, 3], got {tuple(frames.shape)}")
    n, h, w, c = frames.shape
    if c != 3:
        raise ValueError(f"frames must have 3 channels (RGB) in the last dimension, got {c}")
    if n == 0:
        raise ValueError("empty chunk: at least one frame is required")
    if h < 2 or w < 2 or h > MAX_FRAME_SIDE or w > MAX_FRAME_SIDE:
        raise ValueError(f"frame size {w}x{h} outside the supported range 2..{MAX_FRAME_SIDE} pixels per side")
    if timestamps is not None:
        if len(timestamps) != n:
            raise ValueError(f"got {n} frames but {len(timestamps)} timestamps")
        ts = [float(t) for t in timestamps]
        if any(not math.isfinite(t) or t < 0 for t in ts):
            raise ValueError("timestamps must be finite and non-negative seconds")
        if any(b < a for a, b in zip(ts, ts[1:])):
            raise ValueError("timestamps within a chunk must be non-decreasing")
    return frames


def resize_and_normalize(
    frames: torch.Tensor, height: int, width: int, spec: NormalizeSpec, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, height, width]."""
    x = frames.permute(0, 3, 1, 2).to(torch.float32)  # [N, 3, H, W], 0..255
    if x.shape[-2:] != (height, width):
        mode = _RESAMPLE_MODES.get(spec.resample, "bilinear")
        if mode == "nearest":
            x = F.interpolate(x, size=(height, width), mode="nearest")
        else:
            x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 255.0)
    x = x * spec.rescale_factor
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's rule: sides divisible by `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of a {width}x{height} frame exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
