"""Decoding from a stream: the `Decoder` type and `build_decoders` (decoders.py), AR (ar.py), the
draft-verify loop (speculative.py) with its trees (draft_tree.py), verification (verify.py) and
proposers (proposers/), the drafter network (drafter.py), sampling and counters. Import the modules
directly; this package imports nothing."""
