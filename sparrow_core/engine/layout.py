"""The streaming chat layout, shared by inference and training so the two can never drift apart.

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n
    [frames t0..t1] <|im_start|>assistant\n{caption}<|im_end|>\n
    [frames t1..t2] <|im_start|>assistant\n{caption}<|im_end|>\n ...

Each caption describes the frames since the previous one, with everything before as context.
"""

from __future__ import annotations

DEFAULT_SYSTEM = "You are a live video captioner."
DEFAULT_INSTRUCTION = "Describe what happens in the video since the last caption."
CAPTION_PREFIX = "<|im_start|>assistant\n"
CAPTION_END = "<|im_end|>"
CAPTION_SUFFIX = "\n"


def preamble_text(instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> str:
    instruction = instruction or DEFAULT_INSTRUCTION
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n"


def caption_text(caption: str) -> str:
    """A whole caption turn as it sits in the stream after decoding."""
    return f"{CAPTION_PREFIX}{caption}{CAPTION_END}{CAPTION_SUFFIX}"
