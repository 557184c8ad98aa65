"""Device hygiene without a GPU: every decoding method (greedy and sampled) and a few drafter-training steps
run with the model on "cpu" under a TorchFunctionMode that (1) puts every tensor that this repository's code
creates without an explicit device on "meta", and (2) refuses any op whose tensors (or generator) sit on
different devices.

On a GPU a tensor created without a device lands on the CPU beside CUDA weights; here it lands on meta
beside CPU weights, so the first op that meets the model's tensors fails, and so does reading a meta tensor
back (`int()`, `.tolist()`). A pass means every tensor our code makes is created on the device it is used on
(the model's, or "cpu" said explicitly for bookkeeping), and every random draw uses a generator on its
tensors' device. Factories called from transformers or torch keep their own defaults: only code under
sparrow_core/ is held to this.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import sparrow_core
from sparrow_core.decoding.drafter import DrafterConfig, TextAnchoredDrafter
from sparrow_core.session import CaptionEngine, SessionConfig
from sparrow_core.train.data import WorldStreamSpec, world_segments
from sparrow_core.train.drafter import DrafterTrainConfig, train
from tests.tiny_models import random_frames, tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

METHODS = ("ar", "sparrow", "eagle", "msd", "ngram")
OUR_CODE = str(Path(sparrow_core.__file__).parent)
FACTORIES = {torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty,
             torch.eye, torch.rand, torch.randn, torch.randint, torch.linspace}


class DeviceMixError(AssertionError):
    pass


class StrictDevices(TorchFunctionMode):
    """(1) A factory called from sparrow_core without device= makes a meta tensor; (2) any op whose tensor
    arguments, or whose generator, sit on more than one device fails. A 0-dim CPU tensor is exempt from (2),
    as CUDA ops accept it as a scalar."""

    def __init__(self, held: str = OUR_CODE) -> None:
        super().__init__()
        self.held = held  # code under this directory is held to (1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(self.held):
                kwargs["device"] = "meta"
        devices = {
            t.device
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")
        }
        generator = kwargs.get("generator")
        if generator is not None:
            devices.add(generator.device)
        if len(devices) > 1:
            raise DeviceMixError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


class strict_devices:
    """StrictDevices, and torch.Generator must be given its device."""

    def __init__(self, held: str = OUR_CODE) -> None:
        self.held = held

    def __enter__(self):
        self.mode = StrictDevices(self.held)
        self.mode.__enter__()
        self.generator_cls = cls = torch.Generator

        def generator(device=None):
            if device is None:
                raise DeviceMixError("torch.Generator() without a device: it would draw on the CPU whatever the model's device")
            return cls(device)

        torch.Generator = generator
        return self

    def __exit__(self, *exc):
        torch.Generator = self.generator_cls
        self.mode.__exit__(*exc)
        return False


def test_the_check_sees_what_a_gpu_run_would_trip_on():
    from sparrow_core.decoding.draft_tree import build_tree
    from sparrow_core.decoding.sampling import SamplingConfig, sample

    logits = torch.randn(5, 7)  # a model-side tensor, on "cpu"
    with strict_devices(held=str(Path(__file__).parent)):  # this file's factories are held to (1) too
        assert torch.zeros(3).device.type == "meta" and torch.zeros(3, device="cpu").device.type == "cpu"
        with pytest.raises(DeviceMixError):
            logits + torch.ones(7)
        assert build_tree(torch.tensor([1, 2], device="cpu"), torch.tensor([-1, 0], device="cpu")).mask.device.type == "cpu"
        with pytest.raises(DeviceMixError):
            torch.Generator()
        assert sample(logits[0], SamplingConfig(1.0), torch.Generator("cpu")) in range(7)


def engine_with_every_method(target) -> CaptionEngine:
    drafters = {}
    for i, variant in enumerate(("sparrow", "eagle", "msd")):
        torch.manual_seed(i)
        drafters[variant] = TextAnchoredDrafter(target, DrafterConfig(variant=variant))
    return CaptionEngine(target, drafters)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_method_keeps_its_tensors_on_the_model_device(world_target, temperature):
    engine = engine_with_every_method(world_target)
    assert set(METHODS) <= set(engine.decoders)
    segments = list(world_segments(WorldStreamSpec(seed=3, segments=2)))
    for method in METHODS:
        with strict_devices():
            session = engine.open_session(SessionConfig(decoding=method, temperature=temperature, max_caption_tokens=6))
            for seg in segments:
                session.ingest(seg.frames, seg.times)
                progress = session.caption(seg.segment.t1)
            assert progress.done and progress.tokens >= 1, method
            session.close()


def test_qwen_mrope_target_keeps_its_tensors_on_the_model_device():
    """M-RoPE positions and a Qwen vision tower, driven through streams (the tiny target has no tokenizer)."""
    from sparrow_core.decoding.ar import ARDecoder
    from sparrow_core.decoding.proposers.drafter import DrafterProposer
    from sparrow_core.decoding.sampling import SamplingConfig
    from sparrow_core.decoding.speculative import SpeculativeDecoder
    from sparrow_core.engine.stream import TargetStream

    target = tiny_qwen2_5_vl()
    torch.manual_seed(0)
    sparrow = SpeculativeDecoder(DrafterProposer(TextAnchoredDrafter(target, DrafterConfig())))
    frames = random_frames(2)
    for decoder in (ARDecoder(), sparrow):
        for sampling in (SamplingConfig(), SamplingConfig(0.9)):
            with strict_devices():
                stream = TargetStream(target)
                stream.append_text([3, 4, 5])
                stream.append_frames(frames, [0.0, 0.5])
                logits = stream.append_text([6, 7])
                gen = torch.Generator(target.device).manual_seed(0)
                steps = list(decoder.decode(stream, logits, 6, [], sampling, gen))
                assert steps[-1].done


def test_drafter_training_keeps_its_tensors_on_the_model_device(world_target, tmp_path):
    cfg = DrafterTrainConfig(out=str(tmp_path / "d"), samples=2, eval_samples=1, min_segments=1, max_segments=1,
                             max_caption_tokens=4, steps=2, batch=2, mtp_steps=2, feature_layer="last",
                             checkpoint_every=100, warmup=1)
    with strict_devices():
        train(cfg, target=world_target)
