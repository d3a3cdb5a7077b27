"""Scoring an image against a canonical caption (docs/world.md "Scoring a generated image against its caption").

Detection: the background is the border's colour (nearest background palette entry, majority over the border
pixels); objects are pixels nearest an object palette colour, and each colour's object is its largest 4-connected
region. Around that core we measure soft coverage (where each pixel lies between the background and the object
colour), so antialiased rims and thin star tips count for what they cover.

Box and shape: for each candidate shape we place the box that shape would need to have the region's area and
centroid (the renderer's geometry, inverted), draw the shape there exactly as the renderer does, and keep the shape
with the best soft IoU. Its box gives centre and side; the side is the object's extent for the size words (that is
what `small`/`large` set in docs/world.md). Moments rather than a bounding box because a thresholded bounding box loses
up to ~1.5 px at each sharp star tip, which mis-scales a 16 px star.

Lengths are fractions of the image width and height, so any image size works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .captions import CaptionSpec, parse_caption
from .components import label_components
from .palette import (
    BACKGROUNDS,
    COLOURS,
    RELATION_AXIS,
    SCORE_CENTER_RANGE,
    SCORE_POSITION_EDGE,
    SCORE_RELATION_GAP,
    SCORE_SMALL_EXTENT,
    SHAPES,
)
from .shapes import SHAPE_AREA, SHAPE_CENTROID_DY, shape_coverage

# A pixel belongs to an object colour when that colour is its nearest palette entry (backgrounds included) and it
# lies within this RGB distance of it. 45 is below the distance (~50) from any object/background antialiasing mix
# to a *third* object colour (the worst: a red-on-white edge near pink), so edges never grow phantom objects.
COLOUR_THRESHOLD = 45.0
# A colour's largest region counts as an object from this share of the image up (a small star at 64x64 is ~1.8 %).
MIN_AREA_FRACTION = 0.004
# Soft coverage is measured this many pixels (8-neighbour steps) around the core: the antialiased rim is one pixel
# thick on straight edges and a little longer at star tips.
RIM_STEPS = 2

_OBJECT_WORDS = tuple(COLOURS)
_BACKGROUND_WORDS = tuple(BACKGROUNDS)
# (11, 3) all palette entries: object colours first, then backgrounds.
_PALETTE = np.array([COLOURS[c] for c in _OBJECT_WORDS] + [BACKGROUNDS[b] for b in _BACKGROUND_WORDS], np.float32)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in _BACKGROUND_WORDS], np.float32)

ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "background", "fully_right")


@dataclass(frozen=True)
class DetectedObject:
    """One colour's object: its best-fitting shape and that shape's box, as fractions of the image side."""

    colour: str
    area: float  # soft coverage summed, pixels
    shape: str
    shape_iou: float  # soft IoU of the best shape
    cx: float
    cy: float
    s: float  # box side, fraction of the width

    @property
    def extent(self) -> float:
        return self.s


@dataclass(frozen=True)
class Detection:
    background: str
    objects: dict[str, DetectedObject]  # colour word -> its object; colours without one are left out

    def largest(self) -> DetectedObject | None:
        return max(self.objects.values(), key=lambda o: o.area, default=None)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"expected a uint8 (H, W, 3) array or a PIL image, got {image.dtype} {image.shape}")
    return image


def _background(img: np.ndarray) -> str:
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]]).astype(np.float32)  # (N, 3)
    nearest = np.argmin(((border[:, None, :] - _BG_PALETTE[None]) ** 2).sum(-1), axis=1)
    return _BACKGROUND_WORDS[int(np.bincount(nearest, minlength=len(_BACKGROUND_WORDS)).argmax())]


def _dilate(region: np.ndarray, steps: int) -> np.ndarray:
    """8-neighbour dilation of a (H, W) bool mask by shifted ORs."""
    for _ in range(steps):
        d = region.copy()
        d[1:] |= region[:-1]
        d[:-1] |= region[1:]
        region = d.copy()
        region[:, 1:] |= d[:, :-1]
        region[:, :-1] |= d[:, 1:]
    return region


def _fit_shape(cover: np.ndarray) -> tuple[str, float, float, float, float]:
    """Best shape for a (H, W) soft coverage map: (shape, soft IoU, cx, cy, s) with cx, cy, s in pixels."""
    h, w = cover.shape
    area = float(cover.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    mx = float((cover * xs).sum()) / area + 0.5  # centroid, continuous pixel coordinates (pixel centres at +0.5)
    my = float((cover * ys).sum()) / area + 0.5
    best = (SHAPES[0], -1.0, mx, my, 0.0)
    for shape in SHAPES:
        s = (area / SHAPE_AREA[shape]) ** 0.5  # the box side that gives this shape the region's area
        cy = my - SHAPE_CENTROID_DY[shape] * s  # and the box centre that puts its centroid on the region's
        t = shape_coverage(shape, mx, cy, s, w, h)
        iou = float(np.minimum(t, cover).sum() / max(float(np.maximum(t, cover).sum()), 1e-6))
        if iou > best[1]:
            best = (shape, iou, mx, cy, s)
    return best


def detect(image) -> Detection:
    """Find the background and, per object colour, its largest region (image: uint8 (H, W, 3) or PIL)."""
    img = _as_array(image)
    h, w, _ = img.shape
    px = img.reshape(-1, 3).astype(np.float32)
    d2 = ((px[:, None, :] - _PALETTE[None]) ** 2).sum(-1)  # (H*W, 11) squared distances
    nearest = d2.argmin(1)
    is_object = (nearest < len(_OBJECT_WORDS)) & (d2[np.arange(len(px)), nearest] < COLOUR_THRESHOLD ** 2)
    classes = np.where(is_object, nearest, -1).reshape(h, w)
    background = _background(img)
    bg = np.array(BACKGROUNDS[background], np.float32)

    objects: dict[str, DetectedObject] = {}
    if not is_object.any():
        return Detection(background, objects)
    labels = label_components(classes).ravel()
    areas = np.bincount(labels[labels >= 0], minlength=h * w)  # pixels per component, indexed by root pixel
    roots = np.flatnonzero(areas)
    root_class = classes.ravel()[roots]
    for k in np.unique(root_class):
        mine = roots[root_class == k]
        root = mine[np.argmax(areas[mine])]
        if areas[root] < MIN_AREA_FRACTION * h * w:
            continue
        colour = _OBJECT_WORDS[int(k)]
        core = (labels == root).reshape(h, w)
        # Coverage of each pixel: its position on the segment background -> object colour, clipped to [0, 1];
        # counted on the core and its rim, but never on another colour's confident pixels.
        axis = np.array(COLOURS[colour], np.float32) - bg
        cover = np.clip((px - bg) @ axis / float(axis @ axis), 0.0, 1.0).reshape(h, w)
        keep = core | (_dilate(core, RIM_STEPS) & ~(is_object & (nearest != k)).reshape(h, w))
        cover = np.where(keep, cover, 0.0).astype(np.float32)
        shape, iou, cx, cy, s = _fit_shape(cover)
        objects[colour] = DetectedObject(colour, float(cover.sum()), shape, iou, cx / w, cy / h, s / w)
    return Detection(background, objects)


def _position_right(obj: DetectedObject, position: str) -> bool:
    lo, hi = SCORE_CENTER_RANGE
    return {
        "on the left": obj.cx < SCORE_POSITION_EDGE,
        "on the right": obj.cx > 1 - SCORE_POSITION_EDGE,
        "at the top": obj.cy < SCORE_POSITION_EDGE,
        "at the bottom": obj.cy > 1 - SCORE_POSITION_EDGE,
        "in the center": lo <= obj.cx <= hi and lo <= obj.cy <= hi,
    }[position]


def _relation_right(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    axis, sign = RELATION_AXIS[relation]
    delta = (a.cx - b.cx, a.cy - b.cy)[axis] * sign  # how far A is to the named side of B
    return delta >= SCORE_RELATION_GAP


def score_spec(image, spec: CaptionSpec) -> dict[str, bool | None]:
    """`score` for an already parsed caption."""
    det = detect(image)
    result: dict[str, bool | None] = dict.fromkeys(ATTRIBUTES)
    if spec.kind == "single":
        colour = spec.colours[0]
        result["colour"] = colour in det.objects
        # Judge shape/size/position on the named colour's object, else on the most prominent one, so that a
        # blue circle for "a red circle" is wrong in colour only.
        obj = det.objects.get(colour) or det.largest()
        result["shape"] = obj is not None and obj.shape == spec.shapes[0]
        if spec.size is not None:
            result["size"] = obj is not None and (obj.extent < SCORE_SMALL_EXTENT) == (spec.size == "small")
        if spec.position is not None:
            result["position"] = obj is not None and _position_right(obj, spec.position)
    else:
        a, b = (det.objects.get(c) for c in spec.colours)
        found = a is not None and b is not None
        result["colour"] = found
        result["shape"] = found and a.shape == spec.shapes[0] and b.shape == spec.shapes[1]
        result["relation"] = found and _relation_right(a, b, spec.relation)
    if spec.background is not None:
        result["background"] = det.background == spec.background
    result = {k: None if v is None else bool(v) for k, v in result.items()}  # plain bools, not numpy's
    result["fully_right"] = all(v for k, v in result.items() if k != "fully_right" and v is not None)
    return result


def score(image, caption: str) -> dict[str, bool | None]:
    """Score `image` (uint8 (H, W, 3) array or PIL image) against a canonical `caption`.

    Returns {attribute: True/False, or None when the caption does not name it} for ATTRIBUTES; "fully_right" is
    True when every named attribute is right (which includes finding every named object). For two objects,
    "colour" means both named colours were found and "shape" both shapes are right.
    Raises CaptionError for a non-canonical caption.
    """
    return score_spec(image, parse_caption(caption))
