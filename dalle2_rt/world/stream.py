"""The endless, seeded training stream of (image, caption) pairs from the shapes world."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .paraphrase import canonical_or_paraphrase
from .render import render
from .sampling import random_caption_spec, sample_scene


def world_stream(seed: int, size: int = 64, two_object_prob: float = 0.4,
                 paraphrase_prob: float = 0.3, labels: bool = False) -> Iterator[tuple]:
    """Yield (uint8 (size, size, 3) image, caption) forever; the same seed gives the same sequence.

    With ``labels`` each item also carries ``(spec, scene)``: what the caption names and what was drawn (the
    attribute heads of CLIP training read them). The images and captions are the same either way.

    Captions are canonical with probability 1 - paraphrase_prob, which must stay >= 0.5 so that the canonical
    grammar (what evaluation prompts use) dominates training.
    """
    if not 0.0 <= paraphrase_prob <= 0.5:
        raise ValueError(f"paraphrase_prob must be in [0, 0.5] (canonical captions at least half), "
                         f"got {paraphrase_prob}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    rng = np.random.default_rng(seed)
    while True:
        spec = random_caption_spec(rng, two_object_prob)
        scene = sample_scene(spec, rng)
        item = render(scene, size), canonical_or_paraphrase(spec, rng, paraphrase_prob)
        yield (*item, (spec, scene)) if labels else item
