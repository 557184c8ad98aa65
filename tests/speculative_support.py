"""Shared by the speculative-decoding tests (no tests here): tiny random targets, one per architecture and
test session, and a captioning run (system text, frames, caption turns) any decoder can be driven through.
"""

from __future__ import annotations

import torch

from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.engine.caption_history import CaptionHistory, CaptionTurn
from sparrow_core.engine.layout import CaptionLayout
from sparrow_core.engine.stream import StreamConfig, TargetStream
from tiny_models import EOS_ID, random_frames, tiny_llava_onevision, tiny_qwen2_5_vl

SYSTEM = [3, 4, 5, 6]
CAPTION_PREFIX = [7, 8]
CAPTION_SUFFIX = [9]
CAPTIONS = 2  # two captions per run: the drafter must stay in sync across them (HSR)
MAX_TOKENS = 10
GREEDY = SamplingConfig()

TARGETS = {"llava_onevision": tiny_llava_onevision, "qwen2_5_vl": tiny_qwen2_5_vl}
_cache: dict = {}


def target_for(arch: str):
    if arch not in _cache:
        _cache[arch] = TARGETS[arch]()
    return _cache[arch]


def run_captions(target, decoder, max_tokens=MAX_TOKENS, stop_ids=(EOS_ID,), sampling=GREEDY,
                 captions_n=CAPTIONS, history: int | None = None):
    """System text, 2 frames, then captions_n x (a caption turn: prefix, decoding, end token if cut at
    the cap, suffix; one more frame); with `history`, only that many earlier caption turns stay in the
    stream (the rest evicted). Returns the captions, the stream and the decoding metrics."""
    frames = random_frames(2 + captions_n, seed=11)
    s = TargetStream(target, StreamConfig().with_needs(decoder.needs))
    s.append_text(SYSTEM)
    s.append_frames(frames[:2], [0.0, 0.5])
    layout = CaptionLayout(prefix=CAPTION_PREFIX, end_id=EOS_ID, suffix=CAPTION_SUFFIX, stop_ids=list(stop_ids))
    turns = CaptionHistory(history)
    captions = []
    metrics = DecodeMetrics()
    g = torch.Generator().manual_seed(0)
    for c in range(captions_n):
        turn = CaptionTurn(s, layout, turns)
        tokens = []
        steps = list(decoder.decode(s, turn.logits, max_tokens, layout.stop_ids, sampling, g, metrics))
        for step in steps:
            tokens += step.tokens
        assert [st.done for st in steps] == [False] * (len(steps) - 1) + [True]
        captions.append(tokens)
        turn.close(tokens)
        s.append_frames(frames[2 + c : 3 + c], [1.0 + c])
    return captions, s, metrics


def assert_same_stream(a, b):
    assert torch.equal(a.token_ids(), b.token_ids())
    assert torch.equal(a.positions(), b.positions())
    assert torch.equal(a.kinds(), b.kinds())
    assert a.next_position == b.next_position
