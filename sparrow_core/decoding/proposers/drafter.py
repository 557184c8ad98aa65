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
any edit of the stream is seen. The drafter's KV changes only here: sync, and `propose`, which grows
the tree's entries and crops them off again before it returns.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Protocol

import torch

from sparrow_core.decoding.draft_tree import DraftTree, TreeConfig, propose_tree
from sparrow_core.decoding.drafter import TextAnchoredDrafter
from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.stream import TargetStream

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
        return (stream.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1)

    def features(self, stream: TargetStream, slots: torch.Tensor) -> torch.Tensor:
        """Target feature h(slot) [n, H] for each slot; zeros where the stream keeps none (slot -1, visual)."""
        layer = self.drafter.feature_layer
        hv = stream.hidden()
        if layer not in hv.layers:
            raise ValueError(f"the stream keeps hidden layers {sorted(hv.layers)}, the drafter reads layer {layer}")
        rows = hv.layers[layer]
        out = rows.new_zeros((slots.numel(), rows.shape[-1]))
        if hv.slots.numel() == 0 or slots.numel() == 0:
            return out
        at = torch.searchsorted(hv.slots, slots).clamp(max=hv.slots.numel() - 1)
        hit = hv.slots[at] == slots
        out[hit.to(out.device)] = rows[at[hit].to(rows.device)]
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
    @torch.no_grad()
    def sync(self, stream: TargetStream) -> None:
        """Make the drafter's KV mirror the stream's relevant slots (see the module docstring)."""
        config = self.drafter.config
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
        for start in range(p, slots.numel(), INGEST_CHUNK):
            end = min(start + INGEST_CHUNK, slots.numel())
            self._ingest(stream, slots[start:end], s_pos[start:end], s_tok[start:end], s_frame[start:end])
        w = config.text_window
        if w is not None and config.visual_span is None:
            slack = max(16, w // 8)  # compact in bursts, not on every token
            if self.cache.length > config.sink_tokens + w + slack:
                self.keep_window(config.sink_tokens, w)

    def _ingest(self, stream, slots, pos, tok, frame) -> None:
        drafter = self.drafter
        n = slots.numel()
        x = drafter.fuse(tok, self.features(stream, slots - 1))  # [n, H]
        is_frame = frame >= 0
        if bool(is_frame.any()):  # a visual span: frame slots enter the layer as they are
            x[is_frame.to(x.device)] = self.visual_inputs(stream, slots[is_frame]).to(x.dtype)
        length = self.cache.length
        mask = torch.ones((n, length + n), dtype=torch.bool, device="cpu")
        mask[:, length:] = torch.ones((n, n), dtype=torch.bool, device="cpu").tril()
        first = self.entries
        drafter.layer_forward(x.unsqueeze(0), self.entry_positions(pos, first), mask, self.cache)
        self.pos = torch.cat([self.pos, pos])
        self.tok = torch.cat([self.tok, tok])
        self.frame = torch.cat([self.frame, frame])
        self.kv_entry = torch.cat([self.kv_entry, torch.arange(first, first + n, device="cpu")])

    # --- drafting a tree -----------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, stream: TargetStream, root_token: int, tree: TreeConfig, max_depth: int) -> DraftTree:
        """Sync, then grow an EAGLE-2 tree below the stream's last slot. The root's input uses the
        target's feature of that slot, every other node its parent's drafter output o. The tree's KV
        entries are cropped off before returning: the KV mirrors the stream again."""
        self.sync(stream)
        drafter = self.drafter
        committed = self.cache.length
        root_h = self.features(stream, torch.tensor([stream.length - 1], device="cpu"))[0]
        if drafter.config.position_mode == "target":
            root_pos = stream.next_position
        else:
            root_pos = self.entries + self.dropped
        rows = drafter.target.position_rows
        node_h: dict[int, torch.Tensor] = {}  # node id -> its o [H]
        node_off: dict[int, int] = {}  # node id -> its KV offset after `committed`
        node_anc: dict[int, list[int]] = {}  # node id -> KV offsets of itself and its forwarded ancestors

        def expand(node_ids: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, depth: int) -> torch.Tensor:
            ids, pars = node_ids.tolist(), parents.tolist()
            m, t = len(ids), len(node_off)
            h_prev = torch.stack([root_h if p < 0 else node_h[p] for p in pars])
            x = drafter.fuse(tokens, h_prev)  # [m, H]
            # committed KV: visible to all; tree KV: ancestors (and self) only
            mask = torch.zeros((m, committed + t + m), dtype=torch.bool, device="cpu")
            mask[:, :committed] = True
            for i, (node, par) in enumerate(zip(ids, pars)):
                anc = (node_anc[par] if par >= 0 else []) + [t + i]
                node_anc[node], node_off[node] = anc, t + i
                mask[i, [committed + a for a in anc]] = True
            positions = torch.full((rows, m), root_pos + depth, dtype=torch.long, device="cpu")
            o = drafter.layer_forward(x.unsqueeze(0), positions, mask, self.cache, tree_level=True)[0]  # [m, H]
            for i, node in enumerate(ids):
                node_h[node] = o[i]
            return torch.log_softmax(drafter.head(o).float(), dim=-1)

        try:
            return propose_tree(root_token, expand, tree, max_depth)
        finally:
            self.cache.crop(committed - self.cache.length)  # drop the tree's drafter KV


class TreeSource(Protocol):
    """Where a proposer gets each step's tree when it is not fixed (`tree_policy.TreePolicy`)."""

    max_tree_tokens: int  # the most nodes of any tree it gives, root included

    def tree_for(self, context: int) -> TreeConfig:
        """The tree for a step below a stream of `context` slots."""
        ...

    def observe(self, ranks: Sequence[tuple[int, int]]) -> None:
        """A verified step's sibling ranks (the Proposer's `observe`)."""
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
        return self.state(stream).propose(stream, root_token, self.tree_for(stream), max_depth)

    def observe(self, ranks: Sequence[tuple[int, int]]) -> None:
        if not isinstance(self.tree, TreeConfig):
            self.tree.observe(ranks)
