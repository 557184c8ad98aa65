"""What the speculative loop asks for a draft tree: the protocol (base.py), a trained drafter with its
per-stream state (drafter.py), prompt lookup (ngram.py)."""
