"""The scorer: right on (nearly) every render of the world, and wrong when the image contradicts the caption."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle2_rt.world import (
    ATTRIBUTES,
    SHAPES,
    CaptionError,
    Scene,
    SceneObject,
    caption_text,
    detect,
    parse_caption,
    random_caption_spec,
    render,
    sample_scene,
    score,
    score_many,
)


def _one(colour="red", shape="circle", s=0.28, cx=0.5, cy=0.5, background="white", size=64):
    return render(Scene(background, (SceneObject(colour, shape, s, cx, cy),)), size)


def test_fully_right_on_1000_fresh_renders():
    rng = np.random.default_rng(2024)
    specs = [random_caption_spec(rng, two_object_prob=0.4) for _ in range(1000)]
    images = [render(sample_scene(spec, rng), 64) for spec in specs]
    captions = [caption_text(spec) for spec in specs]
    summary = score_many(images, captions)
    rate = summary.rate("fully_right")
    print(f"\nscorer fully right on {summary.count()} renders: {rate:.2%}\n{summary}")
    assert rate >= 0.995
    assert summary.count("single") + summary.count("two") == 1000
    # An attribute is scored exactly when its caption names it.
    for spec, result in zip(specs, summary.results):
        assert set(result) == set(ATTRIBUTES)
        assert (result["size"] is None) == (spec.size is None)
        assert (result["position"] is None) == (spec.position is None)
        assert (result["relation"] is None) == (spec.relation is None)
        assert (result["background"] is None) == (spec.background is None)
        assert result["colour"] is not None and result["shape"] is not None


def test_right_image_scores_right():
    r = score(_one("red", "circle", 0.48, 0.3, 0.5, "black"), "a large red circle on the left, black background")
    assert r == {"colour": True, "shape": True, "size": True, "position": True, "relation": None,
                 "background": True, "fully_right": True}


@pytest.mark.parametrize("caption, image, wrong", [
    ("a red circle", _one("blue", "circle"), "colour"),
    ("a red circle on the left", _one("red", "circle", cx=0.75), "position"),
    ("a red circle at the top", _one("red", "circle", cy=0.75), "position"),
    ("a red circle in the center", _one("red", "circle", cx=0.2, cy=0.2), "position"),
    ("a red circle", _one("red", "square"), "shape"),
    ("a small red circle", _one("red", "circle", s=0.48), "size"),
    ("a large red circle", _one("red", "circle", s=0.28), "size"),
    ("a blue star, black background", _one("blue", "star", background="gray"), "background"),
])
def test_single_object_mistakes_are_caught(caption, image, wrong):
    r = score(image, caption)
    assert r[wrong] is False
    assert r["fully_right"] is False
    # Only the contradicted attribute is wrong: the others stay right.
    assert all(v for k, v in r.items() if k not in (wrong, "fully_right") and v is not None)


@pytest.mark.parametrize("drawn", SHAPES)
@pytest.mark.parametrize("named", SHAPES)
def test_every_shape_is_told_from_every_other(drawn, named):
    for s in (0.26, 0.5):  # smallest and largest boxes
        r = score(_one("green", drawn, s=s), f"a green {named}")
        assert r["shape"] is (drawn == named), (drawn, named, s)


def _pair(a, b, background="gray"):
    return render(Scene(background, (SceneObject(*a), SceneObject(*b))), 64)


def test_two_object_mistakes_are_caught():
    caption = "a yellow triangle above a purple cross, gray background"
    right = _pair(("yellow", "triangle", 0.28, 0.5, 0.2), ("purple", "cross", 0.28, 0.5, 0.8))
    assert score(right, caption)["fully_right"] is True
    swapped = _pair(("yellow", "triangle", 0.28, 0.5, 0.8), ("purple", "cross", 0.28, 0.5, 0.2))
    r = score(swapped, caption)
    assert r["relation"] is False and r["colour"] and r["shape"] and not r["fully_right"]
    side_by_side = _pair(("yellow", "triangle", 0.28, 0.2, 0.5), ("purple", "cross", 0.28, 0.8, 0.5))
    assert score(side_by_side, caption)["relation"] is False
    wrong_shape = _pair(("yellow", "star", 0.28, 0.5, 0.2), ("purple", "cross", 0.28, 0.5, 0.8))
    r = score(wrong_shape, caption)
    assert r["shape"] is False and r["relation"] is True
    missing = _one("yellow", "triangle", cx=0.5, cy=0.2, background="gray")
    r = score(missing, caption)
    assert r["colour"] is False and r["shape"] is False and r["relation"] is False and not r["fully_right"]
    left = _pair(("red", "circle", 0.28, 0.2, 0.5), ("blue", "square", 0.28, 0.8, 0.5), "white")
    assert score(left, "a red circle to the left of a blue square")["fully_right"] is True
    assert score(left, "a red circle to the right of a blue square")["relation"] is False
    assert score(left, "a blue square to the right of a red circle")["fully_right"] is True


def test_empty_image_finds_nothing():
    blank = render(Scene("white"), 64)
    assert detect(blank).objects == {}
    r = score(blank, "a red circle, white background")
    assert r["colour"] is False and r["shape"] is False and r["background"] is True and not r["fully_right"]


def test_inputs_any_size_and_pil():
    scene = Scene("black", (SceneObject("pink", "star", 0.48, 0.7, 0.7),))
    caption = "a large pink star at the bottom, black background"
    for size in (32, 64, 128):
        assert score(render(scene, size), caption)["fully_right"], size
    assert score(Image.fromarray(render(scene)), caption)["fully_right"]
    assert score(Image.fromarray(render(scene)).convert("RGBA"), caption)["fully_right"]
    with pytest.raises(TypeError):
        score(render(scene).astype(np.float32) / 255, caption)
    with pytest.raises(CaptionError):
        score(render(scene), "A large pink star.")


def test_robust_to_mild_noise_and_blur():
    # Generated images are never exact: the detector must not depend on exact palette values or crisp edges.
    rng = np.random.default_rng(5)
    n, right_noisy, right_blurred = 150, 0, 0
    for _ in range(n):
        spec = random_caption_spec(rng, 0.4)
        img = render(sample_scene(spec, rng))
        noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        right_noisy += score(noisy, caption_text(spec))["fully_right"]
        blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7))
        right_blurred += score(blurred, caption_text(spec))["fully_right"]
    assert right_noisy / n >= 0.97
    assert right_blurred / n >= 0.97


def test_score_many_aggregates_per_kind():
    good = _one("red", "circle", 0.28, 0.2, 0.5)
    pair = _pair(("red", "circle", 0.28, 0.2, 0.5), ("blue", "square", 0.28, 0.8, 0.5), "white")
    summary = score_many(
        [good, good, good, pair, pair],
        ["a red circle on the left",     # right
         "a red circle on the right",    # wrong position
         "a small red square",           # wrong shape, right size
         "a red circle to the left of a blue square, white background",  # right
         "a red circle above a blue square"],  # wrong relation
    )
    assert summary.count("single") == 3 and summary.count("two") == 2 and summary.count() == 5
    assert summary.rate("fully_right", "single") == pytest.approx(1 / 3)
    assert summary.rate("fully_right", "two") == pytest.approx(1 / 2)
    assert summary.rate("position", "single") == pytest.approx(1 / 2)  # named by two captions
    assert summary.rate("shape", "single") == pytest.approx(2 / 3)
    assert summary.rate("size", "single") == 1.0
    assert summary.rate("size", "two") is None
    assert summary.rate("relation", "two") == pytest.approx(1 / 2)
    assert summary.rate("background", "all") == 1.0 and summary.tallies["all"]["background"].named == 1
    d = summary.as_dict()
    assert d["two"]["n"] == 2 and d["single"]["position"] == {"right": 1, "named": 2, "rate": 0.5}
    assert "fully_right" in str(summary)
    with pytest.raises(ValueError):
        score_many([good], [])


def test_parse_then_score_spec_agrees_with_score():
    img = _one("orange", "cross", 0.48, 0.5, 0.5, "gray")
    caption = "a large orange cross in the center, gray background"
    assert parse_caption(caption).colours == ("orange",)
    assert score(img, caption)["fully_right"] is True
