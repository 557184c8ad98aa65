"""Qwen2-VL and Qwen2.5-VL as streaming targets (M-RoPE, 3-D positions).

Each frame is one video of temporal grid 1: the frame is repeated to `temporal_patch_size` (as Qwen's
processor does for a still image), patchified in Qwen's order, and wrapped in the model's own
`<|vision_start|> <|video_pad|>* <|vision_end|>`. Positions follow `get_rope_index`: the separators are
text; the frame's tokens take (t, h, w) = (s, s + row, s + col) from the start s; the next text token
takes s + max(rows, cols).
"""

from __future__ import annotations

import torch

from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.preprocess import NormalizeSpec, resize_and_normalize, smart_resize
from sparrow_core.engine.target import FrameBlock, TargetModel

DEFAULT_STREAM_MAX_PIXELS = 448 * 448  # per-frame cap for live video unless the config says less


class QwenVLTarget(TargetModel):
    position_rows = 3

    def __init__(self, model, tokenizer, preprocessor: dict, path=None, max_pixels: int | None = None) -> None:
        super().__init__(model, tokenizer, preprocessor, path)
        self.architecture = model.config.model_type
        vcfg = model.config.vision_config
        self.patch = int(vcfg.patch_size)
        self.merge = int(vcfg.spatial_merge_size)
        self.temporal_patch = int(vcfg.temporal_patch_size)
        self.in_channels = int(getattr(vcfg, "in_channels", getattr(vcfg, "in_chans", 3)))
        size = preprocessor.get("size") or {}
        self.min_pixels = int(preprocessor.get("min_pixels", size.get("shortest_edge", 56 * 56)))
        cfg_max = int(preprocessor.get("max_pixels", size.get("longest_edge", DEFAULT_STREAM_MAX_PIXELS)))
        self.max_pixels = min(cfg_max, max_pixels or DEFAULT_STREAM_MAX_PIXELS)
        self.norm = NormalizeSpec.from_config(preprocessor)
        c = model.config
        self.video_token_id: int = c.video_token_id
        self.vision_start_id: int = c.vision_start_token_id
        self.vision_end_id: int = c.vision_end_token_id

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def max_tokens_per_frame(self) -> int:
        """smart_resize keeps a frame's area within max_pixels: at most max_pixels / (patch * merge)^2 merged
        tokens, plus the two separators."""
        return self.max_pixels // (self.patch * self.merge) ** 2 + 2

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """uint8 [N, H, W, 3] -> (patches [N * gh * gw, C * tp * p * p], gh, gw) in Qwen's merge order."""
        n, h, w, _ = frames.shape
        factor = self.patch * self.merge
        rh, rw = smart_resize(h, w, factor, self.min_pixels, self.max_pixels)
        x = resize_and_normalize(frames, rh, rw, self.norm, torch.float32)  # [N, C, rh, rw]
        tp, p, m = self.temporal_patch, self.patch, self.merge
        gh, gw = rh // p, rw // p
        x = x.unsqueeze(1).expand(n, tp, *x.shape[1:])  # each frame repeated over the temporal patch
        x = x.reshape(n, tp, self.in_channels, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [N, gh/m, gw/m, m, m, C, tp, p, p]
        return x.reshape(n * gh * gw, self.in_channels * tp * p * p), gh, gw

    def encode_frames(self, frames: torch.Tensor) -> FrameBlock:
        n = frames.shape[0]
        patches, gh, gw = self.patchify(frames)
        grid_thw = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=self.device)
        out = self.model.model.get_video_features(
            pixel_values_videos=patches.to(self.device, self.dtype), video_grid_thw=grid_thw, return_dict=True
        )
        vis = torch.stack(list(out.pooler_output))  # [N, k, H], k = gh * gw / m^2
        k = vis.shape[1]
        emb = self.embed_tokens
        ids_sep = torch.tensor([self.vision_start_id, self.vision_end_id], device=self.device)
        start_emb, end_emb = emb(ids_sep).to(vis.dtype)
        per_frame = torch.cat(
            [start_emb.expand(n, 1, -1), vis, end_emb.expand(n, 1, -1)], dim=1
        )  # [N, k + 2, H]
        ids = torch.cat(
            [
                torch.tensor([self.vision_start_id], device="cpu"),
                torch.full((k,), self.video_token_id, device="cpu"),
                torch.tensor([self.vision_end_id], device="cpu"),
            ]
        ).long()
        kinds = torch.full((k + 2,), int(TokenKind.VISUAL), dtype=torch.uint8, device="cpu")
        kinds[0] = kinds[-1] = int(TokenKind.SPECIAL)
        return FrameBlock(
            embeds=per_frame.reshape(n * (k + 2), -1),
            token_ids=ids.repeat(n),
            kinds=kinds.repeat(n),
            frame_index=torch.arange(n, device="cpu").repeat_interleave(k + 2),
            grid=[(gh // self.merge, gw // self.merge)] * n,
        )

    def frame_positions(self, block: FrameBlock, start: int) -> tuple[torch.Tensor, int]:
        cols = []
        pos = start
        for rows, ncols in block.grid:
            sep_start = torch.full((3, 1), pos, dtype=torch.long, device="cpu")
            s = pos + 1
            t = torch.full((rows, ncols), s, dtype=torch.long, device="cpu")
            hh = (torch.arange(rows, device="cpu").view(-1, 1) + s).expand(rows, ncols)
            ww = (torch.arange(ncols, device="cpu").view(1, -1) + s).expand(rows, ncols)
            vis = torch.stack([t.reshape(-1), hh.reshape(-1), ww.reshape(-1)])  # [3, rows * cols]
            end = s + max(rows, ncols)
            sep_end = torch.full((3, 1), end, dtype=torch.long, device="cpu")
            cols += [sep_start, vis, sep_end]
            pos = end + 1
        return torch.cat(cols, dim=1), pos
