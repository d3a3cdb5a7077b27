"""The public stage API of ``Pipeline`` (encode_text, encode_image, prior, decode, upsample, to_pil): composed,
the stages draw the whole call's pixels under the seed contract; injected latents replace the seed's x_T and
nothing else; options are the ``Settings`` fields and nothing else."""
from __future__ import annotations

import numpy as np
import pytest

from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.images import to_uint8
from dalle2_rt.runtime.noise import DECODER, PRIOR, NoiseStreams
from dalle2_rt.runtime.pipeline import Pipeline

FAST = {"prior_steps": 3, "decoder_steps": 3, "sr_steps": 2}


pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.fixture(scope="module")
def pipe(tiny_engines) -> Pipeline:
    return Pipeline.load(tiny_engines, threads=1)


def test_stages_composed_are_the_call_pixel_for_pixel(pipe):
    """Two prompts, two images each, prior and decoder candidates: the stages in turn give __call__'s pixels."""
    prompts, seed = ["a red circle", "two blue squares"], 5
    opts = {**FAST, "candidates": 2, "decoder_candidates": 2}
    want = pipe(prompts, seed=seed, num_images=2, output_type="np", **opts)  # (4, H, W, 3) uint8
    text = pipe.encode_text(prompts)
    rows, indices = [0, 0, 1, 1], [0, 1, 0, 1]
    embed = pipe.prior(text, seed=seed, rows=rows, indices=indices, **opts)
    x = pipe.decode(embed, text, seed=seed, rows=rows, indices=indices, **opts)
    got = to_uint8(pipe.upsample(x, seed=seed, indices=indices, **opts), pipe.pixel_range)
    assert got.shape == want.shape and np.array_equal(got, want)
    other = to_uint8(pipe.upsample(x, seed=seed + 1, indices=indices, **opts), pipe.pixel_range)
    assert not np.array_equal(other, want)  # the seed reaches the stage: the check above can fail


def test_output_type_np_is_the_pil_pixels(pipe):
    images = pipe("a green star", seed=3, num_images=2, **FAST)
    arrays = pipe("a green star", seed=3, num_images=2, output_type="np", **FAST)
    assert arrays.dtype == np.uint8 and arrays.shape == (2, *np.asarray(images[0]).shape)
    assert np.array_equal(arrays, np.stack([np.asarray(im) for im in images]))
    with pytest.raises(InputError, match="unknown output_type 'pt'"):
        pipe("a green star", output_type="pt")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_latents_the_seed_would_draw_give_the_same_samples(pipe, sampler):
    """``latents`` replace x_T only: the streams still make (and drop) that draw, so DDPM's later draws are the
    seed's too; other latents give other samples."""
    text = pipe.encode_text(["a yellow triangle"])
    opts = {**FAST, "sampler": sampler, "decoder_candidates": 2}
    embed = pipe.prior(text, seed=1, **opts)  # (1, D)
    want = pipe.decode(embed, text, seed=1, **opts)
    x_T = NoiseStreams(1, [0], DECODER, rows=2).standard_normal((2, *pipe.decoder_plan.x_shape))
    assert np.array_equal(pipe.decode(embed, text, seed=1, latents=x_T, **opts), want)
    other = NoiseStreams(99, [0], DECODER, rows=2).standard_normal(x_T.shape)
    assert not np.array_equal(pipe.decode(embed, text, seed=1, latents=other, keep_candidates=True, **opts),
                              pipe.decode(embed, text, seed=1, keep_candidates=True, **opts))
    prior_T = NoiseStreams(1, [0], PRIOR, rows=1).standard_normal((1, *pipe.prior_plan.x_shape))
    assert np.array_equal(pipe.prior(text, seed=1, latents=prior_T, **{**opts, "candidates": 1}),
                          pipe.prior(text, seed=1, **{**opts, "candidates": 1}))
    with pytest.raises(InputError, match="initial latents of shape"):
        pipe.decode(embed, text, seed=1, latents=x_T[:1], **opts)


def test_keep_candidates_returns_every_sample_and_clip_scores_rank_them(pipe):
    text = pipe.encode_text(["a purple cross"])
    opts = {**FAST, "decoder_candidates": 3}
    embed = pipe.prior(text, seed=2, **opts)
    every = pipe.decode(embed, text, seed=2, keep_candidates=True, **opts)  # (3, C, h, w)
    chosen = pipe.decode(embed, text, seed=2, **opts)  # (1, C, h, w)
    assert every.shape == (3, *pipe.decoder_plan.x_shape) and chosen.shape == (1, *pipe.decoder_plan.x_shape)
    scores = pipe.clip_scores(every, np.repeat(text["text_embed"], 3, 0))
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1 + 1e-6)
    assert np.array_equal(chosen[0], every[int(np.argmax(scores))])


def test_decode_without_text_is_variations(pipe, tmp_path):
    source = pipe("a red circle", seed=0, **FAST)[0]
    want = pipe.variations(source, seed=4, num_images=2, output_type="np", **{"decoder_steps": 3, "sr_steps": 2})
    embed = np.repeat(pipe.encode_image(source), 2, 0)
    x = pipe.decode(embed, seed=4, decoder_candidates=1, decoder_steps=3)
    got = to_uint8(pipe.upsample(x, seed=4, sr_steps=2), pipe.pixel_range)
    assert np.array_equal(got, want)


def test_stage_options_are_the_settings_fields(pipe):
    text = pipe.encode_text(["a red circle"])
    with pytest.raises(TypeError, match="unknown sampling option.*decoder_stepz"):
        pipe.prior(text, seed=0, decoder_stepz=3)
    with pytest.raises(TypeError, match="num_images"):
        pipe.prior(text, seed=0, num_images=2)  # a stage's images are its rows
    with pytest.raises(InputError, match="prior steps must be at least 1"):
        pipe.prior(text, seed=0, prior_steps=0)
    with pytest.raises(InputError, match="seed must be an integer"):
        pipe.prior(text, seed=None)
    with pytest.raises(InputError, match="one index per row"):
        pipe.prior(text, seed=0, indices=[0, 1])
    with pytest.raises(InputError, match="3 images for 1 text rows"):
        pipe.decode(np.zeros((3, text["text_embed"].shape[1]), np.float32), text, seed=0)


def test_to_pil_carries_metadata_and_the_folder(pipe):
    x = np.zeros((1, 3, 8, 8), np.float32)
    (image,) = pipe.to_pil(x, [{"operation": "test"}])
    assert image.size == (8, 8) and np.asarray(image)[0, 0].tolist() == [128, 128, 128]
    assert image.info["operation"] == "test" and image.info["manifest_sha256"] == pipe.manifest.sha256
