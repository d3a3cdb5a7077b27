"""Sampling defaults survive a retrain: checkpoints/<model>/defaults.json -> bundle -> export -> manifest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from dalle2_rt.models import registry  # noqa: E402
from dalle2_rt.training import bundle as bundle_mod  # noqa: E402
from dalle2_rt.training import stages  # noqa: E402
from dalle2_rt.training.config import config_from_dict  # noqa: E402
from export import manifest as mf  # noqa: E402
from export.all import export_folder  # noqa: E402
from export.sources import SourceError, find_sources  # noqa: E402
from tests.conftest import tiny_config_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "checkpoints" / "shapes-v2"

# Chosen so that no value equals the exporter's built-in default or a trained run's model.json.
CHOSEN = {
    "prior": {"sampler": "ddpm", "steps": 3, "guidance": 1.5, "candidates": 1},
    "decoder": {"steps": 2, "guidance": 2.5, "candidates": 2, "operation_steps": 5},
    "sr": {"steps": 2},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of all four stages, 2 steps each: its model.json files carry no sampling defaults."""
    cfg = config_from_dict(tiny_config_dict(tmp_path_factory.mktemp("run"), steps=2))
    stages.train_all(cfg)
    return Path(cfg.out_dir)


def test_train_bundle_export_keeps_the_chosen_defaults(run, tmp_path):
    for stage in ("prior", "decoder", "sr"):
        assert "defaults" not in registry.read_meta(run / stage / "model")  # a retrain forgets them
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / registry.DEFAULTS).write_text(json.dumps(CHOSEN))
    assert bundle_mod.main([str(run), str(ckpt)]) == 0
    for stage, chosen in CHOSEN.items():
        assert registry.read_meta(ckpt / stage / "model")["defaults"] == chosen

    engines = tmp_path / "engines"
    export_folder(ckpt, engines, name="tiny", quiet=True)
    got = json.loads((engines / "manifest.json").read_text())["stages"]
    assert got["prior"]["defaults"] == {**mf.DEFAULTS["prior"], **CHOSEN["prior"]}
    assert got["decoder"]["defaults"] == {**mf.DEFAULTS["decoder"], **CHOSEN["decoder"]}
    assert got["sr"][0]["defaults"] == {**mf.DEFAULTS["sr"], **CHOSEN["sr"]}

    # Editing defaults.json alone reaches the export (and changes the source digest, so the folder rebuilds).
    before = find_sources(ckpt).decoder
    (ckpt / registry.DEFAULTS).write_text(json.dumps({**CHOSEN, "decoder": {**CHOSEN["decoder"], "steps": 7}}))
    after = find_sources(ckpt).decoder
    assert mf.stage_defaults("decoder", after)["steps"] == 7
    assert after.meta_sha256 != before.meta_sha256


def test_bundle_defaults_option_replaces_the_committed_file(run, tmp_path):
    given = tmp_path / "mine.json"
    given.write_text(json.dumps({"decoder": {"steps": 4}}))
    ckpt = tmp_path / "ckpt"
    assert bundle_mod.main([str(run), str(ckpt), "--defaults", str(given)]) == 0
    assert json.loads((ckpt / registry.DEFAULTS).read_text()) == {"decoder": {"steps": 4}}
    assert registry.read_meta(ckpt / "decoder" / "model")["defaults"] == {"steps": 4}
    assert "defaults" not in registry.read_meta(ckpt / "prior" / "model")


def test_bundle_keeps_a_distilled_decoder_from_the_recipes_guided_one(run, tmp_path, capsys):
    """The bundled decoder is step-distilled; the recipe retrains a guided one. Bundling the run over it is
    refused before anything is written; --stages bundles the other stages and leaves the decoder alone."""
    ckpt = tmp_path / "ckpt"
    assert bundle_mod.main([str(run), str(ckpt)]) == 0
    meta_path = ckpt / "decoder" / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["distilled_steps"] = 3
    meta_path.write_text(json.dumps(meta))
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    given = tmp_path / "mine.json"
    given.write_text(json.dumps({"decoder": {"steps": 4}}))
    for extra in ([], ["--defaults", str(given)]):
        assert bundle_mod.main([str(run), str(ckpt)] + extra) == 1
        assert "holds a decoder distilled otherwise" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before  # nothing written
    assert bundle_mod.main([str(run), str(ckpt), "--stages", "clip,prior,sr"]) == 0
    assert "bundled clip, prior, sr" in capsys.readouterr().out
    assert meta_path.read_bytes() == before[meta_path]
    assert bundle_mod.main([str(run), str(ckpt), "--stages", "clip,decodr"]) == 2
    assert "--stages takes" in capsys.readouterr().err


def test_bundle_writes_a_distillation_stage_as_the_stage_its_model_is(run, tmp_path, capsys):
    """sr_steps (a step-distilled SR) is bundled as sr; over an undistilled sr only with --replace; two run stages
    that are both an sr are refused until --stages names one."""
    import shutil

    student = tmp_path / "run2"
    shutil.copytree(run / "sr" / "model", student / "sr_steps" / "model")
    meta_path = student / "sr_steps" / "model" / "model.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "distilled_steps": 1}))
    one_step = tmp_path / "one-step.json"
    one_step.write_text(json.dumps({"sr": {"steps": 1}}))
    fresh = tmp_path / "fresh"
    assert bundle_mod.main([str(student), str(fresh), "--stages", "sr_steps"]) == 1  # no defaults: steps unknown
    assert "distilled to sample in 1 steps, but the defaults it would get say None" in capsys.readouterr().err
    assert not (fresh / "sr").exists()
    assert bundle_mod.main([str(student), str(fresh), "--stages", "sr_steps", "--defaults", str(one_step)]) == 0
    assert "bundled sr into" in capsys.readouterr().out
    meta = registry.read_meta(fresh / "sr" / "model")
    assert meta["distilled_steps"] == 1 and meta["defaults"] == {"steps": 1}
    assert not (fresh / "sr_steps").exists()

    ckpt = tmp_path / "ckpt"
    (ckpt).mkdir()
    (ckpt / registry.DEFAULTS).write_text(json.dumps(CHOSEN))  # sr steps 2, the undistilled SR's
    assert bundle_mod.main([str(run), str(ckpt)]) == 0
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert bundle_mod.main([str(student), str(ckpt), "--stages", "sr_steps"]) == 1
    assert "holds an sr distilled otherwise" in capsys.readouterr().err
    # --replace alone would give the one-step student the two-step defaults: refused before anything is written
    assert bundle_mod.main([str(student), str(ckpt), "--stages", "sr_steps", "--replace"]) == 1
    assert "say 2: give sr steps = 1" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    given = tmp_path / "with-one-step.json"
    given.write_text(json.dumps({**CHOSEN, "sr": {"steps": 1}}))
    assert bundle_mod.main([str(student), str(ckpt), "--stages", "sr_steps", "--replace", "--defaults",
                            str(given)]) == 0
    assert registry.read_meta(ckpt / "sr" / "model")["distilled_steps"] == 1
    assert registry.read_meta(ckpt / "sr" / "model")["defaults"]["steps"] == 1

    shutil.copytree(run / "sr" / "model", student / "sr" / "model")
    assert bundle_mod.main([str(student), str(tmp_path / "both")]) == 1
    assert "both an sr: name one with --stages" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


@pytest.mark.parametrize("bad, says", [
    ({"decoder": {"step": 4}}, "decoder.step: unknown key"),
    ({"decoder": {"steps": 0}}, "decoder.steps = 0"),
    ({"decoder": {"operation_steps": 0}}, "decoder.operation_steps = 0"),
    ({"decoder": {"operation_steps": 6.0}}, "decoder.operation_steps = 6.0"),
    ({"prior": {"guidance": "high"}}, "prior.guidance = 'high'"),
    ({"decoder": 5}, "'decoder' must be an object"),
])
def test_a_bad_defaults_file_is_refused_by_name(tmp_path, bad, says):
    (tmp_path / registry.DEFAULTS).write_text(json.dumps(bad))
    with pytest.raises(registry.CheckpointError, match=says.replace(".", r"\.").replace("(", r"\(")):
        registry.read_defaults(tmp_path)


def test_exporter_refuses_defaults_for_a_stage_it_does_not_have(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for stage in ("clip", "prior", "decoder", "sr"):
        (ckpt / stage).symlink_to(tiny_checkpoints / stage)
    (ckpt / registry.DEFAULTS).write_text(json.dumps({"decoer": {"steps": 4}}))
    with pytest.raises(SourceError, match="no stage folder for 'decoer'"):
        find_sources(ckpt)


def test_bundled_model_json_files_agree_with_its_defaults_file():
    chosen = registry.read_defaults(BUNDLED)
    assert set(chosen) == {"prior", "decoder", "sr"}
    for stage, entry in chosen.items():
        assert registry.read_meta(BUNDLED / stage / "model")["defaults"] == entry, stage
