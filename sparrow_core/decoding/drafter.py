"""The text-anchored drafter: one decoder layer of the target's own LM architecture, EAGLE-style.

Input at a text position t (H = target hidden size):

    x_t = FC([norm_e(embed(token_t)) ; norm_h(h(t-1))])        [2H] -> [H]
    o_t = DecoderLayer(x_t | the drafter's KV)                 one layer of the target's class
    q(token_{t+1}) = softmax(lm_head(norm_o(o_t)))             the target's own (frozen) LM head

h(t-1) is the target's hidden state at slot t-1 from `feature_layer` ("last" or "penultimate", recorded
in the config) while the slot is verified; inside a draft tree a node's own o replaces it for its
children (EAGLE), so o is trained to stand in for the target's feature. Embeddings, LM head and the
rotary embedding are the target's, shared by reference: never copied, never saved.

Text-anchored attention (VATA). The drafter keeps its own KV (`StreamKVCache`, one layer) with one
entry per TEXT slot of the stream, never a visual token, so drafting costs the same at 500 or 25,000
visual tokens. Optionally a window: the first `sink_tokens` entries and the last `text_window` ones.
Position ids of text entries are the target's own (gaps where frames were; M-RoPE targets get the same
value in all rows, which is plain 1-D RoPE) or compacted 0, 1, 2, ... over text only (`position_mode`).

Hidden-state reuse (HSR). `sync` brings the drafter's KV level with the stream incrementally from the
hidden states the stream already keeps: new text (prompt, earlier captions, accepted tokens) is fed in
with the target's h(t-1); anything the stream dropped (rollback, rejected nodes) is cropped first.
Entries are matched to stream slots by (position, token, frame), so any edit of the stream is seen.

Variants (`variant`): "sparrow" (above), "eagle" (the same architecture trained text-only, inference
as sparrow), and "msd": the KV holds every slot of the stream in order, frame slots as the target's raw
projector embeddings (fed to the layer as they are) and text as above; it attends to everything, so its
cost grows with the video. msd needs a stream opened with `keep_visual_embeds=True`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparrow_core.decoding.draft_tree import ExpandFn, TreeConfig
from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.engine.target import TargetModel, TokenKind

VARIANTS = ("sparrow", "eagle", "msd")
POSITION_MODES = ("target", "compact")
VISUAL_SPANS = ("embeds", "mid_hidden")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INGEST_CHUNK = 512  # rows per drafter forward when catching up (bounds the [n, kv] mask)


@dataclass
class DrafterConfig:
    variant: str = "sparrow"
    # what the KV holds for frame slots: None = nothing (text-anchored, sparrow / eagle); "embeds" = the
    # raw projector embeddings (msd, ablation "none"); "mid_hidden" = the target's L/2 states (ablation
    # "MTP+IVSB" without VATA). With a visual span the drafter attends to every slot of the stream.
    visual_span: str | None = None
    feature_layer: int | str = "last"  # which target hidden state feeds the FC ("last" | "penultimate" | index)
    position_mode: str = "target"  # "target": the target's positions; "compact": 0, 1, 2, ... over entries
    text_window: int | None = None  # keep only the last W text entries (+ sinks); None = all
    sink_tokens: int = 4
    tree_total_tokens: int = 30
    tree_depth: int = 4
    tree_top_k: int = 8
    # the target it was built for (checked on load)
    target_architecture: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    num_layers: int = 0
    training: dict = field(default_factory=dict)  # how it was trained (recorded by train_drafter)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown drafter variant {self.variant!r}; use one of {VARIANTS}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"unknown position mode {self.position_mode!r}; use one of {POSITION_MODES}")
        if self.variant == "msd" and self.visual_span is None:
            self.visual_span = "embeds"
        if self.visual_span is not None and self.visual_span not in VISUAL_SPANS:
            raise ValueError(f"unknown visual span {self.visual_span!r}; use one of {VISUAL_SPANS} or None")

    def stream_options(self) -> dict:
        """StreamConfig fields a stream needs for this drafter (what its visual span reads)."""
        if self.visual_span == "embeds":
            return {"keep_visual_embeds": True}
        if self.visual_span == "mid_hidden":
            return {"keep_visual_mid_hidden": True}
        return {}

    def tree(self) -> TreeConfig:
        return TreeConfig(self.tree_total_tokens, self.tree_depth, self.tree_top_k)


class DrafterState:
    """One stream's drafter KV and, per entry, the stream slot it mirrors (target position, token, frame)."""

    def __init__(self, position_rows: int, capacity: int = 256) -> None:
        self.cache = StreamKVCache(1, capacity)
        self.pos = torch.empty((0, position_rows), dtype=torch.long)  # [N, P] target positions
        self.tok = torch.empty(0, dtype=torch.long)  # [N]
        self.frame = torch.empty(0, dtype=torch.long)  # [N] frame number, -1 for text
        self.kv_entry = torch.empty(0, dtype=torch.long)  # [length] entry index held by each KV slot
        self.slots_evicted_seen = 0  # the stream's evicted-slot count when we last looked
        self.dropped = 0  # entries dropped by evictions: compact positions keep counting past them

    @property
    def entries(self) -> int:
        return int(self.tok.numel())

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
        idx = torch.cat([torch.arange(min(sinks, n)), torch.arange(max(sinks, n - window), n)])
        self.cache.keep(idx)
        self.kv_entry = self.kv_entry[idx]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [q, kv] or [B, q, kv] (True = may attend) -> additive float [1 or B, 1, q, kv] (0 / finfo.min)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return out[None, None] if mask.dim() == 2 else out[:, None]


class TextAnchoredDrafter(nn.Module):
    def __init__(self, target: TargetModel, config: DrafterConfig) -> None:
        super().__init__()
        self.target = target  # a plain object (not an nn.Module): its weights are not ours
        self.config = config
        text_cfg = target.model.config.get_text_config()
        lm = target.language_model
        h = target.hidden_size
        norm_cls = type(lm.norm)
        eps = text_cfg.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.embed_norm = norm_cls(h, eps=eps)
        self.hidden_norm = norm_cls(h, eps=eps)
        self.layer = type(lm.layers[0])(text_cfg, layer_idx=0)  # e.g. Qwen2DecoderLayer
        self.out_norm = norm_cls(h, eps=eps)
        self.feature_layer = target.layers.resolve(config.feature_layer)
        config.target_architecture = target.architecture
        config.hidden_size, config.vocab_size, config.num_layers = h, target.vocab_size, target.num_layers
        self._init_weights(text_cfg.initializer_range)
        self.to(device=target.device, dtype=target.dtype)
        self.eval()

    def _init_weights(self, std: float) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    # --- the network -------------------------------------------------------------------------
    def fuse(self, tokens: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """tokens [..., n], h_prev [..., n, H] (the feature of the slot before each token) -> [..., n, H]."""
        e = self.target.embed_tokens(tokens.to(self.fc.weight.device)).to(self.fc.weight.dtype)
        return self.fc(torch.cat([self.embed_norm(e), self.hidden_norm(h_prev.to(e.dtype))], dim=-1))

    def layer_forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: StreamKVCache | None = None
    ) -> torch.Tensor:
        """x [B, n, H], positions [P, n] or [B, P, n] (P = the target's position rows), mask bool [n, kv] or
        [B, n, kv] over (cache + these n rows) -> o [B, n, H]. With a cache the n rows' keys are appended."""
        b = x.shape[0]
        pos = positions.to(x.device)
        if pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(b, *pos.shape)  # [B, P, n]
        position_ids = pos[:, 0] if pos.shape[1] == 1 else pos.permute(1, 0, 2)  # [B, n] or [P, B, n]
        cos_sin = self.target.language_model.rotary_emb(x, position_ids)
        return self.layer(
            x,
            attention_mask=_additive(mask.to(x.device), x.dtype),
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=cos_sin,
        )

    def head(self, o: torch.Tensor) -> torch.Tensor:
        """o [..., H] -> logits [..., V] through the target's LM head."""
        return self.target.lm_head(self.out_norm(o))

    # --- keeping level with a stream (HSR) ----------------------------------------------------
    def new_state(self) -> DrafterState:
        return DrafterState(self.target.position_rows)

    def _relevant_slots(self, stream) -> torch.Tensor:
        if self.config.visual_span is not None:
            return torch.arange(stream.length)
        return (stream.kinds() == int(TokenKind.TEXT)).nonzero().squeeze(1)

    def _features(self, stream, slots: torch.Tensor) -> torch.Tensor:
        """Target feature h(slot) [n, H] for each slot; zeros where the stream keeps none (slot -1, visual)."""
        hv = stream.hidden()
        if self.feature_layer not in hv.layers:
            raise ValueError(
                f"the stream keeps hidden layers {sorted(hv.layers)}, the drafter reads layer {self.feature_layer}"
            )
        rows = hv.layers[self.feature_layer]
        out = rows.new_zeros((slots.numel(), rows.shape[-1]))
        if hv.slots.numel() == 0 or slots.numel() == 0:
            return out
        at = torch.searchsorted(hv.slots, slots).clamp(max=hv.slots.numel() - 1)
        hit = hv.slots[at] == slots
        out[hit.to(out.device)] = rows[at[hit].to(rows.device)]
        return out

    def _entry_positions(self, state: DrafterState, pos: torch.Tensor, first_entry: int) -> torch.Tensor:
        """Drafter position ids [P, n] of entries first_entry.. with target positions pos [n, P]."""
        if self.config.position_mode == "target":
            return pos.T
        n, first = pos.shape[0], first_entry + state.dropped
        return torch.arange(first, first + n).unsqueeze(0).expand(pos.shape[1], n)

    @torch.no_grad()
    def sync(self, state: DrafterState, stream) -> None:
        """Make the drafter's KV mirror the stream's relevant slots (see the module docstring)."""
        slots = self._relevant_slots(stream)
        s_pos = stream.positions()[:, slots].T  # [n, P]
        s_tok = stream.token_ids()[slots]
        s_frame = stream.frame_ids()[slots]
        if stream.slots_evicted != state.slots_evicted_seen:
            # the stream evicted frames or text spans: drop those entries here too. Text positions are
            # unique per slot; a frame's entries go with its frame number.
            state.slots_evicted_seen = stream.slots_evicted
            alive = torch.isin(state.pos[:, 0], s_pos[:, 0]) & ((state.frame < 0) | torch.isin(state.frame, s_frame))
            if not bool(alive.all()):
                state.keep_entries(alive)
        # longest common prefix of (position, token, frame) between our entries and the stream's slots
        m = min(state.entries, slots.numel())
        same = (state.pos[:m] == s_pos[:m]).all(1) & (state.tok[:m] == s_tok[:m]) & (state.frame[:m] == s_frame[:m])
        p = m if bool(same.all()) else int((~same).nonzero()[0])
        if p < state.entries:
            state.truncate(p)
        for start in range(p, slots.numel(), INGEST_CHUNK):
            end = min(start + INGEST_CHUNK, slots.numel())
            self._ingest(state, stream, slots[start:end], s_pos[start:end], s_tok[start:end], s_frame[start:end])
        w = self.config.text_window
        if w is not None and self.config.visual_span is None:
            slack = max(16, w // 8)  # compact in bursts, not on every token
            if state.cache.length > self.config.sink_tokens + w + slack:
                state.keep_window(self.config.sink_tokens, w)

    def _ingest(self, state, stream, slots, pos, tok, frame) -> None:
        n = slots.numel()
        x = self.fuse(tok, self._features(stream, slots - 1))  # [n, H]
        is_frame = frame >= 0
        if bool(is_frame.any()):  # a visual span: frame slots enter the layer as they are
            x[is_frame.to(x.device)] = self._visual_inputs(stream, slots[is_frame]).to(x.dtype)
        length = state.cache.length
        mask = torch.ones((n, length + n), dtype=torch.bool)
        mask[:, length:] = torch.ones((n, n), dtype=torch.bool).tril()
        first = state.entries
        self.layer_forward(x.unsqueeze(0), self._entry_positions(state, pos, first), mask, state.cache)
        state.pos = torch.cat([state.pos, pos])
        state.tok = torch.cat([state.tok, tok])
        state.frame = torch.cat([state.frame, frame])
        state.kv_entry = torch.cat([state.kv_entry, torch.arange(first, first + n)])

    def _visual_inputs(self, stream, slots: torch.Tensor) -> torch.Tensor:
        """Layer inputs [n, H] of frame slots: raw projector embeddings, or the target's L/2 states."""
        if self.config.visual_span == "embeds":
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

    # --- drafting a tree ---------------------------------------------------------------------
    def tree_expander(self, state: DrafterState, stream) -> tuple[ExpandFn, int]:
        """An `expand` for `propose_tree` below the stream's last slot; the root's input uses the target's
        feature of that slot, every other node its parent's drafter output o. Returns (expand, committed
        KV length): the caller crops the KV back to it afterwards."""
        committed = state.cache.length
        root_h = self._features(stream, torch.tensor([stream.length - 1]))[0]
        if self.config.position_mode == "target":
            root_pos = stream.next_position
        else:
            root_pos = state.entries + state.dropped
        rows = self.target.position_rows
        node_h: dict[int, torch.Tensor] = {}  # node id -> its o [H]
        node_off: dict[int, int] = {}  # node id -> its KV offset after `committed`
        node_anc: dict[int, list[int]] = {}  # node id -> KV offsets of itself and its forwarded ancestors

        @torch.no_grad()
        def expand(node_ids: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, depth: int) -> torch.Tensor:
            ids, pars = node_ids.tolist(), parents.tolist()
            m, t = len(ids), len(node_off)
            h_prev = torch.stack([root_h if p < 0 else node_h[p] for p in pars])
            x = self.fuse(tokens, h_prev)  # [m, H]
            # committed KV: visible to all; tree KV: ancestors (and self) only
            mask = torch.zeros((m, committed + t + m), dtype=torch.bool)
            mask[:, :committed] = True
            for i, (node, par) in enumerate(zip(ids, pars)):
                anc = (node_anc[par] if par >= 0 else []) + [t + i]
                node_anc[node], node_off[node] = anc, t + i
                mask[i, [committed + a for a in anc]] = True
            positions = torch.full((rows, m), root_pos + depth, dtype=torch.long)
            o = self.layer_forward(x.unsqueeze(0), positions, mask, state.cache)[0]  # [m, H]
            for i, node in enumerate(ids):
                node_h[node] = o[i]
            return torch.log_softmax(self.head(o).float(), dim=-1)

        return expand, committed

    # --- engine wiring, save / load ----------------------------------------------------------
    def decoders(self) -> dict:
        """name -> decoder callable for `CaptionEngine.decoders`: this drafter's method and `ngram`."""
        from sparrow_core.decoding.proposers.drafter import DrafterProposer, NgramProposer
        from sparrow_core.decoding.speculative import make_decoder

        return {
            self.config.variant: make_decoder(DrafterProposer(self)),
            "ngram": make_decoder(NgramProposer()),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors (FC, layer, norms only; the target's weights are not ours)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME))


def load_drafter(directory: str | Path, target: TargetModel) -> TextAnchoredDrafter:
    """Load a drafter saved by `save_pretrained` on top of `target` (whose embeddings / head it shares)."""
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{d} is not a drafter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    raw = json.loads((d / CONFIG_NAME).read_text())
    known = DrafterConfig.__dataclass_fields__
    config = DrafterConfig(**{k: v for k, v in raw.items() if k in known})
    want = (target.architecture, target.hidden_size, target.vocab_size, target.num_layers)
    have = (config.target_architecture, config.hidden_size, config.vocab_size, config.num_layers)
    if have != want:
        raise ValueError(f"drafter in {d} was built for (arch, hidden, vocab, layers) = {have}, target is {want}")
    drafter = TextAnchoredDrafter(target, config)
    drafter.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    drafter.to(device=target.device, dtype=target.dtype)
    return drafter
