"""A trained drafter as a proposer: its per-stream state, kept level with the stream, and the EAGLE-2
tree grown below the stream's last token. The network itself (`decoding/drafter.py`) is stateless.

Text-anchored attention (VATA). The drafter keeps its own KV (`StreamKVCache`, one layer) with one
entry per TEXT slot of the stream, never a visual token, so drafting costs the same at 500 or 25,000
visual tokens. Optionally a window: the first `sink_tokens` entries and the last `text_window` ones.
Position ids of text entries are the target's own (gaps where frames were; M-RoPE targets get the same
value in all rows, which is plain 1-D RoPE) or compacted 0, 1, 2, ... over text only (`position_mode`).
With a visual span (msd, ablations) the KV holds every slot of the stream in order, frame slots as the
span's states (raw projector embeddings or the target's L/2 states) fed to the layer as they are.

Hidden-state reuse (HSR). `DrafterState.sync` brings the drafter's KV level with the stream
incrementally from the hidden states the stream already keeps: new text (prompt, earlier captions,
accepted tokens) is fed in with the target's h(t-1); anything the stream dropped (rollback, rejected
nodes, evictions) is cropped first. Entries are matched to stream slots by (position, token, frame), so
any edit of the stream is seen. The drafter's KV changes only here: sync (the session calls it through
`prefill` whenever it appends outside a caption: `CaptionSession.catch_up`), and `propose`, which ingests
what is still pending in the root's forward, grows the tree's entries one forward per depth and crops
them off again before it returns.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from itertools import accumulate
from typing import Protocol

import torch

from sparrow_core.decoding.draft_tree import DraftTree, LevelRequest, TreeConfig, grow_tree, top_children
from sparrow_core.decoding.drafter import (
    DrafterWeights,
    LayerRows,
    TextAnchoredDrafter,
    lean_fuse,
    lean_layer,
    lean_layer_rows,
    lean_logprobs,
    rope_angles,
)
from sparrow_core.decoding.proposers.base import DraftRequest
from sparrow_core.engine.kv_cache import StreamKVCache, StreamKVLayer
from sparrow_core.engine.stream import TargetStream
from sparrow_core.engine.text_stack import rms_norm
from sparrow_core.kernels.dispatch import resolve_backend, visible_slots

INGEST_CHUNK = 512  # rows per drafter forward when catching up (bounds the [n, kv] mask)


class DrafterState:
    """One stream's drafter KV and, per entry, the stream slot it mirrors (target position, token, frame)."""

    def __init__(self, drafter: TextAnchoredDrafter, capacity: int = 256) -> None:
        self.drafter = drafter
        self.cache = StreamKVCache(1, capacity)
        self.pos = torch.empty((0, drafter.target.position_rows), dtype=torch.long, device="cpu")  # [N, P] target positions
        self.tok = torch.empty(0, dtype=torch.long, device="cpu")  # [N]
        self.frame = torch.empty(0, dtype=torch.long, device="cpu")  # [N] frame number, -1 for text
        self.kv_entry = torch.empty(0, dtype=torch.long, device="cpu")  # [length] entry index held by each KV slot
        self.slots_evicted_seen = 0  # the stream's evicted-slot count when we last looked
        self.dropped = 0  # entries dropped by evictions: compact positions keep counting past them

    @property
    def entries(self) -> int:
        return int(self.tok.numel())

    # --- the entries ---------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Forget entries >= n; their KV slots are a suffix of the KV (entry indices increase along it)."""
        self.pos, self.tok, self.frame = self.pos[:n], self.tok[:n], self.frame[:n]
        keep = int((self.kv_entry < n).sum())
        self.cache.crop(keep - self.cache.length)
        self.kv_entry = self.kv_entry[:keep]

    def keep_entries(self, alive: torch.Tensor) -> None:
        """Keep entries where alive [N] bool; renumber (after the stream evicted frames or text)."""
        self.dropped += int((~alive).sum())
        renumber = torch.cumsum(alive.long(), 0) - 1
        kv_alive = alive[self.kv_entry]
        self.cache.keep(kv_alive.nonzero().squeeze(1))
        self.kv_entry = renumber[self.kv_entry[kv_alive]]
        self.pos, self.tok, self.frame = self.pos[alive], self.tok[alive], self.frame[alive]

    def keep_window(self, sinks: int, window: int) -> None:
        """Keep the first `sinks` and the last `window` KV slots."""
        n = self.cache.length
        idx = torch.cat([torch.arange(min(sinks, n), device="cpu"), torch.arange(max(sinks, n - window), n, device="cpu")])
        self.cache.keep(idx)
        self.kv_entry = self.kv_entry[idx]

    # --- reading the stream --------------------------------------------------------------------
    def relevant_slots(self, stream: TargetStream) -> torch.Tensor:
        """The stream slots the drafter's entries mirror: text only, or every slot with a visual span."""
        if self.drafter.config.visual_span is not None:
            return torch.arange(stream.length, device="cpu")
        return stream.text_slots()

    def features(self, stream: TargetStream, slots: torch.Tensor) -> torch.Tensor:
        """Target feature h(slot) [n, H] for each slot; zeros where the stream keeps none (slot -1, visual)."""
        layer = self.drafter.feature_layer
        hv = stream.hidden()
        if layer not in hv.layers:
            raise ValueError(f"the stream keeps hidden layers {sorted(hv.layers)}, the drafter reads layer {layer}")
        rows = hv.layers[layer]
        if hv.slots.numel() == 0 or slots.numel() == 0:
            return rows.new_zeros((slots.numel(), rows.shape[-1]))
        at = torch.searchsorted(hv.slots, slots).clamp(max=hv.slots.numel() - 1)
        hit = hv.slots[at] == slots
        out = rows[at.to(rows.device)]  # a copy: the misses are zeroed in place
        if not bool(hit.all()):
            out[~hit.to(out.device)] = 0
        return out

    def entry_positions(self, pos: torch.Tensor, first_entry: int) -> torch.Tensor:
        """Drafter position ids [P, n] of entries first_entry.. with target positions pos [n, P]."""
        if self.drafter.config.position_mode == "target":
            return pos.T
        n, first = pos.shape[0], first_entry + self.dropped
        return torch.arange(first, first + n, device="cpu").unsqueeze(0).expand(pos.shape[1], n)

    def visual_inputs(self, stream: TargetStream, slots: torch.Tensor) -> torch.Tensor:
        """Layer inputs [n, H] of frame slots: raw projector embeddings, or the target's L/2 states."""
        if self.drafter.config.visual_span == "embeds":
            emb_slots, embeds = stream.visual_embeds()
            return embeds[torch.searchsorted(emb_slots, slots).to(embeds.device)]
        # mid_hidden: visual tokens from the kept L/2 states, separators from the non-visual hidden view
        vis_slots, vis = stream.visual_mid_hidden()
        hv = stream.hidden()
        mid = hv.layers[stream.mid_layer]
        out = vis.new_zeros((slots.numel(), vis.shape[-1]))
        at = torch.searchsorted(vis_slots, slots).clamp(max=max(vis_slots.numel() - 1, 0))
        is_vis = vis_slots[at] == slots if vis_slots.numel() else torch.zeros_like(slots, dtype=torch.bool)
        out[is_vis] = vis[at[is_vis]]
        sep = ~is_vis
        if bool(sep.any()):
            out[sep] = mid[torch.searchsorted(hv.slots, slots[sep])]
        return out

    # --- keeping level with the stream (HSR) ---------------------------------------------------
    def pending(self, stream: TargetStream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop the entries the stream no longer has (evictions, and everything from the first entry that
        differs from its slot: a rollback, rejected nodes) and return what is left to ingest: the stream's
        relevant slots past the common prefix, (slots [n], target positions [n, P], tokens [n], frames [n])."""
        slots = self.relevant_slots(stream)
        s_pos = stream.positions()[:, slots].T  # [n, P]
        s_tok = stream.token_ids()[slots]
        s_frame = stream.frame_ids()[slots]
        if stream.slots_evicted != self.slots_evicted_seen:
            # the stream evicted frames or text spans: drop those entries here too. Text positions are
            # unique per slot; a frame's entries go with its frame number.
            self.slots_evicted_seen = stream.slots_evicted
            alive = torch.isin(self.pos[:, 0], s_pos[:, 0]) & ((self.frame < 0) | torch.isin(self.frame, s_frame))
            if not bool(alive.all()):
                self.keep_entries(alive)
        # longest common prefix of (position, token, frame) between our entries and the stream's slots
        m = min(self.entries, slots.numel())
        same = (self.pos[:m] == s_pos[:m]).all(1) & (self.tok[:m] == s_tok[:m]) & (self.frame[:m] == s_frame[:m])
        p = m if bool(same.all()) else int((~same).nonzero()[0])
        if p < self.entries:
            self.truncate(p)
        return slots[p:], s_pos[p:], s_tok[p:], s_frame[p:]

    @torch.no_grad()
    def sync(self, stream: TargetStream) -> None:
        """Make the drafter's KV mirror the stream's relevant slots (see the module docstring)."""
        self._ingest_all(stream, *self.pending(stream))

    def _ingest_all(self, stream: TargetStream, slots: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor,
                    frame: torch.Tensor) -> None:
        """Ingest the pending slots in causal chunks, then compact to the text window when it is due."""
        w = self.drafter.weights()
        for start in range(0, slots.numel(), INGEST_CHUNK):
            end = min(start + INGEST_CHUNK, slots.numel())
            x = self.inputs(stream, w, slots[start:end], tok[start:end], frame[start:end])
            n = end - start
            rope = self.drafter.rotary(x[None], self.entry_positions(pos[start:end], self.entries))
            lean_layer(w, x[None], rope, self.kv, self._causal(n))
            self._append_entries(pos[start:end], tok[start:end], frame[start:end])
        config = self.drafter.config
        if self._window_due(0):
            self.keep_window(config.sink_tokens, config.text_window)

    def _window_due(self, incoming: int) -> bool:
        """Whether the text window must be compacted once `incoming` more entries are in the KV."""
        config = self.drafter.config
        w = config.text_window
        if w is None or config.visual_span is not None:
            return False
        slack = max(16, w // 8)  # compact in bursts, not on every token
        return self.cache.length + incoming > config.sink_tokens + w + slack

    @property
    def kv(self) -> StreamKVLayer:
        """The drafter's one layer of KV, written in place by the lean step."""
        return self.cache.layers[0]

    def _causal(self, n: int) -> torch.Tensor | None:
        """Mask [1, 1, n, length + n] of n new rows over the KV: every committed slot, and the new rows
        causally (row i sees new rows <= i); None when one row sees everything anyway."""
        if n == 1:
            return None
        length = self.cache.length
        return torch.ones((n, length + n), dtype=torch.bool, device=self.drafter.fc.weight.device).tril(length)[None, None]

    def inputs(self, stream: TargetStream, w: DrafterWeights, slots: torch.Tensor, tok: torch.Tensor,
               frame: torch.Tensor) -> torch.Tensor:
        """Layer inputs [n, H] of stream slots: FC([embed(token); h(slot - 1)]) for text, the visual span's
        state for frame slots (msd, ablations)."""
        device = w.fc_w.device
        x = lean_fuse(w, tok.to(device), rms_norm(self.features(stream, slots - 1).to(w.fc_w.dtype), w.eps))  # [n, H]
        is_frame = frame >= 0
        if bool(is_frame.any()):  # a visual span: frame slots enter the layer as they are
            x[is_frame.to(device)] = self.visual_inputs(stream, slots[is_frame]).to(x.dtype)
        return x

    def _append_entries(self, pos: torch.Tensor, tok: torch.Tensor, frame: torch.Tensor) -> None:
        first = self.entries
        self.pos = torch.cat([self.pos, pos])
        self.tok = torch.cat([self.tok, tok])
        self.frame = torch.cat([self.frame, frame])
        self.kv_entry = torch.cat([self.kv_entry, torch.arange(first, first + tok.numel(), device="cpu")])

    # --- drafting a tree ---------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, stream: TargetStream, root_token: int, tree: TreeConfig, max_depth: int) -> DraftTree:
        """Grow an EAGLE-2 tree below the stream's last slot, one lean forward per depth for all the nodes at
        that depth (`grow_trees` of this stream alone). The root's input uses the target's feature of that
        slot, every other node its parent's drafter output o. What the stream gained since the last sync (the
        accepted tokens of the last step, a caption's prefix) is ingested by the root's forward, as rows
        before it: at most one forward per depth in all. The tree's KV entries are cropped off before
        returning: the KV mirrors the stream."""
        return grow_trees(self.drafter.weights(), [(self, stream, root_token, tree, max_depth)])[0]

    def start_tree(self, stream: TargetStream, w: DrafterWeights, tree: TreeConfig) -> _TreeLevels:
        """The levels of a tree to grow below the stream's last slot: a long catch-up (or the text window's
        turn) is ingested first, in chunks; what is left pending goes into the root's forward."""
        slots, pos, tok, frame = self.pending(stream)
        if slots.numel() >= INGEST_CHUNK or self._window_due(slots.numel()):
            self._ingest_all(stream, slots, pos, tok, frame)  # a long catch-up in chunks, or the window's turn
            slots, pos, tok, frame = slots[:0], pos[:0], tok[:0], frame[:0]
        return _TreeLevels(self, stream, w, tree, slots, pos, tok, frame)


# One tree to draft: (the stream's drafter state, the stream, the root token, the tree, its max depth).
TreeRequest = tuple[DrafterState, TargetStream, int, TreeConfig, int]


@torch.no_grad()
def grow_trees(w: DrafterWeights, requests: Sequence[TreeRequest]) -> list[DraftTree]:
    """Grow one EAGLE-2 tree per request (each of a different stream) in step: per depth ONE lean forward
    (`lean_layer_rows`: the matmuls once over every stream's rows of that depth, attention per stream over
    its own drafter KV) and one LM head over all their rows. A stream whose tree is shallower drops out of
    the later forwards. Each stream's drafter KV mirrors its stream again afterwards (the tree's entries
    cropped off)."""
    if len({id(state) for state, *_ in requests}) != len(requests):
        raise ValueError("grow_trees takes at most one tree per stream")
    levels: list[_TreeLevels] = []
    try:
        for state, stream, _, tree, _ in requests:
            levels.append(state.start_tree(stream, w, tree))
        growths = [grow_tree(root, tree, max_depth) for _, _, root, tree, max_depth in requests]
        trees: list[DraftTree | None] = [None] * len(requests)
        asks: dict[int, LevelRequest] = {}

        def advance(i: int, children: tuple[torch.Tensor, torch.Tensor] | None) -> None:
            try:
                asks[i] = next(growths[i]) if children is None else growths[i].send(children)
            except StopIteration as grown:
                trees[i] = grown.value
                asks.pop(i, None)

        for i in range(len(requests)):
            advance(i, None)
        while asks:
            items = list(asks.items())
            inputs = [levels[i].level_rows(*ask) for i, ask in items]
            # the outputs o normalised once [N, H]: the children's norm_h and the LM head's norm_o (weights folded)
            o = rms_norm(lean_layer_rows(w, _fused_inputs(w, [x for x, _ in inputs]), [rows for _, rows in inputs]), w.eps)
            outs = [levels[i].level_done(ask[0], part)
                    for (i, ask), part in zip(items, torch.split(o, [rows.size for _, rows in inputs]))]
            # one LM head and one top-k over every stream's nodes; each stream takes its own top_k
            top_k = [requests[i][3].top_k for i, _ in items]
            top_lp, top_tok = top_children(lean_logprobs(w, outs[0] if len(outs) == 1 else torch.cat(outs)), max(top_k))  # [sum m, k]
            ends = list(accumulate(out.shape[0] for out in outs))
            for (i, _), k, out, end in zip(items, top_k, outs, ends):
                advance(i, (top_lp[end - out.shape[0] : end, :k], top_tok[end - out.shape[0] : end, :k]))
        return trees
    finally:
        for grown in levels:
            grown.close()  # drop the tree's drafter KV


def _fused_inputs(w: DrafterWeights, inputs: Sequence[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Every stream's layer inputs of one forward, concatenated [N, H]: rows given as x [r, H] as they are, rows
    given as (tokens [r], normalised h_prev [r, H]) through ONE `lean_fuse` for all of them."""
    if len(inputs) == 1:
        x = inputs[0]
        return lean_fuse(w, *x) if isinstance(x, tuple) else x
    pairs = [x for x in inputs if isinstance(x, tuple)]
    if not pairs:
        return torch.cat(inputs)
    fused = iter(torch.split(lean_fuse(w, torch.cat([t for t, _ in pairs]), torch.cat([h for _, h in pairs])),
                             [t.numel() for t, _ in pairs]))
    return torch.cat([next(fused) if isinstance(x, tuple) else x for x in inputs])


class _TreeLevels:
    """The `ExpandFn` of one proposed tree: one lean forward per depth over that depth's frontier, with the
    rotary angles of every depth and the ancestor masks' buffers made once for the tree.

    Tree entries in the drafter's KV: after the `committed` slots, each forwarded node in forward order
    (the root, then each level's frontier). anc[e] marks the entries node e sees: its ancestors and itself.
    A node sees every committed slot and exactly those tree entries, so a chain (top_k 1: every earlier
    entry is an ancestor) needs no mask at all."""

    def __init__(self, state: DrafterState, stream: TargetStream, w: DrafterWeights, tree: TreeConfig,
                 slots: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor, frame: torch.Tensor) -> None:
        self.state, self.stream, self.w = state, stream, w
        drafter = state.drafter
        self.device = w.fc_w.device
        self.pending = (slots, pos, tok, frame)
        n = slots.numel()
        self.committed = state.cache.length  # grows by the pending rows the root's forward ingests
        # positions: the pending rows' own, then depth d of the tree at root_pos + d
        if drafter.config.position_mode == "target":
            root_pos = stream.next_position
        else:
            root_pos = state.entries + n + state.dropped
        rows = drafter.target.position_rows
        depths = torch.arange(root_pos, root_pos + max(tree.depth, 1), device="cpu").expand(rows, -1)  # [P, D]
        positions = torch.cat([state.entry_positions(pos, state.entries), depths], dim=1) if n else depths  # [P, n + D]
        self.cos, self.sin = drafter.rotary_rows(positions)  # [1, n + D, Dh] each
        self.rope_at_depth = rope_angles(self.cos[0, n:], self.sin[0, n:], w.rope_rot)  # [D, Dh, Dh]: a depth's nodes share it
        self.n_pending = n
        self.top_k = tree.top_k
        self.chain = tree.top_k == 1
        self.rows_kernel = resolve_backend(w.fc_w) != "torch"  # CUDA: tree levels through the Triton kernels
        self.anc: torch.Tensor | None = None  # [entries, entries] ancestors-and-self of the tree entries (not a chain)
        if not self.chain:
            entries = 1 + max(tree.depth - 1, 0) * tree.top_k  # tree entries forwarded, at most
            self.anc = torch.zeros((entries, entries), dtype=torch.bool, device=self.device)
            self.anc[0, 0] = True  # the root sees itself
            self.diag = torch.arange(entries, device=self.device)
        self.mask_rows: torch.Tensor | None = None  # [top_k, committed + entries]: committed slots all visible
        self.forwarded = 0  # tree entries in the KV
        self.prev_ids: torch.Tensor | None = None  # node ids of the last forwarded level
        self.prev_o: torch.Tensor | None = None  # [m, H] their outputs, normalised (`rms_norm`)
        self.prev_first = 0  # the tree entry of the last level's first node

    def level_rows(self, node_ids: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                   depth: int) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], LayerRows]:
        """The rows of this depth's forward (a `LevelRequest`): their inputs, x [r, H] or what `lean_fuse` makes
        it of (tokens [r], normalised h_prev [r, H]), and how they attend. Depth 0 is the root, after the pending stream
        slots (their KV is kept: they are committed from here on)."""
        if depth == 0:
            return self._root_rows(int(tokens[0]))
        m = node_ids.numel()
        # each node's parent is a node of the previous level: its row there
        rows = torch.searchsorted(self.prev_ids, parents) if self.prev_ids.numel() > 1 else None
        h_prev = self.prev_o.expand(m, -1) if rows is None else self.prev_o[rows.to(self.device)]
        t = self.forwarded
        mask = None
        if not self.chain:
            parent_entry = self.prev_first + (rows.to(self.device) if rows is not None else 0)
            self.anc[t : t + m] = self.anc[parent_entry]  # a node sees what its parent sees ...
            self.anc[self.diag[t : t + m], self.diag[t : t + m]] = True  # ... and itself
            if self.mask_rows is None:
                self.mask_rows = torch.ones((self.top_k, self.committed + self.anc.shape[0]), dtype=torch.bool, device=self.device)
            c = self.committed
            self.mask_rows[:m, c : c + t + m] = self.anc[t : t + m, : t + m]
            mask = self.mask_rows[None, None, :m, : c + t + m]
        self.prev_first = t
        self.forwarded = t + m
        return (tokens.to(self.device), h_prev), self._layer_rows(m, self.rope_at_depth[depth], mask)

    def level_done(self, node_ids: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The forward's outputs o [r, H] of this level's rows -> those of its nodes [m, H] (kept: their
        children's inputs)."""
        if self.prev_ids is None and self.n_pending:  # the root's forward took the pending rows in: kept
            _, pos, tok, frame = self.pending
            self.state._append_entries(pos, tok, frame)
            self.committed += self.n_pending
        o = o[o.shape[0] - node_ids.numel() :]  # the root's forward: the pending rows come first
        self.prev_ids, self.prev_o = node_ids, o
        return o

    def close(self) -> None:
        """Drop the tree's entries from the drafter's KV (the pending rows the root took in stay)."""
        self.state.cache.crop(self.committed - self.state.cache.length)

    def _root_rows(self, root_token: int) -> tuple[torch.Tensor, LayerRows]:
        state, stream, w = self.state, self.stream, self.w
        slots, _, tok, frame = self.pending
        n = self.n_pending
        root = torch.tensor([root_token], device="cpu")
        last = torch.tensor([stream.length], device="cpu")  # the root sits at the next slot
        x = state.inputs(stream, w, torch.cat([slots, last]), torch.cat([tok, root]),
                         torch.cat([frame, torch.tensor([-1], device="cpu")]))  # [n + 1, H]
        rope = (self.cos[:, : n + 1], self.sin[:, : n + 1]) if n else self.rope_at_depth[0]
        rows = self._layer_rows(n + 1, rope, state._causal(n + 1))
        self.forwarded = 1
        return x, rows

    def _layer_rows(self, r: int, rope, mask: torch.Tensor | None) -> LayerRows:
        rows_kv_index = None
        if self.rows_kernel and mask is not None:
            length = self.state.cache.length + r
            rows_kv_index = visible_slots(mask[0, 0, :, :length])
            mask = None
        return LayerRows(r, rope, self.state.kv, mask, rows_kv_index)


class TreeSource(Protocol):
    """Where a proposer gets each step's tree when it is not fixed (`tree_policy.TreePolicy`)."""

    max_tree_tokens: int  # the most nodes of any tree it gives, root included

    def tree_for(self, context: int) -> TreeConfig:
        """The tree for a step below a stream of `context` slots."""
        ...

    def observe(self, ranks: Sequence[tuple[int, int]], context: int) -> None:
        """A verified step's sibling ranks below a stream of `context` slots (the Proposer's `observe`)."""
        ...


class DrafterProposer:
    """A `Proposer` over a drafter: one `DrafterState` per stream, dropped with the stream. Its tree is
    fixed (a TreeConfig; None: the drafter's own) or asked of a `TreeSource` per step."""

    def __init__(self, drafter: TextAnchoredDrafter, tree: TreeConfig | TreeSource | None = None) -> None:
        self.drafter = drafter
        self.tree: TreeConfig | TreeSource = tree or drafter.config.tree()
        # nodes of one proposed tree, root included
        self.max_tree_tokens = self.tree.total_tokens + 1 if isinstance(self.tree, TreeConfig) else self.tree.max_tree_tokens
        self.name = drafter.config.variant
        self.needs = drafter.config.stream_needs()
        self._states: weakref.WeakKeyDictionary[TargetStream, DrafterState] = weakref.WeakKeyDictionary()

    def state(self, stream: TargetStream) -> DrafterState:
        st = self._states.get(stream)
        if st is None:
            st = self._states[stream] = DrafterState(self.drafter)
        return st

    def prefill(self, stream: TargetStream) -> None:
        self.state(stream).sync(stream)

    def tree_for(self, stream: TargetStream) -> TreeConfig:
        """The tree the next step below `stream` grows."""
        return self.tree if isinstance(self.tree, TreeConfig) else self.tree.tree_for(stream.length)

    def propose(self, stream: TargetStream, root_token: int, max_depth: int) -> DraftTree:
        return self.propose_many([(stream, root_token, max_depth)])[0]

    def propose_many(self, requests: Sequence[DraftRequest]) -> list[DraftTree]:
        """Every stream's tree grown in step: one drafter forward per depth for all of them (`grow_trees`)."""
        return grow_trees(self.drafter.weights(), [(self.state(stream), stream, root, self.tree_for(stream), max_depth)
                                                   for stream, root, max_depth in requests])

    def observe(self, ranks: Sequence[tuple[int, int]], context: int) -> None:
        if not isinstance(self.tree, TreeConfig):
            self.tree.observe(ranks, context)
