"""Hard negatives: a spec changed in one attribute, so that its caption is false of every image of the original.

CLIP trained with in-batch negatives only rarely meets two captions that differ in one word, so it can match a
caption by its bag of words ("red", "circle", "blue", "square") without knowing which object is which or which
side each is on. A hard negative is exactly that near miss: the same words with the objects swapped, one
object's shape or colour changed, the relation inverted, a single object's size or position moved.

Each change is chosen so that the new caption is *false* of the image by the world's scorer too (whose margins
are looser than generation's), never merely different: a position moves only to its opposite (not to or from
"in the center", which a scene at the edge of its range can also satisfy by the scorer's margins, nor from
"on the left" to "at the top", which a scene on the left may satisfy); a relation is only inverted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .captions import CaptionSpec
from .palette import COLOURS, INVERSE_RELATION, SHAPES

# The position a caption's position word can move to and still be false of the scene by the scorer
# (docs/world.md "Placement" and "Scoring"); "in the center" has none.
OPPOSITE_POSITION: dict[str, str] = {
    "on the left": "on the right",
    "on the right": "on the left",
    "at the top": "at the bottom",
    "at the bottom": "at the top",
}
_OTHER_SIZE = {"small": "large", "large": "small"}


def _other(rng: np.random.Generator, words, *exclude: str) -> str:
    options = [w for w in words if w not in exclude]
    return options[int(rng.integers(len(options)))]


def _single_changes(spec: CaptionSpec, rng: np.random.Generator) -> dict[str, CaptionSpec]:
    out = {"colour": dataclasses.replace(spec, colours=(_other(rng, COLOURS, spec.colours[0]),)),
           "shape": dataclasses.replace(spec, shapes=(_other(rng, SHAPES, spec.shapes[0]),))}
    if spec.size:
        out["size"] = dataclasses.replace(spec, size=_OTHER_SIZE[spec.size])
    if spec.position in OPPOSITE_POSITION:
        out["position"] = dataclasses.replace(spec, position=OPPOSITE_POSITION[spec.position])
    return out


def _two_changes(spec: CaptionSpec, rng: np.random.Generator) -> dict[str, CaptionSpec]:
    (ca, cb), (sa, sb) = spec.colours, spec.shapes
    i = int(rng.integers(2))  # which object a one-object change touches
    shapes = list(spec.shapes)
    shapes[i] = _other(rng, SHAPES, shapes[i])
    colours = list(spec.colours)
    colours[i] = _other(rng, COLOURS, ca, cb)  # the two objects' colours stay different
    out = {
        "objects swapped": dataclasses.replace(spec, colours=(cb, ca), shapes=(sb, sa)),
        "colours traded": dataclasses.replace(spec, colours=(cb, ca)),
        "relation inverted": dataclasses.replace(spec, relation=INVERSE_RELATION[spec.relation]),
        "one shape": dataclasses.replace(spec, shapes=tuple(shapes)),
        "one colour": dataclasses.replace(spec, colours=tuple(colours)),
    }
    if sa != sb:
        out["shapes traded"] = dataclasses.replace(spec, shapes=(sb, sa))
    return out


def hard_negatives(spec: CaptionSpec, rng: np.random.Generator) -> dict[str, CaptionSpec]:
    """Every kind of hard negative that applies to ``spec``, by name ("shape", "objects swapped", ...); where a
    kind picks a new word (a colour, a shape), ``rng`` picks it. The background is never changed, so that the
    negative is hard (a background word is the easiest thing in the image to check)."""
    return _single_changes(spec, rng) if spec.kind == "single" else _two_changes(spec, rng)


def hard_negative(spec: CaptionSpec, rng: np.random.Generator) -> CaptionSpec:
    """One hard negative of ``spec``, its kind uniform over those that apply (``hard_negatives``)."""
    changes = list(hard_negatives(spec, rng).values())
    return changes[int(rng.integers(len(changes)))]
