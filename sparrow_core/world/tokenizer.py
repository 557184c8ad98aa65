"""A small byte-level BPE tokenizer trained on the world's caption language, saved in the
transformers format (AutoTokenizer.from_pretrained(dir) loads it offline as a fast tokenizer)."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sparrow_core.world.captions import sample_caption
from sparrow_core.world.episode import caption_rng, iter_segments

ENDOFTEXT = "<|endoftext|>"  # pad and eos
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VIDEO = "<video>"  # LLaVA-OneVision video placeholder
IMAGE = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VIDEO, IMAGE)  # ids 0..4

# The streaming layout the world target is trained on (engine/layout.py): ChatML turns; the first user
# turn's text is the instruction; every media part follows its message, outside any turn; a later user
# message contributes only its media (the instruction is given once).
CHAT_TEMPLATE = (
    "{% set ns = namespace(users=0) %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set media = [] %}"
    "{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set media = message['content'] | rejectattr('type', 'equalto', 'text') | list %}"
    "{% endif %}"
    "{% if text and (message['role'] != 'user' or ns.users == 0) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}"
    "{% for part in media %}"
    "{% if part['type'] == 'video' %}{{ '<video>' }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# text the training scripts may put around captions; part of the corpus so it tokenizes compactly
CHAT_TEXT: tuple[str, ...] = (
    "system", "user", "assistant",
    "you are a video captioner. describe what happens on screen.",
    "describe the video.", "describe what happens now.", "what happens in the latest clip?",
    "caption the last four seconds.", "what changed since the last caption?",
    "previous caption:", "caption:", "segment", "seconds",
)
VOCAB_SIZE = 768
CORPUS_SEGMENTS = 3000  # 4 s segments (over 20 seeds), 4 captions each


def caption_corpus(seed: int, segments: int = CORPUS_SEGMENTS, per_segment: int = 4) -> Iterator[str]:
    """Captions of world segments (no rendering) plus the chat text, in a deterministic order."""
    worlds = 20
    per_world = max(1, segments // worlds)
    for w in range(worlds):
        world_seed = seed * 1000 + w
        for seg in iter_segments(world_seed, seconds=per_world * 4.0, render=False):
            yield seg.caption
            rng = caption_rng(world_seed, 10_000 + seg.facts.index)
            for _ in range(per_segment - 1):
                yield sample_caption(seg.facts, rng)
    for _ in range(20):
        yield from CHAT_TEXT
        yield IM_START + "assistant\n"


def train_bpe(texts: Iterator[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (no unknown tokens) with SPECIAL_TOKENS at ids 0..4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def build_tokenizer(out_dir: str | Path, seed: int = 0, vocab_size: int = VOCAB_SIZE,
                    segments: int = CORPUS_SEGMENTS) -> Path:
    """Train on a caption corpus of world `seed` and save tokenizer.json, tokenizer_config.json (and
    what else transformers writes) into out_dir. Deterministic for a given seed."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = train_bpe(caption_corpus(seed, segments), vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, bos_token=None, unk_token=None,
        extra_special_tokens=[IM_START, IM_END, VIDEO, IMAGE], video_token=VIDEO, image_token=IMAGE,
        chat_template=CHAT_TEMPLATE, model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path):  # -> transformers.PreTrainedTokenizerFast
    """AutoTokenizer.from_pretrained(path), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Number of tokens per text [len(texts)] (to size max caption lengths)."""
    return np.array([len(tokenizer(t)["input_ids"]) for t in texts])
