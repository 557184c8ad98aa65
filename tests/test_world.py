"""The procedural world: determinism, laziness, rendering, facts vs frames, captions, parser,
tokenizer and video IO."""

import gc
import inspect
import itertools
import json
import time
import weakref
from collections import defaultdict

import numpy as np
import pytest

from sparrow_core.world.captions import parse_caption, sample_caption, score_caption, word_f1
from sparrow_core.world.episode import episode, iter_frames, iter_segments
from sparrow_core.world.facts import Fact, Reference, caption_facts, reference_supported
from sparrow_core.world.palette import BACKGROUNDS, COLOURS, SHAPES
from sparrow_core.world.render import render_frame
from sparrow_core.world.state import Body
from sparrow_core.world.video_io import main as video_cli
from sparrow_core.world.video_io import read_video, resample_latest, write_video


@pytest.fixture(scope="module")
def segments():
    """Facts-only segments of a few worlds (no rendering): ~45 min of world."""
    return [s for seed in (1, 2, 3) for s in iter_segments(seed, seconds=900, render=False)]


def _body(shape: str, colour: str = "red", x: float = 0.5, y: float = 0.5, size: float = 0.35,
          texture: str = "plain") -> Body:
    return Body(0, shape, colour, texture, x, y, 0.0, 0.0, size, size, "free")


# --- simulation and rendering -------------------------------------------------------------

def test_same_seed_same_world_and_different_seed_differs():
    a, b, c = episode(3, 20.0), episode(3, 20.0), episode(4, 20.0)
    assert np.array_equal(a.frames, b.frames)
    assert a.events == b.events and len(a.events) > 0
    assert [s.caption for s in a.segments] == [s.caption for s in b.segments]
    assert not np.array_equal(a.frames, c.frames)
    assert a.events != c.events


def test_episode_layout():
    ep = episode(5, 10.0, fps=2.0, size=48, segment_seconds=4.0)
    assert ep.frames.shape == (20, 48, 48, 3) and ep.frames.dtype == np.uint8
    np.testing.assert_allclose(ep.times, np.arange(20) / 2.0)
    assert [(s.t0, s.t1) for s in ep.segments] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    assert [len(s.frames) for s in ep.segments] == [8, 8, 4]
    for s in ep.segments:
        assert np.shares_memory(s.frames, ep.frames)
        assert all(s.t0 <= t < s.t1 for t in s.times)
        assert all(s.t0 <= e.t < s.t1 for e in s.facts.events)
        assert s.caption == s.caption.lower() and 3 <= len(s.caption.split()) <= 45
    big = episode(5, 2.0, fps=2.0, size=256)
    assert big.frames.shape == (4, 256, 256, 3)


def test_an_hour_streams_without_being_held():
    frames = iter_frames(11, fps=2.0, seconds=3600.0)
    assert inspect.isgenerator(frames)
    refs, n, last = [], 0, -1.0
    for frame, t in frames:
        assert t > last
        last = t
        if n % 600 == 0:
            refs.append(weakref.ref(frame))
        n += 1
    del frame
    gc.collect()
    assert n == 7200 and last == pytest.approx(3599.5)
    assert all(r() is None for r in refs), "iter_frames kept old frames alive"


def test_shapes_are_distinct_and_coloured():
    masks = {}
    for shape in SHAPES:  # at the smallest size, 14 px
        img = render_frame("black", [_body(shape, size=14 / 64)], 64, 64)
        mask = np.all(img == COLOURS["red"], axis=-1)
        assert 80 < mask.sum() <= 14 * 14, shape
        masks[shape] = mask
    for a, b in itertools.combinations(SHAPES, 2):
        differ = (masks[a] ^ masks[b]).sum()
        assert differ >= 0.2 * min(masks[a].sum(), masks[b].sum()), (a, b, differ)
    striped = render_frame("white", [_body("square", "blue", texture="striped")], 64, 64)
    assert len({tuple(p) for p in striped.reshape(-1, 3)}) == 3  # background, colour, dark stripes
    assert np.all(render_frame("gray", [], 8, 8) == BACKGROUNDS["gray"])


def test_render_speed_is_sane():
    ticks = [tk for tk in itertools.islice(iter_ticks(6), 4000) if tk.bodies][:500]
    start = time.perf_counter()
    for tk in ticks:
        render_frame(tk.background, tk.bodies, 64, 64)
    fps = len(ticks) / (time.perf_counter() - start)
    assert fps > 300, fps  # ~8000 fps measured on one core; loose bound for a busy 2-core box


def iter_ticks(seed: int, config=None):
    from sparrow_core.world.scene import simulate

    return simulate(seed, config)


def _centroid(frame: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray | None:
    ys, xs = np.nonzero(np.all(frame == rgb, axis=-1))
    return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])


def test_motion_facts_match_the_pixels():
    """Where a caption says an object moves <dir> (and nothing else about it), its pixels move that way;
    where it says the object stays still, its pixels stay put."""
    checked = defaultdict(int)
    for seed in (21, 22, 23):
        for seg in iter_segments(seed, seconds=240.0, fps=2.0, size=64):
            cf = caption_facts(seg.facts)
            colours = [o.colour for o in seg.facts.objects]
            for o in seg.facts.objects:
                mine = [f for f in cf.facts if o.key in (f.obj, f.other)]
                if len(mine) != 1 or colours.count(o.colour) != 1 or o.texture != "plain":
                    continue
                if len(o.colours) > 1 or mine[0].kind not in ("move", "still"):
                    continue
                cs = [_centroid(f, COLOURS[o.colour]) for f in seg.frames]
                if any(c is None for c in cs):
                    continue
                shift = cs[-1] - cs[0]
                # unstated motion moves < MIN_SHIFT_PX (3 px) inside the frames
                if mine[0].kind == "still":
                    assert np.abs(shift).max() <= 3.5, (seed, seg.index, o, shift)
                else:
                    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[mine[0].detail]
                    assert sign * shift[axis] >= 1.5 and abs(shift[1 - axis]) <= 3.5, (seed, seg.index, o, shift)
                checked[mine[0].kind] += 1
    assert checked["move"] >= 5 and checked["still"] >= 5, dict(checked)


def test_counts_and_statements_are_consistent(segments):
    kinds = set()
    for seg in segments:
        cf = caption_facts(seg.facts)
        kinds |= {f.kind for f in cf.facts}
        arrivals = sum(f.kind in ("enter", "appear") for f in cf.facts)
        departures = sum(f.kind in ("leave", "vanish") for f in cf.facts)
        assert seg.facts.count_end - seg.facts.count_start == arrivals - departures
        assert cf.count == seg.facts.count_end <= 3
        ts = [s.t for s in seg.facts.statements]
        # what the frames show (2 fps): after the previous segment's last frame, up to this one's last frame
        assert ts == sorted(ts) and all(seg.t0 - 0.5 < t <= seg.t1 - 0.5 + 1e-9 for t in ts)
    assert kinds >= {"enter", "leave", "move", "stop", "still", "bounce", "collide", "grow", "shrink",
                     "recolour", "background", "empty"}


# --- captions -----------------------------------------------------------------------------

def test_every_sampled_caption_parses_back_to_its_facts(segments):
    rng = np.random.default_rng(0)
    words, lengths = set(), []
    for seg in segments[::3]:
        truth = caption_facts(seg.facts)
        for _ in range(8):
            text = sample_caption(seg.facts, rng)
            assert parse_caption(text) == truth, (text, sorted(truth.facts))
            words |= set(text.replace(",", " ").replace(";", " ").replace(".", " ").split())
            lengths.append(len(text.split()))
    assert len(words) <= 300, len(words)
    assert 10 <= np.median(lengths) <= 25 and np.percentile(lengths, 95) <= 32


def test_captions_vary_for_the_same_facts(segments):
    rng = np.random.default_rng(1)
    busy = [s for s in segments if len(s.facts.statements) >= 2][:40]
    assert len(busy) == 40
    for seg in busy:
        variants = {sample_caption(seg.facts, rng) for _ in range(6)}
        assert len(variants) >= 4, variants


def test_captions_need_the_frames(segments):
    """Same text context (the previous segment's facts), different frames -> different facts and words."""
    by_context = defaultdict(set)
    for prev, seg in zip(segments, segments[1:]):
        if prev.facts.index + 1 == seg.facts.index:
            by_context[caption_facts(prev.facts)].add(caption_facts(seg.facts))
    common = [outs for outs in by_context.values() if len(outs) >= 2]
    assert len(common) >= 20
    # and a caption of one segment is (almost) never a correct caption of another
    rng = np.random.default_rng(2)
    a, b = segments[10], segments[11]
    assert caption_facts(a.facts) != caption_facts(b.facts)
    assert score_caption(sample_caption(a.facts, rng), b.facts)["exact"] == 0.0


@pytest.mark.parametrize("text, facts, count", [
    ("the red circle that entered earlier now moves down", {Fact("move", ("red", "circle"), "down")}, 1),
    ("nothing changes; the blue square stays in the middle", {Fact("still", ("blue", "square"))}, 1),
    ("a small striped green cross comes in from the top and stops, leaving two shapes on screen",
     {Fact("enter", ("green", "cross"), "top"), Fact("stop", ("green", "cross"))}, 2),
    ("the pink disc turns yellow; the yellow ball and the blue box bump into each other",
     {Fact("recolour", ("pink", "circle"), "yellow"),
      Fact("collide", ("blue", "square"), None, ("pink", "circle"))}, 2),
    ("the orange triangle hits the left edge and bounces back, then it slides out to the top",
     {Fact("bounce", ("orange", "triangle"), "left"), Fact("leave", ("orange", "triangle"), "top")}, 0),
    ("the background turns white. nothing but a white background", {Fact("background", None, "white"),
                                                                    Fact("empty", None, "white")}, 0),
])
def test_parse_handwritten_captions(text, facts, count):
    got = parse_caption(text)
    assert got.facts == frozenset(facts) and got.count == count


@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_a_segment_states_only_what_its_frames_show(fps):
    """An event between two frames belongs to the segment of the later frame; motion after a segment's last
    frame is not stated in it (at 1 fps the last frame of [4, 8) is at 7 s)."""
    segs = list(iter_segments(8, seconds=200.0, fps=fps))
    for seg in segs:
        first, last = seg.times[0], seg.times[-1]
        assert all(first - 1 / fps < e.t <= last + 1e-9 for e in seg.facts.events), seg.index
    late = [e for seg in segs for e in seg.facts.events if e.t > seg.t1 - 1 / fps + 1e-9]
    assert not late
    moved = [e for seg in segs for e in seg.facts.events if e.t < seg.t0]
    assert moved, "no event fell between two segments' frames in 200 s"


@pytest.mark.parametrize("text, reference", [
    ("the yellow square that was blue before now stays in place",
     Reference(("yellow", "square"), "recolour", "blue")),
    ("the green cross that shrank earlier moves left", Reference(("green", "cross"), "shrink")),
    ("the red box that came in from the left earlier now halts", Reference(("red", "square"), "enter", "left")),
    ("the pink disc that grew earlier rests", Reference(("pink", "circle"), "grow")),
    ("the cyan plus that popped up earlier slides up", Reference(("cyan", "cross"), "appear")),
])
def test_parse_reads_references_to_the_past(text, reference):
    got = parse_caption(text)
    assert got.references == (reference,)
    assert len(got.facts) == 1 and next(iter(got.facts)).obj == reference.obj  # the clause states no fact


@pytest.mark.parametrize("start_seconds", [0.0, 30.0, 61.0])
def test_captions_refer_only_to_events_in_their_stream(start_seconds):
    """A stream cut mid-world (as training cuts them) never refers to what happened before its start."""
    from sparrow_core.train.data import WorldStreamSpec, world_segments

    refs = 0
    for seed in range(40):
        spec = WorldStreamSpec(seed=seed, segments=6, fps=1.0, start_seconds=start_seconds)
        segs = world_segments(spec, np.random.default_rng(seed))
        for i, seg in enumerate(segs):
            for ref in parse_caption(seg.caption).references:
                refs += 1
                context = [s.segment.facts for s in segs[:i + 1]]
                assert reference_supported(ref, seg.segment.facts, context), (seed, i, seg.caption)
            if i == 0:
                assert not parse_caption(seg.caption).references
    assert refs >= 10, refs


def test_camera_world_is_deterministic_and_shows_what_it_says():
    from sparrow_core.world.config import CAMERA_WORLD

    a = episode(12, 120.0, fps=1.0, size=(72, 128), config=CAMERA_WORLD)
    b = episode(12, 120.0, fps=1.0, size=(72, 128), config=CAMERA_WORLD)
    assert a.frames.shape == (120, 72, 128, 3) and np.array_equal(a.frames, b.frames)
    assert a.events == b.events and [s.caption for s in a.segments] == [s.caption for s in b.segments]
    assert not np.array_equal(a.frames, episode(13, 120.0, fps=1.0, size=(72, 128), config=CAMERA_WORLD).frames)
    segs = [s for seed in range(20, 30) for s in iter_segments(seed, 240.0, 1.0, render=False, config=CAMERA_WORLD)]
    kinds = {f.kind for s in segs for f in caption_facts(s.facts).facts}
    assert {"appear", "vanish", "enter", "leave"} <= kinds
    rng = np.random.default_rng(3)
    for seg in segs[::4]:
        truth = caption_facts(seg.facts)
        assert truth.count == seg.facts.count_end
        text = sample_caption(seg.facts, rng)
        assert parse_caption(text) == truth, (text, sorted(truth.facts))
    tints = {(b.hue_shift, b.brightness) for tk in itertools.islice(iter_ticks(5, CAMERA_WORLD), 2000) for b in tk.bodies}
    assert len(tints) >= 3 and all(abs(h) <= CAMERA_WORLD.hue_jitter for h, _ in tints)


def test_isotropic_shapes_stay_round_on_a_wide_frame():
    img = render_frame("black", [_body("circle", size=0.5)], 72, 128, isotropic=True)
    ys, xs = np.nonzero(np.all(img == COLOURS["red"], axis=-1))
    assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 1
    squashed = render_frame("black", [_body("circle", size=0.5)], 72, 128)
    ys, xs = np.nonzero(np.all(squashed == COLOURS["red"], axis=-1))
    assert xs.max() - xs.min() > 1.5 * (ys.max() - ys.min())


def test_parse_reads_optional_details():
    got = parse_caption("the big purple rhombus with stripes sits in the top left corner")
    assert got.attributes[("purple", "diamond")] == {"size": "large", "texture": "striped", "region": "top left"}


def test_score_caption():
    truth = parse_caption("the red circle moves left; the blue square stays still")
    perfect = score_caption("the blue box does not move, and the red ball drifts to the left", truth)
    assert all(v == 1.0 for v in perfect.values())
    wrong_dir = score_caption("the red circle moves right; the blue square stays still", truth)
    assert wrong_dir["motion"] < 1.0 and wrong_dir["colour"] == wrong_dir["shape"] == wrong_dir["count"] == 1.0
    wrong_colour = score_caption("the green circle moves left; the blue square stays still", truth)
    assert wrong_colour["colour"] < 1.0 and wrong_colour["shape"] == 1.0 and wrong_colour["exact"] == 0.0
    wrong_count = score_caption("the red circle moves left", truth)
    assert wrong_count["count"] == 0.0 and wrong_count["object"] == 0.5
    assert score_caption("", truth)["facts"] == 0.0
    ref = score_caption("the red circle moves left", truth, reference="the red circle moves left")
    assert ref["word_f1"] == 1.0
    assert word_f1("a b c d", "a b x y") == pytest.approx(0.5)
    assert word_f1("red", "blue") == 0.0


# --- tokenizer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from sparrow_core.world.tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"), seed=0, segments=300)


def test_tokenizer_loads_offline_and_round_trips(tokenizer_dir, segments, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from sparrow_core.world.tokenizer import SPECIAL_TOKENS

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.is_fast and 300 < len(tok) <= 1024
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    ids = tok("<|im_start|>assistant\n")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "assistant", "Ċ"]
    rng = np.random.default_rng(3)
    for seg in segments[:60]:
        text = sample_caption(seg.facts, rng)
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and len(ids) <= 1.6 * len(text.split()) + 4
    assert tok.decode(tok("<video>\n<image> x\n\n<|im_end|>")["input_ids"]) == "<video>\n<image> x\n\n<|im_end|>"
    # the streaming layout (engine/layout.py): the instruction once, each clip after its user turn
    video_turn = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}
    msgs = [video_turn, {"role": "assistant", "content": "a red circle enters from the left"}, video_turn]
    chat = tok.apply_chat_template(msgs, tokenize=False)
    assert chat == ("<|im_start|>user\ndescribe the video.<|im_end|>\n<video>"
                    "<|im_start|>assistant\na red circle enters from the left<|im_end|>\n<video>")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<video><|im_start|>assistant\n")
    assert tok.decode(tok(chat)["input_ids"]) == chat


def test_tokenizer_is_deterministic(tokenizer_dir, tmp_path):
    from sparrow_core.world.tokenizer import build_tokenizer

    again = build_tokenizer(tmp_path, seed=0, segments=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes()


# --- video IO -----------------------------------------------------------------------------

def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """mask [N, H, W] -> pixels whose (2r+1)^2 neighbourhood is all in mask."""
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(mask, (dy, dx), axis=(1, 2))
    return out


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".y4m"])
def test_video_round_trip(suffix, tmp_path):
    ep = episode(7, 6.0, fps=10.0, size=64)
    path = tmp_path / f"clip{suffix}"
    assert write_video(path, iter(ep.frames), fps=10) == 60
    back = list(read_video(path))
    frames = np.stack([f for f, _ in back])
    times = np.array([t for _, t in back])
    assert frames.shape == ep.frames.shape and frames.dtype == np.uint8
    assert np.all(np.diff(times) > 0)
    np.testing.assert_allclose(times, np.arange(60) / 10.0, atol=1e-3)
    err = np.abs(frames.astype(np.int16) - ep.frames.astype(np.int16))
    assert err.mean() < 5 and np.median(err) <= 3
    palette = {**COLOURS, **BACKGROUNDS}
    seen = 0
    for name, rgb in palette.items():  # flat areas (2 px inside their edges) keep their colour
        inner = _erode(np.all(ep.frames == rgb, axis=-1), 2)
        if inner.sum() < 50:
            continue
        seen += 1
        assert err[inner].max() <= 25 and np.percentile(err[inner], 90) <= 8, name
        mean = frames[inner].mean(axis=0)
        assert min(palette, key=lambda c: np.abs(np.array(palette[c]) - mean).sum()) == name
    assert seen >= 2
    sampled = list(read_video(path, fps=2.0, size=(32, 48)))
    assert [round(t, 3) for _, t in sampled] == [k / 2 for k in range(12)]
    assert sampled[0][0].shape == (32, 48, 3)


def test_resample_latest_keeps_the_newest_frame_per_tick():
    items = [(i, i / 30) for i in range(61)]  # 30 fps, 2 s inclusive
    assert [t for _, t in resample_latest(items, 2.0)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    jittery = [("a", 0.0), ("b", 0.3), ("c", 0.45), ("d", 0.7), ("e", 1.6), ("f", 1.7)]
    assert [x for x, _ in resample_latest(jittery, 2.0)] == ["a", "c", "d"]  # f (1.7) < tick 2.0 = end


def test_cli_writes_clip_and_ground_truth(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    video_cli(["--seed", "3", "--seconds", "4", "--fps", "5", "--size", "64", str(out)])
    truth = json.loads(out.with_suffix(".json").read_text())
    assert truth["frames"] == 20 and len(truth["segments"]) == 1
    assert truth["segments"][0]["caption"] in capsys.readouterr().out
    assert truth["segments"][0]["facts"]["caption_facts"]["count"] == truth["segments"][0]["facts"]["count_end"]
    assert len(list(read_video(out))) == 20
