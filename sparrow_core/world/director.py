"""The random 'director': decides intentional events (enter, leave, appear, vanish, move, stop, grow, shrink,
recolour, background) from a seeded numpy Generator. Physics (bounces, collisions) is in physics.py."""

from dataclasses import dataclass, field, replace

import numpy as np

from sparrow_core.world.config import WorldConfig
from sparrow_core.world.palette import DIRECTION_OF_SIDE, DIRECTIONS, SIDES
from sparrow_core.world.physics import fully_inside, ref
from sparrow_core.world.state import Body, Event

ROOM = 0.12  # a body only starts moving toward a wall that is at least this far away


@dataclass
class DirectorMemory:
    """Mutable bookkeeping owned by one simulation run."""

    next_oid: int = 0
    next_action: float = 0.0
    last_background: float = -1e9
    recent: dict[tuple[str, str], float] = field(default_factory=dict)  # (colour, shape) -> last time seen


def _free_identities(t: float, bodies: list[Body], cfg: WorldConfig, mem: DirectorMemory) -> list[tuple[str, str]]:
    taken = {(b.colour, b.shape) for b in bodies}
    taken |= {k for k, when in mem.recent.items() if t - when < cfg.recent_identity_seconds}
    return [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in taken]


def new_body(rng: np.random.Generator, t: float, bodies: list[Body], cfg: WorldConfig, mem: DirectorMemory,
             x: float, y: float, size: float) -> Body | None:
    """A still, free body with a fresh identity at (x, y); None if every identity is taken."""
    free = _free_identities(t, bodies, cfg, mem)
    if not free:
        return None
    colour, shape = free[int(rng.integers(len(free)))]
    striped = "striped" in cfg.textures and rng.random() < cfg.striped_probability
    texture = "striped" if striped else cfg.textures[0]
    mem.next_oid += 1
    body = Body(mem.next_oid - 1, shape, colour, texture, x, y, 0.0, 0.0, size, size, "free")
    if cfg.hue_jitter > 0 or cfg.brightness_range != (1.0, 1.0):  # drawn only then: the default world is unchanged
        body = replace(body, hue_shift=float(rng.uniform(-cfg.hue_jitter, cfg.hue_jitter)),
                       brightness=float(rng.uniform(*cfg.brightness_range)))
    return body


def _place(rng: np.random.Generator, t: float, bodies: list[Body], cfg: WorldConfig,
           mem: DirectorMemory) -> Body | None:
    """A still body with a fresh identity at a free spot fully inside the frame; None when none was found."""
    size = float(rng.uniform(*cfg.size_range))
    for _ in range(10):
        x, y = (float(v) for v in rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, size=2))
        if all(max(abs(x - b.x), abs(y - b.y)) > (size + b.size) / 2 + 0.04 for b in bodies):
            return new_body(rng, t, bodies, cfg, mem, x, y, size)
    return None


def _room(body: Body, direction: str) -> float:
    """Free distance between the body and the wall in `direction`."""
    h = body.size / 2
    return {"left": body.x - h, "right": 1 - h - body.x, "up": body.y - h, "down": 1 - h - body.y}[direction]


def _gap(a: Body, b: Body) -> float:
    """Chebyshev gap between two boxes (negative when they overlap)."""
    half = (a.size + b.size) / 2
    return max(abs(a.x - b.x) - half, abs(a.y - b.y) - half)


def _spawn(rng: np.random.Generator, t: float, bodies: list[Body], cfg: WorldConfig,
           mem: DirectorMemory) -> Body | None:
    """A body just outside a random side, moving in; None when no free lane was found."""
    side = list(SIDES)[int(rng.integers(4))]
    size = float(rng.uniform(*cfg.size_range))
    speed = float(rng.uniform(*cfg.speed_range))
    ux, uy = SIDES[side]
    for _ in range(6):
        lateral = float(rng.uniform(size / 2 + 0.03, 1 - size / 2 - 0.03))
        depth = -size / 2  # centre distance in from the side: just touching the edge
        x = 1 - depth if ux > 0 else (depth if ux < 0 else lateral)
        y = 1 - depth if uy > 0 else (depth if uy < 0 else lateral)
        blocked = False
        for b in bodies:
            along = abs(b.y - y) if ux else abs(b.x - x)  # lateral distance
            into = (b.x if ux < 0 else 1 - b.x) if ux else (b.y if uy < 0 else 1 - b.y)  # depth of b
            if along < (b.size + size) / 2 + 0.03 and into < size + b.size + 0.25:
                blocked = True
        if not blocked:
            body = new_body(rng, t, bodies, cfg, mem, x, y, size)
            if body is None:
                return None
            glide = size / speed + float(rng.uniform(*cfg.glide_after_enter))
            return replace(body, vx=-ux * speed, vy=-uy * speed, phase="entering", side=side, stop_at=t + glide)
    return None


def _options(t: float, bodies: list[Body], background: str, cfg: WorldConfig,
             mem: DirectorMemory) -> list[tuple[float, str, int]]:
    """(weight, action, body index) for every action possible now; index -1 for global actions."""
    n = len(bodies)
    opts: list[tuple[float, str, int]] = []
    if n < cfg.max_objects:
        opts.append((4.0 if n == 0 else 1.4, "enter", -1))
        opts.append((cfg.appear_weight * (2.0 if n == 0 else 1.0), "appear", -1))
    if len(cfg.backgrounds) > 1 and t - mem.last_background >= cfg.background_gap:
        opts.append((0.25, "background", -1))
    lo, hi = cfg.size_limits
    for i, b in enumerate(bodies):
        if b.phase != "free" or not fully_inside(b):
            continue
        still = b.direction() == "still"
        leave_w = (1.4 if n == cfg.max_objects else 0.7) * (1.0 if still else 0.8)
        opts += [
            (1.2 if still else 0.5, "move", i),
            (0.0 if still else 0.6, "stop", i),
            (0.4, "recolour", i),
            (0.45 if b.size * cfg.grow_factor <= hi + 0.02 else 0.0, "grow", i),
            (0.45 if b.size / cfg.grow_factor >= lo - 0.02 else 0.0, "shrink", i),
            (leave_w, "leave", i),
            (cfg.vanish_weight, "vanish", i),
        ]
    return [o for o in opts if o[0] > 0]


def _apply(rng: np.random.Generator, action: str, i: int, t: float, bodies: list[Body], background: str,
           cfg: WorldConfig, mem: DirectorMemory) -> tuple[list[Body], str, list[Event], bool]:
    """Carry out one action; the flag is False when it turned out impossible (nothing changed)."""
    bodies = list(bodies)
    if action == "enter":
        body = _spawn(rng, t, bodies, cfg, mem)
        if body is None:
            return bodies, background, [], False
        bodies.append(body)
        return bodies, background, [Event(t, "enter", ref(body), body.side),
                                    Event(t, "count", None, str(len(bodies)))], True
    if action == "appear":
        body = _place(rng, t, bodies, cfg, mem)
        if body is None:
            return bodies, background, [], False
        bodies.append(body)
        return bodies, background, [Event(t, "appear", ref(body)), Event(t, "count", None, str(len(bodies)))], True
    if action == "background":
        choices = [c for c in cfg.backgrounds if c != background]
        new = choices[int(rng.integers(len(choices)))]
        mem.last_background = t
        return bodies, new, [Event(t, "background", None, new, before=background)], True
    b = bodies[i]
    if action == "move":
        dirs = [d for d in DIRECTIONS if d != b.direction() and _room(b, d) >= ROOM]
        if not dirs:
            return bodies, background, [], False
        d = dirs[int(rng.integers(len(dirs)))]
        speed = float(rng.uniform(*cfg.speed_range))
        ux, uy = DIRECTIONS[d]
        stop_at = t + float(rng.uniform(*cfg.move_duration))
        bodies[i] = replace(b, vx=ux * speed, vy=uy * speed, stop_at=stop_at)
        return bodies, background, [Event(t, "move", ref(b), d)], True
    if action == "stop":
        bodies[i] = replace(b, vx=0.0, vy=0.0)
        return bodies, background, [Event(t, "stop", ref(b))], True
    if action in ("grow", "shrink"):
        lo, hi = cfg.size_limits
        target = min(b.size * cfg.grow_factor, hi) if action == "grow" else max(b.size / cfg.grow_factor, lo)
        if abs(target - b.size) < 3 / 64:
            return bodies, background, [], False
        if action == "grow" and any(_gap(b, o) < (target - b.size) / 2 + 0.03 for o in bodies if o is not b):
            return bodies, background, [], False
        bodies[i] = replace(b, target_size=target)
        return bodies, background, [Event(t, action, ref(b))], True
    if action == "recolour":
        free = {c for c, s in _free_identities(t, bodies, cfg, mem) if s == b.shape}
        choices = [c for c in cfg.colours if c in free and c != b.colour]
        if not choices:
            return bodies, background, [], False
        new = choices[int(rng.integers(len(choices)))]
        mem.recent[(b.colour, b.shape)] = t
        bodies[i] = replace(b, colour=new)
        return bodies, background, [Event(t, "recolour", ref(b), new, before=b.colour)], True
    if action == "vanish":
        mem.recent[(b.colour, b.shape)] = t
        del bodies[i]
        return bodies, background, [Event(t, "vanish", ref(b)), Event(t, "count", None, str(len(bodies)))], True
    if action == "leave":
        room = {s: _room(b, DIRECTION_OF_SIDE[s]) for s in SIDES}
        side = min(room, key=room.get) if rng.random() < 0.7 else list(SIDES)[int(rng.integers(4))]
        d = DIRECTION_OF_SIDE[side]
        speed = float(rng.uniform(*cfg.speed_range))
        ux, uy = DIRECTIONS[d]
        bodies[i] = replace(b, vx=ux * speed, vy=uy * speed, phase="leaving", side=side, stop_at=float("inf"))
        events = [Event(t, "move", ref(b), d)] if d != b.direction() else []  # already heading there: no event
        return bodies, background, events, True
    raise ValueError(action)


def director_step(rng: np.random.Generator, t: float, bodies: list[Body], background: str, cfg: WorldConfig,
                  mem: DirectorMemory) -> tuple[list[Body], str, list[Event]]:
    """Automatic stops of bodies whose move ran out, then maybe one intentional event at time t.
    Draws from rng on every tick (deterministic stream)."""
    stops = []
    for i, b in enumerate(bodies):
        if t >= b.stop_at and b.phase == "free" and fully_inside(b) and b.direction() != "still":
            bodies = bodies[:i] + [replace(b, vx=0.0, vy=0.0, stop_at=float("inf"))] + bodies[i + 1:]
            stops.append(Event(t, "stop", ref(b)))
    if stops:
        mem.next_action = max(mem.next_action, t + cfg.min_gap / 2)
    bodies, background, events = _director_choice(rng, t, bodies, background, cfg, mem)
    return bodies, background, stops + events


def _director_choice(rng: np.random.Generator, t: float, bodies: list[Body], background: str,
                     cfg: WorldConfig, mem: DirectorMemory) -> tuple[list[Body], str, list[Event]]:
    draw = rng.random()
    if t < mem.next_action or draw >= cfg.action_rate / cfg.ticks_per_second:
        return bodies, background, []
    opts = _options(t, bodies, background, cfg, mem)
    if not opts:
        return bodies, background, []
    w = np.array([o[0] for o in opts])
    _, action, i = opts[int(rng.choice(len(opts), p=w / w.sum()))]
    bodies, background, events, done = _apply(rng, action, i, t, bodies, background, cfg, mem)
    if done:
        mem.next_action = t + cfg.min_gap
    return bodies, background, events
