"""Fixtures shared by several test modules, and the hypothesis profiles of the fuzz suite.

Hypothesis: `ci` (the default) is bounded and reproducible: a fixed number of examples drawn from a
derandomized source, no example database, and no shrinking (a failure against a server is reported as
found; a frozen server would make every shrink step wait for its deadline). `long` is for a local hunt:
`pytest tests/test_service_fuzz.py --hypothesis-profile=long`.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from transformers import LlavaOnevisionForConditionalGeneration

from sparrow_core.engine.checkpoint import build_target
from sparrow_core.engine.default_model import default_config, preprocessor_config
from sparrow_core.world.tokenizer import build_tokenizer, load_tokenizer

TOKENIZER_SEGMENTS = 150  # a small BPE corpus: enough to tokenize the world's captions
TINY_LAYERS, TINY_HIDDEN = 2, 64

# an example is one or a few calls that each end within their own gRPC deadline (see the fuzz suite);
# this is only the backstop for an example that hangs outside a call
_EXAMPLE_DEADLINE = timedelta(seconds=120)
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci", max_examples=12, derandomize=True, database=None, deadline=_EXAMPLE_DEADLINE,
    phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False, suppress_health_check=_SLOW_IS_FINE,
    print_blob=False,
)
settings.register_profile(
    "long", max_examples=400, derandomize=False, deadline=_EXAMPLE_DEADLINE,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    suppress_health_check=_SLOW_IS_FINE, print_blob=True,
)
settings.load_profile("ci")


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


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The service tests' real CaptionEngine: the shipped default model, or its architecture with random
    weights (tests/service_support.py)."""
    from service_support import load_engine, model_dir

    return load_engine(model_dir(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The frames a service test's client sends of a world clip (service_support.world_frames)."""
    from service_support import world_frames

    return world_frames(tmp_path_factory.mktemp("clip"))[1]


@pytest.fixture
def watch_peak_length():
    """watch(stream) -> [peak]: the stream's recording of each forward, wrapped to record the most slots the
    stream held after any forward (a frame before its eviction, a draft tree before it is cut back)."""

    def watch(stream) -> list[int]:
        peak = [0]
        record = stream.record_forward

        def watched_record(forward, *args):
            length = stream.length + forward.size  # the slots it holds once these are recorded
            record(forward, *args)
            peak[0] = max(peak[0], length)

        stream.record_forward = watched_record
        return peak

    return watch
