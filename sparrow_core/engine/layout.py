"""The chat layout of a stream: where the system prompt, the instruction, each clip and each caption sit.

A stream is laid out as the checkpoint's own chat template lays out the conversation

    system, user(clip 1, instruction), assistant(caption 1), user(clip 2, instruction), assistant(caption 2), ...

which, with the clips cut out, is a few fixed text pieces (`ChatLayout`):

    preamble  [clip 1]  prefix {caption 1} end suffix  [clip 2]  prefix {caption 2} end suffix ...

`chat_layout` finds the pieces by rendering that conversation with the template and cutting it at the
template's video placeholder and at the caption. Qwen2-VL / Qwen2.5-VL's template gives

    preamble = <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>
    prefix   = <|vision_end|>{instruction}<|im_end|>\n<|im_start|>assistant\n
    suffix   = \n<|im_start|>user\n<|vision_start|>

LLaVA-OneVision's gives preamble `<|im_start|>system \n{system}<|im_end|><|im_start|>user `, prefix
`\n{instruction}<|im_end|><|im_start|>assistant\n` and suffix `<|im_start|>user `.

A past caption turn is re-laid in the template's history form where that differs from its generation
prompt (`ChatLayout.history_prefix`), so later turns continue in the template's multi-turn form.

The streaming layout (`streaming_layout`). The embedded default model was trained on another layout: the
instruction once, in the first user turn, and each clip's frames after it, outside any turn, each frame a
one-frame video:

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n
    [frames t0..t1] <|im_start|>assistant\n{caption}<|im_end|>\n
    [frames t1..t2] <|im_start|>assistant\n{caption}<|im_end|>\n ...

Its chat template says so (it renders a video part after the user turn and a later user turn's text not
at all), so `chat_layout` finds this layout in it; a tokenizer without a chat template gets it too. A
layout whose clips sit outside every turn is this streaming layout: the adapters then encode each frame
as a one-frame video (`ChatLayout.clip_in_turn`). Training (train/target.py) writes the same strings.

Each caption describes the frames since the previous one, with everything before as context.
`CaptionLayout` is a layout as one target's token ids (`TargetModel.caption_layout`), and
`caption_history.CaptionTurn` is the one place a caption turn is opened and closed in a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

DEFAULT_SYSTEM = "You are a live video captioner."
DEFAULT_INSTRUCTION = "Describe what happens in the video since the last caption."
CAPTION_PREFIX = "<|im_start|>assistant\n"
CAPTION_END = "<|im_end|>"
CAPTION_SUFFIX = "\n"

# Stand-ins rendered through a template to find where the caption goes (no template emits these).
_CAPTION_PROBE = "\x00caption\x00"


class TokenKind(IntEnum):
    """What a stream slot holds."""

    TEXT = 0
    VISUAL = 1
    SPECIAL = 2  # a frame's or clip's own separator (LLaVA-OV image_newline)


def preamble_text(instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> str:
    """The streaming layout's preamble (system turn and the instruction's user turn)."""
    instruction = instruction or DEFAULT_INSTRUCTION
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n"


def caption_text(caption: str) -> str:
    """A whole caption turn of the streaming layout as it sits in the stream after decoding."""
    return f"{CAPTION_PREFIX}{caption}{CAPTION_END}{CAPTION_SUFFIX}"


@dataclass(frozen=True)
class ChatLayout:
    """A stream's text pieces around its clips and captions (see the module docstring)."""

    preamble: str  # before the first clip
    prefix: str  # after a clip, up to where the caption is decoded (the generation prompt's end)
    end: str  # closes a caption
    suffix: str  # after a caption's end, up to the next clip
    clip_in_turn: bool  # the clips sit inside the user turns (the template's form) or outside (streaming)
    # How the template renders a past caption turn's opening where it differs from `prefix` (None: it
    # does not; LLaVA-OneVision's: "...<|im_start|>assistant \n" for the prompt's "...assistant\n").
    # A finished turn is re-laid in this form (`CaptionTurn.close`), as the template's next turn has it.
    history_prefix: str | None = None


def streaming_layout(instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> ChatLayout:
    return ChatLayout(preamble_text(instruction, system), CAPTION_PREFIX, CAPTION_END, CAPTION_SUFFIX, False)


class ChatTemplateError(ValueError):
    """A chat template this engine cannot stream (the message says what it renders)."""


def _conversation(turns: int, instruction: str, system: str) -> list[dict]:
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, user]
    for _ in range(turns - 1):
        messages += [{"role": "assistant", "content": [{"type": "text", "text": _CAPTION_PROBE}]}, user]
    return messages


def chat_layout(tokenizer, video_token: str, instruction: str | None = None, system: str = DEFAULT_SYSTEM) -> ChatLayout:
    """The layout `tokenizer`'s chat template gives a stream of (instruction, clip) turns.

    `video_token` is the token the template's video placeholder is made of (the processor expands it to
    the clip's slots). Without a chat template: the streaming layout."""
    instruction = instruction or DEFAULT_INSTRUCTION
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return streaming_layout(instruction, system)

    def render(turns: int) -> str:
        return tokenizer.apply_chat_template(
            _conversation(turns, instruction, system), tokenize=False, add_generation_prompt=True
        )

    one, two = render(1), render(2)
    # cut at the placeholder: a run of video tokens is one clip
    pieces_one = one.split(video_token)
    if len(pieces_one) != 2:
        raise ChatTemplateError(
            f"the chat template renders one video part as {len(pieces_one) - 1} of the model's video token "
            f"{video_token!r} (it must render exactly one): {one!r}"
        )
    preamble, prefix = pieces_one
    pieces_two = two.split(video_token)
    if len(pieces_two) != 3 or pieces_two[0] != preamble or pieces_two[2] != prefix:
        raise ChatTemplateError(f"the chat template's second turn is not laid out as its first: {two!r}")
    middle = pieces_two[1]  # history prefix + caption + end + suffix
    if middle.count(_CAPTION_PROBE) != 1:
        raise ChatTemplateError(f"the chat template does not render an assistant turn's text: {two!r}")
    history_prefix, after = middle.split(_CAPTION_PROBE)
    if not after.startswith(CAPTION_END):
        raise ChatTemplateError(f"the chat template does not close an assistant turn with {CAPTION_END}: {two!r}")
    suffix = after[len(CAPTION_END) :]
    # the clip is inside a user turn when the user turn opened before it has not been closed
    clip_in_turn = preamble.rfind("<|im_start|>user") > preamble.rfind(CAPTION_END)
    return ChatLayout(
        preamble=preamble,
        prefix=prefix,
        end=CAPTION_END,
        suffix=suffix,
        clip_in_turn=clip_in_turn,
        history_prefix=None if history_prefix == prefix else history_prefix,
    )


@dataclass(frozen=True)
class CaptionLayout:
    """A layout's caption-turn pieces as one target's token ids."""

    prefix: list[int]  # opens a turn (closes the clip, the instruction where the template puts it there); decoding starts after it
    end_id: int  # CAPTION_END: closes the caption (appended when decoding stopped at the token cap)
    suffix: list[int]  # after the end token, up to the next clip
    stop_ids: list[int]  # tokens that end decoding (CAPTION_END among them)
    preamble: list[int] = field(default_factory=list)  # before the first clip
    history_prefix: list[int] | None = None  # a finished turn's opening, where the template renders it otherwise

    @property
    def finished_prefix(self) -> list[int]:
        """How a finished caption turn opens in the stream."""
        return self.prefix if self.history_prefix is None else self.history_prefix

    def caption_turn(self, caption_ids: list[int]) -> list[int]:
        """A whole finished caption turn (a caption decided elsewhere) as it sits in the stream."""
        return [*self.finished_prefix, *caption_ids, self.end_id, *self.suffix]
