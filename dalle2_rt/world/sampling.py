"""Random canonical specs, and scenes that satisfy a spec (docs/world.md "Sizes" and "Placement").

Everything draws from an injected numpy Generator, so a stream is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np

from .captions import CaptionSpec
from .palette import (
    BACKGROUNDS,
    CENTER_RANGE,
    COLOURS,
    POSITION_EDGE,
    POSITIONS,
    RELATION_AXIS,
    RELATION_GAP,
    RELATIONS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
)
from .scene import Scene, SceneObject

# How often a random spec leaves an optional part out. Every combination keeps a sizeable share, so every
# canonical caption (with and without each optional part) is in the training distribution.
P_NO_SIZE = 1 / 3
P_NO_POSITION = 0.4
P_NO_BACKGROUND = 0.4

# Two-object placement is rejection-sampled in vectorised batches; one batch accepts ~10 % of its candidates for
# the tightest relation, so a few rounds virtually always suffice and the bound only guards against a bug.
_BATCH = 64
_MAX_ROUNDS = 200

_COLOUR_WORDS = tuple(COLOURS)
_BACKGROUND_WORDS = tuple(BACKGROUNDS)
_SIZE_WORDS = tuple(SIZES)


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _maybe(rng: np.random.Generator, p_none: float, words: tuple[str, ...]) -> str | None:
    return None if rng.random() < p_none else _pick(rng, words)


def random_caption_spec(rng: np.random.Generator, two_object_prob: float = 0.4) -> CaptionSpec:
    """A spec drawn from the whole canonical distribution: one or two objects, optional parts present or absent."""
    if rng.random() < two_object_prob:
        n = len(_COLOUR_WORDS)
        i = int(rng.integers(n))
        j = (i + 1 + int(rng.integers(n - 1))) % n  # uniform over the other colours
        return CaptionSpec(kind="two", colours=(_COLOUR_WORDS[i], _COLOUR_WORDS[j]),
                           shapes=(_pick(rng, SHAPES), _pick(rng, SHAPES)), relation=_pick(rng, RELATIONS),
                           background=_maybe(rng, P_NO_BACKGROUND, _BACKGROUND_WORDS))
    return CaptionSpec(kind="single", colours=(_pick(rng, _COLOUR_WORDS),), shapes=(_pick(rng, SHAPES),),
                       size=_maybe(rng, P_NO_SIZE, _SIZE_WORDS), position=_maybe(rng, P_NO_POSITION, POSITIONS),
                       background=_maybe(rng, P_NO_BACKGROUND, _BACKGROUND_WORDS))


def random_full_single_spec(rng: np.random.Generator) -> CaptionSpec:
    """A single-object spec that names every attribute (size, position and background too): the strictest case
    to score or probe, since every attribute the scorer knows is judged. Colour and shape as random_caption_spec."""
    base = random_caption_spec(rng, two_object_prob=0.0)
    return CaptionSpec("single", base.colours, base.shapes, size=_pick(rng, _SIZE_WORDS),
                       position=_pick(rng, POSITIONS), background=_pick(rng, _BACKGROUND_WORDS))


def _box_side(rng: np.random.Generator, size_word: str) -> float:
    return SIZES[size_word] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)


def _centre_range(position: str | None, s: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Allowed (cx range, cy range) for a box of side s: inside the canvas and on the named side."""
    lo, hi = s / 2, 1 - s / 2  # the whole box inside the canvas
    x = y = (lo, hi)
    if position == "on the left":
        x = (lo, POSITION_EDGE)
    elif position == "on the right":
        x = (1 - POSITION_EDGE, hi)
    elif position == "at the top":
        y = (lo, POSITION_EDGE)
    elif position == "at the bottom":
        y = (1 - POSITION_EDGE, hi)
    elif position == "in the center":
        x = y = CENTER_RANGE
    return x, y


def _place_single(spec: CaptionSpec, rng: np.random.Generator) -> SceneObject:
    s = _box_side(rng, spec.size or _pick(rng, _SIZE_WORDS))
    (x0, x1), (y0, y1) = _centre_range(spec.position, s)
    # Ranges are half-open at the named edge in docs/world.md (cx < 0.4); uniform() never returns its upper end.
    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
    if spec.position == "on the right":
        cx = x0 + x1 - cx  # mirror so that the strict edge (cx > 0.6) is the one excluded
    if spec.position == "at the bottom":
        cy = y0 + y1 - cy
    return SceneObject(spec.colours[0], spec.shapes[0], float(s), float(cx), float(cy))


def _place_pair(spec: CaptionSpec, rng: np.random.Generator) -> tuple[SceneObject, SceneObject]:
    """Two small objects, A `relation` B, boxes inside the canvas and not overlapping."""
    sa, sb = _box_side(rng, "small"), _box_side(rng, "small")
    axis, sign = RELATION_AXIS[spec.relation]
    for _ in range(_MAX_ROUNDS):
        a = rng.uniform(sa / 2, 1 - sa / 2, size=(_BATCH, 2))  # (N, 2) candidate centres (cx, cy) of A
        b = rng.uniform(sb / 2, 1 - sb / 2, size=(_BATCH, 2))
        d = a - b  # (N, 2) A minus B
        along, across = d[:, axis] * sign, np.abs(d[:, 1 - axis])
        ok = (along >= RELATION_GAP) & (along > across)  # named side by >= 0.3 W, and the dominant axis
        # Axis-aligned boxes are disjoint when they are apart along x or along y.
        ok &= (np.abs(d) >= (sa + sb) / 2).any(axis=1)
        hits = np.flatnonzero(ok)
        if hits.size:
            (ax, ay), (bx, by) = a[hits[0]], b[hits[0]]
            return (SceneObject(spec.colours[0], spec.shapes[0], float(sa), float(ax), float(ay)),
                    SceneObject(spec.colours[1], spec.shapes[1], float(sb), float(bx), float(by)))
    raise RuntimeError(f"could not place {spec} in {_MAX_ROUNDS * _BATCH} tries")


def sample_scene(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies every constraint `spec` names; whatever it leaves unnamed is random."""
    background = spec.background or _pick(rng, _BACKGROUND_WORDS)
    if spec.kind == "single":
        return Scene(background, (_place_single(spec, rng),))
    return Scene(background, _place_pair(spec, rng))


def two_object_scenes(n: int, seed: int) -> list[tuple[CaptionSpec, Scene]]:
    """``n`` random canonical two-object specs (background named or not, as in training), each with a scene
    that satisfies it: the fixed sample the diagnoses measure two-object scenes on."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spec = random_caption_spec(rng, two_object_prob=1.0)
        out.append((spec, sample_scene(spec, rng)))
    return out
