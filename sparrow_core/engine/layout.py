"""The streaming chat layout, shared by inference and training so the two can never drift apart.

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n
    [frames t0..t1] <|im_start|>assistant\n{caption}<|im_end|>\n
    [frames t1..t2] <|im_start|>assistant\n{caption}<|im_end|>\n ...

Each caption describes the frames since the previous one, with everything before as context. The strings
live here; `CaptionLayout` is the same layout as one target's token ids (`TargetModel.caption_layout`),
and `caption_history.CaptionTurn` is the one place a caption turn is opened and closed in a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

DEFAULT_SYSTEM = "You are a live video captioner."
DEFAULT_INSTRUCTION = "Describe what happens in the video since the last caption."
CAPTION_PREFIX = "<|im_start|>assistant\n"
CAPTION_END = "<|im_end|>"
CAPTION_SUFFIX = "\n"


class TokenKind(IntEnum):
    """What a stream slot holds."""

    TEXT = 0
    VISUAL = 1
    SPECIAL = 2  # a frame's own separator tokens (LLaVA-OV image_newline, Qwen vision_start/end)


def preamble_text(instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> str:
    instruction = instruction or DEFAULT_INSTRUCTION
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n"


def caption_text(caption: str) -> str:
    """A whole caption turn as it sits in the stream after decoding."""
    return f"{CAPTION_PREFIX}{caption}{CAPTION_END}{CAPTION_SUFFIX}"


@dataclass(frozen=True)
class CaptionLayout:
    """The layout's caption-turn pieces as one target's token ids."""

    prefix: list[int]  # CAPTION_PREFIX: opens a turn; decoding starts after it
    end_id: int  # CAPTION_END: closes the caption (appended when decoding stopped at the token cap)
    suffix: list[int]  # CAPTION_SUFFIX: after the end token
    stop_ids: list[int]  # tokens that end decoding (CAPTION_END among them)
