"""The tiny random targets the tests build (they live in sparrow_core: the device check uses them too)."""

from sparrow_core.engine.tiny_targets import (  # noqa: F401 - re-exported for the tests
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    LLAVA_OV_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    QWEN_TEMPLATE,
    TEXT_HIDDEN,
    TINY_TARGETS,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB,
    random_frames,
    save_tiny_checkpoint,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
