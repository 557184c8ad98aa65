"""The learning-rate decay the trainers share."""

import math


def cosine_decay(frac: float, floor: float) -> float:
    """Factor on the peak learning rate at `frac` in [0, 1] of the decay: half a cosine from 1 down to `floor`."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
