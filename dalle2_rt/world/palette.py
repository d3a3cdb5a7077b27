"""The fixed vocabulary of the shapes world (docs/world.md): colours, shapes, sizes, positions, relations.

Everything else in `dalle2_rt.world` reads its words and numbers from here, so the spec lives in one place.
Lengths are fractions of the canvas side W.
"""

from __future__ import annotations

# Background words -> RGB (docs/world.md "Backgrounds").
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (16, 16, 16),
}

# Object colour words -> RGB (docs/world.md "Object colours").
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 30),
    "green": (40, 170, 70),
    "cyan": (30, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 190),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Box side s per size word, and the uniform jitter around it (docs/world.md "Sizes").
SIZES: dict[str, float] = {"small": 0.28, "large": 0.48}
SIZE_JITTER = 0.03

# Single-object position phrases (docs/world.md "Placement").
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")

# Two-object relation phrases, A RELATION B.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
# A relation read with A and B swapped; used by paraphrases ("B below A").
INVERSE_RELATION: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}

# Generation margins (docs/world.md "Placement"): where a named position/relation puts the box centre.
POSITION_EDGE = 0.4  # left: cx < 0.4; right: cx > 1 - 0.4; same for top/bottom
CENTER_RANGE = (0.4, 0.6)  # in the center: cx and cy both inside
RELATION_GAP = 0.3  # A's centre at least this far to the named side of B's, on the dominant axis

# Scoring margins (docs/world.md "Scoring"): looser than generation, so renders score right with room to spare.
SCORE_POSITION_EDGE = 0.45
SCORE_CENTER_RANGE = (0.35, 0.65)
SCORE_RELATION_GAP = 0.15
SCORE_SMALL_EXTENT = 0.38  # an object whose extent is under 0.38 W counts as small

# The scene (and caption) has a relation axis (+1/-1 along x or y) per relation word: "A to the left of B"
# means A.cx - B.cx <= -gap.
RELATION_AXIS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1),
    "to the right of": (0, +1),
    "above": (1, -1),
    "below": (1, +1),
}


def article(next_word: str) -> str:
    """The canonical article before `next_word`: 'an' before a vowel, 'a' elsewhere."""
    return "an" if next_word and next_word[0] in "aeiou" else "a"
