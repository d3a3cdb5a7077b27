"""Negative prompts: the guided stages' unconditional branch conditioned on a text to avoid.

The exact check is the prior's: its unconditional half differs from the conditional one only in the text and
the keep input, so a negative prompt equal to the prompt makes both halves the same and guidance a no-op — the
prior's output equals the unguided prior's. The rest: the option reaches every surface (library, CLI, HTTP
schema via ``settings.OPTIONS``), is checked like a prompt, and is recorded in the PNG text.
"""
from __future__ import annotations

import numpy as np
import pytest

from dalle2_rt import cli
from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.runtime.settings import OPTIONS, Settings
from dalle2_rt.runtime.stage_runner import guidance_halves

FAST = {"prior_steps": 2, "decoder_steps": 2, "sr_steps": 1}


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return Pipeline.load(tiny_engines, threads=1)


def test_a_negative_prompt_equal_to_the_prompt_makes_the_prior_s_guidance_a_no_op(pipe):
    text = pipe.encode_text(["a red circle", "two blue stars"])
    unguided = pipe.prior(text, seed=5, prior_steps=3, prior_guidance=1.0)
    guided = pipe.prior(text, seed=5, prior_steps=3, prior_guidance=4.0)
    assert not np.allclose(guided, unguided, atol=1e-4)  # guidance does move it
    for row, prompt in enumerate(["a red circle", "two blue stars"]):
        same = pipe.prior(text, seed=5, rows=[row], indices=[row], prior_steps=3, prior_guidance=4.0,
                          negative_prompt=prompt)
        np.testing.assert_allclose(same[0], unguided[row], atol=2e-5)


def test_the_unconditional_half_reads_the_negative_text_with_its_keep_at_one(pipe):
    plan = pipe.prior_plan
    text = pipe.encode_text(["a red circle", "a blue star"])
    negative = pipe.encode_text(["green"])
    halves = guidance_halves(plan, text, {plan.cond_input: 1.0}, np.arange(2), None, negative=negative,
                             text_keep=plan.cond_input)
    assert (halves.cond[plan.cond_input] == 1).all() and (halves.uncond[plan.cond_input] == 1).all()
    for name, value in negative.items():
        assert np.array_equal(halves.uncond[name], np.repeat(value, 2, 0)), name
        assert np.array_equal(halves.cond[name], text[name]), name
    plain = guidance_halves(plan, text, {plan.cond_input: 1.0}, np.arange(2), None)
    assert (plain.uncond[plan.cond_input] == 0).all()


def test_the_decoder_s_unconditional_half_drops_the_image_and_reads_the_negative_text(pipe):
    plan = pipe.decoder_plan
    text = pipe.encode_text(["a red circle"])
    negative = pipe.encode_text(["green"])
    cond = {"image_embed": np.ones((1, text["text_embed"].shape[1]), np.float32), **text}
    halves = guidance_halves(plan, cond, {"image_keep": 1.0, "text_keep": 1.0}, np.arange(1), None,
                             negative=negative, text_keep="text_keep")
    assert (halves.uncond["image_keep"], halves.uncond["text_keep"]) == (0.0, 1.0)
    assert np.array_equal(halves.uncond["text_encodings"], negative["text_encodings"])
    assert np.array_equal(halves.uncond["image_embed"], cond["image_embed"])  # dropped by its keep, in the graph


def test_the_decoder_alone_honours_it(pipe):
    """Prior unguided (no unconditional half there): the decoder's guidance alone must still read it."""
    kwargs = dict(seed=3, prior_guidance=1.0, decoder_guidance=3.0, **FAST)
    plain = np.asarray(pipe("a red circle", **kwargs)[0])
    avoided = pipe("a red circle", negative_prompt="a green square", **kwargs)[0]
    assert not np.array_equal(np.asarray(avoided), plain)
    assert avoided.info["negative_prompt"] == "a green square"


def test_decode_without_text_refuses_a_negative_prompt(pipe):
    embed = pipe.prior(pipe.encode_text(["a red circle"]), seed=1, prior_steps=2)
    with pytest.raises(InputError, match="negative prompt"):
        pipe.decode(embed, None, seed=1, decoder_steps=2, negative_prompt="green")


def test_generation_with_a_negative_prompt_differs_is_reproducible_and_recorded(pipe):
    plain = pipe("a red circle", seed=3, **FAST)[0]
    avoided = pipe("a red circle", seed=3, negative_prompt="a green square", **FAST)
    again = pipe("a red circle", seed=3, negative_prompt="a green square", **FAST)
    assert np.array_equal(np.asarray(avoided[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(avoided[0]), np.asarray(plain))
    assert avoided[0].info["negative_prompt"] == "a green square" and "negative_prompt" not in plain.info
    # unguided stages have no unconditional branch: the negative prompt then changes nothing
    a = pipe("a red circle", seed=3, prior_guidance=1.0, decoder_guidance=1.0, **FAST)[0]
    b = pipe("a red circle", seed=3, prior_guidance=1.0, decoder_guidance=1.0, negative_prompt="green", **FAST)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "negative_prompt" not in b.info  # no stage read it: not recorded as if it had


@pytest.mark.parametrize("value, words", [("   ", "the negative prompt is empty"), ("x" * 2001, "at most 2000"),
                                          ("red \ud800", "lone surrogate"), (7, "must be a string")])
def test_a_bad_negative_prompt_is_refused_by_name(value, words):
    with pytest.raises(InputError, match="negative prompt") as e:
        Settings(negative_prompt=value)
    assert words in str(e.value)


def test_the_option_reaches_the_cli_and_the_http_schema(tiny_engines, tmp_path, monkeypatch, capsys):
    from dalle2_rt.serve.app import ImagesRequest

    assert "negative_prompt" in {o.name for o in OPTIONS}
    assert "negative_prompt" in ImagesRequest.model_fields
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as stop:  # argparse's type check: exit 2 before anything loads
        cli.main(["a red circle", "--engines", str(tiny_engines), "--seed", "3", "--negative-prompt", " ",
                  "--prior-steps", "2", "--decoder-steps", "2", "--sr-steps", "1", "--threads", "1"])
    rc = stop.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "negative prompt" in err[0], err
    source = tmp_path / "a.png"
    pipe_image = Pipeline.load(tiny_engines, threads=1)("a red circle", seed=1, **FAST)[0]
    pipe_image.save(source)
    rc = cli.main(["--variations", str(source), "--engines", str(tiny_engines), "--negative-prompt", "green",
                   "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--negative-prompt would be ignored" in err[0], err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a.png"]
