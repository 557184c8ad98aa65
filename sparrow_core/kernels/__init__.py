"""Attention kernels for the speculative-decoding hot path (one concept per file):

reference.py        the semantics, in PyTorch (explicit fp32 math, and SDPA with enable_gqa)
tree_verify.py      Triton split-K tree attention: Q tree queries over a long KV cache (target verify)
draft_attention.py  Triton single-pass tree attention for prefixes that fit one split (short KV)
runtime.py          compiled vs interpreted launch, autotune switch, shared host-side helpers
dispatch.py         `tree_attention` (backend choice) and the transformers attention function

Import the modules directly; importing this package stays cheap.
"""
