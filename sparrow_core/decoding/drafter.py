"""The text-anchored drafter: one decoder layer of the target's own LM architecture, EAGLE-style.

Input at a text position t (H = target hidden size):

    x_t = FC([norm_e(embed(token_t)) ; norm_h(h(t-1))])        [2H] -> [H]
    o_t = DecoderLayer(x_t | the drafter's KV)                 one layer of the target's class
    q(token_{t+1}) = softmax(lm_head(norm_o(o_t)))             the target's own (frozen) LM head

h(t-1) is the target's hidden state at slot t-1 from `feature_layer` ("last" or "penultimate", recorded
in the config) while the slot is verified; inside a draft tree a node's own o replaces it for its
children (EAGLE), so o is trained to stand in for the target's feature. Embeddings, LM head and the
rotary embedding are the target's, shared by reference: never copied, never saved.

Per-stream state (the drafter's own KV, kept level with a stream: VATA, HSR) and tree expansion are
the proposer's, `decoding/proposers/drafter.py`; this module is the network, its config and save / load,
and the lean step drafting runs (`lean_fuse`, `lean_layer`, `lean_logprobs` over `DrafterWeights`, read
from the module's parameters by `TextAnchoredDrafter.weights()`); training runs the module itself.

Variants (`variant`): "sparrow" (above), "eagle" (the same architecture trained text-only, inference
as sparrow), and "msd": the KV holds every slot of the stream in order, frame slots as the target's raw
projector embeddings (fed to the layer as they are) and text as above; it attends to everything, so its
cost grows with the video. msd needs a stream opened with `keep_visual_embeds=True`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers.activations import SiLUActivation
from transformers.cache_utils import Cache

from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.engine.derived import DerivedCache
from sparrow_core.engine.kv_cache import StreamKVLayer
from sparrow_core.engine.stream import StreamNeeds
from sparrow_core.engine.target import TargetModel
from sparrow_core.engine.text_stack import rms_norm
from sparrow_core.kernels.dispatch import rows_attention
from sparrow_core.kernels.reference import grouped_sdpa

VARIANTS = ("sparrow", "eagle", "msd")
POSITION_MODES = ("target", "compact")
VISUAL_SPANS = ("embeds", "mid_hidden")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
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
    # the draft tree it is served with (`tree()`), recorded by its trainer (`sparrow-train drafter --tree`)
    tree_total_tokens: int = TreeConfig.total_tokens
    tree_depth: int = TreeConfig.depth
    tree_top_k: int = TreeConfig.top_k
    # the target it was built for (checked on load)
    target_architecture: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    num_layers: int = 0
    training: dict = field(default_factory=dict)  # how it was trained (recorded by train/drafter.py)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown drafter variant {self.variant!r}; use one of {VARIANTS}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"unknown position mode {self.position_mode!r}; use one of {POSITION_MODES}")
        if self.variant == "msd" and self.visual_span is None:
            object.__setattr__(self, "visual_span", "embeds")  # msd's span, whatever the caller left out
        if self.visual_span is not None and self.visual_span not in VISUAL_SPANS:
            raise ValueError(f"unknown visual span {self.visual_span!r}; use one of {VISUAL_SPANS} or None")

    def stream_needs(self) -> StreamNeeds:
        """What a stream must keep for this drafter (what its visual span reads)."""
        return StreamNeeds(visual_embeds=self.visual_span == "embeds", visual_mid_hidden=self.visual_span == "mid_hidden")

    def tree(self) -> TreeConfig:
        return TreeConfig(self.tree_total_tokens, self.tree_depth, self.tree_top_k)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [q, kv] or [B, q, kv] (True = may attend) -> additive float [1 or B, 1, q, kv] (0 / finfo.min)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return out[None, None] if mask.dim() == 2 else out[:, None]


class TextAnchoredDrafter(nn.Module):
    def __init__(self, target: TargetModel, config: DrafterConfig) -> None:
        super().__init__()
        self.target = target  # a plain object (not an nn.Module): its weights are not ours
        # the config as built: the given one, with the target it was built for filled in (not mutated)
        self.config = replace(config, target_architecture=target.architecture, hidden_size=target.hidden_size,
                              vocab_size=target.vocab_size, num_layers=target.num_layers)
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
        self._lean: DerivedCache[DrafterWeights] = DerivedCache()  # `weights()`
        self._lean_sources: tuple[torch.Tensor, ...] | None = None
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # `rotary_rows`: (cos, sin) [T, D]
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
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Cache | None = None,
    ) -> torch.Tensor:
        """x [B, n, H], positions [P, n] or [B, P, n] (P = the target's position rows), mask bool [n, kv] or
        [B, n, kv] over (cache + these n rows) -> o [B, n, H]. With a cache the n rows' keys are appended.

        The module path: training (autograd, batches of sequences) and the reference the lean step
        (`lean_layer`) is tested against. Inference drafts through the lean step."""
        cos_sin = self.rotary(x, positions)
        attention_mask = _additive(mask.to(x.device), x.dtype)
        return self.layer(x, cache=cache, use_cache=cache is not None, position_embeddings=cos_sin, attention_mask=attention_mask)

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [P, n] or [B, P, n] -> the target's rotary (cos, sin), each [B, n, D] (x: [B, n, H], for
        the batch, dtype and device). An M-RoPE target mixes its P rows per frequency band here."""
        b = x.shape[0]
        pos = positions.to(x.device)
        if pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(b, *pos.shape)  # [B, P, n]
        position_ids = pos[:, 0] if pos.shape[1] == 1 else pos.permute(1, 0, 2)  # [B, n] or [P, B, n]
        return self.target.language_model.rotary_emb(x, position_ids)

    def head(self, o: torch.Tensor) -> torch.Tensor:
        """o [..., H] -> logits [..., V] through the target's LM head (in the head's dtype: a drafter trained
        in fp32 on a bf16 target)."""
        head = self.target.lm_head
        return head(self.out_norm(o).to(head.weight.dtype))

    # --- the weights as the lean step reads them ------------------------------------------------
    def weights(self) -> DrafterWeights:
        """The `DrafterWeights` of the current parameters: rebuilt (the fused QKV and gate/up concatenated
        again) only when a parameter changed since the last call (an optimizer step, load_state_dict, .to()),
        so training and inference read one definition of the weights."""
        if self._lean_sources is None:  # the tensors the weights come from (a module walk: once)
            embed, head = self.target.embed_tokens, self.target.lm_head
            self._lean_sources = (*self.parameters(), embed.weight, head.weight, *([head.bias] if head.bias is not None else []))
        return self._lean.get(self._lean_sources, self._build_weights)

    def _apply(self, fn, recurse: bool = True):
        """.to() / .float() / .cuda() may swap parameters: walk them again at the next `weights()`."""
        self._lean_sources = None
        self._rope_table = None
        return super()._apply(fn, recurse)

    def rotary_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotary` of one sequence's positions [P, n] for the lean step: (cos, sin) [1, n, D] in the drafter's
        dtype. Where every position row agrees (text; a tree's depths) and the rotary is the plain one (no
        dynamic scaling), rows of a table over positions 0..T made by `rotary` once (grown by doubling): no
        rotary call per draft. Each angle is one product (inv_freq x position), so a row of the table is that
        position's own rotary."""
        weight = self.fc.weight
        x_like = torch.empty((1, 1, 1), dtype=weight.dtype, device=weight.device)
        pos = positions[0]
        plain = getattr(self.target.language_model.rotary_emb, "rope_type", "default") == "default"
        if not plain or pos.numel() == 0 or (positions.shape[0] > 1 and not bool((positions == pos).all())):
            return self.rotary(x_like, positions)
        top = int(pos.max()) + 1
        table = self._rope_table
        if table is None or table[0].shape[0] < top:
            size = max(top, 2 * table[0].shape[0] if table is not None else 1024)
            cos, sin = self.rotary(x_like, torch.arange(size, device="cpu").expand(positions.shape[0], size))
            table = self._rope_table = (cos[0], sin[0])
        at = pos.to(weight.device)
        return table[0][at][None], table[1][at][None]

    @torch.no_grad()
    def _build_weights(self) -> DrafterWeights:
        layer, embed, head = self.layer, self.target.embed_tokens, self.target.lm_head
        attn, mlp = layer.self_attn, layer.mlp
        norms = (self.embed_norm, self.hidden_norm, layer.input_layernorm, layer.post_attention_layernorm, self.out_norm)
        eps = {float(n.variance_epsilon) for n in norms}
        supported = (
            type(embed) is nn.Embedding and type(head) is nn.Linear and isinstance(mlp.act_fn, (nn.SiLU, SiLUActivation))
            and len(eps) == 1 and attn.o_proj.bias is None and all(p.bias is None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            and not hasattr(attn, "q_norm") and getattr(attn, "sliding_window", None) is None
            and attn.scaling == attn.head_dim**-0.5
        )
        if not supported:
            raise NotImplementedError(f"the lean drafter step covers Qwen2-style layers; {type(layer).__name__} differs")
        d = attn.head_dim

        def folded(weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
            return (weight.float() * norm_weight.float()).to(weight.dtype)  # W diag(g), in fp32

        qkv_b = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        gate_up_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        h, eps_all = self.fc.out_features, next(iter(eps))
        fc_e, fc_h = self.fc.weight[:, :h], self.fc.weight[:, h:]
        # the FC's embedding half (and its bias) for every token at once: a row lookup per drafted node
        embed_fc = F.linear(rms_norm(embed.weight.to(fc_e.dtype), eps_all), folded(fc_e, self.embed_norm.weight), self.fc.bias)
        return DrafterWeights(
            embed_fc=embed_fc, fc_w=folded(fc_h, self.hidden_norm.weight).contiguous(),
            qkv_w=folded(qkv_w, layer.input_layernorm.weight), qkv_b=qkv_b, o_w=attn.o_proj.weight,
            gate_up_w=folded(gate_up_w, layer.post_attention_layernorm.weight), down_w=mlp.down_proj.weight,
            head_w=folded(head.weight, self.out_norm.weight), head_b=head.bias,
            rope_rot=rotate_half_matrix(d, fc_e.dtype, fc_e.device),
            heads=attn.q_proj.out_features // d, kv_heads=attn.k_proj.out_features // d, head_dim=d, eps=eps.pop(),
        )

    # --- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors (FC, layer, norms only; the target's weights are not ours)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME))


# --- the lean step: inference as flat functions over the module's weights ---------------------------
# The module above is the one definition of the weights (training, save / load). Drafting reads them through
# `DrafterWeights` and a few plain functions, gpt-fast style: no module calls, no masks beyond the caller's,
# the new rows' keys and values written in place into the drafter's preallocated KV. At hidden 192 a layer
# is microseconds of arithmetic and what costs is the number of framework calls, so the step is written to
# make few: one matmul for Q, K and V, one for the MLP's gate and up, the RMSNorm weights folded into the
# matmul that follows each norm (W (g * n) = (W diag(g)) n), RMSNorm as one fused op, the FC's embedding half
# looked up (applied to the whole vocabulary when the weights are built: one row read instead of a third of
# the FC's weights per forward), a tree node's output normalised once for both its LM head (norm_o) and its
# children's FC (norm_h), and RoPE as one [D, D] matmul when every row sits at one position (a tree level).


@dataclass(frozen=True)
class DrafterWeights:
    """What the lean step reads. H hidden, V vocabulary, Hq query / Hkv key-value heads of dim D, I the MLP
    width. `o_w` and `down_w` are the parameters themselves (by reference); the rest are derived:
    concatenations (QKV, gate/up) and the LM head with the preceding RMSNorm's weight folded into their
    columns, and the FC split in two: its embedding half applied to the whole (normalised) vocabulary ahead
    of time, a table row per token. Rebuilt by `TextAnchoredDrafter.weights()` whenever a parameter changed."""

    embed_fc: torch.Tensor  # [V, H] FC_e norm_e(embed(v)) + b for every token v: the FC's embedding half
    fc_w: torch.Tensor  # [H, H] the FC's hidden half, columns scaled by norm_h's weight
    qkv_w: torch.Tensor  # [(Hq + 2 Hkv) D, H] q_proj; k_proj; v_proj stacked, columns scaled by norm_in's weight
    qkv_b: torch.Tensor | None  # [(Hq + 2 Hkv) D]
    o_w: torch.Tensor  # [H, Hq D]
    gate_up_w: torch.Tensor  # [2 I, H] gate_proj; up_proj stacked, columns scaled by norm_post's weight
    down_w: torch.Tensor  # [H, I]
    head_w: torch.Tensor  # [V, H] the target's LM head, columns scaled by norm_o's weight (in the head's dtype)
    head_b: torch.Tensor | None  # [V]
    rope_rot: torch.Tensor  # [D, D] rotate-half as a matrix (`rotate_half_matrix`), for `rope_angles`
    heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    eps: float  # every RMSNorm's epsilon (the target's rms_norm_eps)


def lean_fuse(w: DrafterWeights, tokens: torch.Tensor, h_normed: torch.Tensor) -> torch.Tensor:
    """The layer's input x_t = FC([norm_e(embed(token_t)); norm_h(h(t-1))]): tokens [n] (on the weights'
    device), h_normed [n, H] = `rms_norm(h(t-1))` in the drafter's dtype (norm_h before its weight, which
    sits in fc_w) -> [n, H]. The embedding half is a row of `embed_fc`; the hidden half one matmul, added
    onto those rows. Inside a tree h(t-1) is the parent's o, normalised once for this and the LM head."""
    return torch.addmm(F.embedding(tokens, w.embed_fc), h_normed, w.fc_w.T)


def rotate_half_matrix(d: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The [D, D] signed permutation R with x R = rot(x) = (-x2, x1) for the halves (x1, x2) of x."""
    half = d // 2
    rot = torch.zeros((d, d), dtype=dtype, device=device)
    rot[half:, :half] = -torch.eye(half, dtype=dtype, device=device)  # column j < D/2 takes -x[j + D/2]
    rot[:half, half:] = torch.eye(half, dtype=dtype, device=device)  # column j >= D/2 takes x[j - D/2]
    return rot


def rope_angles(cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The target's rotary (cos, sin) [..., D] at one position -> the [..., D, D] matrix M with x M = RoPE(x):

        RoPE(x) = x * cos + rot(x) * sin,   rot(x) = x R (`rotate_half_matrix`, `DrafterWeights.rope_rot`)
        M = diag(cos) + R diag(sin)"""
    return torch.diag_embed(cos) + rot * sin.unsqueeze(-2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def lean_layer(
    w: DrafterWeights, x: torch.Tensor, rope: torch.Tensor | tuple[torch.Tensor, torch.Tensor], kv: StreamKVLayer,
    mask: torch.Tensor | None = None, rows_kv_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder layer of the target's class (Qwen2's: pre-norm GQA attention with RoPE, pre-norm SwiGLU)
    over n new rows x [B, n, H]:

        q, k, v = split(Wqkv norm_in(x) + b)              [B, Hq | Hkv | Hkv, n, D]
        q, k    = RoPE(q), RoPE(k)                        `rope`: the [D, D] matrix of one position for every
                                                          row (`rope_angles`), or the rows' (cos, sin) [B or 1, n, D]
        K, V    = the KV's slots, k and v written in place at [length, length + n)
        h       = x + Wo softmax(q K^T / sqrt(D) + mask) V           each query head reads its kv head's K, V
        o       = h + Wdown (silu(Wgate norm_post(h)) * Wup norm_post(h))

    Which slots a row reads: all of them when `mask` is None; where mask [B or 1, 1, n, S] (bool, S = the
    KV's length after the write) is True; or, with `rows_kv_index` [n, L] (B = 1; `visible_slots` of the
    mask), exactly those slots, through the tree-attention kernels (`kernels.dispatch.rows_attention`).
    -> o [B, n, H]."""
    attn = _attend(w, _qkv(w, x), rope, kv, mask, rows_kv_index)
    return _attention_out(w, x, attn)


@dataclass(frozen=True)
class LayerRows:
    """One stream's rows in a ragged `lean_layer_rows` forward: how its n rows attend (`lean_layer`'s
    rope / kv / mask / rows_kv_index, for B = 1)."""

    size: int  # n
    rope: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    kv: StreamKVLayer
    mask: torch.Tensor | None = None
    rows_kv_index: torch.Tensor | None = None


def lean_layer_rows(w: DrafterWeights, x: torch.Tensor, rows: Sequence[LayerRows]) -> torch.Tensor:
    """`lean_layer` over many streams' rows at once: x [N, H] their rows concatenated (N = n_1 + ... + n_k);
    the matmuls (QKV, O, MLP) run once over all N rows, RoPE and attention per stream over that stream's
    own drafter KV (its keys and values written in place there: no KV is copied to make the batch).
    One stream's rows give exactly `lean_layer`'s output. -> o [N, H]."""
    qkv = _qkv(w, x[None])  # [1, Hq + 2 Hkv, N, D]
    ends = list(accumulate(r.size for r in rows))
    attended = [_attend(w, qkv[:, :, end - r.size : end], r.rope, r.kv, r.mask, r.rows_kv_index) for r, end in zip(rows, ends)]
    attn = attended[0] if len(attended) == 1 else torch.cat(attended, dim=1)  # [1, N, Hq D]
    return _attention_out(w, x[None], attn)[0]


def _qkv(w: DrafterWeights, x: torch.Tensor) -> torch.Tensor:
    """x [B, n, H] -> q, k, v heads [B, Hq + 2 Hkv, n, D] (`lean_layer`'s first line)."""
    b, n, _ = x.shape
    return F.linear(rms_norm(x, w.eps), w.qkv_w, w.qkv_b).view(b, n, w.heads + 2 * w.kv_heads, w.head_dim).transpose(1, 2)


def _attend(w: DrafterWeights, qkv: torch.Tensor, rope: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
            kv: StreamKVLayer, mask: torch.Tensor | None, rows_kv_index: torch.Tensor | None) -> torch.Tensor:
    """RoPE, the KV write and attention of `lean_layer`: qkv [B, Hq + 2 Hkv, n, D] -> [B, n, Hq D]."""
    b, _, n, d = qkv.shape
    hq, hkv = w.heads, w.kv_heads
    qk = qkv[:, : hq + hkv]  # q and k heads: one RoPE for both
    if isinstance(rope, torch.Tensor):
        qk = qk @ rope
    else:
        cos, sin = (t.unsqueeze(1) for t in rope)  # [B or 1, 1, n, D]: the same angles for every head
        qk = qk * cos + _rotate_half(qk) * sin
    keys, values = kv.update(qk[:, hq:], qkv[:, hq + hkv :])  # [B, Hkv, S, D] views of the buffers
    q = qk[:, :hq]
    scale = d**-0.5
    if rows_kv_index is not None:
        attn = rows_attention(q, keys, values, rows_kv_index, scale)
    elif mask is None and hq != hkv:  # the query heads of a kv head as rows of one head: the KV read as it is
        attn = grouped_sdpa(q, keys, values, None, scale)
    else:
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
    return attn.transpose(1, 2).reshape(b, n, hq * d)


def _attention_out(w: DrafterWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The residual, O projection and MLP of `lean_layer`: x [B, n, H], attn [B, n, Hq D] -> o [B, n, H]."""
    h = x + F.linear(attn, w.o_w)
    gate, up = F.linear(rms_norm(h, w.eps), w.gate_up_w).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, w.down_w)


def lean_logprobs(w: DrafterWeights, o_normed: torch.Tensor) -> torch.Tensor:
    """o_normed [..., H] = `rms_norm(o)` (norm_o before its weight, which sits in head_w) -> log q(next token)
    [..., V] in fp32, through the target's LM head (in the head's dtype: a drafter trained in fp32 on a bf16
    target)."""
    logits = F.linear(o_normed.to(w.head_w.dtype), w.head_w, w.head_b)
    return torch.log_softmax(logits.float(), dim=-1)


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
