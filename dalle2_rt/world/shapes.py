"""Geometry of the five shapes (WORLD.md "Shapes"), shared by the renderer and the scorer's templates.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), so a box of side s at
centre (cx, cy) covers [cx - s/2, cx + s/2). PIL's ImageDraw instead addresses pixel *indices* (its point (i, j)
is the centre of pixel (i, j)), truncates vertices to whole pixels and fills both end pixels of a span. So we
draw with the centre shifted by -0.5 and the side shrunk by one pixel: a square box [64, 192) then fills pixels
64..191 exactly. What remains is vertex snapping, under a quarter target pixel when drawing at 4x.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from .palette import SHAPES

# WORLD.md: star inner radius = 0.4 x outer radius; cross bars are s/3 thick.
STAR_INNER_RATIO = 0.4
CROSS_BAR = 1.0 / 3.0


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Polygon of `shape` in a box of side 1 centred at the origin (y grows downwards)."""
    h = 0.5
    if shape == "square":
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(0.0, -h), (h, h), (-h, h)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * STAR_INNER_RATIO
            a = math.radians(-90.0 + 36.0 * k)  # k = 0 points straight up
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        b = CROSS_BAR / 2.0  # half bar thickness
        return [(-b, -h), (b, -h), (b, -b), (h, -b), (h, b), (b, b),
                (b, h), (-b, h), (-b, b), (-h, b), (-h, -b), (-b, -b)]
    raise ValueError(f"no polygon for shape {shape!r}")


_UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def _unit_extent(shape: str) -> tuple[float, float, float, float]:
    if shape == "circle":
        return (-0.5, -0.5, 0.5, 0.5)
    xs, ys = zip(*_UNIT_POLYGONS[shape], strict=True)
    return (min(xs), min(ys), max(xs), max(ys))


# Tight bounding box of each shape inside its unit box, (x0, y0, x1, y1). Only the star is smaller than its box
# (its lower points sit at 0.405, its side points at +-0.476), which matters for the scorer's templates.
SHAPE_EXTENT: dict[str, tuple[float, float, float, float]] = {s: _unit_extent(s) for s in SHAPES}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill) -> None:
    """Fill `shape` with box side `s` centred at (cx, cy), all in continuous pixel coordinates of `draw`'s image."""
    _draw_pil(draw, shape, cx - 0.5, cy - 0.5, s - 1.0, s - 1.0, fill)


def _draw_pil(draw: ImageDraw.ImageDraw, shape: str, px: float, py: float, sx: float, sy: float, fill) -> None:
    """Draw in PIL index coordinates: box of sides (sx, sy) centred at pixel index (px, py), ends inclusive."""
    if shape == "circle":
        draw.ellipse([px - sx / 2, py - sy / 2, px + sx / 2, py + sy / 2], fill=fill)
    else:
        draw.polygon([(px + sx * x, py + sy * y) for x, y in _UNIT_POLYGONS[shape]], fill=fill)


@functools.lru_cache(maxsize=4096)
def shape_template(shape: str, width: int, height: int, supersample: int = 4) -> np.ndarray:
    """Boolean (height, width) mask of `shape` stretched so that its tight bounding box fills the whole array.

    The scorer compares a detected region (cropped to its bounding box) with these; a pixel is inside when at least
    half of it is covered, matching a detector that keeps pixels nearer the object colour than the background.
    """
    x0, y0, x1, y1 = SHAPE_EXTENT[shape]
    big_w, big_h = width * supersample, height * supersample
    img = Image.new("L", (big_w, big_h), 0)
    # Scale the unit box per axis so the shape's extent maps onto [0, big_w) x [0, big_h); the box side is then
    # s_x = big_w / (x1 - x0) horizontally (and likewise vertically), drawn as a polygon in those units.
    sx, sy = big_w / (x1 - x0), big_h / (y1 - y0)
    cx, cy = -x0 * sx, -y0 * sy
    _draw_pil(ImageDraw.Draw(img), shape, cx - 0.5, cy - 0.5, sx - 1.0, sy - 1.0, 255)
    cover = np.asarray(img.resize((width, height), Image.Resampling.BOX), dtype=np.uint8)
    mask = cover >= 128
    mask.setflags(write=False)  # cached and shared: nobody may edit it
    return mask
