"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from sparrow_core.engine.checkpoint import build_target
from sparrow_core.engine.default_model import default_config, preprocessor_config
from sparrow_core.world.tokenizer import build_tokenizer, load_tokenizer

TOKENIZER_SEGMENTS = 150  # a small BPE corpus: enough to tokenize the world's captions
TINY_LAYERS, TINY_HIDDEN = 2, 64


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is several times faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world_target(tmp_path_factory):
    """The default architecture, shrunk (2 LM layers of 64, 1 vision layer), random weights, over a
    small world tokenizer: a real target the engine and the trainers run on in seconds."""
    tok = load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok"), segments=TOKENIZER_SEGMENTS))
    cfg = default_config(tok)
    tc = cfg.text_config
    tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size = TINY_LAYERS, TINY_HIDDEN, 2 * TINY_HIDDEN
    tc.layer_types = tc.layer_types[:TINY_LAYERS]
    cfg.vision_config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return build_target(model.eval(), tok, preprocessor_config())


@pytest.fixture
def watch_peak_length():
    """watch(stream) -> [peak]: the stream's real forward, wrapped to record the most slots the stream held
    after any forward (a frame before its eviction, a draft tree before it is cut back)."""

    def watch(stream) -> list[int]:
        peak = [0]
        forward = stream._forward

        def watched_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            peak[0] = max(peak[0], stream.length)
            return out

        stream._forward = watched_forward
        return peak

    return watch
