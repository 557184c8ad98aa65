"""Vectorised numpy rendering of bodies to uint8 RGB frames."""

from collections.abc import Sequence

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


def draw_body(canvas: np.ndarray, body: Body) -> None:
    """Paint one body into canvas [H, W, 3] uint8 in place (clipped at the frame border)."""
    height, width = canvas.shape[:2]
    h = body.size / 2
    x0, x1 = max(0, int(np.floor((body.x - h) * width))), min(width, int(np.ceil((body.x + h) * width)))
    y0, y1 = max(0, int(np.floor((body.y - h) * height))), min(height, int(np.ceil((body.y + h) * height)))
    if x0 >= x1 or y0 >= y1:
        return
    dx = (((np.arange(x0, x1) + 0.5) / width - body.x) / h)[None, :]  # [1, w]
    dy = (((np.arange(y0, y1) + 0.5) / height - body.y) / h)[:, None]  # [h, 1]
    mask = shape_mask(body.shape, dx, dy)  # [h, w]
    patch = canvas[y0:y1, x0:x1]  # view [h, w, 3]
    rgb = np.array(COLOURS[body.colour], dtype=np.uint8)
    if body.texture == "striped":
        dark = (np.floor((dy + 1.0) * STRIPES / 2).astype(np.int64) % 2 == 1)  # [h, 1]
        patch[mask & ~dark] = rgb
        patch[mask & dark] = (rgb * STRIPE_DARKEN).astype(np.uint8)
    else:
        patch[mask] = rgb


def render_frame(background: str, bodies: Sequence[Body], height: int = 64, width: int = 64) -> np.ndarray:
    """One frame [height, width, 3] uint8 RGB; bodies drawn in order (later ones on top)."""
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[background]
    for body in bodies:
        draw_body(canvas, body)
    return canvas
