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
