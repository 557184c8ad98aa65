"""The engine: a target video-LLM behind one interface (checkpoint.py, target.py, targets/), a live
stream over it (stream.py, kv_cache.py, preprocess.py), and the caption layout and turns in a stream
(layout.py, caption_history.py). Import the modules directly; this package imports nothing."""
