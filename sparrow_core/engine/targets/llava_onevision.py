"""LLaVA-OneVision (SigLIP + projector + Qwen2 LM) as a streaming target.

Each frame is encoded as transformers' video path encodes a one-frame video: SigLIP patches ->
projector -> 2x2 bilinear pooling (`apply_pooling`) -> the frame's tokens, then the model's own
`image_newline` embedding as that frame's separator. Encoding per frame makes the layout independent
of how frames are chunked, so a stream appended 1 frame at a time equals one appended all at once.
Positions are 1-D and contiguous.
"""

from __future__ import annotations

import torch

from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.preprocess import NormalizeSpec, resize_and_normalize
from sparrow_core.engine.target import FrameBlock, TargetModel


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
        self.video_token_id: int = model.config.video_token_id
        side = self.image_size // vcfg.patch_size
        self.grid = ((side + 1) // 2, (side + 1) // 2)  # after 2x2 pooling (ceil, as apply_pooling)
        self.tokens_per_frame = self.grid[0] * self.grid[1] + 1  # + image_newline

    @property
    def language_model(self):
        return self.model.model.language_model

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> [N, 1, 3, S, S], each frame a one-frame video."""
        px = resize_and_normalize(frames, self.input_height, self.input_width, self.norm, self.dtype)
        return px.unsqueeze(1).to(self.device)

    def encode_frames(self, frames: torch.Tensor) -> FrameBlock:
        n = frames.shape[0]
        cfg = self.model.config
        out = self.model.model.get_video_features(
            pixel_values_videos=self.pixel_values(frames),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        per_frame = out.pooler_output  # [N, T + 1, H]: T pooled tokens, then image_newline
        t1 = per_frame.shape[1]
        kinds = torch.full((t1,), int(TokenKind.VISUAL), dtype=torch.uint8, device="cpu")
        kinds[-1] = int(TokenKind.SPECIAL)
        return FrameBlock(
            embeds=per_frame.reshape(n * t1, -1),
            token_ids=torch.full((n * t1,), self.video_token_id, dtype=torch.long, device="cpu"),
            kinds=kinds.repeat(n),
            frame_index=torch.arange(n, device="cpu").repeat_interleave(t1),
            grid=[self.grid] * n,
        )

    def frame_positions(self, block: FrameBlock, start: int) -> tuple[torch.Tensor, int]:
        return self.text_positions(block.token_ids.numel(), start)
