"""Tiny random targets of the three supported transformers classes, built from config (no files)."""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from sparrow_core.engine.checkpoint import build_target
from sparrow_core.engine.target import TargetModel

VOCAB = 128
# special ids inside the tiny vocab (named, not magic: the configs below are built from these)
IMAGE_ID, VISION_START_ID, VISION_END_ID, VIDEO_ID = 124, 125, 126, 127
BOS_ID, EOS_ID = 1, 2
TEXT_HIDDEN = 64
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=TEXT_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
)


def _build(cls, cfg, preprocessor: dict, seed: int) -> TargetModel:
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    return build_target(model, None, preprocessor)


def tiny_llava_onevision(seed: int = 0, text_layers: int = _TEXT["num_hidden_layers"]) -> TargetModel:
    cfg = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(_TEXT, model_type="qwen2", num_hidden_layers=text_layers),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    pre = {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}
    return _build(LlavaOnevisionForConditionalGeneration, cfg, pre, seed)


def _qwen_config(cls_cfg, extra_vision: dict, text_layers: int = _TEXT["num_hidden_layers"]):
    head_dim = TEXT_HIDDEN // _TEXT["num_attention_heads"]  # 16 -> mrope sections sum to 8
    return cls_cfg(
        vision_config=dict(
            depth=2,
            num_heads=2,
            in_channels=3,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            **extra_vision,
        ),
        text_config=dict(
            _TEXT,
            num_hidden_layers=text_layers,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    ), head_dim


_QWEN_PRE = {"min_pixels": 8 * 8, "max_pixels": 32 * 32, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3}


def tiny_qwen2_vl(seed: int = 0) -> TargetModel:
    cfg, _ = _qwen_config(Qwen2VLConfig, dict(embed_dim=32, mlp_ratio=2, hidden_size=TEXT_HIDDEN))
    return _build(Qwen2VLForConditionalGeneration, cfg, dict(_QWEN_PRE), seed)


def tiny_qwen2_5_vl(seed: int = 0, text_layers: int = _TEXT["num_hidden_layers"]) -> TargetModel:
    cfg, _ = _qwen_config(
        Qwen2_5_VLConfig,
        dict(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, window_size=16, fullatt_block_indexes=[1], tokens_per_second=2),
        text_layers,
    )
    return _build(Qwen2_5_VLForConditionalGeneration, cfg, dict(_QWEN_PRE), seed)


TINY_TARGETS = {
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}


def random_frames(n: int, h: int = 40, w: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).numpy()
