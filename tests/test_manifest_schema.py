"""``manifest.schema.json``: the engine folder's contract for consumers that do not run our Python (C++, Triton).

Every folder the exporter writes must conform: the bundled engines, the tiny ones built here (inline and
external-data weights), diffusers-imported folders and folders with TensorRT records (those are checked in
tests/test_external_data.py, test_diffusers_interop.py and here through ``check_manifest_schema``). And the
schema must refuse what a consumer must not accept, or it would be a check that cannot fail.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema  # a dev dependency (setup.py extra "dev"): missing, the suite fails rather than skips
import pytest

from dalle2_rt.runtime.errors import EngineFolderError
from dalle2_rt.runtime.manifest import MANIFEST, load_manifest
from dalle2_rt.runtime.pipeline import DEFAULT_ENGINES

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "engines" / DEFAULT_ENGINES


def schema() -> dict:
    # read as package data: the file ships with the installed runtime (setup.py package_data)
    return json.loads(resources.files("dalle2_rt.runtime").joinpath("manifest.schema.json").read_text("utf-8"))


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def schema_errors(manifest: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in _validator().iter_errors(manifest)]


def check_manifest_schema(folder: Path) -> dict:
    """Assert that ``folder``'s manifest conforms to the schema; return it."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    assert schema_errors(manifest) == []
    return manifest


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(schema())


def test_tiny_engines_conform(tiny_engines):
    check_manifest_schema(tiny_engines)


def test_bundled_engines_conform():
    if not (BUNDLED / MANIFEST).is_file():
        pytest.skip("engines/shapes-v2 is not built (make engines)")
    check_manifest_schema(BUNDLED)


def _first_graph(m: dict) -> dict:
    return next(iter(m["graphs"].values()))


# Each mutation is something the runtime refuses too (checked below), so a schema that let it through would
# promise consumers a folder the reference implementation does not run.
MUTATIONS = {
    "schema_version 2": lambda m: m.update(schema_version=2),
    "no graphs": lambda m: m.pop("graphs"),
    "graph without file": lambda m: _first_graph(m).pop("file"),
    "tensor of unknown dtype": lambda m: _first_graph(m)["inputs"][0].update(dtype="complex64"),
    "file outside the folder": lambda m: _first_graph(m).update(file="../elsewhere.onnx"),
    "absolute file": lambda m: _first_graph(m).update(file="/tmp/x.onnx"),
    "unknown parameterization": lambda m: m["stages"]["decoder"].update(parameterization="score"),
    "alphas_cumprod of 1": lambda m: m["stages"]["prior"]["schedule"]["alphas_cumprod"].__setitem__(0, 1.0),
    "sr without noise_aug_t": lambda m: m["stages"]["sr"][0].pop("noise_aug_t"),
    "unknown variance": lambda m: m["stages"]["decoder"].update(variance="learned"),
    "unknown text_mask": lambda m: m["stages"]["text_encoder"].update(text_mask="attention"),
    "tokenizer of another format": lambda m: m["tokenizer"].update(format="sentencepiece/1"),
    "unknown preprocess step": lambda m: m["tokenizer"]["preprocess"].append("stem"),
    "no prior stage": lambda m: m["stages"].pop("prior"),
    "ddim_eta above 1": lambda m: m["stages"]["prior"]["schedule"].update(ddim_eta=1.5),
    "unknown spacing": lambda m: m["stages"]["decoder"]["schedule"].update(spacing="linspace_ceil"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_schema_refuses_what_the_runtime_refuses(tiny_engines, tmp_path, mutation):
    manifest = json.loads((tiny_engines / MANIFEST).read_text())
    broken = copy.deepcopy(manifest)
    MUTATIONS[mutation](broken)
    assert schema_errors(broken), f"the schema accepts a manifest with {mutation}"
    # the runtime agrees: the same manifest beside the same files is refused on load (or by the tokenizer)
    folder = tmp_path / "engines"
    folder.mkdir()
    for rel in manifest["files"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).symlink_to(tiny_engines / rel)
    (folder / MANIFEST).write_text(json.dumps(broken))
    with pytest.raises((EngineFolderError, ValueError)):
        m = load_manifest(folder)
        from dalle2_rt.runtime.tokenizer import Tokenizer
        Tokenizer.load(folder, m.tokenizer)


@pytest.mark.parametrize("place", [(), ("stages", "prior"), ("stages", "sr", 0), ("graphs", "prior"),
                                   ("graphs", "prior", "inputs", 0), ("tokenizer",), ("options",)])
def test_schema_refuses_keys_it_does_not_describe(tiny_engines, place):
    """The entries are closed: a key the exporter starts writing must be described in the schema first."""
    broken = json.loads((tiny_engines / MANIFEST).read_text())
    target = broken
    for key in place:
        target = target[key]
    target["undocumented"] = 1
    assert any("undocumented" in e for e in schema_errors(broken)), place
