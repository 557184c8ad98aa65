"""Many streams' slots through one target forward (a ragged batch), and the step protocol that feeds it.

A `StreamForward` is what one stream wants from a target forward: its new slots (embeddings, positions,
bookkeeping), and how they attend (causal after the stream's KV, or a draft tree). `TargetStream` makes
them (`text_forward`, `tree_forward`, `frames_forward`) and records them afterwards; its own appends are
`forward_streams` of one. `forward_streams(target, forwards)` runs any number of them, of different
streams, as ONE forward:

    vision tower: once over every forward's frames not encoded yet (`TargetModel.vision_embeds`)
    embeds [1, N, H] = the streams' new slots concatenated (N = n_1 + ... + n_k), positions [P, N]
    linear layers, norms, RoPE: once over all N tokens
    attention: per stream, over that stream's own KV, each stream's cache taking its own keys and values
               in place (`TargetModel.streams_forward`: engine/text_stack.py, or for a stack it does not
               reproduce transformers' forward with kernels/ragged.py behind the registered attention)
    lm_head: once over the rows whose logits are wanted

One forward of one stream is exactly the stream's own forward (`TargetModel.stream_forward`), so the
unbatched path is this path with one stream.

A `Step` is one unit of a decoder or a caption that needs one target forward: `prepare()` gives the
forward (drafting happens here), `finish(forward)` takes its logits and says what the step decided.
`run_steps` drives one `Step` alone; a scheduler (streamer/scheduler.py) drives many through one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.engine.target import TargetModel, VisionInput


class ForwardedStream(Protocol):
    """What a forward needs of its stream (`stream.TargetStream`)."""

    target: TargetModel
    cache: StreamKVCache
    hidden_keep: set[int]  # the hidden-state indices its record needs

    def record_forward(self, forward: StreamForward, last: torch.Tensor | None,
                       hidden: dict[int, torch.Tensor] | None) -> None:
        """Record the forward's slots after it ran (last [n, H], hidden index -> [n, H]; None: no slots)."""
        ...


@dataclass(eq=False)
class StreamForward:
    """One stream's new slots in a target forward (made by `TargetStream`, recorded by it afterwards)."""

    stream: ForwardedStream
    embeds: torch.Tensor | None  # [n, H] LM input embeddings, on the model's device; None while `vision` is set
    positions: torch.Tensor  # [P, n] int64, CPU
    ids: torch.Tensor  # [n] int64, CPU
    kinds: torch.Tensor  # [n] uint8 TokenKind, CPU
    times: torch.Tensor  # [n] float64, CPU
    frames: torch.Tensor  # [n] int64, CPU (-1: text)
    tree_mask: torch.Tensor | None = None  # [n, n] bool on the model's device (a draft tree); None: causal
    wants_logits: bool = False  # text and trees: fp32 logits after each slot, [n, V]
    after: Callable[[], None] | None = None  # the stream's own follow-up once the slots are recorded
    logits: torch.Tensor | None = None  # [n, V] fp32, set by the forward when wanted
    vision: VisionInput | None = None  # frames not through the vision tower yet: the forward sets `embeds` from it

    @property
    def size(self) -> int:
        return self.ids.numel()


@torch.no_grad()
def forward_streams(target: TargetModel, forwards: Sequence[StreamForward]) -> None:
    """Run the forwards (at most one per stream) as one target forward (`TargetModel.streams_forward`);
    each stream records its slots (and, where wanted, `forward.logits` is set). An empty forward is only
    recorded."""
    streams = [f.stream for f in forwards]
    if len(set(map(id, streams))) != len(streams):
        raise ValueError("a ragged forward takes at most one forward per stream")
    active = [f for f in forwards if f.size]
    encode = [f for f in active if f.vision is not None]
    if encode:  # every stream's frames through the vision tower in one call
        for f, embeds in zip(encode, target.vision_embeds([f.vision for f in encode])):
            f.embeds, f.vision = embeds, None
    keep = set().union(*(f.stream.hidden_keep for f in active))
    outs = target.streams_forward([(f.embeds, f.positions, f.stream.cache, f.tree_mask) for f in active], keep) if active else []
    wanted = [(f, last) for f, (last, _) in zip(active, outs) if f.wants_logits]
    if wanted:
        logits = target.lm_head(torch.cat([last for _, last in wanted])).float()  # [sum n, V]
        for (f, _), out in zip(wanted, torch.split(logits, [f.size for f, _ in wanted])):
            f.logits = out
    for f, (last, hidden) in zip(active, outs):
        f.stream.record_forward(f, last, hidden)
    for f in forwards:
        if not f.size:
            f.stream.record_forward(f, None, None)


Result = TypeVar("Result", covariant=True)


class Step(Protocol[Result]):
    """A unit of work that needs target forwards, one step per forward."""

    @property
    def done(self) -> bool:
        """No step is left."""
        ...

    def prepare(self) -> StreamForward:
        """This step's forward (what it appends to its stream)."""
        ...

    def finish(self, forward: StreamForward) -> Result:
        """After the forward ran: what the step decided."""
        ...


def run_steps(step: Step[Result]) -> Iterator[Result]:
    """Drive one `Step` alone: each step's forward is its stream's own forward."""
    while not step.done:
        forward = step.prepare()
        forward_streams(forward.stream.target, [forward])
        yield step.finish(forward)
