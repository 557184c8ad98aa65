"""The target's text stack as one plain function over its own weights: the stream's forward.

transformers' forward of a Qwen2-family decoder stack (Qwen2, the Qwen2-VL / Qwen2.5-VL text models,
LLaVA-OneVision's Qwen2) spends most of a decode step of a small model outside arithmetic: a causal mask
built per forward, kwargs threaded through every module, output-capturing hooks for the hidden states,
a Cache object per layer call. `TextStack.forward` runs the same operations in the same order (RMSNorm,
q/k/v projections, rotary embedding, the KV write, attention, o_proj, the SwiGLU MLP, the residuals) on
the same weights, and so gives the same hidden states as transformers to fp32 rounding (tests compare them
on every supported family). Fewer framework calls do the same work: q, k and v come out of one matmul and
gate and up out of another (the modules' weights concatenated, `LayerWeights`: rebuilt when a parameter
changed, so a model moved, cast or trained afterwards is followed, `engine/derived.py`), RMSNorm is one
fused op in fp32, and RoPE rotates q and k together. What it leaves out: the mask, because a stream
forward's visibility is one of two shapes known before the forward (`kernels.dispatch.Visibility`: a
one-token decode sees every slot; a prefill or a draft tree sees the whole prefix plus its own rows),
built once per forward and read by every layer; and every hidden state the caller did not ask for.

The rotary embedding stays the model's own module (1-D RoPE or Qwen's M-RoPE: both hand back cos/sin
[1, n, D] for the standard rotate-half application), called once per forward.

`TextStack.supports` names the decoder layers it reproduces; any other stack runs through transformers
(`TargetModel.lm_forward`) unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from sparrow_core.engine.derived import DerivedCache
from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.kernels.dispatch import Visibility, stream_attention

# decoder-layer classes whose forward TextStack.forward reproduces op for op
SUPPORTED_LAYERS = ("Qwen2DecoderLayer", "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer")


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., H] -> x / sqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, then times `weight` if given:
    transformers' Qwen2RMSNorm.forward, in its order (one fused op in fp32). Without a weight where the
    weight sits folded into the next matmul (the drafter's lean step)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    h = x.to(torch.float32)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for q and k heads at once: x [B, h, n, D], cos [B, 1, n, D] and
    sin_signed [B, 1, n, D] the sine with its first half negated, so that rotate_half(x) * sin =
    roll(x, D/2) * sin_signed (the same products: a sign moves between factors)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights as `TextStack.forward_streams` reads them: q, k, v stacked and gate, up
    stacked (derived: concatenations), the rest the modules' own parameters (by reference)."""

    in_norm: torch.Tensor  # [H] input_layernorm's weight
    qkv_w: torch.Tensor  # [(Hq + 2 Hkv) D, H] q_proj; k_proj; v_proj
    qkv_b: torch.Tensor | None  # [(Hq + 2 Hkv) D]
    o_w: torch.Tensor  # [H, Hq D]
    o_b: torch.Tensor | None
    post_norm: torch.Tensor  # [H] post_attention_layernorm's weight
    gate_up_w: torch.Tensor  # [2 I, H] gate_proj; up_proj
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor  # [H, I]
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]  # the MLP's activation (F.silu for SiLU)
    in_eps: float  # the norms' epsilons
    post_eps: float


def _cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


@torch.no_grad()
def layer_weights(layer: nn.Module) -> LayerWeights:
    """`LayerWeights` of a Qwen2-family decoder layer, read from its modules."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        in_norm=layer.input_layernorm.weight,
        qkv_w=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        qkv_b=_cat(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias),
        o_w=attn.o_proj.weight, o_b=attn.o_proj.bias, post_norm=layer.post_attention_layernorm.weight,
        gate_up_w=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), gate_up_b=_cat(mlp.gate_proj.bias, mlp.up_proj.bias),
        down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
        act=F.silu if isinstance(mlp.act_fn, (nn.SiLU, SiLUActivation)) else mlp.act_fn,
        in_eps=float(layer.input_layernorm.variance_epsilon), post_eps=float(layer.post_attention_layernorm.variance_epsilon),
    )


class TextStack:
    """A supported decoder stack (`supports`), run over a stream's `StreamKVCache`."""

    def __init__(self, language_model: nn.Module) -> None:
        if not self.supports(language_model):
            raise ValueError(f"{type(language_model).__name__} is not a decoder stack TextStack reproduces")
        cfg = language_model.config
        self.model = language_model
        self.heads: int = cfg.num_attention_heads
        self.kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.heads
        attn = language_model.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        # the parameters the concatenated weights come from (the Parameter objects: .to() and in-place writes
        # change what they hold, which `DerivedCache` sees; the others are read by reference)
        self._sources = [p for layer in language_model.layers
                         for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                      layer.mlp.gate_proj, layer.mlp.up_proj)
                         for p in (proj.weight, proj.bias) if p is not None]
        self._weights: DerivedCache[list[LayerWeights]] = DerivedCache()

    def weights(self) -> list[LayerWeights]:
        """Every layer's `LayerWeights`, built again only when a parameter changed."""
        return self._weights.get(self._sources, lambda: [layer_weights(layer) for layer in self.model.layers])

    @staticmethod
    def supports(language_model: nn.Module) -> bool:
        """True for a Qwen2-family stack of full-attention layers (no sliding window) in eval mode."""
        layers = getattr(language_model, "layers", None)
        cfg = getattr(language_model, "config", None)
        if not layers or cfg is None or not hasattr(language_model, "rotary_emb") or language_model.training:
            return False
        if any(type(layer).__name__ not in SUPPORTED_LAYERS for layer in layers):
            return False
        if len(layers) != cfg.num_hidden_layers:
            return False
        return all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"])

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: StreamKVCache,
        visibility: Visibility,
        keep: frozenset[int] | set[int],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """embeds [1, n, H]; position_ids [1, n] or [3, 1, n] (transformers' layout); the n new keys and
        values are written to `cache` after its `length` slots, and query i sees what `visibility` says.
        -> (the last, normed hidden state [1, n, H], {index: hidden state [1, n, H]} for the indices in
        `keep`, in transformers' `hidden_states` numbering: 0 the input, i the output of layer i, L normed)."""
        return self.forward_streams(embeds, position_ids, [(cache, visibility, embeds.shape[1])], keep)

    @torch.no_grad()
    def forward_streams(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        parts: Sequence[tuple[StreamKVCache, Visibility, int]],
        keep: frozenset[int] | set[int],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`forward` over several streams' new slots at once (a ragged batch, engine/ragged.py): embeds
        [1, N, H] are the parts' rows one after another, part (cache, visibility, n) its next n rows. The
        linear layers run once over all N rows; each part's keys and values go to its own cache and its
        queries attend over that cache alone, as its own forward would."""
        lm = self.model
        b, n, _ = embeds.shape
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        cos, sin = lm.rotary_emb(embeds, position_ids)
        half = d // 2
        cos = cos.unsqueeze(1)  # [B, 1, n, D]
        sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)  # [B, 1, n, D]
        x = embeds
        kept: dict[int, torch.Tensor] = {0: x} if 0 in keep else {}
        weights = self.weights()
        last = len(weights)
        for i, lw in enumerate(weights):
            h = rms_norm(x, lw.in_eps, lw.in_norm)
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b).view(b, n, hq + 2 * hkv, d).transpose(1, 2)  # [B, Hq + 2 Hkv, n, D]
            qk = _rotate(qkv[:, : hq + hkv], cos, sin_signed)  # q and k heads rotated in one pass
            q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :]
            attended, start = [], 0
            for cache, visibility, rows in parts:
                part = slice(start, start + rows)
                keys, values = cache.layers[i].update(k[:, :, part], v[:, :, part])
                attended.append(stream_attention(q[:, :, part], keys, values, visibility, self.scaling))  # [B, rows, Hq * D]
                start += rows
            a = attended[0] if len(attended) == 1 else torch.cat(attended, dim=1)
            x = x + F.linear(a, lw.o_w, lw.o_b)
            h = rms_norm(x, lw.post_eps, lw.post_norm)
            gate, up = F.linear(h, lw.gate_up_w, lw.gate_up_b).chunk(2, dim=-1)
            x = x + F.linear(lw.act(gate) * up, lw.down_w, lw.down_b)
            if i + 1 in keep and i + 1 < last:
                kept[i + 1] = x
        out = rms_norm(x, lm.norm.variance_epsilon, lm.norm.weight)
        if last in keep:
            kept[last] = out
        return out, kept
