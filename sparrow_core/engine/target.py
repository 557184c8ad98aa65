"""The target video-LLM: a transformers model behind one small interface the stream engine drives.

An adapter turns the frames of a clip into the LM input embeddings of their slots (vision tower +
projector, the model's own separators) and says which position ids those slots take. A clip is what the
checkpoint's chat template calls one video: the frames between two pieces of text of a stream
(`VideoClip`, opened by the first frame after text and closed by the next text). Everything after that —
KV, hidden states, decoding — is architecture-independent and lives in `stream.py`, which drives a
model through this interface (a stream is `TargetStream(target, config)`).

Positions are carried as int64 [P, n]: P = 1 for 1-D RoPE (LLaVA-OneVision), P = 3 for M-RoPE
(Qwen-VL: temporal, height, width). A text token's position is the same in all P rows.

The text around the clips is the checkpoint's chat template's (`layout.chat_layout`), found once at load
(`self.chat`); its `clip_in_turn` says whether the adapters lay a clip out as the template's one video
or, for the streaming layout, each frame as a one-frame video.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sparrow_core.engine.kv_cache import StreamKVCache
from sparrow_core.engine.layout import DEFAULT_SYSTEM, CaptionLayout, ChatLayout, chat_layout
from sparrow_core.engine.text_stack import TextStack
from sparrow_core.kernels.dispatch import Visibility, register_attention
from sparrow_core.kernels.ragged import RaggedBatch, Segment


@dataclass
class VideoClip:
    """The clip a stream is appending frames to: one video of the chat template."""

    start_position: int  # the position its first slot takes (the stream's next position when it opened)
    first_time: float  # media time of its first frame (s)
    units: int = 0  # temporal units appended so far (frames; Qwen: temporal patches of frames)
    next_position: int = 0  # the position the text after it takes (so far); the stream starts it at start_position
    last_frame: int = -1  # the stream's number of its last frame so far (set by the stream)
    last_time: float = 0.0  # media time of that frame (s)
    size: tuple[int, int] | None = None  # (height, width) every frame of the clip is resized to, where the adapter fixes one
    # frames received but not yet in the KV (Qwen: waiting for their temporal patch's partner)
    held: list[tuple[torch.Tensor, float, int]] = field(default_factory=list)  # (fp32 [C, h, w] normalised, time, frame no.)

    def copy(self) -> VideoClip:
        """A copy an append can be undone to (the held list is copied, its frames are not)."""
        return replace(self, held=list(self.held))


@dataclass
class VisionInput:
    """Frames made ready for the vision tower (resized, normalised, laid out as the tower takes them) but not
    through it yet. `TargetModel.vision_embeds` runs many of them, of any streams, in one tower call: a
    turn of the model worker encodes every stream's frames at once (engine/ragged.py: `forward_streams`)."""

    pixels: torch.Tensor  # the tower's input on the model's device, in its dtype (the adapter's layout)
    grid: torch.Tensor | None = None  # Qwen-VL: video_grid_thw [t, 3] of those pixels (one row a temporal patch)


@dataclass
class FrameBlock:
    """The LM slots that some frames of a clip (or its closing) become."""

    embeds: torch.Tensor | None  # [n, H] LM input embeddings; None until the tower has run `vision`
    token_ids: torch.Tensor  # [n] int64, the placeholder ids a full forward would see
    kinds: torch.Tensor  # [n] uint8 TokenKind
    frame_no: torch.Tensor  # [n] int64, the stream's number of the frame each slot belongs to
    times: torch.Tensor  # [n] float64, media time of that frame
    positions: torch.Tensor  # [P, n] int64
    vision: VisionInput | None = None  # what gives `embeds` (`TargetModel.vision_embeds`), while they are None

    @property
    def size(self) -> int:
        return self.token_ids.numel()


@dataclass(frozen=True)
class HiddenLayers:
    """Indices into transformers' `hidden_states` tuple (0 = embeddings, L = last layer, normed)."""

    num_layers: int

    def resolve(self, name: int | str) -> int:
        if isinstance(name, int):
            if not 0 <= name <= self.num_layers:
                raise ValueError(f"hidden layer {name} outside 0..{self.num_layers}")
            return name
        table = {"last": self.num_layers, "penultimate": self.num_layers - 1, "mid": self.num_layers // 2}
        if name not in table:
            raise ValueError(f"unknown hidden layer name {name!r}; use an index or one of {sorted(table)}")
        return table[name]


class TargetModel(ABC):
    """A loaded video-LLM. Subclasses wrap one transformers class family each."""

    architecture: str = ""
    position_rows: int = 1
    image_size: int | None = None  # square frame side the model resizes to; None: any size (Qwen-VL)
    tokens_per_frame: int | None = None  # LM slots per frame when fixed; None: it depends on the frame

    def __init__(self, model: nn.Module, tokenizer, preprocessor: dict, path: Path | None = None) -> None:
        # The text stack runs on the registered "sparrow" attention: ordinary forwards are exactly
        # transformers' sdpa; tree-verification forwards (tree_mask kwarg) go to kernels.dispatch, which
        # uses the Triton kernel on CUDA and SDPA with enable_gqa on CPU. Vision stays on sdpa.
        model.set_attn_implementation({"text_config": register_attention("sparrow")})
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.path = path
        text_cfg = model.config.get_text_config()
        self.num_layers: int = text_cfg.num_hidden_layers
        self.hidden_size: int = text_cfg.hidden_size
        self.vocab_size: int = text_cfg.vocab_size
        self.layers = HiddenLayers(self.num_layers)
        self.video_token_id: int = model.config.video_token_id
        self.chat: ChatLayout = self.chat_layout()  # the layout of the default instruction
        # the stream's forward (`stream_forward`): the lean text stack where it reproduces this model's
        # decoder layers, else (None) transformers' forward
        self.text_stack: TextStack | None = TextStack(self.language_model) if TextStack.supports(self.language_model) else None
        # the dtype streams keep their KV in (`--kv-dtype`, kv_cache.py); None: the model's
        self.kv_dtype: torch.dtype | None = None

    def chat_layout(self, instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> ChatLayout:
        """The text pieces of this checkpoint's chat template around (instruction, clip) turns."""
        video_token = self.tokenizer.convert_ids_to_tokens(self.video_token_id) if self.tokenizer is not None else ""
        return chat_layout(self.tokenizer, video_token, instruction, system)

    # --- properties of the model -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack (a transformers `*Model` returning hidden states)."""

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one KV slot takes over the whole text stack: layers x 2 (K, V) x kv_heads x head_dim x the KV
        dtype's size."""
        cfg = self.model.config.get_text_config()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return self.num_layers * 2 * kv_heads * head_dim * (self.kv_dtype or self.dtype).itemsize

    @property
    def context_length(self) -> int:
        """The most positions the text stack was built for (its config's max_position_embeddings)."""
        return int(self.model.config.get_text_config().max_position_embeddings)

    @property
    def max_tokens_per_frame(self) -> int:
        """The most LM slots one frame can take (tokens_per_frame where that is fixed)."""
        if self.tokens_per_frame is None:
            raise NotImplementedError(f"{type(self).__name__} must say how many slots a frame can take")
        return self.tokens_per_frame

    def name(self) -> str:
        return self.path.name if self.path is not None else self.architecture

    # --- frames -> LM slots ------------------------------------------------------------------
    @abstractmethod
    def encode_frames(self, frames: torch.Tensor, times: torch.Tensor, frame_no: torch.Tensor, clip: VideoClip) -> FrameBlock | None:
        """uint8 RGB [N, H, W, 3] (validated) at media `times` [N], numbered `frame_no` [N], appended to
        `clip` -> their LM slots (possibly none yet: frames may be held, see `clip.held`). Updates `clip`.
        Everything but the vision tower runs here (a bad frame raises ValueError now); the slots' embeddings
        are left to `vision_embeds` (`block.vision`), which runs many streams' frames in one call."""

    def close_clip(self, clip: VideoClip) -> FrameBlock | None:
        """The slots that end a clip (held frames, the clip's own separator), or None; embeddings as
        `encode_frames` leaves them."""
        return None

    @abstractmethod
    def vision_embeds(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """The LM input embeddings [n_i, H] of each input's slots (`FrameBlock.vision`), all of them through
        the vision tower and projector in one call where the adapter's layout allows. Each equals the
        input's embeddings encoded alone to fp32 rounding (tests/test_batching.py)."""

    def text_positions(self, n: int, start: int) -> tuple[torch.Tensor, int]:
        pos = torch.arange(start, start + n, dtype=torch.long, device="cpu")
        return pos.unsqueeze(0).expand(self.position_rows, n).clone(), start + n

    # --- the LM ------------------------------------------------------------------------------
    def lm_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None = None,
        **attn_kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """embeds [1, n, H], positions [P, n] -> (last hidden [1, n, H], all hidden states (L+1) x [1, n, H])."""
        pos = positions.to(embeds.device)
        position_ids = pos if self.position_rows == 1 else pos.unsqueeze(1)  # [1, n] or [3, 1, n]
        out = self.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            attention_mask=attention_mask,
            output_hidden_states=True,
            **attn_kwargs,
        )
        return out.last_hidden_state, out.hidden_states

    def stream_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: StreamKVCache,
        keep: set[int],
        tree_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """A stream's forward: n new slots after the cache's `length`. embeds [n, H], positions [P, n];
        tree_mask [Q=n, Q] bool on the model's device (a draft tree: node i sees the whole cache and the
        nodes its row allows) or None (causal). -> (last hidden [n, H], {hidden-state index: [n, H]} for
        the indices in `keep`, 0 = the input, L = the last layer, normed).

        Through `text_stack` (one mask per forward, no transformers plumbing) where it is set and the
        model is in eval mode, else through `lm_forward`; the two agree to fp32 rounding."""
        return self.streams_forward([(embeds, positions, cache, tree_mask)], keep)[0]

    def streams_forward(
        self,
        parts: Sequence[tuple[torch.Tensor, torch.Tensor, StreamKVCache, torch.Tensor | None]],
        keep: set[int],
    ) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        """`stream_forward` of several streams as ONE forward (a ragged batch, engine/ragged.py): each part
        (embeds [n, H], positions [P, n], cache, tree_mask) is one stream's new slots; the linear layers run
        once over all of them, attention per part over its own cache (which takes its own keys and values).
        One result per part, as `stream_forward` gives it."""
        embeds = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])  # [N, H]
        positions = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=1)  # [P, N]
        pos = positions.to(embeds.device)
        position_ids = pos if self.position_rows == 1 else pos.unsqueeze(1)  # [1, N] or [3, 1, N]
        sizes = [p[0].shape[0] for p in parts]
        stack = self.text_stack
        if stack is not None and not self.model.training:
            groups = stack.heads // stack.kv_heads
            segments = [(cache, Visibility.build(cache.length, n, tree_mask, groups, embeds.device,
                                                 cache.layers[0].kv_dtype or embeds.dtype), n)
                        for (_, _, cache, tree_mask), n in zip(parts, sizes)]
            last, kept = stack.forward_streams(embeds.unsqueeze(0), position_ids, segments, keep)
        elif len(parts) == 1:
            _, _, cache, tree_mask = parts[0]
            tree = {} if tree_mask is None else {
                # the attention function reads tree_mask directly: no dense causal mask to build
                "attention_mask": {"full_attention": None}, "tree_mask": tree_mask, "tree_prefix_len": cache.length,
            }
            last, hidden = self.lm_forward(embeds.unsqueeze(0), positions, cache, **tree)
            kept = {i: hidden[i] for i in keep}
        else:  # no cache: the attention function writes each part's own (kernels/ragged.py)
            segments, start = [], 0
            for (_, _, cache, tree_mask), n in zip(parts, sizes):
                attn = {} if tree_mask is None else {"tree_mask": tree_mask, "tree_prefix_len": cache.length}
                segments.append(Segment(start, start + n, cache, attn))
                start += n
            last, hidden = self.lm_forward(embeds.unsqueeze(0), positions, None, attention_mask={"full_attention": None},
                                           ragged=RaggedBatch(segments))
            kept = {i: hidden[i] for i in keep}
        rows = torch.split(last[0], sizes)
        kept_rows = {i: torch.split(h[0], sizes) for i, h in kept.items()}
        return [(rows[j], {i: kept_rows[i][j] for i in kept_rows}) for j in range(len(parts))]

    # --- chat layout -------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stop_token_ids(self) -> list[int]:
        ids = []
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != self.tokenizer.unk_token_id:
                ids.append(tid)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def caption_layout(self, instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> CaptionLayout:
        """This checkpoint's chat layout (`chat_layout`) for `instruction` in its token ids."""
        chat = self.chat_layout(instruction, system)
        return CaptionLayout(
            prefix=self.encode_text(chat.prefix),
            end_id=self.tokenizer.convert_tokens_to_ids(chat.end),
            suffix=self.encode_text(chat.suffix),
            stop_ids=self.stop_token_ids(),
            preamble=self.encode_text(chat.preamble),
            history_prefix=None if chat.history_prefix is None else self.encode_text(chat.history_prefix),
        )
