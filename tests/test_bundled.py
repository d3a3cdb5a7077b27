"""The bundled default model, as `make engines` builds it: loads, generates, agrees across backends.

`make test` builds engines/shapes-v2 before the suite, so these run in CI; they skip only where the engine
folder was not built (a bare `pytest` on a checkout without engines).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dalle2_rt.runtime.pipeline import DEFAULT_ENGINES, Pipeline
from dalle2_rt.world import parse_caption, score

ENGINES = Path(__file__).resolve().parents[1] / "engines" / DEFAULT_ENGINES
FEW_STEPS = dict(prior_steps=8, decoder_steps=8, sr_steps=3)

pytestmark = pytest.mark.skipif(not (ENGINES / "manifest.json").exists(),
                                reason="engines/shapes-v2 not built (run `make engines`)")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(ENGINES, threads=1)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(int)


def test_bundled_manifest_matches_the_committed_checkpoints(pipe):
    from dalle2_rt.runtime.manifest import sha256_file

    repo = ENGINES.parents[1]
    for name, src in pipe.manifest.sources.items():
        weights = repo / src["path"] / "model.safetensors"
        assert sha256_file(weights) == src["sha256"], f"{name}: engines are stale; rerun `make engines`"


def test_bundled_model_output_size_and_determinism(pipe):
    a = pipe("a large red circle on the left, black background", seed=3, num_images=2, **FEW_STEPS)
    b = pipe("a large red circle on the left, black background", seed=3, num_images=2, **FEW_STEPS)
    assert [im.size for im in a] == [(64, 64)] * 2
    assert np.array_equal(_pixels(a), _pixels(b))


def test_bundled_model_draws_the_named_background(pipe):
    """A coarse, reliable fidelity check: the border colour the scorer reads is the one the caption names."""
    captions = [f"a {c} {s}, {bg} background" for c, s, bg in
                [("red", "circle", "black"), ("blue", "square", "white"), ("yellow", "star", "gray"),
                 ("green", "triangle", "black"), ("pink", "cross", "white"), ("cyan", "circle", "gray")]]
    for cap in captions:
        parse_caption(cap)  # canonical
    images = pipe(captions, seed=0, num_images=1)
    right = [score(np.asarray(im), cap)["background"] for im, cap in zip(images, captions)]
    assert all(right), dict(zip(captions, right))


def test_bundled_onnxruntime_matches_torch_within_3_of_255(pipe):
    pytest.importorskip("torch")
    ref = Pipeline.load(ENGINES, backend="torch", threads=1)
    prompts = ["a yellow triangle above a purple cross, gray background", "a small blue star"]
    a = _pixels(pipe(prompts, seed=5, **FEW_STEPS))
    b = _pixels(ref(prompts, seed=5, **FEW_STEPS))
    assert np.abs(a - b).max() <= 3


def test_bundled_prefix_cache_draws_the_full_priors_pixels(pipe):
    """The prior's text-prefix cache (the default) against the full prior graph at every step."""
    full = Pipeline.load(ENGINES, threads=1, prefix_cache=False)
    assert "prior_step" in pipe.engines and "prior" in full.engines
    prompts = ["a yellow triangle above a purple cross, gray background", "a small blue star"]
    a = _pixels(pipe(prompts, seed=7, num_images=2, **FEW_STEPS))
    b = _pixels(full(prompts, seed=7, num_images=2, **FEW_STEPS))
    assert np.abs(a - b).max() <= 2
