"""Seeded, lazy simulation of the procedural world: an endless iterator of ticks."""

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from sparrow_core.world.config import WorldConfig
from sparrow_core.world.director import DirectorMemory, director_step, new_body
from sparrow_core.world.palette import DIRECTIONS
from sparrow_core.world.physics import advance, physics_step
from sparrow_core.world.state import Body, Tick


def initial_scene(rng: np.random.Generator, cfg: WorldConfig, mem: DirectorMemory) -> tuple[list[Body], str]:
    """0..max_objects non-overlapping bodies inside the frame, some moving, and a background."""
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    bodies: list[Body] = []
    for _ in range(int(rng.integers(cfg.max_objects + 1))):
        size = float(rng.uniform(*cfg.size_range))
        for _ in range(20):
            x, y = (float(v) for v in rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, size=2))
            if all(max(abs(x - b.x), abs(y - b.y)) > (size + b.size) / 2 + 0.04 for b in bodies):
                body = new_body(rng, 0.0, bodies, cfg, mem, x, y, size)
                if body is not None:
                    if rng.random() < 0.4:
                        ux, uy = list(DIRECTIONS.values())[int(rng.integers(4))]
                        speed = float(rng.uniform(*cfg.speed_range))
                        stop_at = float(rng.uniform(*cfg.move_duration))
                        body = replace(body, vx=ux * speed, vy=uy * speed, stop_at=stop_at)
                    bodies.append(body)
                break
    return bodies, background


def simulate(seed: int, config: WorldConfig | None = None) -> Iterator[Tick]:
    """Endless ticks k = 0, 1, ... at t = k / ticks_per_second. Same seed -> same ticks.

    Holds only the current state, so an hour of world costs no memory."""
    cfg = config or WorldConfig()
    rng = np.random.default_rng(seed)
    mem = DirectorMemory()
    bodies, background = initial_scene(rng, cfg, mem)
    # drawn only when jittered: the default world's seeds give the worlds they always gave
    lit = float(rng.uniform(1 - cfg.background_jitter, 1 + cfg.background_jitter)) if cfg.background_jitter else 1.0
    dt = 1.0 / cfg.ticks_per_second
    k = 0
    while True:
        t = k / cfg.ticks_per_second
        events = []
        if k > 0:
            bodies = [advance(b, dt, cfg.grow_speed) for b in bodies]
            bodies, ev = physics_step(bodies, t, cfg.collision_shrink)
            for e in ev:
                if e.kind == "leave" and e.obj is not None:
                    mem.recent[(e.obj.colour, e.obj.shape)] = t
            events += ev
        bodies, background, ev = director_step(rng, t, bodies, background, cfg, mem)
        events += ev
        yield Tick(k, t, background, tuple(bodies), tuple(events), lit)
        k += 1
