"""Batched decoding across streams: one ragged target forward for many streams gives each stream exactly
what its own forwards give, and the worker's scheduler keeps to its token budget without starving anyone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service_support import SEND_FPS, finals, offline_captions, replay_config, run_with_server, world_frames
from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
from sparrow_core.decoding.proposers.drafter import DrafterProposer
from sparrow_core.engine.checkpoint import load_target
from sparrow_core.engine.ragged import StreamForward, forward_streams
from sparrow_core.engine.stream import StreamConfig, TargetStream
from sparrow_core.engine.tiny_targets import (
    random_frames,
    save_tiny_checkpoint,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
from sparrow_core.offline import caption_frames
from sparrow_core.session import CaptionEngine, CaptionSession, CaptionSteps, SessionConfig, draft_captions
from sparrow_core.timeline import Timeline
from streamer.client import CaptionClient, frame_requests
from streamer.proto import pb
from streamer.scheduler import STARVATION_FORWARDS, UNBATCHED, Unit, UnitKind, plan_forward

EVERY_S = 4.0
MAX_TOKENS = 10
# (clip seed, clip seconds, method): streams of different lengths and methods, run side by side
STREAMS = ((3, 12.0, "ar"), (4, 8.0, "sparrow"), (5, 10.0, "ngram"), (6, 6.0, "sparrow"))


def stream_work(frames: list[tuple[np.ndarray, float]]) -> list[tuple]:
    """A stream's work in order, by `caption_frames`' rule: ("frame", rgb, ts) and ("caption", end_s)."""
    timeline, pending, work = Timeline(EVERY_S, SEND_FPS), False, []
    for rgb, ts in frames:
        decision = timeline.on_frame(ts)
        if decision.caption_before and pending:
            work.append(("caption", decision.caption_end_s))
            pending = False
        if decision.keep:
            work.append(("frame", rgb, ts))
            pending = True
    if pending:
        work.append(("caption", timeline.end_now()))
    return work


def run_side_by_side(engine: CaptionEngine, sessions: list[CaptionSession], works: list[list[tuple]]) -> list[list[str]]:
    """Every stream's next unit (a frame prefill, its caption's next step, or the close of its last caption's
    turn, as the worker runs them) in ONE forward per round, the captions' trees drafted together before it,
    until all streams are done; returns each stream's final captions."""
    texts: list[list[str]] = [[] for _ in sessions]
    cursor = [0] * len(sessions)
    running: dict[int, CaptionSteps] = {}
    closing: dict[int, StreamForward] = {}  # a final caption's turn close: the stream's next unit
    while True:
        round_: list[tuple[int, StreamForward]] = list(closing.items())
        closed = set(closing)
        for i, (session, work) in enumerate(zip(sessions, works)):
            if i not in running and i not in closing and cursor[i] < len(work):
                item = work[cursor[i]]
                cursor[i] += 1
                if item[0] == "frame":
                    round_.append((i, session.ingest_forward(item[1][None], [item[2]])))
                    continue
                running[i] = session.open_caption(item[1], draft_ahead=False, close_later=True)
        closing.clear()
        draft_captions(list(running.values()))  # every stream's tree in step: one drafter forward per depth
        round_ += [(i, steps.prepare()) for i, steps in running.items()]
        if not round_:
            return texts
        forward_streams(engine.target, [fw for _, fw in round_])
        for i, fw in round_:
            if i in closed:
                sessions[i].catch_up()  # the closed turn into the drafter, as the worker does
            elif i in running:
                progress = running[i].finish(fw)
                if progress.done:
                    texts[i].append(progress.text)
                    closing[i] = running.pop(i).closing


@pytest.fixture
def tower_calls(monkeypatch):
    """watch(target) -> calls: each call of the target's vision tower (`vision_embeds`), as the number of
    inputs (frame blocks, one per stream) it encoded."""

    def watch(target) -> list[int]:
        calls: list[int] = []
        encode = target.vision_embeds

        def counted(inputs):
            calls.append(len(inputs))
            return encode(inputs)

        monkeypatch.setattr(target, "vision_embeds", counted)
        return calls

    return watch


def tiny_engine(arch: str, root) -> CaptionEngine:
    """A tiny random checkpoint of `arch` (its class's chat template, a world tokenizer) with a random drafter."""
    target = load_target(save_tiny_checkpoint(arch, root))
    torch.manual_seed(3)
    return CaptionEngine(target, {"sparrow": TextAnchoredDrafter(target, DrafterConfig())})


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[int, list[tuple[np.ndarray, float]]]:
    root = tmp_path_factory.mktemp("clips")
    return {seed: world_frames(root, seed=seed, seconds=seconds)[1] for seed, seconds, _ in STREAMS}


@pytest.mark.parametrize("which", ["default", "default-transformers", "qwen2_5_vl", "llava_onevision"])
def test_streams_batched_in_one_forward_caption_exactly_as_alone(which, engine, clips, tmp_path, monkeypatch,
                                                                tower_calls) -> None:
    """Four streams of different lengths and methods (ar, sparrow, ngram), their frame prefills and caption
    steps mixed in one forward a round (their frames through the vision tower in one call): each stream's
    greedy finals and its whole KV token sequence equal that stream run alone through `caption_frames` (the
    sparrow-caption loop). "default-transformers": the default model through transformers' forward (a stack
    TextStack does not reproduce: kernels/ragged.py). "llava_onevision": its template renders a finished turn's
    opening otherwise than the generation prompt, so each turn's close (run in the next round's forward) re-lays
    the caption."""
    if which in ("qwen2_5_vl", "llava_onevision"):
        engine = tiny_engine(which, tmp_path)
        assert (engine.target.caption_layout().history_prefix is not None) == (which == "llava_onevision")
    elif which == "default-transformers":
        monkeypatch.setattr(engine.target, "text_stack", None)
    configs = [SessionConfig(decoding=method, max_caption_tokens=MAX_TOKENS) for _, _, method in STREAMS]
    alone, alone_ids = [], []
    for (seed, _, _), config in zip(STREAMS, configs):
        session = engine.open_session(config)
        alone.append([cue.text for cue in caption_frames(session, clips[seed], EVERY_S, SEND_FPS)])
        alone_ids.append(session.stream.token_ids().clone())
        session.close()
    sessions = [engine.open_session(config) for config in configs]
    calls = tower_calls(engine.target)
    together = run_side_by_side(engine, sessions, [stream_work(clips[seed]) for seed, _, _ in STREAMS])
    assert together == alone
    assert max(calls) == len(STREAMS)  # the first round's frames: every stream's in one tower call
    for session, ids in zip(sessions, alone_ids):
        assert torch.equal(session.stream.token_ids(), ids)
        session.close()


@pytest.mark.parametrize("tree", [TreeConfig.chain(4), TreeConfig(total_tokens=10, depth=3, top_k=3)])
def test_trees_drafted_together_are_each_streams_own(engine, clips, tree) -> None:
    """Three streams of different lengths (one with text its drafter has not seen yet, taken in by the root's
    forward; one with a shallower cap) drafted in step, one drafter forward per depth for all: each tree is
    the one its stream drafts alone, and each drafter KV mirrors its stream afterwards."""
    drafter = engine.decoders["sparrow"].proposer.drafter
    sessions = [engine.open_session(SessionConfig(decoding="sparrow")) for _ in range(3)]
    for session, (seed, _, _), frames in zip(sessions, STREAMS, (1, 3, 2)):
        for rgb, ts in clips[seed][:frames]:
            session.ingest(rgb[None], [ts])
    streams = [session.stream for session in sessions]
    streams[1].append_text(engine.target.encode_text("a red ball"))  # pending for the root's forward
    requests = [(stream, root, depth) for stream, root, depth in zip(streams, (5, 9, 13), (tree.depth, 2, tree.depth))]
    alone = [DrafterProposer(drafter, tree).propose(*request) for request in requests]
    together = DrafterProposer(drafter, tree)
    trees = together.propose_many(requests)
    for got, want in zip(trees, alone):
        assert got.tokens.tolist() == want.tokens.tolist() and got.parents.tolist() == want.parents.tolist()
        torch.testing.assert_close(got.scores, want.scores)
    for stream in streams:
        state = together.state(stream)
        assert state.cache.length == state.entries and state.pending(stream)[0].numel() == 0
    with pytest.raises(ValueError, match="at most one tree per stream"):
        together.propose_many([requests[0], requests[0]])
    for session in sessions:
        session.close()


@pytest.mark.parametrize("which", ["default", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_frames_of_many_streams_through_one_tower_call_are_each_streams_own(which, engine, tower_calls) -> None:
    """Three streams' frame chunks (Qwen-VL: frames of different sizes, so patch grids of different shapes;
    a held odd frame; "llava_onevision": the template's layout) prefilled in one ragged forward, their
    frames through the vision tower in ONE call: each stream's frame embeddings equal those of its frames
    encoded alone to fp32 rounding (on this machine's CPU they are bit-identical), and its KV tokens are
    its own. The greedy finals of batched encodings: the side-by-side and service tests above and below."""
    target = {"default": lambda: engine.target, "llava_onevision": tiny_llava_onevision,
              "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[which]()
    sizes, counts = ((40, 48), (56, 56), (36, 64)), (2, 3, 1)  # Qwen: 3 frames = a temporal patch and one held
    chunks = [(random_frames(n, h, w, seed=k), [0.5 * i for i in range(n)]) for k, ((h, w), n) in enumerate(zip(sizes, counts))]
    config = StreamConfig(keep_visual_embeds=True)
    alone = []
    for rgb, ts in chunks:
        stream = TargetStream(target, config)
        stream.append_frames(rgb, ts)
        alone.append(stream)
    calls = tower_calls(target)
    streams = [TargetStream(target, config) for _ in chunks]
    forward_streams(target, [s.frames_forward(rgb, ts) for s, (rgb, ts) in zip(streams, chunks)])
    # Qwen: the lone frame is held (no slots yet), so two streams' patches are encoded
    assert calls == [sum(1 for s in alone if s.length)]
    for together, own in zip(streams, alone):
        assert torch.equal(together.token_ids(), own.token_ids())
        assert torch.equal(together.positions(), own.positions())
        torch.testing.assert_close(together.visual_embeds()[1], own.visual_embeds()[1])  # fp32 tolerances
        # the clip's close (Qwen: the held frame padded to a patch; LLaVA-OneVision: its image_newline)
        together.close_clip()
        own.close_clip()
        assert torch.equal(together.token_ids(), own.token_ids())
        torch.testing.assert_close(together.visual_embeds()[1], own.visual_embeds()[1])  # fp32 tolerances


def test_a_ragged_forward_refuses_a_stream_twice(engine, clips) -> None:
    session = engine.open_session(SessionConfig(decoding="ar"))
    rgb, ts = clips[3][0]
    first = session.ingest_forward(rgb[None], [ts])
    with pytest.raises(ValueError, match="at most one forward per stream"):
        forward_streams(engine.target, [first, first])
    session.close()


# --- the scheduler's budget, by hand ------------------------------------------------------------
TREE = 6  # a sparrow step's tree
FRAME = 17  # a default-model frame: 16 visual tokens + its separator


def units(*kinds_tokens: tuple[UnitKind, int]) -> list[Unit[int]]:
    return [Unit(i, kind, tokens) for i, (kind, tokens) in enumerate(kinds_tokens)]


def test_caption_steps_go_first_and_frames_fill_the_budget() -> None:
    offered = units((UnitKind.FRAME, FRAME), (UnitKind.CAPTION, TREE), (UnitKind.FRAME, FRAME), (UnitKind.CAPTION, TREE))
    budget = 2 * TREE + FRAME  # both trees and one frame; the second frame would take it to 2 * TREE + 2 * FRAME
    assert [u.owner for u in plan_forward(offered, budget)] == [1, 3, 0]
    assert [u.owner for u in plan_forward(offered, 2 * TREE + 2 * FRAME)] == [1, 3, 0, 2]
    # a unit that does not fit is passed over; a smaller one behind it still joins
    mixed = units((UnitKind.CAPTION, TREE), (UnitKind.FRAME, 3 * FRAME), (UnitKind.FRAME, FRAME))
    assert [u.owner for u in plan_forward(mixed, TREE + 2 * FRAME)] == [0, 2]
    # a caption turn's close (its end and suffix text) goes with the caption steps, before frames
    closing = units((UnitKind.FRAME, FRAME), (UnitKind.CLOSE, 3), (UnitKind.CAPTION, TREE))
    assert [u.owner for u in plan_forward(closing, TREE + 3)] == [1, 2]
    # the first unit joins even over the budget (every forward makes progress)
    assert [u.owner for u in plan_forward(units((UnitKind.FRAME, 3 * FRAME)), FRAME)] == [0]


def test_unbatched_is_one_unit_round_robin() -> None:
    offered = units((UnitKind.FRAME, FRAME), (UnitKind.CAPTION, TREE))
    assert [u.owner for u in plan_forward(offered, UNBATCHED)] == [0]  # the head of the ring, whatever its kind
    with pytest.raises(ValueError, match=">= 0"):
        plan_forward(offered, -1)


def test_no_unit_starves_under_a_budget_full_of_caption_steps() -> None:
    """Three caption streams fill the budget every forward; the frame stream's unit waits at most
    STARVATION_FORWARDS forwards, then goes first."""
    budget = 3 * TREE
    offered = units((UnitKind.CAPTION, TREE), (UnitKind.CAPTION, TREE), (UnitKind.CAPTION, TREE), (UnitKind.FRAME, FRAME))
    frame = offered[3]
    waits = 0
    for _ in range(STARVATION_FORWARDS + 1):
        planned = plan_forward(offered, budget)
        if frame in planned:
            break
        for u in offered:  # the worker's bookkeeping
            u.waited = 0 if u in planned else u.waited + 1
        waits += 1
    assert waits == STARVATION_FORWARDS
    assert planned[0] is frame


# --- the service ---------------------------------------------------------------------------------
def service_finals(engine: CaptionEngine, clips, budget: int) -> tuple[list[list[tuple]], float, float]:
    """Three replay streams (ar, sparrow, ngram; clips of different lengths) at once through a server with
    this batch token budget: each stream's finals, and (sum, count) of the streams-per-forward histogram."""
    methods = {"ar": pb.DECODING_METHOD_AR, "sparrow": pb.DECODING_METHOD_SPARROW, "ngram": pb.DECODING_METHOD_NGRAM}
    out: dict = {}

    async def body(server, target):
        async with CaptionClient(target) as client:
            calls = [client.describe(frame_requests(replay_config(decoding=methods[m], max_caption_tokens=MAX_TOKENS),
                                                    clips[seed])) for seed, _, m in STREAMS[:3]]

            async def read(call):
                return [r async for r in call]

            results = await asyncio.gather(*(read(c) for c in calls))
        out["finals"] = [[(f.text, f.start_s, f.end_s) for f in finals(r)] for r in results]
        sample = server.metrics.registry.get_sample_value
        out["streams"] = (sample("sparrow_forward_streams_sum"), sample("sparrow_forward_streams_count"))

    run_with_server(engine, body, batch_token_budget=budget)
    return out["finals"], *out["streams"]


def test_the_service_batches_streams_and_their_finals_equal_offline(engine, clips) -> None:
    expected = [offline_captions(engine, clips[seed], max_tokens=MAX_TOKENS, sampling_fps=SEND_FPS)
                for seed, _, _ in STREAMS[:3]]
    batched, stream_sum, forwards = service_finals(engine, clips, 256)
    assert batched == expected
    assert stream_sum > forwards  # some forward carried more than one stream's work
    unbatched, stream_sum, forwards = service_finals(engine, clips, UNBATCHED)
    assert unbatched == expected
    assert stream_sum == forwards  # one stream's unit per forward
