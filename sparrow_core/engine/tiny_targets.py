"""Tiny random targets of the three supported transformers classes: built from config (no files), or
saved as a local download (`save_tiny_checkpoint`: weights, a tokenizer, a preprocessor config). For the
tests and `sparrow-bench device-check`, which need every class of checkpoint without downloading one."""

from __future__ import annotations

import json
from pathlib import Path

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


def on(target: TargetModel, device: str | torch.device, dtype: torch.dtype) -> TargetModel:
    """The target moved to `device` in `dtype` (in place; returned for chaining)."""
    target.model.to(device=device, dtype=dtype)
    return target


def _llava_config(text: dict, image_id: int = IMAGE_ID, video_id: int = VIDEO_ID) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(model_type="qwen2", **text),
        image_token_id=image_id,
        video_token_id=video_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


_LLAVA_PRE = {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}


def tiny_llava_onevision(seed: int = 0, text_layers: int = _TEXT["num_hidden_layers"]) -> TargetModel:
    text = dict(_TEXT, num_hidden_layers=text_layers)
    return _build(LlavaOnevisionForConditionalGeneration, _llava_config(text), dict(_LLAVA_PRE), seed)


def _qwen_config(cls_cfg, extra_vision: dict, text: dict = _TEXT, ids: tuple[int, int, int, int] | None = None):
    """ids: (image, vision start, vision end, video) token ids."""
    image_id, start_id, end_id, video_id = ids or (IMAGE_ID, VISION_START_ID, VISION_END_ID, VIDEO_ID)
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
            **text,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        image_token_id=image_id,
        video_token_id=video_id,
        vision_start_token_id=start_id,
        vision_end_token_id=end_id,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    ), head_dim


_QWEN_PRE = {"min_pixels": 8 * 8, "max_pixels": 32 * 32, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3}


_QWEN2_VISION = dict(embed_dim=32, mlp_ratio=2, hidden_size=TEXT_HIDDEN)
_QWEN2_5_VISION = dict(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, window_size=16,
                       fullatt_block_indexes=[1], tokens_per_second=2)


def tiny_qwen2_vl(seed: int = 0) -> TargetModel:
    cfg, _ = _qwen_config(Qwen2VLConfig, _QWEN2_VISION)
    return _build(Qwen2VLForConditionalGeneration, cfg, dict(_QWEN_PRE), seed)


def tiny_qwen2_5_vl(seed: int = 0, text_layers: int = _TEXT["num_hidden_layers"]) -> TargetModel:
    cfg, _ = _qwen_config(Qwen2_5_VLConfig, _QWEN2_5_VISION, dict(_TEXT, num_hidden_layers=text_layers))
    return _build(Qwen2_5_VLForConditionalGeneration, cfg, dict(_QWEN_PRE), seed)


TINY_TARGETS = {
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}


def random_frames(n: int, h: int = 40, w: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).numpy()


QWEN_TEMPLATE = (  # Qwen2-VL-7B-Instruct's and Qwen2.5-VL-7B-Instruct's chat_template
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_OV_TEMPLATE = (  # llava-onevision-qwen2-*-ov-hf's chat_template
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


QWEN_SPECIAL_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")


def save_tiny_checkpoint(arch: str, out: Path, max_positions: int = 8192, seed: int = 0) -> Path:
    """A tiny random checkpoint of `arch` laid out as a local download would be (config.json, safetensors,
    tokenizer with the class's own chat template, preprocessor_config.json), over a small world
    tokenizer, with no sparrow_stream.json."""
    from transformers import AutoTokenizer

    from sparrow_core.world.tokenizer import build_tokenizer

    out = Path(out)
    build_tokenizer(out, seed=0, segments=40)
    tok = AutoTokenizer.from_pretrained(out)
    if arch != "llava_onevision":  # Qwen's media tokens, as its own tokenizer has them
        tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tok.chat_template = LLAVA_OV_TEMPLATE if arch == "llava_onevision" else QWEN_TEMPLATE  # the class's own
    tok.save_pretrained(out)
    ids = tok.convert_tokens_to_ids
    text = dict(_TEXT, vocab_size=len(tok), max_position_embeddings=max_positions,
                bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"))
    if arch == "llava_onevision":
        cls, cfg, pre = LlavaOnevisionForConditionalGeneration, _llava_config(text, ids("<image>"), ids("<video>")), _LLAVA_PRE
    else:
        qwen_ids = tuple(ids(t) for t in QWEN_SPECIAL_TOKENS)
        cls, cfg_cls, vision = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLConfig, _QWEN2_VISION),
                                "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, _QWEN2_5_VISION)}[arch]
        cfg, _ = _qwen_config(cfg_cls, vision, text, qwen_ids)
        pre = _QWEN_PRE
    torch.manual_seed(seed)
    cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out
