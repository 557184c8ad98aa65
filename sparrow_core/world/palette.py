"""The closed sets of the procedural world: colours, shapes, textures, sides.

Object colours and background colours are disjoint, so a colour word in a caption
always says which of the two it is.
"""

# name -> RGB, eight hues that stay distinct after 64x64 downscaling and yuv420p coding
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (245, 220, 40),
    "purple": (150, 60, 210),
    "orange": (250, 140, 20),
    "cyan": (40, 220, 230),
    "pink": (255, 120, 200),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "white": (235, 235, 235),
    "brown": (110, 70, 40),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

TEXTURES: tuple[str, ...] = ("plain", "striped")

# a side of the screen, and the unit direction pointing at it (x right, y down)
SIDES: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
}

# a motion direction and its unit vector (x right, y down)
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

SIDE_OF_DIRECTION: dict[str, str] = {"left": "left", "right": "right", "up": "top", "down": "bottom"}
DIRECTION_OF_SIDE: dict[str, str] = {v: k for k, v in SIDE_OF_DIRECTION.items()}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}

# size classes in pixels at the reference 64x64 frame: small < 17 <= medium <= 21 < large
REFERENCE_PX = 64
SMALL_BELOW_PX = 17.0
LARGE_ABOVE_PX = 21.0


def size_word(size: float) -> str:
    """Size class of an object whose extent is `size` (fraction of the frame width)."""
    px = size * REFERENCE_PX
    if px < SMALL_BELOW_PX:
        return "small"
    if px > LARGE_ABOVE_PX:
        return "large"
    return "medium"


def region_word(x: float, y: float) -> str:
    """3x3 screen region of a point in [0, 1]^2: 'top left', 'top', ..., 'middle', ..., 'bottom right'."""
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    return " ".join(w for w in (row, col) if w) or "middle"
