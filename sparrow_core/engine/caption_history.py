"""Caption turns in a stream: how one is opened and closed (`CaptionTurn`), and how many earlier turns
a stream keeps in its KV (`CaptionHistory`).

A turn is the caption layout of `layout.py` around decoded tokens:

    open:   (the open clip is closed) prefix    -> the next-token logits decoding starts from
    close:  end token (only when decoding stopped at the token cap, not on a stop token), suffix, in one
            forward (`close_forward`: the service's worker runs it with other streams' work); the history
            records the turn's span (and evicts the oldest turns beyond its limit) when it is recorded

The session, the drafter trainer and the speculative benchmark all go through `CaptionTurn`, so what is
trained, measured and served is laid out by one rule.

Why bound the history. A stream that runs for hours accumulates a caption turn every few seconds, all
of it text the visual budget never touches. Bounding it keeps text O(keep) instead of growing with the
stream, for the target and for the drafter (whose KV holds exactly the text), and keeps the model in the
context it was trained for: a captioner is trained with a handful of earlier captions in view, and
hundreds of them are a context it has never seen (the default model's card measures what that costs).

Each turn is the span of positions it took, [first, end) (prefix, caption, end token, suffix). Once more
than `keep` turns are recorded, the oldest turns' text is evicted with `TargetStream.evict_text`: the
frames between them are the visual budget's business, the preamble (system prompt and instruction)
always stays, and positions do not move, so the model sees the gap an eviction leaves, as in training.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from sparrow_core.engine.layout import CaptionLayout
from sparrow_core.engine.ragged import StreamForward
from sparrow_core.engine.stream import TargetStream


class CaptionHistory:
    def __init__(self, keep: int | None) -> None:
        """keep: earlier caption turns kept in the KV; None = all of them."""
        if keep is not None and keep < 0:
            raise ValueError("caption history must be >= 0 turns (or None to keep all)")
        self.keep = keep
        self.turns: deque[tuple[int, int]] = deque()  # [first, end) positions of each kept turn
        self._first: int | None = None
        self.turns_evicted = 0

    def begin_turn(self, stream: TargetStream) -> None:
        """Call before the turn's first token (its caption prefix) is appended. Closes the stream's open
        clip first: its closing slots (held frames, its separator) are the clip's, not the turn's."""
        stream.close_clip()
        self._first = stream.next_position

    def end_turn(self, stream: TargetStream) -> int:
        """Call after the turn's last token; evicts the oldest turns beyond `keep`. Returns slots evicted."""
        if self._first is None:
            raise RuntimeError("end_turn without begin_turn")
        self.turns.append((self._first, stream.next_position))
        self._first = None
        evicted = 0
        while self.keep is not None and len(self.turns) > self.keep:
            first, end = self.turns.popleft()
            evicted += stream.evict_text(first, end)
            self.turns_evicted += 1
        return evicted

    def cancel_turn(self) -> None:
        """Forget a turn begun but never ended (its tokens were rolled back)."""
        self._first = None

    def append_turn(self, stream: TargetStream, token_ids: list[int]) -> int:
        """Append a whole finished turn (e.g. a caption decided elsewhere) and apply the limit."""
        self.begin_turn(stream)
        stream.append_text(token_ids)
        return self.end_turn(stream)


class CaptionTurn:
    """One caption turn being decoded: opened on construction, then closed or cancelled exactly once."""

    def __init__(self, stream: TargetStream, layout: CaptionLayout, history: CaptionHistory, prefill: bool = True) -> None:
        """`prefill`: run the prefix's forward now (`logits`); False: it is `opening`, for the caller to run
        (with other streams' work in one ragged forward); its logits are then `opening.logits[-1]`."""
        self.stream, self.layout, self.history = stream, layout, history
        self.evicted = 0  # slots the history evicted when the turn closed
        history.begin_turn(stream)  # closes the open clip: cancel keeps its closing slots
        self._base = stream.length
        self.opening = stream.text_forward(layout.prefix)  # the prefix's forward: decoding starts after it
        self.logits: torch.Tensor | None = stream.run_forward(self.opening).logits[-1] if prefill else None  # [V] fp32

    def close(self, tokens: Sequence[int]) -> int:
        """End the turn after its decoded `tokens` (all in the stream already, a stop token included): its
        closing forward (`close_forward`) run now. Returns the slots the history evicted."""
        self.stream.run_forward(self.close_forward(tokens))
        return self.evicted

    def close_forward(self, tokens: Sequence[int]) -> StreamForward:
        """`close` as ONE forward to run (a scheduler may run it with other streams' work); the history
        records the turn (and evicts, `evicted`) when the forward is recorded. Nothing else may append to
        the stream before it runs.

        Its slots: the end token (only when decoding stopped at the token cap, not on a stop token), then
        the suffix. Where the chat template renders a finished turn's opening otherwise than its generation
        prompt (`CaptionLayout.history_prefix`), the turn is re-laid in that form: its text from the first
        token that differs is rolled back now and goes into this forward again before the end token (a
        prefill of about the caption's length), so the stream is the template's multi-turn sequence."""
        closing = [] if tokens and tokens[-1] in self.layout.stop_ids else [self.layout.end_id]
        history_prefix = self.layout.history_prefix
        if history_prefix is not None:
            prefix = self.layout.prefix
            same = 0
            while same < min(len(prefix), len(history_prefix)) and prefix[same] == history_prefix[same]:
                same += 1
            caption = self.stream.token_ids()[self._base + len(prefix) :].tolist()  # the decoded tokens
            self.stream.rollback(self.stream.length - (self._base + same))
            closing = [*history_prefix[same:], *caption, *closing]
        forward = self.stream.text_forward([*closing, *self.layout.suffix])
        forward.wants_logits = False  # nothing is decoded after a closed turn's text
        advance = forward.after

        def recorded() -> None:
            advance()
            self.evicted = self.history.end_turn(self.stream)

        forward.after = recorded
        return forward

    def cancel(self) -> None:
        """Undo the turn: the stream is as before it was opened (another decoder may caption that state)."""
        self.stream.rollback(self.stream.length - self._base)
        self.history.cancel_turn()
