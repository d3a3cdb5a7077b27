"""Geometry of the five shapes (docs/world.md "Shapes"), shared by the renderer and the scorer's templates.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), so a box of side s at
centre (cx, cy) covers [cx - s/2, cx + s/2). PIL's ImageDraw instead addresses pixel *indices* (its point (i, j)
is the centre of pixel (i, j)), truncates vertices to whole pixels and fills both end pixels of a span. So we
draw with the centre shifted by -0.5 and the side shrunk by one pixel: a square box [64, 192) then fills pixels
64..191 exactly. What remains is vertex snapping, under a quarter target pixel when drawing at 4x.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .palette import SHAPES

# docs/world.md: star inner radius = 0.4 x outer radius; cross bars are s/3 thick.
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


def _unit_area_centroid(shape: str) -> tuple[float, float]:
    """(area, centroid y) of `shape` in a unit box centred at the origin (shoelace formula)."""
    if shape == "circle":
        return math.pi / 4, 0.0
    pts = _UNIT_POLYGONS[shape]
    a = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        cross = x0 * y1 - x1 * y0
        a += cross
        cy += (y0 + y1) * cross
    return abs(a) / 2, cy / (3 * a)


# Area of each shape as a fraction of its box, and how far below the box centre its centroid lies (fraction of s).
# The scorer inverts these: from a region's area and centroid it recovers the box a candidate shape would need.
# Only the triangle's centroid is off-centre (1/6 s down); the star's five-fold symmetry keeps its centroid central.
SHAPE_AREA: dict[str, float] = {}
SHAPE_CENTROID_DY: dict[str, float] = {}
for _s in SHAPES:
    SHAPE_AREA[_s], SHAPE_CENTROID_DY[_s] = _unit_area_centroid(_s)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill) -> None:
    """Fill `shape` with box side `s` centred at (cx, cy), all in continuous pixel coordinates of `draw`'s image."""
    _draw_pil(draw, shape, cx - 0.5, cy - 0.5, s - 1.0, s - 1.0, fill)


def _draw_pil(draw: ImageDraw.ImageDraw, shape: str, px: float, py: float, sx: float, sy: float, fill) -> None:
    """Draw in PIL index coordinates: box of sides (sx, sy) centred at pixel index (px, py), ends inclusive."""
    if shape == "circle":
        draw.ellipse([px - sx / 2, py - sy / 2, px + sx / 2, py + sy / 2], fill=fill)
    else:
        draw.polygon([(px + sx * x, py + sy * y) for x, y in _UNIT_POLYGONS[shape]], fill=fill)


def shape_coverage(shape: str, cx: float, cy: float, s: float, width: int, height: int,
                   supersample: int = 4) -> np.ndarray:
    """Float32 (height, width) coverage in [0, 1] of `shape` drawn exactly as the renderer draws it.

    cx, cy, s are in pixels of the (width, height) image. The scorer overlaps these with a detected region.
    """
    img = Image.new("L", (width * supersample, height * supersample), 0)
    draw_shape(ImageDraw.Draw(img), shape, cx * supersample, cy * supersample, s * supersample, 255)
    small = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0
