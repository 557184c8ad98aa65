"""The embedded default target: a small LLaVA-OneVision (SigLIP + projector + Qwen2) for the world.

Built from transformers' own config classes, so it loads through the same `load_target` path as real
checkpoints. 64x64 frames, 8x8 patches -> 64 SigLIP tokens -> projector -> 2x2 pooling -> 16 visual
tokens + the image_newline separator = 17 slots per frame. 12 LM layers, so a middle layer exists to
bridge from and a one-layer drafter costs about 1/12 of the target, as with real 7B models.
"""

from __future__ import annotations

from transformers import LlavaOnevisionConfig

FRAME_SIZE = 64
PATCH_SIZE = 8
LM_LAYERS = 12
LM_HIDDEN = 192
LM_HEADS = 4
LM_KV_HEADS = 2
LM_FFN = 512
VISION_HIDDEN = 96
VISION_LAYERS = 3
VISION_HEADS = 4
# how the model was trained to be fed; written into the checkpoint's sparrow_stream.json
STREAM_FPS = 1.0
SEGMENT_SECONDS = 4.0
MAX_POSITIONS = 65536  # streams run long; positions never reset


def default_config(tokenizer) -> LlavaOnevisionConfig:
    """The default target's config for a world tokenizer (ids of its special tokens come from it)."""
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=VISION_HIDDEN,
            intermediate_size=4 * VISION_HIDDEN,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=VISION_HEADS,
            image_size=FRAME_SIZE,
            patch_size=PATCH_SIZE,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=LM_HIDDEN,
            intermediate_size=LM_FFN,
            num_hidden_layers=LM_LAYERS,
            num_attention_heads=LM_HEADS,
            num_key_value_heads=LM_KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            tie_word_embeddings=True,
            bos_token_id=ids("<|im_start|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<image>"),
        video_token_id=ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )


def preprocessor_config() -> dict:
    """What `load_target` reads to resize and normalise frames (LLaVA-OneVision's processor keys)."""
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "size": {"height": FRAME_SIZE, "width": FRAME_SIZE},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "resample": 2,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
    }
