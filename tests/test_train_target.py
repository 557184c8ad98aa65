"""`sparrow-train target`: the sequence layout it learns from, the grounding loss, resumable checkpoints."""

from __future__ import annotations

import json

import numpy as np
import torch

from sparrow_core.engine.checkpoint import load_target
from sparrow_core.train.target import (
    CONTENT_WORDS,
    IGNORE,
    TrainConfig,
    build_sample,
    content_word_ids,
    train,
)

TOKENS_PER_FRAME = 17  # the default model: 16 pooled visual tokens + image_newline
VIDEO_ID = 10_000  # any id outside the text vocabulary marks frame slots in a sample


def test_sample_layout_and_grounding_words(tmp_path) -> None:
    from transformers import AutoTokenizer

    from sparrow_core.world.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "tok", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    cfg = TrainConfig(out=str(tmp_path), single_segment_prob=1.0)
    s = build_sample(tok, VIDEO_ID, TOKENS_PER_FRAME, np.random.default_rng(0), cfg)
    n_frames = len(s.frames)
    assert s.ids.count(VIDEO_ID) == n_frames * TOKENS_PER_FRAME == len(s.frame_words) * TOKENS_PER_FRAME
    assert s.frame_slots == [s.ids.index(VIDEO_ID)]
    # labels: the caption and its end token, each predicted from the slot before; nothing on frames
    learned = [i for i, y in enumerate(s.labels) if y != IGNORE]
    caption_then_end = tok.decode([s.labels[i] for i in learned])
    assert caption_then_end.endswith("<|im_end|>") and all(s.ids[i] != VIDEO_ID for i in learned)
    assert s.positions == list(range(len(s.ids)))  # one segment: no eviction gap
    # every word a frame is said to show is a canonical content word, and one token mid-sentence
    assert {w for ws in s.frame_words for w in ws} <= set(CONTENT_WORDS)
    assert len(content_word_ids(tok)) == len(CONTENT_WORDS)


def test_long_sample_holds_its_frames_and_only_the_newest_captions(tmp_path) -> None:
    """The long-context stage's stream: every segment's frames in view (within the sampled visual-token
    range), only the newest `caption_history` earlier caption turns, the evicted turns' positions still taken;
    camera-world streams come at their own frame size."""
    from transformers import AutoTokenizer

    from sparrow_core.world.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "tok", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    cfg = TrainConfig(out=str(tmp_path), long_prob=1.0, long_min_tokens=800, long_max_tokens=1400, caption_history=2,
                      camera_prob=0.5, history_prob=0.0)
    sizes = set()
    for seed in range(6):
        s = build_sample(tok, VIDEO_ID, TOKENS_PER_FRAME, np.random.default_rng(seed), cfg)
        in_view = s.ids.count(VIDEO_ID)
        assert in_view == len(s.frames) * TOKENS_PER_FRAME
        assert 800 - 8 * TOKENS_PER_FRAME <= in_view <= 1400, in_view
        turns = s.ids.count(tok.convert_tokens_to_ids("<|im_end|>"))
        assert turns == 2 + 2 + 1  # the preamble's two turns, the caption history and the newest caption
        gaps = [b - a for a, b in zip(s.positions, s.positions[1:])]
        assert min(gaps) == 1 and max(gaps) > 1  # evicted caption turns keep their positions
        learned = tok.decode([y for y in s.labels if y != IGNORE])
        # every held turn is learned but one that refers to an event whose turn is evicted (the newest never does)
        assert learned.count("<|im_end|>") == sum(learn for _, _, learn in s.caption_turns) >= 1
        assert len(s.caption_turns) == 3 and s.caption_turns[-1][2]
        sizes.add(s.frames.shape[1:3])
    assert len(sizes) >= 2, sizes


def test_grounding_regions_name_where_each_frame_shows_its_objects(tmp_path) -> None:
    from transformers import AutoTokenizer

    from sparrow_core.train.target import REGION_WORDS, grounding_words
    from sparrow_core.world.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "tok", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    cfg = TrainConfig(out=str(tmp_path), grounding_regions=True, min_segments=6, max_segments=6, history_prob=0.0)
    assert len(content_word_ids(tok, grounding_words(cfg))) == len(CONTENT_WORDS) + len(REGION_WORDS)
    moved = 0
    for seed in range(4):
        s = build_sample(tok, VIDEO_ID, TOKENS_PER_FRAME, np.random.default_rng(seed), cfg)
        wheres = [tuple(w for w in ws if w in REGION_WORDS) for ws in s.frame_words]
        assert len(wheres) == len(s.frames)
        moved += len(set(wheres)) > 1  # an object crossing a region boundary changes its frames' words
    assert moved >= 1


def test_train_exports_a_loadable_checkpoint_and_resumes(tmp_path) -> None:
    out = tmp_path / "target"
    base = dict(out=str(out), batch=1, min_segments=1, max_segments=1, checkpoint_every=1, warmup=1, threads=1,
                vision_max_steps=2)
    train(TrainConfig(max_steps=2, **base))
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 2 and summary["final_grounding_loss"] > 0
    assert summary["vision_stage"]["steps"] == 2 and summary["vision_stage"]["single_object_scenes"] > 0
    before = torch.load(out / "train_state" / "state.pt", weights_only=False)
    vision_before = torch.load(out / "train_state" / "vision_state.pt", weights_only=False)
    # picks up the saved states: stage 1 is done and not run again, stage 2 takes one more step, not three
    train(TrainConfig(max_steps=3, **base))
    after = torch.load(out / "train_state" / "state.pt", weights_only=False)
    assert after["step"] == 3 and after["losses"][:2] == before["losses"]
    vision_after = torch.load(out / "train_state" / "vision_state.pt", weights_only=False)
    assert vision_after["done"] and vision_after["losses"] == vision_before["losses"]
    target = load_target(out)
    assert target.tokens_per_frame == TOKENS_PER_FRAME


def test_training_captions_refer_back_only_to_events_whose_caption_they_follow(tmp_path) -> None:
    """The invented-reference count of `sparrow-bench accuracy`, on the training sequences themselves: every
    relative clause about the past in a learned caption turn refers to an event whose own caption turn comes
    before it in the sequence. Frames alone do not count: a long sequence's first kept turn, after evicted
    ones, refers to nothing it learns. The held turns before it are written as a live session writes them
    (holding the `caption_history` turns before each), so some of them refer to an event whose own turn the
    sequence has evicted: those stay unlearned history, and no learned turn after them repeats the reference.
    That is the case the model meets in a live stream: a reference in its own caption history with nothing
    left to back it (before this rule the data never showed one, so copying a held reference was always right)."""
    from transformers import AutoTokenizer

    from sparrow_core.world.caption_parse import parse_caption
    from sparrow_core.world.facts import reference_supported
    from sparrow_core.world.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "tok", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    cfg = TrainConfig(out=str(tmp_path), long_prob=0.6, long_min_tokens=408, long_max_tokens=1200, caption_history=2,
                      camera_prob=0.3, single_segment_prob=0.2)
    learned_refs = evicted = unbacked_history = 0
    for seed in range(16):
        s = build_sample(tok, VIDEO_ID, TOKENS_PER_FRAME, np.random.default_rng(seed), cfg)
        evicted += s.caption_turns[0][0] > 0
        assert s.caption_turns[-1][2], "the newest turn is always learned"
        held_before: list[int] = []
        for i, caption, learned in s.caption_turns:
            context = [s.stream[j] for j in held_before]
            for ref in parse_caption(caption).references:
                if learned:
                    learned_refs += 1
                    assert reference_supported(ref, s.stream[i], context), (seed, i, held_before, caption)
                else:
                    unbacked_history += not reference_supported(ref, s.stream[i], context)
            held_before.append(i)
    assert learned_refs >= 5 and evicted >= 3 and unbacked_history >= 1, (learned_refs, evicted, unbacked_history)


def test_a_long_sequence_walked_by_hand_holds_an_unbacked_reference_it_does_not_learn() -> None:
    """World 5, six 4 s segments at 1 fps, as a long sequence with `caption_history` 2 holds them: turns 0 and
    1 evicted, the first held is 2. In segment 0 the pink cross turns yellow; in segment 1 a yellow diamond
    slides in from the left. Caption 2 is written holding turns 0 and 1, so it may (and with this draw does)
    say 'the yellow diamond that arrived earlier' and 'the yellow cross that was pink before', but the
    sequence no longer holds either event's turn: turn 2 stays as unlearned history. Turn 3 (written holding
    1 and 2) may still refer to the entry at 1 but with this draw refers to nothing, so it is learned, as
    are turns 4 and 5, which hold 2.. and 3.. only and may not refer to the entry or the recolouring."""
    from sparrow_core.train.data import WorldStreamSpec, backed_by, world_segments
    from sparrow_core.world.caption_parse import parse_caption
    from sparrow_core.world.facts import Reference

    segs = world_segments(WorldStreamSpec(seed=5, segments=6, fps=1.0), np.random.default_rng(5), caption_history=2)
    cross = {(e.kind, e.detail, e.before) for e in segs[0].segment.facts.events if e.obj and e.obj.shape == "cross"}
    assert ("recolour", "yellow", "pink") in cross
    assert any(e.kind == "enter" and e.detail == "left" and e.obj.shape == "diamond" for e in segs[1].segment.facts.events)
    assert [s.refers_from for s in segs] == [0, 0, 0, 1, 2, 3]
    assert set(parse_caption(segs[2].caption).references) == {Reference(("yellow", "diamond"), "enter"),
                                                              Reference(("yellow", "cross"), "recolour", "pink")}
    held = [s.segment.facts for s in segs[2:]]  # the turns the sequence holds: 2..5
    assert [backed_by(segs[i], held[:i - 2]) for i in range(2, 6)] == [False, True, True, True]
    assert not any(parse_caption(segs[i].caption).references for i in (3, 4, 5))
    # a session holding every turn (a short sequence) backs caption 2: both events' turns are held
    assert backed_by(segs[2], [segs[0].segment.facts, segs[1].segment.facts])


def test_the_cosine_ends_when_the_run_does() -> None:
    """A run ends at --max-steps or when its time is up: the learning rate reaches its floor at whichever comes
    first, and follows the time spent when the machine's speed changes mid-run."""
    from sparrow_core.train.schedule import run_progress, warmup_cosine

    spent = [0.0]  # fraction of the time budget spent
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(opt, [1.0], 2, run_progress(2, 100, lambda: spent[0]), floor=0.1)
    for _ in range(4):
        schedule.step()
    assert opt.param_groups[0]["lr"] > 0.99  # step 4 of 100, no time spent
    spent[0] = 0.5  # slow steps: half the time gone at step 5
    schedule.step()
    assert abs(opt.param_groups[0]["lr"] - 0.55) < 1e-6
    spent[0] = 1.0  # time is up long before step 100
    schedule.step()
    assert abs(opt.param_groups[0]["lr"] - 0.1) < 1e-6
    spent[0] = 0.0  # no time limit in sight: the steps end it
    for _ in range(100):
        schedule.step()
    assert abs(opt.param_groups[0]["lr"] - 0.1) < 1e-6
