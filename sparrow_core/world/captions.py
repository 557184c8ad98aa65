"""Sampling captions for a segment: many correct phrasings of the same canonical facts.

Every caption states exactly `caption_facts(seg)` (parse_caption recovers them); what varies is
synonyms, word order, clause grouping, pronouns and optional details (size, texture, position,
references to earlier events, an explicit count)."""

import numpy as np

from sparrow_core.world.caption_parse import parse_caption, score_caption, word_f1
from sparrow_core.world.facts import Fact, Key, ObjectFacts, SegmentFacts, Statement
from sparrow_core.world.lexicon import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    DIRECTION_WORDS,
    JOIN,
    NUMBER_WORDS,
    QUIET,
    REFERENCES,
    REGION_PHRASES,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    THEN,
    THING_NOUNS,
    VERBS,
)

__all__ = ["sample_caption", "sample_captions", "parse_caption", "score_caption", "word_f1"]

MAX_WORDS = 30


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fresh(rng: np.random.Generator, options: tuple[str, ...], used: set[str]) -> str:
    """Pick a phrasing whose head word was not used yet in this caption (when there is one)."""
    unused = [o for o in options if o.split()[0] not in used]
    choice = _pick(rng, unused or options)
    used.add(choice.split()[0])
    return choice


def _noun_phrase(rng: np.random.Generator, key: Key, obj: ObjectFacts | None, det: str, detail: bool) -> str:
    """'the red circle', 'a big striped blue box', 'the green cross with stripes', ..."""
    colour, shape = key
    words = [_pick(rng, COLOUR_WORDS[colour]), _pick(rng, SHAPE_WORDS[shape])]
    tail = ""
    if detail and obj is not None:
        if obj.texture == "striped" and rng.random() < 0.6:
            if rng.random() < 0.7:
                words.insert(0, "striped")
            else:
                tail = " with stripes"
        elif obj.texture == "plain" and rng.random() < 0.08:
            words.insert(0, _pick(rng, TEXTURE_WORDS["plain"]))
        if rng.random() < 0.25:
            words.insert(0, _pick(rng, SIZE_WORDS[obj.size]))
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return f"{det} {' '.join(words)}{tail}"


def _reference(rng: np.random.Generator, obj: ObjectFacts | None, context_from: int) -> str:
    """A relative clause about the object's latest past event ('that entered earlier'), or '' when it has
    none in the context: an event counts only when its segment (index >= context_from) is in the stream
    the caption follows, by its caption or its frames. A caption never refers to what its reader never saw."""
    if obj is None or not obj.at_start or not obj.history or obj.history[-1].segment < context_from:
        return ""
    past = obj.history[-1]
    phrase = _pick(rng, REFERENCES[past.kind])
    return " " + phrase.format(side=past.arg, c=_pick(rng, COLOUR_WORDS.get(past.arg, (past.arg,))))


def _where(rng: np.random.Generator, region: str) -> str:
    if region == "middle":
        return _pick(rng, REGION_PHRASES["middle"])
    group = "corner" if " " in region else "edge"
    return _pick(rng, REGION_PHRASES[group]).format(r=region)


def _verb(rng: np.random.Generator, fact: Fact, subject: Key, obj: ObjectFacts | None, detail: bool,
          mention: dict[Key, str], used: set[str]) -> str:
    """Verb phrase for one fact of `subject` (3rd person singular); `used` holds head verbs already said."""
    k = fact.kind
    if k in ("enter", "leave", "bounce"):
        return _fresh(rng, VERBS[k], used).format(side=fact.detail)
    if k == "move":
        return _fresh(rng, VERBS["move"], used).format(dir=_pick(rng, DIRECTION_WORDS[fact.detail]))
    if k == "still":
        if detail and obj is not None and rng.random() < 0.5:
            return _fresh(rng, VERBS["still_at"], used).format(where=_where(rng, obj.region))
        return _fresh(rng, VERBS["still"], used)
    if k == "recolour":
        return _fresh(rng, VERBS["recolour"], used).format(c=_pick(rng, COLOUR_WORDS[fact.detail]))
    if k == "collide":
        other = fact.other if fact.obj == subject else fact.obj
        return _fresh(rng, VERBS["collide"], used).format(o=mention[other])
    return _fresh(rng, VERBS[k], used)  # stop, grow, shrink


def _join_verbs(rng: np.random.Generator, verbs: list[str]) -> str:
    if len(verbs) == 1:
        return verbs[0]
    if len(verbs) > 2 and rng.random() < 0.5:
        return ", ".join(verbs[:-1]) + " and " + verbs[-1]
    links = [THEN[int(k)] for k in rng.permutation(len(THEN))]  # no connector twice in one clause
    out = verbs[0]
    for k, v in enumerate(verbs[1:]):
        out += links[k % len(links)] + v
    return out


def _count_phrase(rng: np.random.Generator, n: int) -> str:
    if n == 0:
        return _pick(rng, VERBS["count_zero"])
    singular, plural = THING_NOUNS[int(rng.integers(len(THING_NOUNS)))]
    things = f"{NUMBER_WORDS[n]} {singular if n == 1 else plural}"
    template = _pick(rng, VERBS["count"])
    return template.format(be="is" if n == 1 else "are", n=things, remain="remains" if n == 1 else "remain",
                           num=NUMBER_WORDS[n])


def _clauses(rng: np.random.Generator, seg: SegmentFacts, detail: bool, context_from: int) -> list[str]:
    """Clause texts in order. Objects are named by their identity colour (as first seen) when clauses are
    grouped per object, by their current colour when narrated in time order."""
    objs = {o.key: o for o in seg.objects}
    stmts = [s for s in seg.statements if s.fact.kind != "empty"]
    grouped = rng.random() < 0.5
    recoloured: dict[Key, str] = {}
    named: set[Key] = set()
    used: set[str] = set()
    clauses: list[str] = []

    def name(key: Key, first_fact: Fact, with_extras: bool) -> str:
        colour = recoloured.get(key, key[0])
        det = "a" if first_fact.kind in ("enter", "appear") and key not in named and rng.random() < 0.7 else "the"
        text = _noun_phrase(rng, (colour, key[1]), objs.get(key), det, detail and with_extras and key not in named)
        if with_extras and detail and key not in named and rng.random() < 0.4:
            text += _reference(rng, objs.get(key), context_from)
            if text.endswith(("earlier", "before")) and rng.random() < 0.6:
                text += " now"
        named.add(key)
        return text

    def simple(key: Key) -> str:
        named.add(key)
        return f"the {_pick(rng, COLOUR_WORDS[recoloured.get(key, key[0])])} {_pick(rng, SHAPE_WORDS[key[1]])}"

    if grouped:
        order: list[Key | None] = []
        for s in stmts:
            subject = s.fact.obj
            if subject not in order:
                order.append(subject)
        done: set[Fact] = set()
        for subject in order:
            if subject is None:  # background changes
                for s in stmts:
                    if s.fact.obj is None:
                        clauses.append(_pick(rng, VERBS["background"]).format(
                            bg=_pick(rng, BACKGROUND_WORDS[s.fact.detail])))
                continue
            facts = [s.fact for s in stmts if subject in (s.fact.obj, s.fact.other) and s.fact not in done]
            if not facts:
                continue
            done.update(facts)
            head = name(subject, facts[0], True)
            mention = {k: simple(k) for f in facts for k in (f.obj, f.other) if k not in (None, subject)}
            verbs = [_verb(rng, f, subject, objs.get(subject), detail, mention, used) for f in facts]
            clauses.append(f"{head} {_join_verbs(rng, verbs)}")
        return clauses

    previous: Key | None = None
    i = 0
    while i < len(stmts):
        f = stmts[i].fact
        if f.obj is None:
            clauses.append(_pick(rng, VERBS["background"]).format(bg=_pick(rng, BACKGROUND_WORDS[f.detail])))
            previous = None
            i += 1
            continue
        if f.kind == "collide" and rng.random() < 0.5:
            a, b = (f.obj, f.other) if rng.random() < 0.5 else (f.other, f.obj)
            clauses.append(_pick(rng, VERBS["collide_pair"]).format(a=name(a, f, False), b=name(b, f, False)))
            previous = None
            i += 1
            continue
        subject = f.obj
        run: list[Statement] = [stmts[i]]
        i += 1
        while i < len(stmts) and stmts[i].fact.obj == subject and stmts[i].fact.kind != "collide":
            run.append(stmts[i])
            i += 1
        head = "it" if subject == previous and rng.random() < 0.6 else name(subject, f, True)
        mention = {k: simple(k) for s in run for k in (s.fact.obj, s.fact.other) if k not in (None, subject)}
        verbs = [_verb(rng, s.fact, subject, objs.get(subject), detail, mention, used) for s in run]
        clauses.append(f"{head} {_join_verbs(rng, verbs)}")
        for s in run:
            if s.fact.kind == "recolour":
                recoloured[subject] = s.fact.detail
        previous = subject
    return clauses


def _compose(rng: np.random.Generator, seg: SegmentFacts, detail: bool, context_from: int) -> str:
    empty = [s.fact for s in seg.statements if s.fact.kind == "empty"]
    clauses = _clauses(rng, seg, detail, context_from)
    if empty:
        clauses.append(_pick(rng, VERBS["empty"]).format(bg=_pick(rng, BACKGROUND_WORDS[empty[0].detail])))
    elif all(s.fact.kind == "still" for s in seg.statements) and rng.random() < 0.4:
        clauses.insert(0, _pick(rng, QUIET))
    changed = seg.count_end != seg.count_start
    joins = [JOIN[int(k)] for k in rng.permutation(len(JOIN))]  # no join twice in a row of <= 5 clauses
    text = clauses[0]
    for k, c in enumerate(clauses[1:]):
        text += joins[k % len(joins)] + c
    if not empty and rng.random() < (0.6 if changed else 0.12):
        count = _count_phrase(rng, seg.count_end)
        text += (", " if count.startswith("leaving") else _pick(rng, ("; ", ". ", ", "))) + count
    return text


def sample_caption(seg: SegmentFacts, rng: np.random.Generator, max_words: int = MAX_WORDS,
                   context_from: int = 0) -> str:
    """One caption of `seg`, lowercase, drawn from rng; retries without optional details to stay
    under max_words when it can. `context_from`: the first segment of the stream the caption follows
    (its caption or frames in view); references to earlier events stay inside it. 0: the world's start."""
    best = ""
    for attempt in range(6):
        text = _compose(rng, seg, detail=attempt < 3, context_from=context_from)
        if len(text.split()) <= max_words:
            return text
        if not best or len(text.split()) < len(best.split()):
            best = text
    return best


def sample_captions(seg: SegmentFacts, rng: np.random.Generator, n: int) -> list[str]:
    """n independent draws (may repeat for very simple segments)."""
    return [sample_caption(seg, rng) for _ in range(n)]
