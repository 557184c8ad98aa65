"""--device / --dtype: every entry point takes them (one parser, cli/device.py), a device this machine lacks is
a one-line usage error naming it, and a bf16 engine keeps its KV, hidden states and drafters in bf16; a
drafter trains on a bf16 target (fp32 weights, the target's head in bf16) and is saved in bf16."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sparrow_core.bench import accuracy, calibrate, device_check, ingest, kernels, speculative
from sparrow_core.cli import caption
from sparrow_core.decoding.drafter import load_drafter
from sparrow_core.session import CaptionEngine, SessionConfig
from sparrow_core.train import drafter as train_drafter
from sparrow_core.train import target as train_target
from sparrow_core.train.drafter import DrafterTrainConfig, train
from streamer import bench_load
from streamer import cli as stream_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ENTRY_POINTS = {
    "sparrow-caption": caption.main,
    "sparrow-train target": train_target.main,
    "sparrow-train drafter": train_drafter.main,
    "sparrow-bench speculative": speculative.main,
    "sparrow-bench accuracy": accuracy.main,
    "sparrow-bench ingest": ingest.main,
    "sparrow-bench kernels": kernels.main,
    "sparrow-bench device-check": device_check.main,
    "sparrow-bench calibrate": calibrate.main,
    "sparrow-bench load": bench_load.main,
    "sparrow-stream serve": lambda argv: stream_cli.main(["serve", *argv]),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_takes_device_and_dtype(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        ENTRY_POINTS[name](["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--device" in text and "--dtype" in text and "bfloat16" in text, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["sparrow-caption", "sparrow-bench speculative", "sparrow-bench load", "sparrow-stream serve"])
def test_a_missing_device_is_a_usage_error(name, capsys):
    argv = ["--world-seed", "1"] if name == "sparrow-caption" else []
    with pytest.raises(SystemExit) as exit_:
        ENTRY_POINTS[name]([*argv, "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'cuda'" in err and "no CUDA device" in err


def test_a_bf16_engine_keeps_everything_in_bf16():
    fp32 = CaptionEngine.load(dtype=torch.float32)
    engine = CaptionEngine.load(dtype=torch.bfloat16)
    assert engine.target.dtype == torch.bfloat16 and engine.drafters
    assert all(p.dtype == torch.bfloat16 for d in engine.drafters.values() for p in d.parameters())
    assert engine.target.kv_bytes_per_token * 2 == fp32.target.kv_bytes_per_token
    session = engine.open_session(SessionConfig(max_caption_tokens=4))
    assert session.generator.device == engine.target.device
    stream = session.stream
    assert stream.cache.layers[0].keys.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in stream.hidden().layers.values())


def test_a_drafter_trains_on_a_bf16_target(world_target, tmp_path):
    target = copy.deepcopy(world_target)
    target.model.to(torch.bfloat16)
    cfg = DrafterTrainConfig(out=str(tmp_path / "d"), samples=2, eval_samples=1, min_segments=1, max_segments=1,
                             max_caption_tokens=4, steps=2, batch=2, mtp_steps=2, feature_layer="last",
                             checkpoint_every=100, warmup=1)
    out = train(cfg, target=target)
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 2
    drafter = load_drafter(out, target)
    assert all(p.dtype == torch.bfloat16 for p in drafter.parameters())


STREAM_ENTRY_POINTS = ["sparrow-caption", "sparrow-bench speculative", "sparrow-bench accuracy", "sparrow-bench ingest",
                       "sparrow-bench load", "sparrow-stream serve"]


@pytest.mark.parametrize("name", STREAM_ENTRY_POINTS)
def test_every_command_with_streams_takes_kv_dtype(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        ENTRY_POINTS[name](["--help"])
    assert exit_.value.code == 0
    assert "--kv-dtype" in capsys.readouterr().out, name


def test_a_bf16_kv_under_fp32_weights():
    """--kv-dtype is a parameter of the load: every session's KV is bf16, the model and the kept hidden
    states stay fp32, and the KV limits count bf16 bytes."""
    fp32_bytes = CaptionEngine.load(dtype=torch.float32).target.kv_bytes_per_token
    engine = CaptionEngine.load(dtype=torch.float32, kv_dtype=torch.bfloat16)
    assert engine.target.kv_bytes_per_token * 2 == fp32_bytes
    stream = engine.open_session(SessionConfig(max_caption_tokens=4)).stream
    assert stream.cache.layers[0].keys.dtype == torch.bfloat16
    assert engine.target.dtype == torch.float32
    assert all(h.dtype == torch.float32 for h in stream.hidden().layers.values())
