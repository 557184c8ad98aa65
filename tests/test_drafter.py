"""The text-anchored drafter: KV contents (VATA), incremental sync (HSR), positions, window, save/load; the lean
inference step against the module; a session keeping the drafter level with its stream."""

from __future__ import annotations

import pytest
import torch

from sparrow_core.decoding.decoders import build_decoders
from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.proposers.drafter import DrafterState
from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.stream import StreamConfig, TargetStream
from tiny_models import random_frames, tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl

SYSTEM = [3, 4, 5, 6]
CAPTION = [7, 8, 20, 21, 22]
TREE_TOKENS = [30, 31, 32]  # root 30 with children 31 (kept) and 32 (dropped)
TREE_DEPTHS = [0, 1, 1]
TREE_MASK = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
TREE_ACCEPT = [0, 1]
ROLLBACK = 2
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def drafter_for(target, **cfg):
    torch.manual_seed(3)
    return TextAnchoredDrafter(target, DrafterConfig(**cfg))


def kv(state):
    layer = state.cache.layers[0]
    return layer.keys[0], layer.values[0]  # [H_kv, T, D]


def edit_stream(stream, drafter=None, state=None):
    """A stream edited every way decoding edits it; the drafter syncs after each edit when given."""
    frames = random_frames(3, seed=21)
    edits = [
        lambda: stream.append_text(SYSTEM),
        lambda: stream.append_frames(frames[:2], [0.0, 0.5]),
        lambda: stream.append_text(CAPTION),
        lambda: stream.append_tree(TREE_TOKENS, TREE_DEPTHS, TREE_MASK),
        lambda: stream.accept_tree(len(TREE_TOKENS), TREE_ACCEPT),
        lambda: stream.rollback(ROLLBACK),
        lambda: stream.append_frames(frames[2:], [1.0]),
        lambda: stream.append_text([9, 10]),
    ]
    for edit in edits:
        edit()
        if drafter is not None:
            state.sync(stream)


@pytest.mark.parametrize("make_target", [tiny_llava_onevision, tiny_qwen2_5_vl])
@pytest.mark.parametrize("position_mode", ["target", "compact"])
def test_incremental_sync_equals_one_sync_and_holds_text_only(make_target, position_mode):
    target = make_target()
    drafter = drafter_for(target, position_mode=position_mode)
    s = TargetStream(target)
    inc = DrafterState(drafter)
    edit_stream(s, drafter, inc)
    once = DrafterState(drafter)
    once.sync(s)
    text = (s.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1)
    # VATA: one entry per text slot, never a visual one, in stream order
    assert inc.entries == once.entries == text.numel() == inc.cache.length
    assert torch.equal(inc.tok, s.token_ids()[text]) and torch.equal(inc.pos, s.positions()[:, text].T)
    for a, b in zip(kv(inc), kv(once)):
        assert (a - b).abs().max().item() <= TOL

    # from first principles: x_t = FC([embed(tok_t); h_last(t-1)]) for every text slot t, one causal
    # forward at the chosen positions
    hv = s.hidden()
    h_prev = torch.zeros(text.numel(), target.hidden_size)
    for i, slot in enumerate(text.tolist()):
        row = (hv.slots == slot - 1).nonzero()
        if row.numel():
            h_prev[i] = hv.layers[target.layers.resolve("last")][int(row)]
    n = text.numel()
    if position_mode == "target":
        positions = s.positions()[:, text]  # the target's own, with the gaps frames leave
    else:
        positions = torch.arange(n).expand(target.position_rows, n)  # 0, 1, 2, ... over text only
    cache = StreamKVCache(1)
    with torch.no_grad():
        drafter.layer_forward(
            drafter.fuse(s.token_ids()[text], h_prev).unsqueeze(0),
            positions,
            torch.ones(n, n, dtype=torch.bool).tril(),
            cache,
        )
    assert (cache.layers[0].keys[0] - kv(once)[0]).abs().max().item() <= TOL


WINDOW, SINKS = 4, 2
LONG_TEXT = list(range(10, 40))  # 30 tokens: past sinks + window + slack (16)


def test_text_window_keeps_sinks_and_the_latest_entries():
    target = tiny_llava_onevision()
    drafter = drafter_for(target, text_window=WINDOW, sink_tokens=SINKS)
    s = TargetStream(target)
    s.append_text(LONG_TEXT)
    state = DrafterState(drafter)
    state.sync(s)
    n = len(LONG_TEXT)
    assert state.kv_entry.tolist() == [0, 1] + list(range(n - WINDOW, n))
    assert state.entries == n  # the bookkeeping still knows every text slot
    s.append_text([5])
    state.sync(s)  # a new token is appended after the window, no compaction yet
    assert state.kv_entry.tolist()[-1] == n and state.cache.length == SINKS + WINDOW + 1


def test_msd_holds_every_slot_and_follows_eviction():
    target = tiny_qwen2_5_vl()
    drafter = drafter_for(target, variant="msd")
    frames = random_frames(4, seed=22)
    full = TargetStream(target, StreamConfig(keep_visual_embeds=True))
    full.append_frames(frames[:1], [0.0])
    full.close_clip()  # a lone frame is one temporal patch once its clip closes
    per_frame = full.length
    s = TargetStream(target, StreamConfig(keep_visual_embeds=True, visual_token_budget=2 * per_frame))
    state = DrafterState(drafter)
    s.append_text(SYSTEM)
    for i in range(4):
        s.append_frames(frames[i : i + 1], [float(i)])
        s.append_text([9])
        state.sync(s)
    assert s.frames_evicted == 2
    # the cost grows with the video: every kept slot (text, separators, visual tokens) is an entry
    assert state.cache.length == state.entries == s.length
    assert torch.equal(state.frame, s.frame_ids()) and torch.equal(state.tok, s.token_ids())


TURN = [7, 8, 20, 21, 9]
TURNS, KEEP = 3, 1


def test_evicted_caption_turns_leave_the_drafter_and_compact_positions_keep_counting():
    """Turns 0 and 1 are evicted from the stream; the drafter drops exactly their entries, keeps the
    KV of the rest as it was, and the next entry's compacted position continues after the largest
    one ever used (never reusing a position an evicted entry had)."""
    from sparrow_core.engine.caption_history import CaptionHistory

    target = tiny_llava_onevision()
    drafter = drafter_for(target, position_mode="compact")
    frames = random_frames(TURNS, seed=23)
    s = TargetStream(target)
    history = CaptionHistory(KEEP)
    state = DrafterState(drafter)
    s.append_text(SYSTEM)
    for i in range(TURNS):
        s.append_frames(frames[i : i + 1], [float(i)])
        before = kv(state)[0].clone() if state.entries else None
        history.append_turn(s, TURN)
        state.sync(s)
    evicted = (TURNS - KEEP) * len(TURN)
    text = (s.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1)
    assert s.text_slots_evicted == evicted and state.dropped == evicted
    assert torch.equal(state.tok, s.token_ids()[text]) and torch.equal(state.pos, s.positions()[:, text].T)
    # the system prompt's entries were not recomputed: their KV is what it was before the evictions
    assert torch.equal(kv(state)[0][:, : len(SYSTEM)], before[:, : len(SYSTEM)])
    # compact positions: the n-th entry ever ingested has position n, evicted ones counted
    next_pos = state.entry_positions(torch.zeros(1, target.position_rows, dtype=torch.long), state.entries)
    assert int(next_pos[0, 0]) == len(SYSTEM) + TURNS * len(TURN)


def test_save_and_load_round_trip(tmp_path):
    target = tiny_llava_onevision()
    drafter = drafter_for(target, feature_layer="penultimate", position_mode="compact")
    drafter.save_pretrained(tmp_path)
    saved = set(drafter.state_dict())
    prefixes = {k.split(".")[0] for k in saved}
    assert prefixes == {"fc", "embed_norm", "hidden_norm", "layer", "out_norm"}  # not the target's weights
    loaded = load_drafter(tmp_path, target)
    assert loaded.config.feature_layer == "penultimate" and loaded.config.position_mode == "compact"
    assert loaded.feature_layer == target.num_layers - 1
    for k, v in drafter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert loaded.target.lm_head is target.lm_head  # shared by reference
    assert sorted(build_decoders({"sparrow": loaded})) == ["ar", "ngram", "sparrow"]  # what CaptionEngine offers
    assert sorted(build_decoders()) == ["ar", "ngram"]  # no drafter: the methods that need none
    with pytest.raises(ValueError, match="built for"):
        load_drafter(tmp_path, tiny_qwen2_5_vl())


# --- the lean step against the module ------------------------------------------------------------
LEAN_TOL = 1e-5


def perturb_norms(drafter):
    """Norm weights other than ones, so the weights folded into the lean step's matmuls are exercised; in
    place, as an optimizer or load_state_dict changes them (the lean weights must follow)."""
    g = torch.Generator(device="cpu").manual_seed(4)
    with torch.no_grad():
        for norm in (drafter.embed_norm, drafter.hidden_norm, drafter.layer.input_layernorm,
                     drafter.layer.post_attention_layernorm, drafter.out_norm):
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))


def module_tree_logprobs(drafter, stream, levels):
    """The module's log-probs for every recorded tree level, from first principles: a fresh KV over every
    text slot (one causal forward), then each level as `layer_forward` with the mask spelled out (committed
    KV + the node's ancestors and itself), at the target's positions next_position + depth."""
    from sparrow_core.engine.kv_cache import StreamKVCache

    helper = DrafterState(drafter)  # only its feature lookup
    text = (stream.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1)
    n = text.numel()
    cache = StreamKVCache(1)
    out = []
    with torch.no_grad():
        x = drafter.fuse(stream.token_ids()[text], helper.features(stream, text - 1))
        drafter.layer_forward(x.unsqueeze(0), stream.positions()[:, text], torch.ones(n, n, dtype=torch.bool).tril(), cache)
        committed = cache.length
        root_h = helper.features(stream, torch.tensor([stream.length - 1]))[0]
        node_o, node_anc, forwarded = {}, {}, 0
        for node_ids, tokens, parents, depth in levels:
            ids, pars = node_ids.tolist(), parents.tolist()
            m = len(ids)
            x = drafter.fuse(tokens, torch.stack([root_h if p < 0 else node_o[p] for p in pars]))
            mask = torch.zeros((m, committed + forwarded + m), dtype=torch.bool)
            mask[:, :committed] = True
            for i, (node, par) in enumerate(zip(ids, pars)):
                node_anc[node] = (node_anc[par] if par >= 0 else []) + [forwarded + i]
                mask[i, [committed + a for a in node_anc[node]]] = True
            positions = torch.full((stream.target.position_rows, m), stream.next_position + depth)
            o = drafter.layer_forward(x.unsqueeze(0), positions, mask, cache)[0]
            for i, node in enumerate(ids):
                node_o[node] = o[i]
            forwarded += m
            out.append(torch.log_softmax(drafter.head(o).float(), dim=-1))
    return out


@pytest.mark.parametrize("make_target", [tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen2_5_vl])
@pytest.mark.parametrize("tree", [TreeConfig.chain(4), TreeConfig(total_tokens=10, depth=3, top_k=3)])
def test_lean_tree_gives_the_modules_logprobs(monkeypatch, make_target, tree):
    """Every level of a proposed tree (the chain without masks, the tree with them; the root's forward
    also ingesting three slots the stream gained since the last sync) gives the log-probs of the module
    path, on each target class, and the drafter's KV mirrors the stream afterwards."""
    import sparrow_core.decoding.proposers.drafter as proposers

    target = make_target()
    drafter = drafter_for(target)
    s = TargetStream(target)
    state = DrafterState(drafter)
    s.append_text(SYSTEM)
    s.append_frames(random_frames(2, seed=24), [0.0, 0.5])
    s.append_text(CAPTION)
    drafter.weights()  # built before the norms change: they must be rebuilt
    perturb_norms(drafter)
    state.sync(s)
    s.append_text([9, 10, 11])  # pending: ingested by the root's forward
    levels, lean = [], []
    level_rows, logprobs = proposers._TreeLevels.level_rows, proposers.lean_logprobs

    def rows_recorded(self, node_ids, tokens, parents, depth):
        levels.append((node_ids.clone(), tokens.clone(), parents.clone(), depth))
        return level_rows(self, node_ids, tokens, parents, depth)

    def logprobs_recorded(w, o):
        lean.append(logprobs(w, o))
        return lean[-1]

    monkeypatch.setattr(proposers._TreeLevels, "level_rows", rows_recorded)
    monkeypatch.setattr(proposers, "lean_logprobs", logprobs_recorded)
    state.propose(s, 12, tree, tree.depth)
    assert len(levels) == tree.depth
    for got, want in zip(lean, module_tree_logprobs(drafter, s, levels)):
        assert (got - want).abs().max().item() <= LEAN_TOL
    text = (s.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1)
    assert state.cache.length == state.entries == text.numel()  # the pending rows stayed, the tree's went
    assert state.pending(s)[0].numel() == 0


def test_lean_weights_follow_the_parameters():
    """One definition of the weights: an in-place change of a parameter (an optimizer step, load_state_dict)
    rebuilds the lean weights, and the same parameters give the same object."""
    drafter = drafter_for(tiny_llava_onevision())
    w = drafter.weights()
    assert drafter.weights() is w
    with torch.no_grad():
        drafter.layer.self_attn.k_proj.weight.mul_(2.0)
    w2 = drafter.weights()
    assert w2 is not w
    k_rows = slice(w2.heads * w2.head_dim, (w2.heads + w2.kv_heads) * w2.head_dim)
    assert torch.allclose(w2.qkv_w[k_rows], 2.0 * w.qkv_w[k_rows])


def test_a_session_keeps_the_drafter_level_with_the_stream(world_target):
    """The drafter takes in the prompt at session open, frames as they are ingested, a caption's closing
    turn at catch_up, a caption put in from elsewhere: a caption's first draft finds nothing to ingest but
    its own prefix."""
    from sparrow_core.session import CaptionEngine, SessionConfig
    from sparrow_core.train.data import WorldStreamSpec, world_segments

    engine = CaptionEngine(world_target, {"sparrow": drafter_for(world_target)})
    session = engine.open_session(SessionConfig(decoding="sparrow", max_caption_tokens=48))  # room for the appended reference caption
    state = session.decoder.proposer.state(session.stream)

    def pending() -> int:
        return state.pending(session.stream)[0].numel()

    assert state.entries > 0 and pending() == 0  # the preamble
    first, second = world_segments(WorldStreamSpec(seed=5, segments=2))
    session.ingest(first.frames, first.times)
    assert pending() == 0
    session.caption(first.segment.t1)
    assert pending() > 0  # the closed turn's end (end token, suffix): not yet taken in
    session.catch_up()
    assert pending() == 0
    session.ingest(second.frames, second.times)
    session.append_caption(second.caption, second.segment.t1)
    assert pending() == 0
