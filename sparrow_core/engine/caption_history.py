"""How many earlier caption turns a stream keeps in its KV.

A stream that runs for hours accumulates a caption turn every few seconds: after 25,000 visual tokens of
stream at 17 tokens a frame, 1 frame a second and a caption every 4 s that is ~370 turns and ~9,000
text tokens, all of which the visual budget never touches. Two reasons to bound them too:

- memory and time: text is then O(keep) instead of growing with the stream, for the target and for
  the drafter, whose KV holds exactly the text;
- accuracy: a captioner is trained with a handful of earlier captions in view; hundreds of them are a
  context it has never seen (measured on the default model: colour accuracy 0.68 behind 15 turns,
  0.23 behind 370).

Each turn is the span of positions it took, [first, end) (prefix, caption, end token, suffix). Once more
than `keep` turns are recorded, the oldest turns' text is evicted with `TargetStream.evict_text`: the
frames between them are the visual budget's business, the preamble (system prompt and instruction)
always stays, and positions do not move, so the model sees the gap an eviction leaves, as in training.
"""

from __future__ import annotations

from collections import deque

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
        """Call before the turn's first token (its caption prefix) is appended."""
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

    def append_turn(self, stream: TargetStream, token_ids: list[int]) -> int:
        """Append a whole finished turn (e.g. a caption decided elsewhere) and apply the limit."""
        self.begin_turn(stream)
        stream.append_text(token_ids)
        return self.end_turn(stream)
