"""The procedural video world: a seeded simulation of coloured shapes (scene.py), numpy rendering
(render.py), per-segment ground truth (facts.py), a caption language with parser and scorer
(captions.py, caption_parse.py, lexicon.py), a BPE tokenizer (tokenizer.py) and video files (video_io.py).

Entry points: episode.episode / iter_segments / iter_frames, captions.sample_caption / parse_caption /
score_caption, tokenizer.build_tokenizer / load_tokenizer, video_io.write_video / read_video /
write_world_clip."""
