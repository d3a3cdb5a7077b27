"""Fidelity by stage (bench/stages.py): its stage calls are the pipeline's own, and its rows count what they say."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench import stages as S
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import caption_text, parse_caption, score_spec


@pytest.fixture(scope="module")
def calls(tiny_engines):
    return S.StageCalls(Pipeline.load(tiny_engines, threads=1))


def test_decode_and_upsample_are_variations_pixel_for_pixel(calls):
    """A reconstruction row is exactly `variations` of the render (image 0, same seed)."""
    spec, render = S.full_single_specs(1, seed=4)[0]
    embed = calls.encode_images(render[None])
    x = calls.upsample(calls.decode(embed, seed=9), seed=9)
    ours = S.to_uint8(np.clip(x, *calls.pixel_range), calls.pixel_range)[0]
    theirs = np.asarray(calls.pipe.variations(Image.fromarray(render), seed=9)[0])
    assert np.array_equal(ours, theirs)


def test_prior_embeddings_are_unit_rows_that_depend_on_the_seed(calls):
    caps = ["a red circle", "a blue star at the top"]
    a, b = calls.prior_embeddings(caps, seed=0), calls.prior_embeddings(caps, seed=1)
    assert a.shape == calls.encode_text(caps)["text_embed"].shape  # (2, D): CLIP's embedding space
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, calls.prior_embeddings(caps, seed=0)) and not np.allclose(a, b)


def test_full_single_specs_name_every_attribute_and_render_them():
    for spec, img in S.full_single_specs(20, seed=1):
        assert spec.size and spec.position and spec.background
        assert parse_caption(caption_text(spec)) == spec
        assert score_spec(img, spec)["fully_right"]


def test_box_down_averages_blocks():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2, :2] = 200  # the top-left 2×2 block
    img[0, 0, 2] = 100  # one pixel of the top-right block
    out = S.box_down(img)
    assert out.shape == (1, 2, 2, 3)
    assert out[0, 0, 0, 0] == 200 and out[0, 0, 1, 0] == 25 and out[0, 1, 1, 0] == 0


def test_rate_and_its_standard_error():
    r = S._rate([1, 1, 1, 0])
    assert (r.right, r.n, r.rate) == (3, 4, 0.75)
    assert r.se == pytest.approx(np.sqrt(0.75 * 0.25 / 4))


def test_diagnose_counts_every_row(calls):
    d = S.diagnose(calls, groups=1, recon=4, recon_two=3, log=lambda *_: None)
    clip = d["clip"]
    assert clip["image_to_caption_strict"].n == 100 and clip["caption_to_image_strict"].n == 100
    assert clip["image_to_caption_strict_single"].n + clip["image_to_caption_strict_two"].n == 100
    assert clip["confusions"]["misses"] == 100 - clip["image_to_caption_strict"].right
    assert d["prior"]["render_retrieval_strict"].n == 100 and d["prior"]["cosine_to_render"]["n"] == 100
    prior = d["prior"]
    assert prior["render_retrieval_strict_single"].n == clip["image_to_caption_strict_single"].n
    assert (prior["render_retrieval_strict_single"].right + prior["render_retrieval_strict_two"].right
            == prior["render_retrieval_strict"].right)
    for row in ("two_at_32", "two_at_64"):
        assert d[row].count("two") == 3 and d[row].count("single") == 0
    assert d["ground_truth"].count("single") == 4 and d["ground_truth"].rate("fully_right", "single") == 1.0
    for row in ("at_32", "at_64", "sr"):
        assert d[row].count("single") == 4
    assert d["end_to_end"].count("all") == 100
    table = S.render_table(d)
    for label in ("image to caption strict", "render retrieval", "decoder reconstruction 32×32", "SR alone",
                  "decoder reconstruction + SR, two-object 64×64", "end to end, two-object"):
        assert label in table


def test_overrides_reach_every_stage_and_the_end_to_end_call(calls):
    """`python -m bench.fidelity --stages --decoder-steps 2 ...`: the stage rows and the end-to-end row run at the
    overrides, pixel for pixel what the pipeline draws with them, not at the manifest defaults."""
    over = S.StageCalls(calls.pipe, decoder_steps=2, sr_steps=1, decoder_guidance=1.0)
    assert over.run["decoder"]["steps"] == 2 and over.run["decoder"]["guidance"] == 1.0
    assert over.run["sr0"]["steps"] == 1
    assert calls.run["decoder"]["steps"] != 2  # the fixture's defaults differ, so the check below can fail
    spec, render = S.full_single_specs(1, seed=4)[0]
    embed = over.encode_images(render[None])
    x = over.upsample(over.decode(embed, seed=9), seed=9)
    ours = S.to_uint8(np.clip(x, *over.pixel_range), over.pixel_range)[0]
    theirs = np.asarray(calls.pipe.variations(Image.fromarray(render), seed=9, decoder_steps=2, sr_steps=1,
                                              decoder_guidance=1.0)[0])
    default = np.asarray(calls.pipe.variations(Image.fromarray(render), seed=9)[0])
    assert np.array_equal(ours, theirs) and not np.array_equal(ours, default)
    e2e = np.asarray(over(["a red circle"], seed=3)[0])
    assert np.array_equal(e2e, np.asarray(calls.pipe("a red circle", seed=3, decoder_steps=2, sr_steps=1,
                                                     decoder_guidance=1.0)[0]))


def test_bad_override_is_refused_before_any_work(calls):
    from dalle2_rt.runtime.errors import InputError

    with pytest.raises(InputError, match="decoder steps"):
        S.StageCalls(calls.pipe, decoder_steps=0)
