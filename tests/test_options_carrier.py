"""One carrier of sampling options: ``Settings`` defines each option once (default, check, help), and the CLI
flags, the HTTP schema, the variations form, the Triton orchestrator's inputs and ``Pipeline`` 's keywords are
read off it, so an option added there (``decoder_choice_step`` was) reaches every surface."""
from __future__ import annotations

import dataclasses

import pytest

from dalle2_rt.cli import build_parser
from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.settings import OPTIONS, VARIATION_OPTIONS, Settings, check, options_given
from dalle2_rt.triton import orchestrator_io


def test_options_are_the_settings_fields_but_the_image_count_and_seed():
    names = [f.name for f in dataclasses.fields(Settings)]
    assert [o.name for o in OPTIONS] == [n for n in names if n not in ("num_images", "seed")]
    assert "decoder_choice_step" in [o.name for o in OPTIONS]
    assert {o.name for o in VARIATION_OPTIONS} == {"decoder_steps", "sr_steps", "decoder_guidance", "sampler"}
    for o in OPTIONS:
        assert o.kind in (int, float, str) and o.help and Settings.__dataclass_fields__[o.name].default is None


def test_the_cli_has_a_flag_per_option_with_its_help_and_check():
    actions = {a.dest: a for a in build_parser()._actions}
    for o in OPTIONS:
        action = actions[o.name]
        assert action.option_strings == ["--" + o.name.replace("_", "-")] and action.help == o.help
        if o.choices:
            assert list(action.choices) == list(o.choices)
    parser = build_parser()
    assert parser.parse_args(["x", "--decoder-choice-step", "2"]).decoder_choice_step == 2
    with pytest.raises(SystemExit):  # the library's check: "decoder choice step must be at least 1"
        parser.parse_args(["x", "--decoder-choice-step", "0"])


def test_the_triton_orchestrator_takes_every_option():
    inputs = {name: (dtype, optional, keyword) for name, dtype, _, optional, keyword in orchestrator_io.INPUTS}
    for o in OPTIONS:
        assert inputs[o.name] == ({int: "TYPE_INT32", float: "TYPE_FP64", str: "TYPE_STRING"}[o.kind], True, o.name)
    assert inputs["decoder_choice_step"][0] == "TYPE_INT32"


def test_the_http_schema_and_variations_form_take_the_options():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient  # noqa: F401 - the serve extra is installed

    from dalle2_rt.serve.app import ImagesRequest, _variations_form

    fields = ImagesRequest.model_fields
    for o in OPTIONS:
        assert fields[o.name].default is None and fields[o.name].description.startswith(o.help)
    req = ImagesRequest.model_validate({"prompt": "a red circle", "decoder_choice_step": 2})
    assert req.decoder_choice_step == 2
    with pytest.raises(ValueError, match="decoder_choice_stepz"):
        ImagesRequest.model_validate({"prompt": "a red circle", "decoder_choice_stepz": 2})  # extra="forbid"
    form = _variations_form().parameters
    assert [n for n in form if n in {o.name for o in OPTIONS}] == [o.name for o in VARIATION_OPTIONS]


def test_one_check_per_option_and_unknown_names_refused():
    assert check("decoder_choice_step", None) is None and check("decoder_choice_step", 3) == 3
    with pytest.raises(InputError, match="decoder choice step must be at least 1"):
        Settings(decoder_choice_step=0)
    with pytest.raises(TypeError, match="unknown sampling option.*decoder_stepz"):
        options_given({"decoder_stepz": 1})
    with pytest.raises(TypeError, match="unknown variations option.*candidates"):
        options_given({"candidates": 2}, VARIATION_OPTIONS, what="variations")
