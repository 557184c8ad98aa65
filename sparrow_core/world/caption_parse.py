"""Reading captions back into facts, and scoring a predicted caption against ground truth.

The parser is a small keyword-driven state machine over words: it tracks the current subject
(an object, 'it', the background), reads verb phrases and their details, skips relative clauses
('that ... earlier/before') and resolves recoloured names ('the green circle' after 'the red circle
turns green'). It is tolerant: unknown words are ignored, so it also scores model outputs."""

import re
from collections import Counter

from sparrow_core.world.facts import CaptionFacts, Fact, Key, Reference, SegmentFacts, caption_facts
from sparrow_core.world.lexicon import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    NUMBER_WORDS,
    PARSE_VERBS,
    REGION_TOKENS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    THING_NOUNS,
    ZERO_PHRASES,
)


def _invert(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {w: name for name, words in table.items() for w in words}


_COLOUR = _invert(COLOUR_WORDS)
_BACKGROUND = _invert(BACKGROUND_WORDS)
_SHAPE = _invert(SHAPE_WORDS)
_SIZE = _invert(SIZE_WORDS)
_TEXTURE = _invert(TEXTURE_WORDS)
_SIDE = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}
_DIRECTION = {"left": "left", "leftward": "left", "right": "right", "rightward": "right", "up": "up",
              "upward": "up", "upwards": "up", "down": "down", "downward": "down", "downwards": "down"}
# events that take an argument after their verb: the words naming it and how many tokens to look ahead
_ARGUMENT_SCAN = {"enter": (_SIDE, 5), "leave": (_SIDE, 5), "bounce": (_SIDE, 5), "move": (_DIRECTION, 4)}
_VERBS = {tuple(k.split()): v for k, v in PARSE_VERBS.items()}
_VERB_LEN = max(len(k) for k in _VERBS)
_THINGS = {w for pair in THING_NOUNS for w in pair}
_ZERO = [tuple(p.split()) for p in ZERO_PHRASES]
_BREAK = {";", ",", ".", ":", "and", "then", "while", "later", "it"}
_RESET = {"nothing", "there", "count"} | _THINGS
_BG_NOUNS = {"background", "backdrop", "screen"}


def tokenize(text: str) -> list[str]:
    """Lowercase words and clause punctuation."""
    return re.findall(r"[a-z]+|[;,.:]", text.lower())


def _mention(toks: list[str], i: int) -> tuple[Key, dict[str, str], int] | None:
    """An object phrase starting at i: [size] [texture] colour [texture] shape [with stripes]."""
    attrs: dict[str, str] = {}
    j = i
    while j < len(toks) and (toks[j] in _SIZE or toks[j] in _TEXTURE):
        attrs["size" if toks[j] in _SIZE else "texture"] = _SIZE.get(toks[j]) or _TEXTURE[toks[j]]
        j += 1
    if j >= len(toks) or toks[j] not in _COLOUR:
        return None
    colour = _COLOUR[toks[j]]
    j += 1
    if j < len(toks) and toks[j] in _TEXTURE:
        attrs["texture"] = _TEXTURE[toks[j]]
        j += 1
    if j >= len(toks) or toks[j] not in _SHAPE:
        return None
    shape = _SHAPE[toks[j]]
    j += 1
    if toks[j:j + 2] == ["with", "stripes"]:
        attrs["texture"] = "striped"
        j += 2
    return (colour, shape), attrs, j


def _scan(toks: list[str], j: int, table: dict[str, str], limit: int) -> tuple[str | None, int]:
    """First word of `table` within `limit` words of j, stopping at a clause break or an object phrase."""
    for k in range(j, min(len(toks), j + limit)):
        if toks[k] in table:
            return table[toks[k]], k + 1
        if toks[k] in _BREAK or _mention(toks, k) is not None:
            break
    return None, j


def _verb_at(toks: list[str], i: int) -> tuple[str, int] | None:
    for n in range(_VERB_LEN, 0, -1):
        kind = _VERBS.get(tuple(toks[i:i + n]))
        if kind is not None:
            return kind, i + n
    return None


def _region(toks: list[str], j: int) -> tuple[str | None, int]:
    row = col = None
    k = j
    while k < len(toks) and k < j + 7 and toks[k] not in _BREAK and _mention(toks, k) is None:
        r = REGION_TOKENS.get(toks[k])
        if r in ("top", "bottom"):
            row = r
        elif r in ("left", "right"):
            col = r
        elif r == "middle":
            row = col = None
            return "middle", k + 1
        k += 1
    words = " ".join(w for w in (row, col) if w)
    return (words or None), (k if words else j)


def parse_caption(text: str) -> CaptionFacts:
    """The facts a caption states (see facts.Fact); count is explicit ('two shapes remain') or derived
    as objects mentioned minus objects that left."""
    toks = tokenize(text)
    facts: set[Fact] = set()
    attrs: dict[Key, dict[str, str]] = {}
    aliases: dict[Key, Key] = {}
    mentioned: list[Key] = []
    subject: Key | str | None = None
    last_object: Key | None = None
    has_verb = False
    pair: Key | None = None
    count: int | None = None
    last_bg: str | None = None
    references: list[Reference] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok == "that" and i > 0 and subject is not None:  # relative clause about the past: read, no fact
            end = next((k for k in range(i + 1, min(len(toks), i + 9)) if toks[k] in ("earlier", "before")), None)
            if end is not None and isinstance(subject, tuple):
                references.append(_reference(subject, toks[i + 1:end]))
            i = i + 1 if end is None else end + 1
            continue
        zero = next((p for p in _ZERO if tuple(toks[i:i + len(p)]) == p), None)
        if zero is not None:
            count = 0
        m = _mention(toks, i)
        if m is not None:
            key, a, j = m
            key = aliases.get(key, key)
            attrs.setdefault(key, {}).update(a)
            if key not in mentioned:
                mentioned.append(key)
            before = [t for t in toks[max(0, i - 3):i] if t not in ("the", "a", "an")]
            conjoined = bool(before) and before[-1] == "and" and isinstance(subject, tuple) and not has_verb
            pair = subject if conjoined else None
            subject, last_object, has_verb = key, key, False
            i = j
            continue
        if tok == "it":
            subject, has_verb, pair = last_object, False, None
            i += 1
            continue
        if tok in _BACKGROUND:
            last_bg = _BACKGROUND[tok]
        if tok in _BG_NOUNS:
            subject, pair = "background", None
            i += 1
            continue
        if tok in _RESET:
            if tok in _THINGS and i > 0 and toks[i - 1] in NUMBER_WORDS:
                count = NUMBER_WORDS.index(toks[i - 1])
            if tok == "count":
                n, _ = _scan(toks, i + 1, {w: w for w in NUMBER_WORDS}, 3)
                count = NUMBER_WORDS.index(n) if n is not None else count
            subject, pair = None, None
            i += 1
            continue
        v = _verb_at(toks, i)
        if v is None:
            i += 1
            continue
        kind, j = v
        if kind == "recolour":
            bg, k = _scan(toks, j, _BACKGROUND, 4)
            if bg is not None:
                facts.add(Fact("background", None, bg))
                last_bg, i = bg, k
                continue
        if not isinstance(subject, tuple):
            i = j
            continue
        obj: Key = subject
        has_verb = True
        if kind == "hits":
            side, k = _scan(toks, j, _SIDE, 3)
            if side is not None:
                facts.add(Fact("bounce", obj, side))
                i = k
                continue
            kind = "collide"
        if kind in _ARGUMENT_SCAN:
            words, window = _ARGUMENT_SCAN[kind]
            value, k = _scan(toks, j, words, window)
            if value is not None:
                facts.add(Fact(kind, obj, value))
            i = k
        elif kind in ("stop", "grow", "shrink", "appear", "vanish"):
            facts.add(Fact(kind, obj))
            i = j
        elif kind == "still":
            facts.add(Fact("still", obj))
            region, i = _region(toks, j)
            if region is not None:
                attrs.setdefault(obj, {})["region"] = region
        elif kind == "recolour":
            c, k = _scan(toks, j, _COLOUR, 4)
            if c is not None:
                facts.add(Fact("recolour", obj, c))
                aliases[(c, obj[1])] = obj
            i = k
        elif kind == "collide":
            i = j
            for k in range(j, min(len(toks), j + 6)):
                m = _mention(toks, k)
                if m is not None:
                    other = aliases.get(m[0], m[0])
                    if other not in mentioned:
                        mentioned.append(other)
                    if other != obj:
                        a, b = sorted((obj, other))
                        facts.add(Fact("collide", a, None, b))
                    i = m[2]
                    break
        elif kind == "collide_pair":
            if pair is not None and pair != obj:
                a, b = sorted((pair, obj))
                facts.add(Fact("collide", a, None, b))
            pair = None
            i = j
        else:
            i = j
    if not mentioned and last_bg is not None:
        facts.add(Fact("empty", None, last_bg))
    if count is None:
        gone = {f.obj for f in facts if f.kind in ("leave", "vanish")}
        count = len([k for k in mentioned if k not in gone])
    return CaptionFacts(frozenset(facts), count, attrs, tuple(references))


_ENTERED = {"entered", "came", "arrived"}


def _reference(obj: Key, words: list[str]) -> Reference:
    """The past event a relative clause names: 'that came in from the left' (enter, left), 'that was blue'
    (recolour, blue), 'that grew', 'that shrank'; `words` lie between 'that' and 'earlier'/'before'."""
    if _ENTERED & set(words):
        return Reference(obj, "enter", next((_SIDE[w] for w in words if w in _SIDE), None))
    if {"appeared", "popped"} & set(words):
        return Reference(obj, "appear")
    if "was" in words:
        return Reference(obj, "recolour", next((_COLOUR[w] for w in words if w in _COLOUR), None))
    for verb, kind in (("grew", "grow"), ("shrank", "shrink")):
        if verb in words:
            return Reference(obj, kind)
    return Reference(obj, "other")


def word_f1(pred: str, reference: str) -> float:
    """Bag-of-words F1 between two captions (punctuation ignored)."""
    p = Counter(w for w in tokenize(pred) if w.isalpha())
    r = Counter(w for w in tokenize(reference) if w.isalpha())
    overlap = sum((p & r).values())
    if not p or not r or overlap == 0:
        return float(not p and not r)
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def _jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def _colours(cf: CaptionFacts) -> set[str]:
    out = {k[0] for f in cf.facts for k in (f.obj, f.other) if k is not None}
    return out | {f.detail for f in cf.facts if f.kind == "recolour"}


def _keys(cf: CaptionFacts) -> set[Key]:
    return {k for f in cf.facts for k in (f.obj, f.other) if k is not None}


MOTION_KINDS = ("move", "still", "stop")


def score_caption(pred_text: str, facts: CaptionFacts | SegmentFacts, reference: str | None = None
                  ) -> dict[str, float]:
    """Per-attribute agreement of a predicted caption with the true facts, each in [0, 1]:
    colour / shape / object (colour+shape) / motion (move, still, stop per object) / event (everything
    else) are Jaccard overlaps of the sets each side states (1.0 when both are empty); count is 1.0 when
    the count matches; facts is the Jaccard over all facts; exact is 1.0 when everything matches;
    word_f1 (only with `reference`) is the bag-of-words F1 against a reference caption."""
    truth = caption_facts(facts) if isinstance(facts, SegmentFacts) else facts
    pred = parse_caption(pred_text)
    motion = {f for f in truth.facts | pred.facts if f.kind in MOTION_KINDS}
    out = {
        "colour": _jaccard(_colours(pred), _colours(truth)),
        "shape": _jaccard({k[1] for k in _keys(pred)}, {k[1] for k in _keys(truth)}),
        "object": _jaccard(_keys(pred), _keys(truth)),
        "motion": _jaccard(set(pred.facts) & motion, set(truth.facts) & motion),
        "event": _jaccard(set(pred.facts) - motion, set(truth.facts) - motion),
        "count": float(pred.count == truth.count),
        "facts": _jaccard(set(pred.facts), set(truth.facts)),
        "exact": float(pred == truth),
    }
    if reference is not None:
        out["word_f1"] = word_f1(pred_text, reference)
    return out
