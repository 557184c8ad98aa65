"""Words of the caption language: the phrasings the generator samples and the parser reads back.

Placeholders: {side} (left/right/top/bottom), {dir} (a direction phrase), {c} (a colour word),
{o} (an object phrase), {n} (a count phrase), {bg} (a background colour word)."""

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
    "purple": ("purple", "violet"), "orange": ("orange",), "cyan": ("cyan", "turquoise"), "pink": ("pink",),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",), "gray": ("gray", "grey"), "white": ("white",), "brown": ("brown",),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"), "square": ("square", "box", "block"), "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "medium": ("medium",),
                                         "large": ("large", "big")}
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {"striped": ("striped",), "plain": ("plain", "solid")}
DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "to the left", "leftward"), "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward", "upwards"), "down": ("down", "downward", "downwards"),
}
REGION_PHRASES: dict[str, tuple[str, ...]] = {  # {r} is the region's words, e.g. "top left"
    "middle": ("in the middle", "at the center", "in the centre of the screen"),
    "corner": ("in the {r} corner", "at the {r}", "near the {r}"),
    "edge": ("on the {r}", "at the {r}", "near the {r} edge"),
}
NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five")
THING_NOUNS: tuple[tuple[str, str], ...] = (("shape", "shapes"), ("object", "objects"), ("thing", "things"))

VERBS: dict[str, tuple[str, ...]] = {
    "enter": ("enters from the {side}", "comes in from the {side}", "slides in from the {side}",
              "appears from the {side}", "enters the screen from the {side}", "moves in from the {side} edge"),
    "leave": ("leaves to the {side}", "exits on the {side}", "leaves the screen on the {side}",
              "goes out the {side} edge", "slides out to the {side}", "disappears off the {side} edge",
              "exits through the {side} side"),
    "appear": ("appears out of nowhere", "pops up", "shows up", "appears in place", "pops into view"),
    "vanish": ("vanishes", "disappears in place", "blinks out", "fades away", "vanishes from view"),
    "move": ("moves {dir}", "goes {dir}", "slides {dir}", "drifts {dir}", "heads {dir}", "travels {dir}",
             "glides {dir}"),
    "stop": ("stops", "comes to a stop", "halts", "comes to rest", "stops moving"),
    "still": ("stays still", "stays put", "does not move", "stays in place", "sits still", "rests",
              "remains still", "keeps still", "is not moving"),
    "still_at": ("stays {where}", "sits {where}", "rests {where}", "remains {where}", "waits {where}"),
    "bounce": ("bounces off the {side} edge", "bounces off the {side} wall", "hits the {side} edge and bounces back",
               "rebounds off the {side} side", "bounces back from the {side} edge"),
    "collide": ("bumps into {o}", "collides with {o}", "crashes into {o}", "runs into {o}", "hits {o}"),
    "collide_pair": ("{a} and {b} collide", "{a} and {b} bump into each other", "{a} and {b} crash into each other",
                     "{a} and {b} meet and bounce apart"),
    "recolour": ("turns {c}", "becomes {c}", "changes to {c}", "changes colour to {c}", "switches to {c}"),
    "grow": ("grows", "gets bigger", "grows larger", "becomes larger", "expands", "swells"),
    "shrink": ("shrinks", "gets smaller", "becomes smaller", "shrinks down", "contracts"),
    "background": ("the background turns {bg}", "the background changes to {bg}", "the backdrop becomes {bg}",
                   "the background switches to {bg}"),
    "empty": ("the {bg} screen is empty", "nothing is on the {bg} screen", "an empty {bg} background",
              "no shapes on the {bg} background", "only the {bg} background is visible",
              "the screen stays empty and {bg}", "nothing but a {bg} background"),
    "count": ("now there {be} {n} on screen", "leaving {n} on screen", "{n} {remain}", "{n} in view now",
              "the count is now {num}"),
    "count_zero": ("the screen is now empty", "nothing is left on screen", "no shapes remain",
                   "no objects remain"),
}
REFERENCES: dict[str, tuple[str, ...]] = {  # relative clauses on an object with history; parser skips them
    "enter": ("that entered earlier", "that came in from the {side} earlier", "that arrived earlier"),
    "appear": ("that appeared earlier", "that popped up earlier"),
    "recolour": ("that was {c} before",),
    "grow": ("that grew earlier",),
    "shrink": ("that shrank earlier",),
}
THEN: tuple[str, ...] = (" and ", " and then ", ", then ", " and later ")
JOIN: tuple[str, ...] = ("; ", ", and ", ". ", ", while ", ", ")
QUIET: tuple[str, ...] = ("nothing changes", "nothing happens", "all is quiet", "a quiet moment")

# --- what the parser reads (keys are word sequences; longest match wins) ---
PARSE_VERBS: dict[str, str] = {
    "enters": "enter", "enter": "enter", "comes in": "enter", "slides in": "enter", "appears": "enter",
    "moves in": "enter", "arrives": "enter",
    "appears out of nowhere": "appear", "pops up": "appear", "shows up": "appear", "appears in place": "appear",
    "pops into view": "appear",
    "vanishes": "vanish", "disappears in place": "vanish", "blinks out": "vanish", "fades away": "vanish",
    "vanishes from view": "vanish",
    "leaves": "leave", "leave": "leave", "exits": "leave", "goes out": "leave", "slides out": "leave",
    "disappears": "leave",
    "moves": "move", "goes": "move", "slides": "move", "drifts": "move", "heads": "move", "travels": "move",
    "glides": "move", "starts moving": "move", "move": "move",
    "stops moving": "stop", "stops": "stop", "comes to a stop": "stop", "halts": "stop", "comes to rest": "stop",
    "stop": "stop",
    "stays": "still", "does not move": "still", "sits": "still", "rests": "still", "remains": "still",
    "keeps still": "still", "is not moving": "still", "waits": "still", "is still": "still",
    "bounces": "bounce", "rebounds": "bounce", "bounce": "bounce",
    "bumps into": "collide", "collides with": "collide", "crashes into": "collide", "runs into": "collide",
    "collide": "collide_pair", "bump into each other": "collide_pair", "crash into each other": "collide_pair",
    "meet": "collide_pair",
    "turns": "recolour", "becomes": "recolour", "changes to": "recolour", "changes colour to": "recolour",
    "switches to": "recolour", "changes": "recolour",
    "grows": "grow", "gets bigger": "grow", "expands": "grow", "swells": "grow", "becomes larger": "grow",
    "grows larger": "grow",
    "shrinks": "shrink", "gets smaller": "shrink", "becomes smaller": "shrink", "contracts": "shrink",
    "shrinks down": "shrink",
    "hits": "hits",
}
REGION_TOKENS: dict[str, str] = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
                                 "left": "left", "right": "right", "middle": "middle", "center": "middle",
                                 "centre": "middle"}
ZERO_PHRASES: tuple[str, ...] = ("is empty", "is now empty", "stays empty", "nothing is left", "nothing left",
                                 "nothing remains", "nothing is on", "nothing but", "an empty", "only the")
