"""`sparrow-bench accuracy`'s invented-reference count: what it takes as a caption's context."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from sparrow_core.bench.accuracy import in_context

TPF = 17  # the default model's visual tokens per frame


def _stream(n: int, frames_per_segment: int = 4) -> list[SimpleNamespace]:
    """n segments of 4 frames; each segment's facts stand in as its index."""
    return [SimpleNamespace(frames=np.zeros((frames_per_segment, 1, 1, 3), np.uint8), segment=SimpleNamespace(facts=i))
            for i in range(n)]


def test_context_is_the_kept_caption_turns_and_the_frames_in_the_budget() -> None:
    """By hand, 10 segments of 4 frames at 17 tokens a frame. A budget of 408 keeps 24 frames: segments
    i-5..i. A caption history of 2 keeps the turns of i-2 and i-1. Caption 9's context is the union,
    segments 4..9; caption 3's is 0..3 (the stream's start)."""
    segs = _stream(10)
    assert in_context(segs, 9, 408, 2, TPF) == [4, 5, 6, 7, 8, 9]
    assert in_context(segs, 3, 408, 2, TPF) == [0, 1, 2, 3]
    # 68 tokens: 4 frames, segment 9's own; the captions of 4..8 reach further back than the frames
    assert in_context(segs, 9, 68, 5, TPF) == [4, 5, 6, 7, 8, 9]
    # 100 tokens: 5 frames, segment 9 and the last frame of 8, which counts as holding segment 8
    assert in_context(segs, 9, 100, 0, TPF) == [8, 9]
    # no budget (every frame kept) or every caption kept: the whole stream
    assert in_context(segs, 9, None, 2, TPF) == list(range(10))
    assert in_context(segs, 9, 68, None, TPF) == list(range(10))
    assert in_context(segs, 0, 408, 2, TPF) == [0]  # a first caption holds only its own segment


def test_a_misnamed_shape_is_not_an_invented_event() -> None:
    """Held-out world 1000007 (the `normal` row's 8th stream), by hand. A blue diamond is on screen from the
    start and leaves at segment 6; an orange circle enters from the right at 5, turns green at 7 and shrinks
    at 8; at 9 it is the only object. The shipped target captions segment 9 'the green diamond that entered
    earlier now slides to the right': the shape is wrong (the shape score counts that), the event is real.
    The object is the one of the named colour; before, the count took any diamond, found the blue one (it
    never entered) and called the reference invented. 'the green diamond that grew earlier' (segment 11's
    caption) stays invented: the circle shrank."""
    from sparrow_core.world.episode import iter_segments
    from sparrow_core.world.facts import Reference, reference_supported

    segs = [s.facts for s in iter_segments(1000007, 48.0, 1.0, render=False)]
    assert [o.key for o in segs[9].objects] == [("green", "circle")]
    assert any(e.kind == "enter" and e.detail == "right" and e.obj.shape == "circle" for e in segs[5].events)
    assert ("blue", "diamond") in [o.key for o in segs[5].objects]
    context = segs[4:10]  # segments 4..9: what 24 frames in view hold at segment 9
    assert reference_supported(Reference(("green", "diamond"), "enter"), segs[9], context)
    assert reference_supported(Reference(("green", "diamond"), "enter", "right"), segs[9], context)
    assert not reference_supported(Reference(("green", "diamond"), "enter", "left"), segs[9], context)
    assert not reference_supported(Reference(("green", "diamond"), "grow"), segs[9], context)
    assert reference_supported(Reference(("green", "circle"), "recolour", "orange"), segs[9], context)
    assert not reference_supported(Reference(("green", "circle"), "recolour", "orange"), segs[9], segs[8:10])
    # named by shape alone (no green object): any circle; no circle entered in 0..4
    assert not reference_supported(Reference(("red", "circle"), "enter"), segs[4], segs[0:5])
