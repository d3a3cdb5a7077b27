"""The shapes world (docs/world.md): vocabulary, scenes, renderer, canonical captions, stream and scorer. Torch-free."""

from .captions import CaptionError, CaptionSpec, caption_text, parse_caption
from .palette import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES
from .paraphrase import paraphrase
from .render import render, render_pil
from .sampling import random_caption_spec, random_full_single_spec, sample_scene, two_object_scenes
from .scene import Scene, SceneObject
from .score_summary import ScoreSummary, Tally, score_many
from .scorer import ATTRIBUTES, DetectedObject, Detection, detect, score, score_spec
from .stream import world_stream

__all__ = [
    # vocabulary
    "BACKGROUNDS", "COLOURS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES",
    # scenes and rendering
    "Scene", "SceneObject", "render", "render_pil", "sample_scene", "two_object_scenes",
    # captions
    "CaptionError", "CaptionSpec", "caption_text", "paraphrase", "parse_caption", "random_caption_spec",
    "random_full_single_spec",
    # training stream
    "world_stream",
    # scoring
    "ATTRIBUTES", "DetectedObject", "Detection", "ScoreSummary", "Tally", "detect", "score", "score_many",
    "score_spec",
]
