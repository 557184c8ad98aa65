"""Speculative decoders hosted by `CaptionEngine`: every method gives AR's captions through sessions."""

from __future__ import annotations

import pytest
import torch

from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
from sparrow_core.session import CaptionEngine, SessionConfig
from sparrow_core.train.data import WorldStreamSpec, world_segments

CAPTION_TOKENS = 10
SEGMENTS = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def session_captions(engine: CaptionEngine, decoding: str):
    session = engine.open_session(SessionConfig(decoding=decoding, max_caption_tokens=CAPTION_TOKENS))
    texts, taus = [], []
    for seg in world_segments(WorldStreamSpec(seed=5, segments=SEGMENTS)):
        session.ingest(seg.frames, seg.times)
        progress = session.caption(seg.segment.t1)
        texts.append(progress.text)
        taus.append(progress.tau)
    return texts, session.stream.token_ids().clone(), taus


@pytest.mark.parametrize("variant", ["sparrow", "msd"])
def test_engine_hosts_the_drafter_decoders(world_target, variant):
    torch.manual_seed(2)
    drafter = TextAnchoredDrafter(world_target, DrafterConfig(variant=variant))
    engine = CaptionEngine(world_target, {variant: drafter})
    assert set(engine.info.decoding_methods) == {"ar", variant, "ngram"}
    assert engine.resolve_decoding("auto") == ("sparrow" if variant == "sparrow" else "ar")
    want, want_ids, _ = session_captions(engine, "ar")
    for decoding in (variant, "ngram"):
        got, ids, taus = session_captions(engine, decoding)
        assert got == want and torch.equal(ids, want_ids)
        assert all(t >= 1.0 for t in taus)
