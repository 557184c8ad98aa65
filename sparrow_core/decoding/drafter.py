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
the proposer's, `decoding/proposers/drafter.py`; this module is the network, its config and save / load.

Variants (`variant`): "sparrow" (above), "eagle" (the same architecture trained text-only, inference
as sparrow), and "msd": the KV holds every slot of the stream in order, frame slots as the target's raw
projector embeddings (fed to the layer as they are) and text as above; it attends to everything, so its
cost grows with the video. msd needs a stream opened with `keep_visual_embeds=True`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparrow_core.decoding.draft_tree import TreeConfig
from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.engine.stream import StreamNeeds
from sparrow_core.engine.target import TargetModel
from sparrow_core.kernels.dispatch import resolve_backend, visible_slots

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
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: StreamKVCache | None = None,
        tree_level: bool = False,
    ) -> torch.Tensor:
        """x [B, n, H], positions [P, n] or [B, P, n] (P = the target's position rows), mask bool [n, kv] or
        [B, n, kv] over (cache + these n rows) -> o [B, n, H]. With a cache the n rows' keys are appended.

        A draft tree's level (`tree_level`: few rows, each seeing the committed KV and its own ancestors) goes
        where `kernels.dispatch` sends tree attention: on CUDA the Triton kernels, each row reading only the
        slots its mask allows (`rows_attention`). Everything else (catching up, a causal prefill; training)
        runs SDPA with the additive mask."""
        b = x.shape[0]
        pos = positions.to(x.device)
        if pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(b, *pos.shape)  # [B, P, n]
        position_ids = pos[:, 0] if pos.shape[1] == 1 else pos.permute(1, 0, 2)  # [B, n] or [P, B, n]
        cos_sin = self.target.language_model.rotary_emb(x, position_ids)
        mask = mask.to(x.device)
        if tree_level and b == 1 and resolve_backend(x) != "torch":
            attention = {"attention_mask": None, "rows_kv_index": visible_slots(mask.reshape(mask.shape[-2:]))}
        else:
            attention = {"attention_mask": _additive(mask, x.dtype)}
        return self.layer(x, cache=cache, use_cache=cache is not None, position_embeddings=cos_sin, **attention)

    def head(self, o: torch.Tensor) -> torch.Tensor:
        """o [..., H] -> logits [..., V] through the target's LM head (in the head's dtype: a drafter trained
        in fp32 on a bf16 target)."""
        head = self.target.lm_head
        return head(self.out_norm(o).to(head.weight.dtype))

    # --- save / load ---------------------------------------------------------------------------
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
