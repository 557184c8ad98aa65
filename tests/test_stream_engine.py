"""The stream engine against transformers' own full forward, on tiny random models of each class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from processor_reference import model_inputs, rope_positions, video_embeds

from sparrow_core.engine.checkpoint import CheckpointError, load_target
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.stream import StreamClosedError, StreamConfig, TargetStream
from tiny_models import IMAGE_ID, TINY_TARGETS, random_frames, tiny_llava_onevision, tiny_qwen2_5_vl

TOL = 1e-4
SYSTEM = [3, 4, 5, 6]
CAPTION_PREFIX = [7, 8]
DECODE_STEPS = 4


def full_inputs(target, frames: np.ndarray, ids: list[int], clips: list[list[int]] | None = None) -> dict:
    """Inputs for the model's own forward over `ids`, whose frame placeholders stand for `frames`, in
    `clips` (frame indices per clip; default: all frames one clip), 0.5 s apart."""
    clips = clips if clips is not None else [list(range(len(frames)))]
    return model_inputs(target, frames, ids, clips, fps=2.0)


def masked_reference_logits(target, frames: np.ndarray, full_stream, visible: torch.Tensor, clips=None) -> torch.Tensor:
    """Last-slot logits [V] of the model's own LM over every slot of `full_stream` (an uncut stream of the
    same sequence), its frame slots holding the model's own video features of `frames` (in `clips`), at
    its positions, where slot i attends to slot j only if visible[i, j] (bool [n, n])."""
    n = visible.shape[0]
    mask = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
    inputs = full_inputs(target, frames, full_stream.token_ids().tolist(), clips)
    is_video = inputs["input_ids"][0] == target.video_token_id
    with torch.no_grad():
        emb = target.embed_tokens(inputs["input_ids"])
        emb[0, is_video.nonzero().squeeze(1)] = video_embeds(target, inputs)
        last, _ = target.lm_forward(emb, full_stream.positions(), None, attention_mask=mask)
        return target.lm_head(last)[0, -1]


def run_stream(target, frames, chunks, config=None, decode_steps=DECODE_STEPS):
    """System text, frames in `chunks`, caption prefix, then greedy decoding; returns (stream, logits list)."""
    s = TargetStream(target, config)
    s.append_text(SYSTEM)
    at = 0
    for c in chunks:
        s.append_frames(frames[at : at + c], [0.5 * i for i in range(at, at + c)])
        at += c
    logits = [s.append_text(CAPTION_PREFIX)]
    for _ in range(decode_steps):
        # greedy over ordinary ids: a random model may prefer a placeholder id, which a full forward
        # would then mistake for a frame slot
        logits.append(s.append_text([int(logits[-1][:IMAGE_ID].argmax())]))
    return s, logits


@pytest.mark.parametrize("arch", sorted(TINY_TARGETS))
@pytest.mark.parametrize("chunks", [(1, 1, 1, 1), (2, 2), (3, 1), (4,)])
def test_incremental_equals_full_forward(arch, chunks):
    target = TINY_TARGETS[arch]()
    frames = random_frames(4, seed=1)
    s, logits = run_stream(target, frames, chunks)
    ids = s.token_ids().tolist()
    with torch.no_grad():
        full = target.model(**full_inputs(target, frames, ids), output_hidden_states=True)
    n_dec = DECODE_STEPS + 1
    # logits after the caption prefix's last token, then after each decoded token: the last n_dec positions
    want = full.logits[0, -n_dec:]
    got = torch.stack(logits)
    assert (got - want).abs().max().item() <= TOL
    # kept hidden states of non-visual slots equal the full forward's
    hv = s.hidden()
    for layer, rows in hv.layers.items():
        ref = full.hidden_states[layer][0, hv.slots]
        assert (rows - ref).abs().max().item() <= TOL
    assert (s.kinds()[hv.slots] != int(TokenKind.VISUAL)).all()


def test_qwen2_5_positions_match_get_rope_index():
    target = tiny_qwen2_5_vl()
    frames = random_frames(3, seed=2)
    s, _ = run_stream(target, frames, (1, 2))
    assert torch.equal(s.positions(), rope_positions(target, full_inputs(target, frames, s.token_ids().tolist())))


KEEP_FRAMES = 2  # visual budget of the eviction test, in frames


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_5_vl"])
def test_eviction_equals_forward_over_survivors(arch):
    """Frames appended one at a time under a budget of 2 units (a unit is what a frame number's slots
    are: a frame on LLaVA-OneVision, a temporal patch of 2 frames on Qwen, the 5th frame padded when the
    caption prefix closes the clip).

    A token's KV is computed once, when it is prefilled, over what the stream held then: unit j was
    prefilled while units j-2 and j-1 were still held, and the caption prefix after the last unit sees
    the last two. The reference is transformers' own forward over the whole sequence with a 4-D mask
    that says exactly that, at the original positions.
    """
    n_frames = 5
    target = TINY_TARGETS[arch]()
    frames = random_frames(n_frames, seed=3)
    full_stream, _ = run_stream(target, frames, (n_frames,), decode_steps=0)
    fid = full_stream.frame_ids()
    unit_frames = torch.unique(fid[fid >= 0])  # first frame of each unit
    n_units = unit_frames.numel()
    budget = KEEP_FRAMES * (full_stream.frame_slot_count() // n_units)
    s, logits = run_stream(target, frames, (1,) * n_frames, StreamConfig(visual_token_budget=budget), decode_steps=0)
    first_kept = int(unit_frames[n_units - KEEP_FRAMES])
    assert s.frame_slot_count() == budget and s.frames_evicted == first_kept

    survivors = ((fid < 0) | (fid >= first_kept)).nonzero().squeeze(1)
    assert torch.equal(s.token_ids(), full_stream.token_ids()[survivors])
    assert torch.equal(s.positions(), full_stream.positions()[:, survivors])  # original positions kept
    for stream in (s, full_stream):  # the text slots, found among the kept hidden states, after evictions too
        assert torch.equal(stream.text_slots(), (stream.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1))

    # which units each slot could see when prefilled: unit j sees units >= j - KEEP_FRAMES;
    # text after the frames sees the last KEEP_FRAMES units
    n = fid.numel()
    unit = torch.where(fid >= 0, torch.searchsorted(unit_frames, fid.clamp(min=0)), torch.full_like(fid, n_units))
    unit[: len(SYSTEM)] = 0
    oldest_visible = (unit - KEEP_FRAMES).clamp(min=0)
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    is_frame = fid >= 0
    visible &= ~(is_frame[None, :] & (unit[None, :] < oldest_visible[:, None]))
    ref_logits = masked_reference_logits(target, frames, full_stream, visible)
    assert (logits[-1] - ref_logits).abs().max().item() <= TOL


def test_eviction_memory_is_bounded():
    target = tiny_llava_onevision()
    s = TargetStream(target, StreamConfig(visual_token_budget=20, evict_slack=0.25))
    frames = random_frames(1, seed=4)
    for i in range(40):
        s.append_frames(frames, [i * 0.5])
        if i % 10 == 9:
            s.append_text([9, 10])
    st = s.stats()
    assert st.frame_slots <= 20 and st.text_slots == 8 and st.frames_ingested == 40
    assert st.frame_slots_evicted + st.frame_slots == 40 * 5


@pytest.mark.parametrize("arch", sorted(TINY_TARGETS))
def test_kv_bytes_per_token_is_what_the_stream_holds(arch):
    target = TINY_TARGETS[arch]()
    s = TargetStream(target, StreamConfig())
    s.append_text(SYSTEM)
    s.append_frames(random_frames(2, seed=1), [0.0, 0.5])
    st = s.stats()
    assert st.kv_bytes == st.slots * target.kv_bytes_per_token > 0


def test_a_stream_never_grows_past_its_slot_limit():
    """No visual budget: the slot limit alone bounds the KV; a refused append leaves the stream as it was."""
    target = tiny_llava_onevision()
    s = TargetStream(target, StreamConfig(max_slots=23))
    s.append_text(SYSTEM)
    frames = random_frames(1, seed=4)
    s.append_frames(frames, [0.0])
    s.append_frames(frames, [0.5])
    before = s.stats()
    assert before.slots == 4 + 2 * 5
    with pytest.raises(ValueError, match="over its limit of 23 tokens"):
        s.append_frames(random_frames(2, seed=5), [1.0, 1.5])
    with pytest.raises(ValueError, match="over its limit of 23 tokens"):
        s.append_text(list(range(10, 20)))
    assert s.stats() == before
    s.append_frames(frames, [1.0])  # what still fits goes in
    assert s.stats().slots == 19 <= 23


TURNS = 4  # caption turns, each after one frame
KEEP_TURNS = 2  # caption history: the last two turns' text stays
TURN = [7, 8, 40, 41, 9]  # prefix, two caption tokens, end, suffix


@pytest.mark.parametrize("arch", sorted(TINY_TARGETS))
def test_caption_history_equals_forward_with_what_each_token_saw(arch):
    """Frame, caption turn, frame, caption turn, ... with the last KEEP_TURNS turns kept.

    Turn i's text is evicted when turn i + KEEP_TURNS ends. Frames and the system text stay, positions
    never move, and every slot's KV is what it was when prefilled: the reference is the model's own
    forward over the whole sequence with a 4-D mask in which turn i's text is visible exactly to the
    slots prefilled before turn i + KEEP_TURNS ended, at the original positions.
    """
    from sparrow_core.engine.caption_history import CaptionHistory

    target = TINY_TARGETS[arch]()
    frames = random_frames(TURNS + 1, seed=5)
    full = TargetStream(target)
    s = TargetStream(target)
    history = CaptionHistory(KEEP_TURNS)
    turn_of = []  # per slot of `full`: the turn its text belongs to, -1 otherwise
    for stream in (full, s):
        stream.append_text(SYSTEM)
    turn_of += [-1] * len(SYSTEM)
    for i in range(TURNS):
        n0 = full.length
        for stream in (full, s):
            stream.append_frames(frames[i : i + 1], [float(i)])
            stream.close_clip()  # each frame its own clip (Qwen: its temporal patch padded now)
        turn_of += [-1] * (full.length - n0)
        full.append_text(TURN)
        turn_of += [i] * len(TURN)
        history.append_turn(s, TURN)
    for stream in (full, s):
        stream.append_frames(frames[TURNS:], [float(TURNS)])
        stream.close_clip()
    turn_of += [-1] * (full.length - len(turn_of))
    logits = s.append_text(CAPTION_PREFIX)
    full.append_text(CAPTION_PREFIX)
    turn_of = torch.tensor(turn_of + [-1] * len(CAPTION_PREFIX))

    evicted_turns = TURNS - KEEP_TURNS
    survivors = ((turn_of < 0) | (turn_of >= evicted_turns)).nonzero().squeeze(1)
    assert torch.equal(s.token_ids(), full.token_ids()[survivors])
    assert torch.equal(s.positions(), full.positions()[:, survivors])  # original positions kept
    assert s.next_position == full.next_position and s.frames_ingested == TURNS + 1
    assert s.text_slots_evicted == evicted_turns * len(TURN) and history.turns_evicted == evicted_turns

    # turn i is evicted once turn i + KEEP_TURNS has ended: later slots never saw it
    n = turn_of.numel()
    slot = torch.arange(n)
    turn_end = torch.tensor([int((turn_of == t).nonzero()[-1]) for t in range(TURNS)])
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    for t in range(evicted_turns):
        gone_after = int(turn_end[t + KEEP_TURNS])
        visible[(slot > gone_after)[:, None] & (turn_of == t)[None, :]] = False
    ref_logits = masked_reference_logits(target, frames, full, visible, clips=[[i] for i in range(TURNS + 1)])
    assert (logits - ref_logits).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_rollback_then_reappend_equals_never_appended(arch):
    target = TINY_TARGETS[arch]()
    frames = random_frames(2, seed=5)
    a = TargetStream(target)
    a.append_frames(frames, [0.0, 0.5])
    a.append_text([11, 12, 13])
    a.rollback(2)
    la = a.append_text([21, 22])
    b = TargetStream(target)
    b.append_frames(frames, [0.0, 0.5])
    b.append_text([11])
    lb = b.append_text([21, 22])
    assert (la - lb).abs().max().item() <= TOL
    assert torch.equal(a.token_ids(), b.token_ids()) and torch.equal(a.positions(), b.positions())
    assert torch.equal(a.text_slots(), (a.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1))
    ha, hb = a.hidden(), b.hidden()
    assert torch.equal(ha.slots, hb.slots)
    for layer in ha.layers:
        assert (ha.layers[layer] - hb.layers[layer]).abs().max().item() <= TOL


def test_bad_frames_are_rejected_and_stream_stays_usable():
    target = tiny_llava_onevision()
    good = random_frames(2, seed=6)
    s = TargetStream(target)
    s.append_text(SYSTEM)
    before = s.length
    bad_inputs = [
        (good[..., :2], "3 channels"),
        (good.astype(np.float32), "uint8"),
        (good[0], "shape"),
        (good[:0], "empty"),
        (np.zeros((1, 1, 9000, 3), np.uint8), "outside the supported range"),
    ]
    for bad, words in bad_inputs:
        with pytest.raises(ValueError, match=words):
            s.append_frames(bad, [0.0] * len(bad))
    with pytest.raises(ValueError, match="timestamps"):
        s.append_frames(good, [0.0])
    with pytest.raises(ValueError, match="token ids"):
        s.append_text([10_000])
    assert s.length == before
    # still usable: the same result as a stream that never saw the bad input
    s.append_frames(good, [0.0, 0.5])
    got = s.append_text([5])
    ref = TargetStream(target)
    ref.append_text(SYSTEM)
    ref.append_frames(good, [0.0, 0.5])
    assert (got - ref.append_text([5])).abs().max().item() <= TOL
    s.close()
    with pytest.raises(StreamClosedError):
        s.append_frames(good, [1.0, 1.5])


def test_checkpoint_errors_name_the_fault(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_target(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'llama'"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_target(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_target(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_target(tmp_path)


# A hand-built draft tree below the stream's last token:
#
#   node 0 (tok A, depth 0)
#   ├── node 1 (tok B, depth 1)
#   │   └── node 3 (tok D, depth 2)
#   └── node 2 (tok C, depth 1)
TOK_A, TOK_B, TOK_C, TOK_D = 31, 32, 33, 34
TREE_TOKENS = [TOK_A, TOK_B, TOK_C, TOK_D]
TREE_DEPTHS = [0, 1, 1, 2]
TREE_PARENT = [-1, 0, 0, 1]
# node i sees its ancestors and itself
TREE_MASK = torch.tensor(
    [
        [1, 0, 0, 0],  # A
        [1, 1, 0, 0],  # B: A, B
        [1, 0, 1, 0],  # C: A, C
        [1, 1, 0, 1],  # D: A, B, D
    ],
    dtype=torch.bool,
)
ACCEPTED_PATH = [0, 1, 3]  # A, B, D


@pytest.mark.parametrize(
    "arch,backend", [("llava_onevision", "auto"), ("qwen2_5_vl", "auto"), ("llava_onevision", "triton")]
)
def test_tree_forward_equals_sequential_paths(arch, backend, monkeypatch):
    """Tree verification through the engine's attention: on CPU "auto" is SDPA; "triton" forces the
    Triton kernel (run by the interpreter here, compiled on a GPU)."""
    monkeypatch.setenv("SPARROW_ATTN_BACKEND", backend)
    target = TINY_TARGETS[arch]()
    frames = random_frames(2, seed=7)

    def prefix():
        s = TargetStream(target)
        s.append_text(SYSTEM)
        s.append_frames(frames, [0.0, 0.5])
        s.append_text(CAPTION_PREFIX)
        return s

    tree = prefix()
    tree_logits = tree.append_tree(TREE_TOKENS, TREE_DEPTHS, TREE_MASK)
    for node in range(len(TREE_TOKENS)):
        path, n = [], node
        while n >= 0:
            path.insert(0, TREE_TOKENS[n])
            n = TREE_PARENT[n]
        seq = prefix()
        assert (tree_logits[node] - seq.append_text(path)).abs().max().item() <= TOL
    tree.accept_tree(len(TREE_TOKENS), ACCEPTED_PATH)
    seq = prefix()
    seq.append_text([TREE_TOKENS[i] for i in ACCEPTED_PATH])
    assert torch.equal(tree.token_ids(), seq.token_ids()) and torch.equal(tree.positions(), seq.positions())
    assert tree.next_position == seq.next_position
    assert (tree.append_text([5]) - seq.append_text([5])).abs().max().item() <= TOL
    for layer in tree.hidden().layers:
        assert (tree.hidden().layers[layer] - seq.hidden().layers[layer]).abs().max().item() <= TOL


def test_rollback_refuses_frame_slots_and_leaves_the_stream_as_it_was():
    target = tiny_llava_onevision()
    s = TargetStream(target)
    s.append_text([11, 12])
    s.append_frames(random_frames(1, seed=7), [0.0])
    s.append_text([13])
    before = (s.length, s.next_position, s.frames_ingested, s.media_time_s)
    with pytest.raises(ValueError, match="text slots only"):
        s.rollback(2)  # the text token and the frame's last slot
    assert (s.length, s.next_position, s.frames_ingested, s.media_time_s) == before
    s.rollback(1)
    assert s.next_position == before[1] - 1 and s.frames_ingested == 1


def test_a_refused_chunk_leaves_the_open_clip_as_it_was():
    """Qwen: a chunk over the slot limit is refused whole; the clip it would have joined (its temporal
    patches so far, held frames) is unchanged, so what is appended next lands where it would have."""
    target = TINY_TARGETS["qwen2_vl"]()  # temporal positions count the clip's patches
    frames = random_frames(6, seed=8)
    times = [0.5 * i for i in range(6)]
    ref = TargetStream(target)
    ref.append_text(SYSTEM)
    ref.append_frames(frames[:2], times[:2])
    patch = ref.length - len(SYSTEM)
    ref.append_frames(frames[2:5], times[2:5])  # a second patch, and frame 4 held
    s = TargetStream(target, StreamConfig(max_slots=len(SYSTEM) + 2 * patch))
    s.append_text(SYSTEM)
    s.append_frames(frames[:2], times[:2])
    with pytest.raises(ValueError, match="over its limit"):
        s.append_frames(frames[2:6], times[2:6])  # two more patches: one too many
    s.append_frames(frames[2:5], times[2:5])
    assert len(s.clip.held) == len(ref.clip.held) == 1
    assert torch.equal(s.token_ids(), ref.token_ids()) and torch.equal(s.positions(), ref.positions())
