"""Immutable simulation state: bodies, events and one tick's snapshot."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Body:
    """One object on (or entering/leaving) the screen. Position is the centre in [0, 1]^2, x right, y down."""

    oid: int
    shape: str
    colour: str
    texture: str
    x: float
    y: float
    vx: float  # per second; always axis-aligned (one of vx, vy is 0)
    vy: float
    size: float  # extent (diameter / side) as a fraction of the frame
    target_size: float  # grow/shrink goal; equal to size when not changing
    phase: str  # "entering" | "free" | "leaving"
    side: str = ""  # the side it enters from / leaves through
    stop_at: float = float("inf")  # a free moving body stops by itself at this time
    hue_shift: float = 0.0  # degrees off its palette colour's hue (camera jitter; the colour name holds)
    brightness: float = 1.0  # factor on its palette colour's brightness

    def direction(self) -> str:
        """'left' | 'right' | 'up' | 'down' | 'still'."""
        if self.vx < 0:
            return "left"
        if self.vx > 0:
            return "right"
        if self.vy < 0:
            return "up"
        if self.vy > 0:
            return "down"
        return "still"


@dataclass(frozen=True)
class ObjRef:
    """How an event names an object: its id and looks at the event time."""

    oid: int
    colour: str
    shape: str


@dataclass(frozen=True)
class Event:
    """A ground-truth event. kinds and their detail:
    enter (side it came from), leave (side it left through), appear / vanish (in place, no edge), move (new
    direction), stop,
    bounce (wall side), collide (other set), grow, shrink, recolour (new colour; old in `before`),
    background (new colour; old in `before`), count (new count as text)."""

    t: float
    kind: str
    obj: ObjRef | None = None
    detail: str | None = None
    other: ObjRef | None = None
    before: str | None = None


@dataclass(frozen=True)
class Tick:
    """World state at time t = k / ticks_per_second, after the events of that instant."""

    k: int
    t: float
    background: str
    bodies: tuple[Body, ...]
    events: tuple[Event, ...]
    background_brightness: float = 1.0  # factor on the background colour (camera jitter, per world)
