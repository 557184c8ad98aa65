"""The learning-rate schedule the trainers share: linear warm-up, then half a cosine down to a floor,
as a `torch.optim.lr_scheduler.LambdaLR` over each parameter group's base learning rate.

    factor(step) = (step + 1) / warmup                                   step < warmup
                 = floor + (1 - floor) * (1 + cos(pi * progress)) / 2     after, progress in [0, 1]

`progress` is a callable of the step, so a trainer decays over steps (drafter, target) or over its
time budget (the vision stage, whose decay runs from the start, under the warm-up ramp:
`decay_in_warmup`). A resumed run builds the scheduler at the step it resumes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_decay(frac: float, floor: float) -> float:
    """Factor on the peak learning rate at `frac` in [0, 1] of the decay: half a cosine from 1 down to `floor`."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def steps_progress(warmup: int, total: Callable[[], int]) -> Callable[[int], float]:
    """Progress of the decay at a step: the steps after warm-up over those left until `total()` (read at
    every step: a trainer may re-estimate its length)."""
    return lambda step: min(1.0, (step - warmup) / max(1, total() - warmup))


def run_progress(warmup: int, max_steps: int, time_spent: Callable[[], float]) -> Callable[[int], float]:
    """Progress of the decay of a run that ends at `max_steps` or when its time is up, whichever comes first:
    the larger of the step fraction (after warm-up) and `time_spent()`, the fraction of its time budget spent,
    read at every step. So the cosine reaches its floor when the run ends, however its speed changes on the way
    (a length estimated once from the first steps' speed is wrong both ways on a shared machine)."""
    by_steps = steps_progress(warmup, lambda: max_steps)
    return lambda step: min(1.0, max(by_steps(step), time_spent()))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    base_lrs: Sequence[float],
    warmup: int,
    progress: Callable[[int], float],
    floor: float,
    start_step: int = 0,
    decay_in_warmup: bool = False,
) -> LambdaLR:
    """The schedule on `optimizer` (one base learning rate per parameter group), at `start_step`: the
    groups' lr is set for that step now, and for the next on every `scheduler.step()` after `opt.step()`."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = base

    def factor(step: int) -> float:
        if decay_in_warmup:
            return min(1.0, (step + 1) / warmup) * cosine_decay(progress(step), floor)
        if step < warmup:
            return (step + 1) / warmup
        return cosine_decay(progress(step), floor)

    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)
