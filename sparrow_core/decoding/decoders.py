"""The decoders a captioning engine offers, one type for all of them.

A `Decoder` turns a stream's next-token logits into caption tokens, one `DecodeStep` per target
forward, and says what its streams must keep (`needs`). `ar.ARDecoder` is the target alone;
`speculative.SpeculativeDecoder` drafts with a proposer and verifies in one forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

from sparrow_core.decoding.ar import ARDecoder, DecodeStep
from sparrow_core.decoding.drafter import TextAnchoredDrafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.decoding.proposers.ngram import NgramProposer
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import SpeculativeDecoder
from sparrow_core.decoding.tree_policy import DeviceProfile, served_policy
from sparrow_core.engine.ragged import Step
from sparrow_core.engine.stream import StreamNeeds, TargetStream


class DecodeSteps(Step[DecodeStep], Protocol):
    """A decode's steps (`Decoder.start`)."""

    next_token: int  # the token the next step emits, already decided by the target (-1 when done)

    def draft_tail(self) -> list[int]:
        """The next token and an unverified continuation below it, for display (AR: none; empty when done)."""
        ...


class Decoder(Protocol):
    name: str
    needs: StreamNeeds  # what a stream must keep beyond the defaults for this decoder
    max_tree_tokens: int  # the most slots one step appends before it keeps what it verified (AR: 1)

    def prefill(self, stream: TargetStream) -> None:
        """Catch up with the stream now (e.g. a drafter's KV, while frames arrive)."""
        ...

    def start(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
              sampling: SamplingConfig, generator: torch.Generator | None = None,
              metrics: DecodeMetrics | None = None, draft_ahead: bool = True) -> DecodeSteps:
        """A decode from `logits` [V], the stream's next-token logits, as steps of one target forward each
        (`ragged.Step`: a scheduler may run many streams' steps in one forward); every emitted token ends up
        in the stream; each step is recorded in `metrics` when given. A drafting decoder drafts each step's tree
        as soon as it can (`draft_ahead`) or leaves it to `speculative.draft_together` for many streams at once."""
        ...

    def decode(self, stream: TargetStream, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
               sampling: SamplingConfig, generator: torch.Generator | None = None,
               metrics: DecodeMetrics | None = None) -> Iterator[DecodeStep]:
        """`start`'s steps run one by one (`ragged.run_steps`)."""
        ...


BUILT_IN = ("ar", "ngram")  # the methods that need no drafter
AUTO = "auto"  # not a method: a session's choice of sparrow when it is loaded, else ar (CaptionEngine)


def build_decoders(drafters: Mapping[str, TextAnchoredDrafter] | None = None,
                   tree_profile: DeviceProfile | None = None) -> dict[str, Decoder]:
    """name -> decoder: `ar` and `ngram` (prompt lookup, no drafter) always, and one speculative decoder per
    drafter under its name (`sparrow`, `eagle`, `msd`, or any other, e.g. an ablation's). A drafter the
    `tree_profile` measured gets its tree from a `TreePolicy` over it; any other grows its own tree."""
    decoders: dict[str, Decoder] = {"ar": ARDecoder(), "ngram": SpeculativeDecoder(NgramProposer())}
    for name, drafter in (drafters or {}).items():
        if name in BUILT_IN or name == AUTO:
            raise ValueError(f"a drafter cannot be named {name!r} (reserved: {', '.join((*BUILT_IN, AUTO))})")
        decoders[name] = SpeculativeDecoder(DrafterProposer(drafter, served_policy(tree_profile, name)))
    return decoders
