"""Knobs of the procedural world simulation."""

from dataclasses import dataclass

from sparrow_core.world.palette import BACKGROUNDS, COLOURS, SHAPES, TEXTURES


@dataclass(frozen=True)
class WorldConfig:
    """All lengths are fractions of the frame width/height (the world is the unit square)."""

    ticks_per_second: int = 20  # simulation step; events happen on ticks
    max_objects: int = 3
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    textures: tuple[str, ...] = TEXTURES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    striped_probability: float = 0.25
    size_range: tuple[float, float] = (14 / 64, 24 / 64)  # initial object extent
    size_limits: tuple[float, float] = (11 / 64, 28 / 64)  # grow/shrink stay inside
    grow_factor: float = 1.4
    grow_speed: float = 0.12  # extent change per second while growing or shrinking
    speed_range: tuple[float, float] = (0.09, 0.16)  # per second
    action_rate: float = 0.3  # director decisions per second once min_gap has passed
    min_gap: float = 1.2  # seconds between two intentional events
    move_duration: tuple[float, float] = (1.5, 4.5)  # a started move stops by itself after this long
    glide_after_enter: tuple[float, float] = (0.3, 2.5)  # seconds an entered body keeps moving once inside
    background_gap: float = 12.0  # seconds between two background changes
    recent_identity_seconds: float = 12.0  # a (colour, shape) pair is not reused this soon
    collision_shrink: float = 0.85  # boxes collide when they overlap by this much of their extent
    # a world closer to a camera (all off by default: the default world's seeds give the worlds they always gave)
    appear_weight: float = 0.0  # director weight of "a new object appears in place" (no edge entry)
    vanish_weight: float = 0.0  # director weight of "an object vanishes in place"
    hue_jitter: float = 0.0  # degrees: each object's hue is its palette hue +- this (names stay unambiguous)
    brightness_range: tuple[float, float] = (1.0, 1.0)  # each object's brightness factor
    background_jitter: float = 0.0  # the background's brightness factor is 1 +- this (per world)
    isotropic_shapes: bool = False  # shapes keep their form in pixels on any aspect ratio (a circle stays round)


# A world closer to a camera: objects also appear and vanish in place, colours and sizes jitter beyond the
# palette, shapes are drawn round in pixels whatever the frame's aspect ratio. With CAMERA_FRAME_SIZES and
# CAMERA_FPS it is what training mixes in and what the accuracy benchmark's robustness row draws.
CAMERA_WORLD = WorldConfig(
    appear_weight=0.5, vanish_weight=0.35, hue_jitter=8.0, brightness_range=(0.72, 1.15), background_jitter=0.2,
    size_range=(10 / 64, 27 / 64), size_limits=(9 / 64, 30 / 64), isotropic_shapes=True,
)
CAMERA_FRAME_SIZES: tuple[tuple[int, int], ...] = (  # (height, width): square, landscape and portrait
    (48, 48), (64, 64), (96, 96), (72, 128), (90, 160), (120, 160), (128, 96), (64, 112),
)
CAMERA_FPS: tuple[float, ...] = (0.5, 1.0, 2.0)
