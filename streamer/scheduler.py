"""Which streams' work goes into the next target forward: continuous batching under a token budget.

Each turn of the model worker, every stream with work offers one unit (its queue's head): a caption
step (one decoder step: a draft tree or an AR token), the close of a caption turn whose final is out
(its end and suffix text; the stream's next work waits for it), or a frame prefill. `plan_forward` picks
the units that run together as one ragged forward (sparrow_core/engine/ragged.py):

    1. units passed over STARVATION_FORWARDS forwards in a row, longest waiting first (no stream starves)
    2. caption steps and turn closes (they are on the latency path), in round-robin order
    3. frame prefills fill the rest, in round-robin order

A unit joins while the forward's tokens stay within the budget (the first always joins, whatever its
size); one that does not fit is passed over and a smaller one behind it may still fit. A budget of
UNBATCHED is the worker before batching: one unit per forward, strictly round-robin.

Live-mode dropping and replay backpressure are the queues' (stream_queue.py) and are unchanged: a
frame leaves its queue only when its unit is planned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

UNBATCHED = 0  # a budget of 0: one unit per forward, round-robin
# Tokens one forward may carry. Measured on this machine with the default model (2 shared cores, one
# torch thread; `sparrow-bench load`, docs in ARCHITECTURE.md): 8 live sparrow streams offer about
# 8 x 6 tree tokens + a few 17-slot frames a turn, which this holds in one forward.
DEFAULT_BATCH_TOKEN_BUDGET = 256
STARVATION_FORWARDS = 4  # forwards in a row a unit may be passed over before it goes first

Owner = TypeVar("Owner")


class UnitKind(Enum):
    CAPTION = "caption"
    CLOSE = "close"  # a caption turn's closing text, after its final
    FRAME = "frame"


@dataclass
class Unit(Generic[Owner]):
    """One stream's offer for the next forward."""

    owner: Owner  # the stream (the worker's)
    kind: UnitKind
    tokens: int  # the most slots its forward adds
    waited: int = 0  # forwards in a row it was passed over


def plan_forward(units: Sequence[Unit[Owner]], budget: int) -> list[Unit[Owner]]:
    """The units (given in round-robin order, at most one per stream) that run in the next forward."""
    if budget < 0:
        raise ValueError(f"the batch token budget is a token count >= 0 (0: unbatched), got {budget}")
    if not units:
        return []
    if budget == UNBATCHED:
        return [units[0]]

    def rank(i: int) -> tuple[int, int, int]:
        unit = units[i]
        if unit.waited >= STARVATION_FORWARDS:
            return (0, -unit.waited, i)
        return (2 if unit.kind is UnitKind.FRAME else 1, 0, i)

    chosen: list[Unit[Owner]] = []
    used = 0
    for i in sorted(range(len(units)), key=rank):
        unit = units[i]
        if chosen and used + unit.tokens > budget:
            continue
        chosen.append(unit)
        used += unit.tokens
    return chosen
