"""Stage 1 of target training: the labelled scenes the vision tower learns from."""

from __future__ import annotations

import numpy as np

from sparrow_core.train.target import CONTENT_WORDS
from sparrow_core.train.vision import sample_scenes, scene_words
from sparrow_core.world.palette import BACKGROUNDS, COLOURS, size_word

SCENES = 40
SIZE = 64


def test_scenes_are_seeded_and_labelled_with_what_they_show() -> None:
    frames, labels, bodies = sample_scenes(np.random.default_rng([0, 1]), SCENES, CONTENT_WORDS, SIZE)
    again, labels_again, _ = sample_scenes(np.random.default_rng([0, 1]), SCENES, CONTENT_WORDS, SIZE)
    assert frames.shape == (SCENES, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, again) and labels.equal(labels_again)
    assert {len(b) for b in bodies} >= {0, 1, 2}  # empty scenes, single objects and crowds all occur
    for frame, row, scene in zip(frames, labels, bodies):
        named = {CONTENT_WORDS[i] for i in row.nonzero().flatten().tolist()}
        background = [w for w in named if w in BACKGROUNDS]
        assert len(background) == 1  # exactly one background, and it is the corner pixel's colour
        assert tuple(frame[0, 0]) == BACKGROUNDS[background[0]]
        assert named == set(scene_words(scene, background[0]))
        for body in scene:  # each object is drawn in its colour (plain) or its colour and a darker stripe
            assert {body.shape, body.texture, size_word(body.size), body.colour} <= named
            assert (frame.reshape(-1, 3) == COLOURS[body.colour]).all(-1).any()
