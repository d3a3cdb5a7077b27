"""Renderer: Scene -> uint8 image, drawn at 4x with PIL and box-downsampled (docs/world.md "Canvas")."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .palette import BACKGROUNDS, COLOURS
from .scene import Scene
from .shapes import draw_shape

SUPERSAMPLE = 4


def render_pil(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a (size x size) RGB PIL image."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, obj.cx * big, obj.cy * big, obj.s * big, COLOURS[obj.colour])
    # BOX = the exact mean over each 4x4 block: the antialiasing is plain area coverage.
    return img.resize((size, size), Image.Resampling.BOX)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) array."""
    return np.asarray(render_pil(scene, size))
