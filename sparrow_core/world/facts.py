"""Ground-truth facts of one segment [t0, t1), and the canonical facts a caption of it states."""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from sparrow_core.world.palette import REFERENCE_PX, region_word, size_word
from sparrow_core.world.state import Event, Tick

Key = tuple[str, str]  # (colour, shape): names an object inside one segment (colour as first seen there)

# a caption says "moves <dir>" when the frames show the object travel at least this far that way (pixels at
# the 64 px reference frame): a shorter run is not something a viewer sees at 1 frame per second
MIN_SHIFT_PX = 3.0
_CAUSE_PRIORITY = ("enter", "collide", "bounce", "move", "stop")


@dataclass(frozen=True, order=True)
class Fact:
    """One caption statement. kinds: enter/leave/bounce (detail = side), appear/vanish (in place),
    move (detail = direction), stop, still, grow, shrink, recolour (detail = new colour), collide (obj < other),
    background (obj None, detail = new background), empty (obj None, detail = background)."""

    kind: str
    obj: Key | None = None
    detail: str | None = None
    other: Key | None = None


@dataclass(frozen=True)
class Statement:
    t: float  # when it starts being true (seconds)
    fact: Fact


@dataclass(frozen=True)
class Reference:
    """A caption's reference to an object's past ('the yellow square that was blue before'). kinds: enter
    (detail = the side, when said), appear, recolour (detail = the old colour, when said), grow, shrink, other
    (a relative clause the parser reads no event in)."""

    obj: Key  # the object as the caption names it
    kind: str
    detail: str | None = None


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption states: compare with ==. `attributes` holds optional details (size, texture,
    region per object) and `references` its relative clauses about the past; both are left out of
    equality."""

    facts: frozenset[Fact]
    count: int  # objects on screen at the end of the segment
    attributes: dict[Key, dict[str, str]] = field(default_factory=dict, compare=False, hash=False)
    references: tuple[Reference, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class PastEvent:
    """Something an object did in an earlier segment, which a caption may refer back to ('that grew
    earlier'). kinds: enter (arg = side), appear, recolour (arg = the old colour), grow, shrink."""

    kind: str
    arg: str
    segment: int  # index of the segment whose caption states it (and whose frames show it)


@dataclass(frozen=True)
class ObjectFacts:
    """An object seen during the segment (or leaving at its first instant)."""

    oid: int
    colour: str  # as first seen in the segment
    shape: str
    texture: str
    size: str  # small | medium | large, as first seen
    region: str  # 3x3 screen region as first seen, e.g. "top left", "middle"
    colours: tuple[str, ...]  # every colour it showed, in order
    motion: tuple[str, ...]  # directions over the segment, merged runs, e.g. ("right", "left", "still")
    entered: str | None  # side it entered from during the segment
    left: str | None  # side it left through during the segment
    at_start: bool  # already on screen when the segment began
    history: tuple[PastEvent, ...]  # what it did in earlier segments, oldest first

    @property
    def key(self) -> Key:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class SegmentFacts:
    index: int
    t0: float
    t1: float
    background: str  # at the end
    background_start: str
    count_start: int
    count_end: int
    objects: tuple[ObjectFacts, ...]
    events: tuple[Event, ...]
    statements: tuple[Statement, ...]  # time-ordered: what a caption of this segment says

    def visible(self) -> tuple[Key, ...]:
        """(colour, shape) of every object seen in the segment."""
        return tuple(o.key for o in self.objects)


def caption_facts(seg: SegmentFacts) -> CaptionFacts:
    """The canonical facts any correct caption of `seg` states (what parse_caption must recover)."""
    attrs = {o.key: {"size": o.size, "texture": o.texture, "region": o.region} for o in seg.objects}
    return CaptionFacts(frozenset(s.fact for s in seg.statements), seg.count_end, attrs)


def _runs(ticks: Sequence[Tick], causes: dict[tuple[int, int], str]) -> dict[int, list[list]]:
    """oid -> runs [direction, t_start, n_ticks, cause, speed] over the segment's ticks."""
    runs: dict[int, list[list]] = {}
    for i, tk in enumerate(ticks):
        for b in tk.bodies:
            d = b.direction()
            r = runs.setdefault(b.oid, [])
            if r and r[-1][0] == d:
                r[-1][2] += 1
            else:
                r.append([d, tk.t, 1, causes.get((tk.k, b.oid), "ongoing" if i == 0 else "other"),
                          abs(b.vx) + abs(b.vy)])
    return runs


def _causes(ticks: Sequence[Tick]) -> dict[tuple[int, int], str]:
    causes: dict[tuple[int, int], str] = {}
    for tk in ticks:
        for e in tk.events:
            for r in (e.obj, e.other):
                if r is None or e.kind not in _CAUSE_PRIORITY:
                    continue
                old = causes.get((tk.k, r.oid))
                if old is None or _CAUSE_PRIORITY.index(e.kind) < _CAUSE_PRIORITY.index(old):
                    causes[(tk.k, r.oid)] = e.kind
    return causes


def _event_fact(e: Event, keys: dict[int, Key]) -> Fact | None:
    if e.kind == "background":
        return Fact("background", None, e.detail)
    if e.obj is None or e.kind in ("move", "count"):
        return None
    key = keys[e.obj.oid]
    if e.kind == "collide":
        a, b = sorted((key, keys[e.other.oid]))
        return Fact("collide", a, None, b)
    if e.kind in ("stop", "grow", "shrink", "appear", "vanish"):
        return Fact(e.kind, key)
    return Fact(e.kind, key, e.detail)  # enter, leave, bounce, recolour


def build_segment(index: int, t0: float, t1: float, ticks: Sequence[Tick], count_start: int,
                  history: dict[int, list[PastEvent]], dt: float, seen_until: float | None = None) -> SegmentFacts:
    """Facts of the segment [t0, t1) made of `ticks`: the ticks its frames show (see
    `episode.iter_segments`: those after the previous segment's last frame, up to its own last frame at
    `seen_until`). `history` (oid -> earlier things) is read for references and then updated with this
    segment's events."""
    seen_until = t1 if seen_until is None else seen_until
    events = tuple(e for tk in ticks for e in tk.events)
    first = {}
    for tk in ticks:
        for b in tk.bodies:
            first.setdefault(b.oid, (tk, b))
    keys = {oid: (b.colour, b.shape) for oid, (_, b) in first.items()}
    for e in events:
        for r in (e.obj, e.other):
            if r is not None and r.oid not in keys:
                keys[r.oid] = (r.colour, r.shape)
    runs = _runs(ticks, _causes(ticks))

    stated: dict[Fact, float] = {}
    for e in events:
        f = _event_fact(e, keys)
        if f is not None:
            stated.setdefault(f, e.t)
    for oid, rs in runs.items():
        for d, t, n, cause, speed in rs:
            seen = min(t + n * dt, seen_until) - t  # motion after the last frame shows in no frame
            shift_px = speed * seen * REFERENCE_PX
            if d != "still" and cause in ("ongoing", "move", "other") and shift_px >= MIN_SHIFT_PX - 1e-9:
                stated.setdefault(Fact("move", keys[oid], d), t)
    mentioned = {k for f in stated for k in (f.obj, f.other) if k is not None}
    for oid, (tk, _) in first.items():
        if keys[oid] not in mentioned:
            stated.setdefault(Fact("still", keys[oid]), tk.t)
    background = ticks[-1].background
    if not keys:
        stated.setdefault(Fact("empty", None, background), t0)
    order = sorted(stated.items(), key=lambda kv: (kv[1], kv[0]))
    statements = tuple(Statement(t, f) for f, t in order)

    objects = []
    for oid, key in keys.items():
        body = first[oid][1] if oid in first else None
        colours = [key[0]] + [e.detail for e in events if e.kind == "recolour" and e.obj.oid == oid]
        entered = next((e.detail for e in events if e.kind == "enter" and e.obj.oid == oid), None)
        left = next((e.detail for e in events if e.kind == "leave" and e.obj.oid == oid), None)
        motion = [r[0] for r in runs.get(oid, [])]
        objects.append(ObjectFacts(
            oid, key[0], key[1], body.texture if body else "plain", size_word(body.size) if body else "medium",
            region_word(body.x, body.y) if body else "middle", tuple(colours), tuple(motion), entered, left,
            oid in {b.oid for b in ticks[0].bodies} and entered is None, tuple(history.get(oid, ()))))
    _update_history(history, events, index)
    return SegmentFacts(index, t0, t1, background, ticks[0].background, count_start, len(ticks[-1].bodies),
                        tuple(objects), events, statements)


def _update_history(history: dict[int, list[PastEvent]], events: Sequence[Event], index: int) -> None:
    for e in events:
        if e.obj is None:
            continue
        h = history.setdefault(e.obj.oid, [])
        if e.kind == "enter":
            h.append(PastEvent("enter", e.detail or "", index))
        elif e.kind == "appear":
            h.append(PastEvent("appear", "", index))
        elif e.kind == "recolour":
            h.append(PastEvent("recolour", e.before or "", index))
        elif e.kind in ("grow", "shrink"):
            h.append(PastEvent(e.kind, "", index))
        elif e.kind in ("leave", "vanish"):
            history.pop(e.obj.oid, None)


def fact_to_json(f: Fact) -> dict:
    return {"kind": f.kind, "obj": list(f.obj) if f.obj else None, "detail": f.detail,
            "other": list(f.other) if f.other else None}


def segment_to_json(seg: SegmentFacts) -> dict:
    """JSON-ready ground truth of a segment (events, objects, statements and the caption facts)."""
    out = asdict(seg)
    cf = caption_facts(seg)
    out["caption_facts"] = {"facts": [fact_to_json(f) for f in sorted(cf.facts)], "count": cf.count}
    return out


_REFERENCE_KINDS = {"enter": ("enter",), "appear": ("appear",), "recolour": ("recolour",), "grow": ("grow",), "shrink": ("shrink",),
                    "other": ("enter", "recolour", "grow", "shrink", "appear")}


def reference_supported(ref: Reference, current: SegmentFacts, in_context: Sequence[SegmentFacts]) -> bool:
    """Whether the event `ref` refers to happened in a segment of `in_context` (the segments whose caption
    or frames the caption's context holds; `current` may be among them). The object is the one of
    `current` the caption names (shape, and a colour it showed); else, its shape misnamed, the one of that
    colour (a caption's colours are far more often right than its shapes, and a wrong shape is the shape
    score's error, not an invented event); else any object of that shape."""
    colour, shape = ref.obj
    oids = ({o.oid for o in current.objects if o.shape == shape and colour in o.colours}
            or {o.oid for o in current.objects if colour in o.colours})
    for seg in in_context:
        for e in seg.events:
            if e.obj is None or e.kind not in _REFERENCE_KINDS[ref.kind]:
                continue
            named = e.obj.oid in oids if oids else e.obj.shape == shape
            if not named:
                continue
            if ref.detail is not None and ref.kind == "enter" and e.detail != ref.detail:
                continue
            if ref.detail is not None and ref.kind == "recolour" and e.before != ref.detail:
                continue
            return True
    return False
