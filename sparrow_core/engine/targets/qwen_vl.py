"""Qwen2-VL and Qwen2.5-VL as streaming targets (M-RoPE, 3-D positions).

A clip is one video of the chat template (`<|vision_start|><|video_pad|><|vision_end|>`, the separators
being the template's text around the clip), laid out as Qwen's video processor and `get_rope_index` lay
it out: every frame resized to the clip's `smart_resize` size, consecutive frames paired into temporal
patches of `temporal_patch_size` (2), patchified in the processor's order, grid (t, gh, gw); a patch's
tokens take positions (s + t_i, s + row, s + col) from the clip's start s, and the text after the clip
s + max(rows, cols), as transformers 5's `get_rope_index` does (the original Qwen code continued at the
largest position + 1, which differs once t_i passes the grid's side; transformers is the reference here). Qwen2-VL's t_i is the patch's index;
Qwen2.5-VL's is time-aligned, floor(seconds since the clip's first frame x tokens_per_second), which for
frames sampled at a steady fps is the processor's floor(i x second_per_grid_t x tokens_per_second) with
second_per_grid_t = temporal_patch_size / fps.

Streaming departure (the only one): a temporal patch needs all its frames, so a frame whose partner has
not arrived yet is held, outside the KV, until it does; a clip that closes (the caption turn's text
follows) with a frame held pads it by repeating it, as the processor pads a clip of odd length. The
sequence is then exactly the processor's; only the held frame's prefill is late (it runs when the
partner or the caption comes). A frame's vision encoding depends on its temporal patch only (the vision
tower attends within a temporal slice), so a clip appended in any chunking gives the same slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.preprocess import NormalizeSpec, resize_and_normalize, smart_resize
from sparrow_core.engine.target import FrameBlock, TargetModel, VideoClip, VisionInput

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
        # Qwen2.5-VL's temporal positions follow media time; Qwen2-VL's count temporal patches
        self.tokens_per_second: float | None = (
            float(vcfg.tokens_per_second) if self.architecture == "qwen2_5_vl" else None
        )
        size = preprocessor.get("size") or {}
        self.min_pixels = int(preprocessor.get("min_pixels", size.get("shortest_edge", 56 * 56)))
        cfg_max = int(preprocessor.get("max_pixels", size.get("longest_edge", DEFAULT_STREAM_MAX_PIXELS)))
        self.max_pixels = min(cfg_max, max_pixels or DEFAULT_STREAM_MAX_PIXELS)
        self.norm = NormalizeSpec.from_config(preprocessor)
        self.vision_start_id: int = model.config.vision_start_token_id
        self.vision_end_id: int = model.config.vision_end_token_id

    @property
    def language_model(self):
        return self.model.model.language_model

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) a frame of this size is resized to (Qwen's smart_resize)."""
        return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)

    @property
    def max_tokens_per_frame(self) -> int:
        """The most slots one frame's append adds: a whole temporal patch (its partner was held), and
        smart_resize keeps a frame's area within max_pixels: max_pixels / (patch * merge)^2 merged tokens."""
        return self.max_pixels // (self.patch * self.merge) ** 2

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
        """Normalised frames fp32 [N, C, rh, rw] of one clip -> (patches [t * gh * gw, C * tp * p * p], t,
        gh, gw) as the video processor makes them: the last frame repeated up to a whole temporal patch."""
        tp, p, m = self.temporal_patch, self.patch, self.merge
        if pad := -frames.shape[0] % tp:
            frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])])
        n, c, rh, rw = frames.shape
        t, gh, gw = n // tp, rh // p, rw // p
        x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, gh/m, gw/m, m, m, C, tp, p, p]
        return x.reshape(t * gh * gw, c * tp * p * p), t, gh, gw

    def _encode(self, frames: torch.Tensor, times: torch.Tensor, frame_no: torch.Tensor, clip: VideoClip) -> FrameBlock:
        """Whole temporal patches of a clip (the last one padded) -> their slots."""
        patches, t, gh, gw = self.patchify(frames)
        grid_thw = torch.tensor([[1, gh, gw]] * t, dtype=torch.long, device=self.device)
        vision = VisionInput(patches.to(self.device, self.dtype), grid_thw)
        rows, cols = gh // self.merge, gw // self.merge
        k = rows * cols
        s = clip.start_position
        first = torch.arange(t, device="cpu") * self.temporal_patch  # each patch's first frame, in `frames`
        if self.tokens_per_second is None:
            t_pos = torch.arange(clip.units, clip.units + t, device="cpu")
        else:
            t_pos = torch.tensor(
                [math.floor((float(times[i]) - clip.first_time) * self.tokens_per_second) for i in first.tolist()],
                device="cpu",
            )
        tt = (t_pos + s).view(-1, 1, 1).expand(t, rows, cols)
        hh = (torch.arange(rows, device="cpu") + s).view(1, -1, 1).expand(t, rows, cols)
        ww = (torch.arange(cols, device="cpu") + s).view(1, 1, -1).expand(t, rows, cols)
        clip.units += t
        clip.next_position = s + max(rows, cols)
        n = t * k
        return FrameBlock(
            embeds=None,
            token_ids=torch.full((n,), self.video_token_id, dtype=torch.long, device="cpu"),
            kinds=torch.full((n,), int(TokenKind.VISUAL), dtype=torch.uint8, device="cpu"),
            # a patch's slots belong to its first frame (the visual budget evicts patches whole)
            frame_no=frame_no[first].repeat_interleave(k),
            times=times[first].repeat_interleave(k),
            positions=torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]),
            vision=vision,
        )

    def vision_embeds(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """The tower takes a list of videos of any sizes (their patches concatenated, one grid row each, and
        it attends within each row's patches), so every input's temporal patches, whatever their streams'
        frame sizes, go through one call: patches and grid rows concatenated, the merged tokens split back."""
        patches = inputs[0].pixels if len(inputs) == 1 else torch.cat([i.pixels for i in inputs])
        grid = inputs[0].grid if len(inputs) == 1 else torch.cat([i.grid for i in inputs])
        out = self.model.model.get_video_features(pixel_values_videos=patches, video_grid_thw=grid, return_dict=True)
        vis = torch.cat(list(out.pooler_output))  # [sum t * k, H], k = rows * cols of each patch
        merged = self.merge**2  # an input's pixels are its t * gh * gw patches
        return list(torch.split(vis, [i.pixels.shape[0] // merged for i in inputs]))

    def encode_frames(self, frames: torch.Tensor, times: torch.Tensor, frame_no: torch.Tensor, clip: VideoClip) -> FrameBlock | None:
        if clip.size is None:
            clip.size = self.resized_size(frames.shape[1], frames.shape[2])
        x = resize_and_normalize(frames, *clip.size, self.norm, torch.float32)  # [N, C, rh, rw]
        clip.held += [(x[i], float(times[i]), int(frame_no[i])) for i in range(x.shape[0])]
        whole = len(clip.held) // self.temporal_patch * self.temporal_patch
        if whole == 0:
            return None
        ready, clip.held = clip.held[:whole], clip.held[whole:]
        return self._encode_held(ready, clip)

    def _encode_held(self, held: list[tuple[torch.Tensor, float, int]], clip: VideoClip) -> FrameBlock:
        frames = torch.stack([f for f, _, _ in held])
        times = torch.tensor([ts for _, ts, _ in held], dtype=torch.float64, device="cpu")
        numbers = torch.tensor([no for _, _, no in held], dtype=torch.long, device="cpu")
        if pad := -len(held) % self.temporal_patch:  # the padding repeats of the last frame share its time
            times = torch.cat([times, times[-1:].expand(pad)])
            numbers = torch.cat([numbers, numbers[-1:].expand(pad)])
        return self._encode(frames, times, numbers, clip)

    def close_clip(self, clip: VideoClip) -> FrameBlock | None:
        if not clip.held:
            return None
        held, clip.held = clip.held, []
        return self._encode_held(held, clip)
