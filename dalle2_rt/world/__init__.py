"""The shapes world (WORLD.md): vocabulary, scenes, renderer, canonical captions, stream and scorer. Torch-free."""

from .captions import CaptionError, CaptionSpec, caption_text, parse_caption
from .palette import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES
from .paraphrase import paraphrase
from .render import render, render_pil
from .sampling import random_caption_spec, sample_scene
from .scene import Scene, SceneObject
from .stream import world_stream

__all__ = [
    "BACKGROUNDS", "COLOURS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES",
    "CaptionError", "CaptionSpec", "Scene", "SceneObject",
    "caption_text", "paraphrase", "parse_caption", "random_caption_spec", "render", "render_pil", "sample_scene",
    "world_stream",
]
