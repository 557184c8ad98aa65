"""Load a target video-LLM from a local checkpoint directory, or refuse with a message naming the fault."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparrow_core.engine.target import TargetModel
from sparrow_core.engine.targets.llava_onevision import LlavaOnevisionTarget
from sparrow_core.engine.targets.qwen_vl import QwenVLTarget

SUPPORTED_ARCHITECTURES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "sparrow-world-target"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as a target; the message says why."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _check_files(path: Path) -> tuple[dict, dict]:
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; load_target expects a checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json")
    config = _read_json(cfg_path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unsupported architecture {model_type!r} in {cfg_path}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
        raise CheckpointError(f"{path} has no safetensors weights (model.safetensors or an index)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (path / name).is_file():
            return config, _read_json(path / name)
    raise CheckpointError(f"{path} has no preprocessor_config.json")


def build_target(model, tokenizer, preprocessor: dict, path: Path | None = None,
                 kv_dtype: torch.dtype | None = None) -> TargetModel:
    """Wrap an already-built transformers model in the adapter for its architecture. `kv_dtype`: the dtype its
    streams keep their KV in (`--kv-dtype`, kv_cache.py; None: the model's), set before any stream opens."""
    model_type = model.config.model_type
    if model_type == "llava_onevision":
        target: TargetModel = LlavaOnevisionTarget(model, tokenizer, preprocessor, path)
    elif model_type in ("qwen2_vl", "qwen2_5_vl"):
        target = QwenVLTarget(model, tokenizer, preprocessor, path)
    else:
        raise CheckpointError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    target.kv_dtype = kv_dtype
    return target


def model_class(model_type: str):
    import transformers

    names = {
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    return getattr(transformers, names[model_type])


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The weights' dtype when none is asked for: fp32 on CPU (bf16 matmuls are slow there), bf16 elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_target(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    kv_dtype: torch.dtype | None = None,
) -> TargetModel:
    """Load a checkpoint directory (config.json, safetensors, tokenizer, preprocessor config).

    `path=None` loads the embedded default model. `dtype=None`: `default_dtype(device)`. The kept hidden states
    and any drafter loaded on it follow the weights' dtype and device; the KV cache too, unless `kv_dtype`
    (`--kv-dtype`) names its own.
    """
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    config, preprocessor = _check_files(path)
    if dtype is None:
        dtype = default_dtype(device)
    cls = model_class(config["model_type"])
    try:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"could not load weights from {path}: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(path)
    return build_target(model.to(device), tokenizer, preprocessor, path, kv_dtype=kv_dtype)
