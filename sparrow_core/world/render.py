"""Vectorised numpy rendering of bodies to uint8 RGB frames."""

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from sparrow_core.world.palette import BACKGROUNDS, COLOURS
from sparrow_core.world.state import Body

STRIPES = 5  # stripes across a striped object
STRIPE_DARKEN = 0.45


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` over offsets from its centre in units of its half extent.
    dx [1, w], dy [h, 1] -> [h, w]."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return (ax <= 0.9) & (ay <= 0.9)
    if shape == "diamond":
        return ax + ay <= 1.0
    if shape == "triangle":  # apex up, base at dy = 0.8
        return (dy <= 0.8) & (ax <= (dy + 1.0) / 1.8)
    if shape == "cross":
        return ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=4096)
def tinted(rgb: tuple[int, int, int], hue_shift: float = 0.0, brightness: float = 1.0) -> tuple[int, int, int]:
    """`rgb` with its hue turned by `hue_shift` degrees and its brightness scaled (clipped to 0..255)."""
    if hue_shift == 0.0 and brightness == 1.0:
        return rgb
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb((h + hue_shift / 360) % 1.0, s, min(1.0, v * brightness))
    return tuple(int(round(min(255.0, c * 255))) for c in (r, g, b))


def draw_body(canvas: np.ndarray, body: Body, isotropic: bool = False) -> None:
    """Paint one body into canvas [H, W, 3] uint8 in place (clipped at the frame border). Its extent is a
    fraction of each side, or with `isotropic` of the shorter side on both axes (round in pixels)."""
    height, width = canvas.shape[:2]
    h = body.size / 2
    hx, hy = (h * min(height, width) / width, h * min(height, width) / height) if isotropic else (h, h)
    x0, x1 = max(0, int(np.floor((body.x - hx) * width))), min(width, int(np.ceil((body.x + hx) * width)))
    y0, y1 = max(0, int(np.floor((body.y - hy) * height))), min(height, int(np.ceil((body.y + hy) * height)))
    if x0 >= x1 or y0 >= y1:
        return
    dx = (((np.arange(x0, x1) + 0.5) / width - body.x) / hx)[None, :]  # [1, w]
    dy = (((np.arange(y0, y1) + 0.5) / height - body.y) / hy)[:, None]  # [h, 1]
    mask = shape_mask(body.shape, dx, dy)  # [h, w]
    patch = canvas[y0:y1, x0:x1]  # view [h, w, 3]
    rgb = np.array(tinted(COLOURS[body.colour], body.hue_shift, body.brightness), dtype=np.uint8)
    if body.texture == "striped":
        dark = (np.floor((dy + 1.0) * STRIPES / 2).astype(np.int64) % 2 == 1)  # [h, 1]
        patch[mask & ~dark] = rgb
        patch[mask & dark] = (rgb * STRIPE_DARKEN).astype(np.uint8)
    else:
        patch[mask] = rgb


def render_frame(background: str, bodies: Sequence[Body], height: int = 64, width: int = 64,
                 isotropic: bool = False, background_brightness: float = 1.0) -> np.ndarray:
    """One frame [height, width, 3] uint8 RGB; bodies drawn in order (later ones on top)."""
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = tinted(BACKGROUNDS[background], 0.0, background_brightness)
    for body in bodies:
        draw_body(canvas, body, isotropic)
    return canvas
