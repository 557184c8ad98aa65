"""Deterministic motion of bodies: advance, walls, phases, collisions. No randomness here."""

from dataclasses import replace

from sparrow_core.world.state import Body, Event, ObjRef


def ref(body: Body) -> ObjRef:
    return ObjRef(body.oid, body.colour, body.shape)


def advance(body: Body, dt: float, grow_speed: float) -> Body:
    """The body dt seconds later, assuming no event in between (linear motion, linear growth)."""
    step = grow_speed * dt
    size = min(body.target_size, body.size + step) if body.target_size > body.size else max(
        body.target_size, body.size - step
    )
    return replace(body, x=body.x + body.vx * dt, y=body.y + body.vy * dt, size=size)


def fully_inside(body: Body) -> bool:
    h = body.size / 2
    return h <= body.x <= 1 - h and h <= body.y <= 1 - h


def fully_outside(body: Body) -> bool:
    h = body.size / 2
    return body.x + h <= 0 or body.x - h >= 1 or body.y + h <= 0 or body.y - h >= 1


def _wall(body: Body, t: float, axis: str, low_side: str, high_side: str) -> tuple[Body, list[Event]]:
    """walls() along one axis ("x" or "y"): positions are in [0, 1], `low_side` is the edge at 0."""
    h = body.size / 2
    pos, vel_name = getattr(body, axis), "v" + axis
    vel = getattr(body, vel_name)
    if pos - h < 0:
        if vel < 0:
            body = replace(body, **{axis: body.size - pos, vel_name: -vel})
            return body, [Event(t, "bounce", ref(body), low_side)]
        if vel == 0:
            body = replace(body, **{axis: h})
    elif pos + h > 1:
        if vel > 0:
            body = replace(body, **{axis: 2 - body.size - pos, vel_name: -vel})
            return body, [Event(t, "bounce", ref(body), high_side)]
        if vel == 0:
            body = replace(body, **{axis: 1 - h})
    return body, []


def walls(body: Body, t: float) -> tuple[Body, list[Event]]:
    """Reflect a free body off the frame edges (velocity pointing out), or clamp it when it has no
    velocity along that axis (growth pushed it out)."""
    if body.phase != "free":
        return body, []
    body, x_events = _wall(body, t, "x", "left", "right")
    body, y_events = _wall(body, t, "y", "top", "bottom")
    return body, x_events + y_events


def phases(bodies: list[Body], t: float) -> tuple[list[Body], list[Event]]:
    """entering -> free once fully inside; leaving bodies that are fully outside are removed."""
    kept, events = [], []
    for b in bodies:
        if b.phase == "entering" and fully_inside(b):
            b = replace(b, phase="free", side="")
        if b.phase == "leaving" and fully_outside(b):
            events.append(Event(t, "leave", ref(b), b.side))
            continue
        kept.append(b)
    if len(kept) != len(bodies):
        events.append(Event(t, "count", None, str(len(kept))))
    return kept, events


REVERSED_LEAVER_STOPS_AFTER = 1.5  # seconds


def _reverse(body: Body, t: float) -> Body:
    body = replace(body, vx=-body.vx, vy=-body.vy)
    if body.phase == "entering":  # pushed back out the way it came
        return replace(body, phase="leaving")
    if body.phase == "leaving":  # pushed back in: an ordinary body again
        return replace(body, phase="free", side="", stop_at=t + REVERSED_LEAVER_STOPS_AFTER)
    return body


def collisions(bodies: list[Body], t: float, shrink: float) -> tuple[list[Body], list[Event]]:
    """Axis-aligned boxes that overlap and approach: each body moving toward the other reverses."""
    bodies = list(bodies)
    events = []
    for i in range(len(bodies)):
        for j in range(i + 1, len(bodies)):
            a, b = bodies[i], bodies[j]
            dx, dy = b.x - a.x, b.y - a.y
            reach = (a.size + b.size) / 2 * shrink
            if abs(dx) >= reach or abs(dy) >= reach:
                continue
            if (b.vx - a.vx) * dx + (b.vy - a.vy) * dy >= 0:
                continue  # separating or resting
            events.append(Event(t, "collide", ref(a), None, ref(b)))
            if a.vx * dx + a.vy * dy > 0:
                bodies[i] = _reverse(a, t)
            if b.vx * dx + b.vy * dy < 0:
                bodies[j] = _reverse(b, t)
    return bodies, events


def physics_step(bodies: list[Body], t: float, shrink: float) -> tuple[list[Body], list[Event]]:
    """Everything that happens by itself at time t (after bodies were advanced to t)."""
    events: list[Event] = []
    moved = []
    for b in bodies:
        b, ev = walls(b, t)
        moved.append(b)
        events += ev
    moved, ev = collisions(moved, t, shrink)
    events += ev
    moved, ev = phases(moved, t)
    return moved, events + ev
