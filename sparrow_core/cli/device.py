"""`--device` and `--dtype`: the one place every command (caption, train, bench, serve) parses them.

    add_device_flags(parser)                  # --device DEVICE, --dtype {float32,bfloat16,float16}
    device, dtype = device_and_dtype(args)    # torch.device, torch.dtype or None (the loader's default)

Commands that run a model in this process also take `--threads` (torch's intra-op threads) and
`--kv-dtype` (the dtype streams keep their KV cache in): `add_run_flags` adds all four and
`apply_run_flags` sets the threads and returns (device, dtype); `kv_dtype(args)` is the parsed
`--kv-dtype`, which the command sets as its target's `kv_dtype` once the model is loaded.

`--kv-dtype bfloat16` under fp32 weights halves the bytes attention reads at long context: keys and values
are stored rounded to bf16 (8 significant bits), attention rounds the query to bf16 and accumulates in
fp32. Greedy speculative decoding stays token-identical to greedy AR with the same KV dtype; against an
fp32 KV the logits move by bf16 rounding (tests/test_text_stack.py).

`--dtype` left out means the checkpoint loader's default for the device (`engine.checkpoint.default_dtype`:
fp32 on CPU, bf16 on an accelerator). A device torch cannot use (no CUDA, a typo) is refused at parse
time with a message naming it, not at the first tensor.
"""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(text: str) -> torch.device:
    """A torch device string ("cpu", "cuda", "cuda:1", ...) that this machine can run, or ValueError."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unknown device {text!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {text!r} asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    return device


def parse_dtype(name: str | None) -> torch.dtype | None:
    """"float32" / "bfloat16" / "float16" -> the torch dtype; None stays None (the loader's default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def add_device_flags(parser: argparse.ArgumentParser, default_device: str = "cpu") -> None:
    """Add --device and --dtype to `parser`."""
    parser.add_argument("--device", default=default_device, help=f"torch device to run on (default {default_device})")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights, KV cache and kept hidden states (default: float32 on CPU, bfloat16 on CUDA)")


def device_and_dtype(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> tuple[torch.device, torch.dtype | None]:
    """The parsed --device and --dtype of `args`; a bad device is a parser error when `parser` is given."""
    try:
        return parse_device(args.device), parse_dtype(args.dtype)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))
        raise  # parser.error exits; this line is never reached


def add_kv_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """Add --kv-dtype to `parser` (a command whose streams run in this process)."""
    parser.add_argument("--kv-dtype", choices=list(DTYPES), default=None,
                        help="the streams' KV cache (default: the model's dtype); bfloat16 under float32 weights "
                             "halves what attention reads, with bf16 rounding of keys, values and the query")


def kv_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The parsed --kv-dtype (None: the model's dtype)."""
    return parse_dtype(args.kv_dtype)


def add_run_flags(parser: argparse.ArgumentParser, default_device: str = "cpu") -> None:
    """Add --threads, --device, --dtype and --kv-dtype to `parser` (a command that runs a model in this process)."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_device_flags(parser, default_device)
    add_kv_dtype_flag(parser)


def apply_run_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[torch.device, torch.dtype | None]:
    """Set torch's threads from --threads (0 leaves torch's default); the parsed --device and --dtype."""
    device_dtype = device_and_dtype(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device_dtype
