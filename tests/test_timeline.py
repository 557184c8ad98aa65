"""Media-time rules at extreme values: each decision is arithmetic, so every call ends at once, whatever
the timestamps and the cadence (a deadline per call, generous enough not to be a speed assertion)."""

from __future__ import annotations

import threading

import pytest

from sparrow_core.timeline import FrameDecision, Timeline

DEADLINE_S = 5.0


def decide(timeline: Timeline, ts: float) -> FrameDecision:
    """timeline.on_frame(ts), failing the test if it does not return within DEADLINE_S."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(timeline.on_frame(ts)), daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    assert not worker.is_alive(), f"on_frame({ts}) did not return within {DEADLINE_S}s"
    return out[0]


@pytest.mark.parametrize(
    "every, stamps, captions",
    [
        # nanoseconds sent as seconds: one frame ~57 years of segments later
        (4.0, [0.0, 1.8e18], [False, True]),
        (4.0, [0.0, 1e300, 1e300, 1.0000000001e300], [False, True, False, True]),
        # a cadence far below the float spacing of the timestamps
        (1e-7, [0.0, 3600.0, 3600.0, 7200.0], [False, True, False, True]),
        (1e-7, [1.8e18, 1.8e18 + 256, 1.8e18 + 256, 1.8e18 + 1024], [False, True, False, True]),
        # the segment index overflows a double: every strictly later frame starts a segment
        (5e-324, [0.0, 1.0, 1.0, 2.0], [False, True, False, True]),
        (1.7e308, [0.0, 1e300, 1.7e308], [False, False, True]),
    ],
)
def test_cadence_is_arithmetic_at_extreme_values(every: float, stamps: list[float], captions: list[bool]) -> None:
    timeline = Timeline(caption_every_s=every)
    assert [decide(timeline, ts).caption_before for ts in stamps] == captions


def test_boundaries_are_multiples_of_the_cadence_from_the_first_frame() -> None:
    timeline = Timeline(caption_every_s=0.1)
    stamps = [5.0 + i * 0.05 for i in range(41)]  # 5.0 .. 7.0
    due = [round(ts, 2) for ts in stamps if decide(timeline, ts).caption_before]
    assert due == [round(5.0 + k * 0.1, 2) for k in range(1, 21)]
    # a long jump crosses many boundaries but is one caption; the next one is at the following boundary
    timeline = Timeline(caption_every_s=1.0)
    assert [decide(timeline, ts).caption_before for ts in (0.0, 1e9 + 0.5, 1e9 + 0.9, 1e9 + 1.0)] == [
        False, True, False, True,
    ]


def test_sampling_at_extreme_values() -> None:
    timeline = Timeline(sampling_fps=1e-30)  # a period of 1e30 s: only the first frame
    assert [decide(timeline, ts).keep for ts in (0.0, 1e18, 1e29)] == [True, False, False]
    timeline = Timeline(sampling_fps=240.0)
    assert [decide(timeline, ts).keep for ts in (1e300, 1e300, 1.0000000001e300)] == [True, False, True]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_rules_and_timestamps_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="caption_every_s"):
        Timeline(caption_every_s=bad)
    with pytest.raises(ValueError, match="sampling_fps"):
        Timeline(sampling_fps=bad)
    if bad != -1.0:
        with pytest.raises(ValueError, match="finite"):
            Timeline(caption_every_s=1.0).on_frame(bad)


def spans(timeline: Timeline, stamps: list[float], close_at: set[int] = frozenset()) -> list[tuple[float, float]]:
    """The caption spans of a stream of frames at `stamps`, as the offline loop and the handler take them:
    each cadence caption ends at its decision's caption_end_s, a caption requested after frame i (i in
    close_at) and the last one at end_now(); each starts where the previous ended. A caption with no frame
    since the previous one is not taken (it would describe nothing)."""
    ends: list[float] = []
    pending = False
    for i, ts in enumerate(stamps):
        decision = decide(timeline, ts)
        if decision.caption_before and pending:
            ends.append(decision.caption_end_s)
        pending = True
        if i in close_at:
            ends.append(timeline.end_now())
            pending = False
    ends.append(timeline.end_now())
    return list(zip([0.0, *ends[:-1]], ends))


@pytest.mark.parametrize("sampling_fps", [0.0, 1.0, 3.0])
def test_a_segment_includes_its_last_frame_duration(sampling_fps: float) -> None:
    """An 8 s clip at 8 fps with a 4 s cadence: 0-4 and 4-8, as the world's segments [i L, (i + 1) L), not
    0-3.875 and 4-7.875; the frames the sampling leaves out are media all the same."""
    stamps = [i / 8 for i in range(64)]
    assert spans(Timeline(4.0, sampling_fps), stamps) == [(0.0, 4.0), (4.0, 8.0)]
    assert spans(Timeline(0.0, sampling_fps), stamps) == [(0.0, 8.0)]  # no cadence: one segment


def test_a_segment_closed_early_ends_one_frame_after_its_last_frame() -> None:
    stamps = [i * 0.5 for i in range(12)]  # 0 .. 5.5 s, 0.5 s frames
    # requested after the frame at 1.0 and after 3.5 (in the second segment): 1.5 and 4.0, clamped to its boundary
    assert spans(Timeline(4.0), stamps, close_at={2, 7}) == [(0.0, 1.5), (1.5, 4.0), (4.0, 6.0)]
    # the frame duration is the latest spacing (a variable-rate source), and a gap crossing several
    # boundaries ends the segment at the boundary after its last frame
    assert spans(Timeline(4.0), [0.0, 1.0, 1.25, 9.0, 9.1]) == [(0.0, 4.0), (4.0, 9.2)]
    assert spans(Timeline(4.0), [2.0]) == [(0.0, 2.0)]  # a lone frame has no duration
    assert Timeline(4.0).end_now() == 0.0  # nothing received yet
