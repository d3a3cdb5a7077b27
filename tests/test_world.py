"""The shapes world against docs/world.md: grammar, parser, placement rules, renderer, stream."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dalle2_rt.world import (
    BACKGROUNDS,
    COLOURS,
    CaptionError,
    CaptionSpec,
    Scene,
    SceneObject,
    caption_text,
    paraphrase,
    parse_caption,
    random_caption_spec,
    render,
    sample_scene,
    world_stream,
)


def _specs(seed: int, n: int, two_object_prob: float = 0.5) -> list[CaptionSpec]:
    rng = np.random.default_rng(seed)
    return [random_caption_spec(rng, two_object_prob) for _ in range(n)]


# ---- captions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("a large red circle on the left, black background",
     CaptionSpec("single", ("red",), ("circle",), size="large", position="on the left", background="black")),
    ("a blue star", CaptionSpec("single", ("blue",), ("star",))),
    ("an orange star", CaptionSpec("single", ("orange",), ("star",))),
    ("a small orange square in the center", CaptionSpec("single", ("orange",), ("square",), size="small",
                                                         position="in the center")),
    ("a yellow triangle above a purple cross, gray background",
     CaptionSpec("two", ("yellow", "purple"), ("triangle", "cross"), relation="above", background="gray")),
    ("a red cross to the right of an orange cross",
     CaptionSpec("two", ("red", "orange"), ("cross", "cross"), relation="to the right of")),
])
def test_worked_examples_parse(text, spec):
    assert parse_caption(text) == spec
    assert caption_text(spec) == text


def test_round_trip_over_the_whole_distribution():
    specs = _specs(0, 3000)
    for spec in specs:
        text = caption_text(spec)
        assert parse_caption(text) == spec
        assert caption_text(parse_caption(text)) == text
    # The random specs do cover every optional part present and absent, and every word.
    single = [s for s in specs if s.kind == "single"]
    assert {s.size for s in single} == {None, "small", "large"}
    assert len({s.position for s in single}) == 6
    assert len({s.background for s in specs}) == 4
    assert len({s.relation for s in specs if s.kind == "two"}) == 4
    assert {c for s in specs for c in s.colours} == set(COLOURS)


@pytest.mark.parametrize("text", [
    "A red circle",                                # capital
    "a red circle.",                               # full stop
    "a orange star",                               # wrong article
    "an red circle",                               # wrong article
    "an large orange star",                        # article goes with the size word
    "a magenta circle",                            # unknown colour
    "a red hexagon",                               # unknown shape
    "a large red circle above a blue square",      # size in a two-object caption
    "a red circle above a large blue square",      # size in a two-object caption (second object)
    "a red circle above a red square",             # two objects must differ in colour
    "a red circle on the left please",             # trailing junk
    "a red circle, black background, thanks",      # trailing junk after the background
    "a red circle,black background",               # missing space
    "a red  circle",                               # double space
    " a red circle",                               # leading space
    "a red circle ",                               # trailing space
    "a red circle, brown background",              # unknown background
    "a red circle, black",                         # background without the word
    "red circle",                                  # no article
    "a circle",                                    # no colour
    "a red circle in the middle",                  # not a position phrase
    "a red circle on the left above a blue star",  # position and relation
    "a red circle above",                          # relation without its object
    "",
])
def test_parser_rejects_non_canonical(text):
    with pytest.raises(CaptionError):
        parse_caption(text)


def test_parser_error_says_what_was_expected():
    with pytest.raises(CaptionError, match="article 'an' before 'orange'"):
        parse_caption("a orange star")
    with pytest.raises(CaptionError, match="expected a colour"):
        parse_caption("a magenta circle")
    with pytest.raises(CaptionError, match="never name a size"):
        parse_caption("a red circle above a large blue square")


def test_spec_rejects_impossible_combinations():
    with pytest.raises(CaptionError):
        CaptionSpec("two", ("red", "blue"), ("circle", "star"), relation="above", size="small")
    with pytest.raises(CaptionError):
        CaptionSpec("single", ("red",), ("circle",), relation="above")
    with pytest.raises(CaptionError):
        CaptionSpec("two", ("red", "blue"), ("circle", "star"))


def test_paraphrases_name_the_same_words():
    rng = np.random.default_rng(1)
    for spec in _specs(1, 300):
        text = paraphrase(spec, rng).lower()
        for word in spec.colours + spec.shapes:
            assert word in text
        for part in (spec.size, spec.position, spec.background):
            if part:
                assert part in text
        if spec.relation:  # the relation or its inverse with the objects swapped
            assert any(r in text for r in ("left of", "right of", "above", "below"))


# ---- placement -----------------------------------------------------------------------------------------------

def test_scenes_satisfy_their_specs():
    rng = np.random.default_rng(2)
    for spec in _specs(2, 2000):
        scene = sample_scene(spec, rng)
        assert scene.background == (spec.background or scene.background)
        assert [o.colour for o in scene.objects] == list(spec.colours)
        assert [o.shape for o in scene.objects] == list(spec.shapes)
        for o in scene.objects:  # wholly inside the canvas
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
        if spec.kind == "single":
            (o,) = scene.objects
            if spec.size == "small":
                assert 0.25 <= o.s <= 0.31
            elif spec.size == "large":
                assert 0.45 <= o.s <= 0.51
            else:
                assert 0.25 <= o.s <= 0.31 or 0.45 <= o.s <= 0.51
            check = {"on the left": o.cx < 0.4, "on the right": o.cx > 0.6, "at the top": o.cy < 0.4,
                     "at the bottom": o.cy > 0.6, "in the center": 0.4 <= o.cx <= 0.6 and 0.4 <= o.cy <= 0.6,
                     None: True}
            assert check[spec.position], (spec, o)
        else:
            a, b = scene.objects
            assert a.colour != b.colour
            assert 0.25 <= a.s <= 0.31 and 0.25 <= b.s <= 0.31  # small only
            dx, dy = a.cx - b.cx, a.cy - b.cy
            gap = (a.s + b.s) / 2
            assert abs(dx) >= gap or abs(dy) >= gap  # boxes do not overlap
            check = {"to the left of": dx <= -0.3 and abs(dx) > abs(dy),
                     "to the right of": dx >= 0.3 and abs(dx) > abs(dy),
                     "above": dy <= -0.3 and abs(dy) > abs(dx),
                     "below": dy >= 0.3 and abs(dy) > abs(dx)}
            assert check[spec.relation], (spec, a, b)


def test_unnamed_attributes_vary():
    rng = np.random.default_rng(3)
    spec = parse_caption("a red circle")
    scenes = [sample_scene(spec, rng) for _ in range(200)]
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert min(s.objects[0].s for s in scenes) < 0.31 and max(s.objects[0].s for s in scenes) > 0.45
    xs = [s.objects[0].cx for s in scenes]
    assert min(xs) < 0.35 and max(xs) > 0.65


# ---- renderer ------------------------------------------------------------------------------------------------

# Area of each shape as a fraction of its box (docs/world.md geometry).
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9,
         "star": 5 * 0.5 * 0.2 * math.sin(math.radians(36))}


@pytest.mark.parametrize("shape", list(_AREA))
def test_shape_geometry(shape):
    # A shape of box side 0.5 W at 128 px: coverage area and centroid match the analytic shape.
    img = render(Scene("black", (SceneObject("red", shape, 0.5, 0.5, 0.5),)), 128).astype(float)
    cover = (img[..., 0] - 16) / (220 - 16)
    area = cover.sum() / (0.5 * 128) ** 2
    assert area == pytest.approx(_AREA[shape], rel=0.02)
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    cx = (cover * xs).sum() / cover.sum() / 128
    assert cx == pytest.approx(0.5, abs=0.004)  # every shape is left-right symmetric
    cy = (cover * ys).sum() / cover.sum() / 128
    expected_cy = {"triangle": 0.5 + 0.5 / 6}.get(shape, 0.5)  # a triangle's centroid is 1/3 up from its base
    assert cy == pytest.approx(expected_cy, abs=0.006)
    # Flat colours only: every pixel is a mix of background and object colour, the interior is exact.
    colour = np.array(COLOURS["red"], float)
    bg = np.array(BACKGROUNDS["black"], float)
    t = cover[..., None]
    assert np.abs(img - (t * colour + (1 - t) * bg)).max() <= 1.0
    assert tuple(img[64, 64].astype(int)) == COLOURS["red"]


def test_render_is_deterministic_and_has_palette_colours():
    rng = np.random.default_rng(4)
    for spec in _specs(4, 50):
        scene = sample_scene(spec, rng)
        a, b = render(scene), render(scene)
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
        assert np.array_equal(a, b)
        flat = a.reshape(-1, 3)
        colours, counts = np.unique(flat, axis=0, return_counts=True)
        by_count = {tuple(int(v) for v in c): int(n) for c, n in zip(colours, counts)}
        # The background colour is the commonest pixel, each object's colour appears as flat interior pixels.
        assert max(by_count, key=by_count.get) == BACKGROUNDS[scene.background]
        for o in scene.objects:
            assert by_count.get(COLOURS[o.colour], 0) >= 40
            assert tuple(a[int(o.cy * 64), int(o.cx * 64)]) == COLOURS[o.colour]  # every shape covers its centre


def test_render_sizes():
    scene = Scene("white", (SceneObject("blue", "square", 0.5, 0.5, 0.5),))
    for size in (32, 64, 100):
        img = render(scene, size)
        assert img.shape == (size, size, 3)
        blue = (img == COLOURS["blue"]).all(-1).sum()
        assert blue == pytest.approx((size / 2) ** 2, rel=0.1)


# ---- stream --------------------------------------------------------------------------------------------------

def test_stream_is_reproducible():
    a = list(itertools.islice(world_stream(7), 40))
    b = list(itertools.islice(world_stream(7), 40))
    c = list(itertools.islice(world_stream(8), 40))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert [x[1] for x in a] != [x[1] for x in c]
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img, _ in a)


def test_stream_mixes_canonical_and_paraphrased():
    captions = [c for _, c in itertools.islice(world_stream(9, size=16, two_object_prob=0.4, paraphrase_prob=0.3),
                                               1000)]
    canonical = 0
    for c in captions:
        try:
            parse_caption(c)
        except CaptionError:
            continue
        canonical += 1
    assert 0.65 < canonical / len(captions) < 0.8  # 0.7 canonical, plus paraphrases that happen to be canonical
    with pytest.raises(ValueError):
        next(world_stream(0, paraphrase_prob=0.6))
    two = sum(any(r in c for r in ("left of", "right of", " above ", " below ")) for c in captions)
    assert 0.3 < two / len(captions) < 0.5


def test_hard_negatives_change_one_thing_and_are_false_of_the_image():
    """Every kind of hard negative of a spec is a valid canonical spec of the same kind and background, differs from
    the original, and the world's scorer finds it false of a render of the original (which it finds fully right);
    `hard_negative` draws one of them."""
    from dalle2_rt.world.negatives import hard_negative, hard_negatives
    from dalle2_rt.world.scorer import score_spec

    rng = np.random.default_rng(7)
    kinds_seen = set()
    for spec in _specs(7, 300, two_object_prob=0.5):
        image = render(sample_scene(spec, rng), 64)
        assert score_spec(image, spec)["fully_right"], spec
        for kind, neg in hard_negatives(spec, rng).items():
            assert neg != spec and neg.kind == spec.kind and neg.background == spec.background, kind
            assert parse_caption(caption_text(neg)) == neg
            assert not score_spec(image, neg)["fully_right"], (kind, spec, neg)
            kinds_seen.add(kind)
        drawn = hard_negative(spec, np.random.default_rng(0))
        assert drawn in hard_negatives(spec, np.random.default_rng(0)).values()
    assert kinds_seen == {"colour", "shape", "size", "position", "objects swapped", "colours traded",
                          "shapes traded", "relation inverted", "one shape", "one colour"}
