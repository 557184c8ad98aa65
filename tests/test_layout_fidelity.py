"""The checkpoint's own layout: a stream's first and second caption turns are computed on exactly the
token sequence the checkpoint's chat template and processor build for (instruction, clip) turns.

Tiny random targets of each class get a character-level tokenizer with the real checkpoints' chat
templates (Qwen2-VL / Qwen2.5-VL share one; LLaVA-OneVision's). The reference is transformers' own
forward (input_ids, pixel_values_videos, video_grid_thw, second_per_grid_ts, mm_token_type_ids) over
the template's text with each video placeholder expanded as the processor expands it, and pixels
patchified as Qwen's video processor does (processor_reference.py). The stream gets its frames one at a
time, as a live stream does.
"""

from __future__ import annotations

import pytest
import torch
from processor_reference import model_inputs
from tokenizers import AddedToken, Tokenizer, models
from transformers import PreTrainedTokenizerFast

from sparrow_core.engine.caption_history import CaptionTurn
from sparrow_core.engine.checkpoint import build_target
from sparrow_core.engine.layout import DEFAULT_SYSTEM as SYSTEM
from sparrow_core.engine.layout import chat_layout, streaming_layout
from sparrow_core.session import CaptionEngine, SessionConfig
from tiny_models import (
    IMAGE_ID,
    LLAVA_OV_TEMPLATE,
    QWEN_TEMPLATE,
    TINY_TARGETS,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    random_frames,
)

TOL = 1e-4
FPS = 2.0  # frames 0.5 s apart: Qwen2.5-VL's second_per_grid_t = 2 / FPS = 1 s
INSTRUCTION = "Say what moves."
CAPTION = "a dot moves."

def char_tokenizer(media: dict[int, str], template: str) -> PreTrainedTokenizerFast:
    """One token per character (ids 3..123: newline, printable ASCII, then control characters so that
    every id a random model emits decodes), ChatML specials at 0..2 and the media tokens at the tiny
    models' media ids: the template's text tokenizes the same whole or in pieces."""
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{tok: i for i, tok in media.items()}}
    chars = ["\n", *(chr(c) for c in range(32, 127)), *(chr(c) for c in range(1, 26))]
    vocab = {**specials, **{ch: 3 + i for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
    )


TEMPLATED = {
    "qwen2_vl": ({IMAGE_ID: "<|image_pad|>", VISION_START_ID: "<|vision_start|>", VISION_END_ID: "<|vision_end|>", VIDEO_ID: "<|video_pad|>"}, QWEN_TEMPLATE),
    "qwen2_5_vl": ({IMAGE_ID: "<|image_pad|>", VISION_START_ID: "<|vision_start|>", VISION_END_ID: "<|vision_end|>", VIDEO_ID: "<|video_pad|>"}, QWEN_TEMPLATE),
    "llava_onevision": ({IMAGE_ID: "<image>", VIDEO_ID: "<video>"}, LLAVA_OV_TEMPLATE),
}


def templated_target(arch: str):
    """The tiny random target of `arch` with a tokenizer carrying its checkpoints' chat template."""
    bare = TINY_TARGETS[arch]()
    media, template = TEMPLATED[arch]
    return build_target(bare.model, char_tokenizer(media, template), bare.preprocessor)


def conversation(turns: int) -> list[dict]:
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": INSTRUCTION}]}
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, user]
    for _ in range(turns - 1):
        messages += [{"role": "assistant", "content": [{"type": "text", "text": CAPTION}]}, user]
    return messages


def video_slots(target, n_frames: int, frame_shape) -> int:
    """How many video tokens the processor expands one clip of n frames to."""
    if target.architecture == "llava_onevision":
        return n_frames * target.grid[0] * target.grid[1] + 1  # + the clip's image_newline
    rh, rw = target.resized_size(*frame_shape)
    t = -(-n_frames // target.temporal_patch)
    return t * (rh // target.patch) * (rw // target.patch) // target.merge**2


def template_ids(target, text: str, clip_lengths: list[int], frame_shape) -> list[int]:
    """The template's text with each video placeholder expanded as the processor does, tokenized whole."""
    video = target.tokenizer.convert_ids_to_tokens(target.video_token_id)
    pieces = text.split(video)
    assert len(pieces) == len(clip_lengths) + 1
    expanded = pieces[0]
    for n, piece in zip(clip_lengths, pieces[1:], strict=True):
        expanded += video * video_slots(target, n, frame_shape) + piece
    return target.tokenizer.encode(expanded, add_special_tokens=False)


@torch.no_grad()
def reference_logits(target, frames, ids: list[int], clips: list[list[int]]) -> torch.Tensor:
    return target.model(**model_inputs(target, frames, ids, clips, fps=FPS)).logits[0, -1]


def stream_clip(session, frames, first: int, n: int) -> None:
    for i in range(first, first + n):  # one frame at a time, as a live stream
        session.ingest(frames[i : i + 1], [i / FPS])


CASES = [("qwen2_5_vl", 3, 2), ("qwen2_5_vl", 4, 3), ("qwen2_vl", 3, 3), ("qwen2_vl", 2, 1), ("llava_onevision", 3, 3)]


@pytest.mark.parametrize(("arch", "first_clip", "second_clip"), CASES)
def test_turns_equal_the_templates_sequence(arch, first_clip, second_clip):
    """First turn over `first_clip` frames, a caption, second turn over `second_clip` more (Qwen: odd and
    even counts, so a temporal patch is padded at a caption)."""
    target = templated_target(arch)
    frames = random_frames(first_clip + second_clip, seed=7)
    shape = frames.shape[1:3]
    session = CaptionEngine(target).open_session(SessionConfig(instruction=INSTRUCTION, decoding="ar"))
    tok = target.tokenizer

    stream_clip(session, frames, 0, first_clip)
    turn = CaptionTurn(session.stream, session.layout, session.history)
    text_one = tok.apply_chat_template(conversation(1), tokenize=False, add_generation_prompt=True)
    ids_one = template_ids(target, text_one, [first_clip], shape)
    assert session.stream.token_ids().tolist() == ids_one  # exactly the template's and processor's tokens
    ref_one = reference_logits(target, frames, ids_one, [list(range(first_clip))])
    diff_one = (turn.logits - ref_one).abs().max().item()
    assert diff_one <= TOL, diff_one

    caption = tok.encode(CAPTION, add_special_tokens=False) + [session.layout.end_id]
    session.stream.append_text(caption)
    turn.close(caption)  # LLaVA-OV: re-laid as its template renders a past turn ("assistant \n")
    stream_clip(session, frames, first_clip, second_clip)
    turn = CaptionTurn(session.stream, session.layout, session.history)
    text_two = tok.apply_chat_template(conversation(2), tokenize=False, add_generation_prompt=True)
    clips = [list(range(first_clip)), list(range(first_clip, first_clip + second_clip))]
    ids_two = template_ids(target, text_two, [first_clip, second_clip], shape)
    assert session.stream.token_ids().tolist() == ids_two
    diff_two = (turn.logits - reference_logits(target, frames, ids_two, clips)).abs().max().item()
    print(f"{arch} {first_clip}+{second_clip} frames: max |logit diff| turn 1 {diff_one:.3g}, turn 2 {diff_two:.3g}")
    assert diff_two <= TOL, diff_two


def test_layout_comes_from_the_template():
    """The same class (LLaVA-OneVision) streams in its template's layout, or, where the template is the
    embedded model's, the streaming layout it was trained on; a tokenizer without a template gets that too."""
    from sparrow_core.world.tokenizer import CHAT_TEMPLATE

    media, _ = TEMPLATED["llava_onevision"]
    real = chat_layout(char_tokenizer(media, LLAVA_OV_TEMPLATE), "<video>", INSTRUCTION, SYSTEM)
    assert real.clip_in_turn and real.prefix == f"\n{INSTRUCTION}<|im_end|><|im_start|>assistant\n"
    assert real.preamble == f"<|im_start|>system \n{SYSTEM}<|im_end|><|im_start|>user "
    world = chat_layout(char_tokenizer(media, CHAT_TEMPLATE), "<video>", INSTRUCTION, SYSTEM)
    assert world == streaming_layout(INSTRUCTION, SYSTEM) and not world.clip_in_turn
    assert chat_layout(None, "<video>", INSTRUCTION, SYSTEM) == world
    assert templated_target("llava_onevision").tokens_per_frame == TINY_TARGETS["llava_onevision"]().tokens_per_frame - 1


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_5_vl"])
def test_speculative_decoding_is_lossless_in_the_templates_layout(arch):
    """Greedy sparrow and ngram give ar's tokens over three captions in the template's layout: odd clips
    (a Qwen patch padded at each caption), LLaVA-OV's turns re-laid as they close."""
    from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter

    target = templated_target(arch)
    torch.manual_seed(3)
    engine = CaptionEngine(target, {"sparrow": TextAnchoredDrafter(target, DrafterConfig())})
    frames = random_frames(9, seed=9)

    def run(decoding: str) -> list[int]:
        session = engine.open_session(SessionConfig(instruction=INSTRUCTION, decoding=decoding, max_caption_tokens=6))
        for first in (0, 3, 6):
            stream_clip(session, frames, first, 3)
            session.caption((first + 3) / FPS)
        return session.stream.token_ids().tolist()

    want = run("ar")
    assert run("sparrow") == want and run("ngram") == want
