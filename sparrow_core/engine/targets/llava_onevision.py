"""LLaVA-OneVision (SigLIP + projector + Qwen2 LM) as a streaming target.

Every frame is encoded as transformers' video path encodes it: SigLIP patches -> projector -> 2x2
bilinear pooling (`apply_pooling`) -> the frame's tokens. A frame's tokens depend on that frame only,
so a clip appended 1 frame at a time equals one appended all at once. Positions are 1-D and contiguous.

Two layouts, chosen by the checkpoint's chat template (`TargetModel.chat.clip_in_turn`):
- the template's own (a real LLaVA-OneVision): a clip is one video, `<video>` expanded as its processor
  does, `frames x pooled tokens` and then the model's `image_newline` once, at the clip's end (appended
  when the clip closes, before the caption turn's text). Exactly the template's and processor's sequence.
- the streaming layout (the embedded default model, trained so): each frame a one-frame video, its
  tokens followed by `image_newline`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.preprocess import NormalizeSpec, resize_and_normalize
from sparrow_core.engine.target import FrameBlock, TargetModel, VideoClip, VisionInput


class LlavaOnevisionTarget(TargetModel):
    architecture = "llava_onevision"
    position_rows = 1

    def __init__(self, model, tokenizer, preprocessor: dict, path=None) -> None:
        super().__init__(model, tokenizer, preprocessor, path)
        vcfg = model.config.vision_config
        self.image_size: int = vcfg.image_size
        size = preprocessor.get("size") or {}
        self.input_height = int(size.get("height", size.get("shortest_edge", self.image_size)))
        self.input_width = int(size.get("width", size.get("shortest_edge", self.image_size)))
        if (self.input_height, self.input_width) != (self.image_size, self.image_size):
            # The vision tower's position embeddings are fixed to image_size; follow the model.
            self.input_height = self.input_width = self.image_size
        self.norm = NormalizeSpec.from_config(preprocessor)
        side = self.image_size // vcfg.patch_size
        self.grid = ((side + 1) // 2, (side + 1) // 2)  # after 2x2 pooling (ceil, as apply_pooling)
        self.newline_per_frame = not self.chat.clip_in_turn  # the streaming layout: one-frame videos
        # a frame's slots; in the template's layout a clip's image_newline comes once more
        self.tokens_per_frame = self.grid[0] * self.grid[1] + int(self.newline_per_frame)

    @property
    def language_model(self):
        return self.model.model.language_model

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> [N, 1, 3, S, S], each frame a one-frame video."""
        px = resize_and_normalize(frames, self.input_height, self.input_width, self.norm, self.dtype)
        return px.unsqueeze(1).to(self.device)

    def _slots(self, embeds: torch.Tensor | None, kinds: torch.Tensor, frame_no, times, clip: VideoClip,
               vision: VisionInput | None = None) -> FrameBlock:
        n = kinds.numel()
        positions, clip.next_position = self.text_positions(n, clip.next_position)
        return FrameBlock(
            embeds=embeds,
            token_ids=torch.full((n,), self.video_token_id, dtype=torch.long, device="cpu"),
            kinds=kinds,
            frame_no=frame_no,
            times=times,
            positions=positions,
            vision=vision,
        )

    def encode_frames(self, frames: torch.Tensor, times: torch.Tensor, frame_no: torch.Tensor, clip: VideoClip) -> FrameBlock:
        n = frames.shape[0]
        t1 = self.tokens_per_frame  # pooled tokens, and in the streaming layout the frame's image_newline
        kinds = torch.full((t1,), int(TokenKind.VISUAL), dtype=torch.uint8, device="cpu")
        if self.newline_per_frame:
            kinds[-1] = int(TokenKind.SPECIAL)
        clip.units += n
        return self._slots(None, kinds.repeat(n), frame_no.repeat_interleave(t1), times.repeat_interleave(t1), clip,
                           VisionInput(self.pixel_values(frames)))

    def vision_embeds(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """Every frame is its own one-frame video of the same square size, so all inputs' frames stack into
        one pixel batch [sum N, 1, 3, S, S]: one SigLIP + projector + pooling call for all of them."""
        pixels = inputs[0].pixels if len(inputs) == 1 else torch.cat([i.pixels for i in inputs])
        cfg = self.model.config
        out = self.model.model.get_video_features(
            pixel_values_videos=pixels,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        per_frame = out.pooler_output  # [sum N, T + 1, H]: T pooled tokens, then image_newline
        if not self.newline_per_frame:
            per_frame = per_frame[:, :-1]
        rows = per_frame.reshape(-1, per_frame.shape[-1])
        return list(torch.split(rows, [i.pixels.shape[0] * per_frame.shape[1] for i in inputs]))

    def close_clip(self, clip: VideoClip) -> FrameBlock | None:
        if self.newline_per_frame or clip.units == 0:
            return None
        newline = self.model.model.image_newline.view(1, -1)
        kinds = torch.tensor([int(TokenKind.SPECIAL)], dtype=torch.uint8, device="cpu")
        # the newline belongs to the clip's last frame: the visual budget evicts it with that frame
        frame = torch.tensor([clip.last_frame], device="cpu")
        return self._slots(newline, kinds, frame, torch.tensor([clip.last_time], dtype=torch.float64, device="cpu"), clip)
