"""The bundled engines' pixels against committed references, and the demo prompt drawn fully right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_rt.runtime.pipeline import DEFAULT_ENGINES, Pipeline
from dalle2_rt.world import score
from tests import golden

ENGINES = Path(__file__).resolve().parents[1] / "engines" / DEFAULT_ENGINES
DEMO_PROMPT = "a large red circle on the left, black background"  # the Makefile's PROMPT, seed 0

pytestmark = pytest.mark.skipif(not (ENGINES / "manifest.json").exists(),
                                reason="engines/shapes-v2 not built (run `make engines`)")


@pytest.fixture(scope="module")
def images():
    return golden.render(Pipeline.load(ENGINES, threads=1))


@pytest.mark.parametrize("case", range(len(golden.CASES)))
def test_bundled_engines_draw_the_golden_images(images, case):
    prompt, seed = golden.CASES[case]
    want = np.asarray(Image.open(golden.path(prompt, seed)).convert("RGB"))
    mean, share = golden.difference(images[case], want)
    assert images[case].shape == want.shape
    assert mean <= golden.MAX_MEAN_ABS and share <= golden.MAX_SHARE_OFF, (
        f"{prompt!r} seed {seed}: mean |diff| {mean:.3f}, share off {share:.4f}; if the model or its defaults "
        "changed on purpose: python -m tests.golden --update")


def test_the_golden_images_are_not_blank():
    """The references must show something: an image of one colour would match a broken pipeline's output."""
    for prompt, seed in golden.CASES:
        want = np.asarray(Image.open(golden.path(prompt, seed)).convert("RGB"))
        assert len(np.unique(want.reshape(-1, 3), axis=0)) > 20, prompt


def test_the_demo_prompt_is_drawn_fully_right(images):
    assert golden.CASES[0] == (DEMO_PROMPT, 0)
    result = score(images[0], DEMO_PROMPT)
    assert result["fully_right"], result
    assert all(result[k] for k in ("background", "colour", "shape", "size", "position")), result
