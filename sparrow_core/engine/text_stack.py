"""The target's text stack as one plain function over its own weights: the stream's forward.

transformers' forward of a Qwen2-family decoder stack (Qwen2, the Qwen2-VL / Qwen2.5-VL text models,
LLaVA-OneVision's Qwen2) spends most of a decode step of a small model outside arithmetic: a causal mask
built per forward, kwargs threaded through every module, output-capturing hooks for the hidden states,
a Cache object per layer call. `TextStack.forward` runs the same operations in the same order (RMSNorm,
q/k/v projections, rotary embedding, the KV write, attention, o_proj, the SwiGLU MLP, the residuals) on
the same weights, read from the modules at every call (so a model moved, cast or trained afterwards is
followed), and so gives the same hidden states as transformers to fp32 rounding (tests compare them on
every supported family). What it leaves out: the mask, because a stream forward's visibility is one of
two shapes known before the forward (`kernels.dispatch.Visibility`: a one-token decode sees every
slot; a prefill or a draft tree sees the whole prefix plus its own rows), built once per forward and
read by every layer; and every hidden state the caller did not ask for.

The rotary embedding stays the model's own module (1-D RoPE or Qwen's M-RoPE: both hand back cos/sin
[1, n, D] for the standard rotate-half application), called once per forward.

`TextStack.supports` names the decoder layers it reproduces; any other stack runs through transformers
(`TargetModel.lm_forward`) unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.kernels.dispatch import Visibility, stream_attention

# decoder-layer classes whose forward TextStack.forward reproduces op for op
SUPPORTED_LAYERS = ("Qwen2DecoderLayer", "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer")


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # Qwen2RMSNorm.forward: in fp32, then the weight in the input's dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' apply_rotary_pos_emb for one of q / k: x [B, h, n, D], cos/sin [B, 1, n, D]
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


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

    @torch.no_grad()
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
        lm = self.model
        b, n, _ = embeds.shape
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        cos, sin = lm.rotary_emb(embeds, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, n, D]
        x = embeds
        kept: dict[int, torch.Tensor] = {0: x} if 0 in keep else {}
        last = len(lm.layers)
        for i, layer in enumerate(lm.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(b, n, hq, d).transpose(1, 2)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(b, n, hkv, d).transpose(1, 2)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(b, n, hkv, d).transpose(1, 2)
            keys, values = cache.layers[i].update(_rotate(k, cos, sin), v)
            a = stream_attention(_rotate(q, cos, sin), keys, values, visibility, self.scaling)  # [B, n, Hq * D]
            x = x + F.linear(a, attn.o_proj.weight, attn.o_proj.bias)
            h = _rms_norm(x, layer.post_attention_layernorm)
            gate = mlp.act_fn(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias))
            x = x + F.linear(gate * F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight, mlp.down_proj.bias)
            if i + 1 in keep and i + 1 < last:
                kept[i + 1] = x
        out = _rms_norm(x, lm.norm)
        if last in keep:
            kept[last] = out
        return out, kept
