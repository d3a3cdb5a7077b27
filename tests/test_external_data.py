"""Graphs with external data (``<graph>.onnx.data``): what the exporter writes for graphs over 2 GB (karlo).

The threshold is forced to 0 bytes, so the tiny checkpoints take the same path as a 4 GB prior: every graph
and its ONNX Runtime copy keep their weights in one data file beside them, listed in the manifest.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dalle2_rt.runtime.errors import EngineFolderError
from dalle2_rt.runtime.manifest import load_manifest
from dalle2_rt.runtime.pipeline import Pipeline
from export import all as export_all
from export.manifest import MANIFEST
from export.onnx_export import REL_TOL
from tests.test_manifest_schema import check_manifest_schema

INLINE_MAX = 1024  # bytes: the largest tensor a graph with external data may still hold inline


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_external_folder(folder: Path) -> dict:
    """Assert the external-data layout of ``folder`` (every graph) and its manifest (schema included); return
    the manifest."""
    m = check_manifest_schema(folder)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {MANIFEST}
    for name, g in m["graphs"].items():
        assert g["external_data"] == [f"{name}.onnx.data"], name
        assert g["optimized_external_data"] == [f"{name}.opt.onnx.data"], name
        for graph, data in ((g["file"], g["external_data"]), (g["optimized_file"], g["optimized_external_data"])):
            model = onnx.load(str(folder / graph), load_external_data=False)
            assert max(len(t.raw_data) for t in model.graph.initializer) < INLINE_MAX, graph  # weights not inline
            stored = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            ends = [sum(int(e.value) for e in t.external_data if e.key in ("offset", "length")) for t in stored]
            assert stored and max(ends) <= (folder / data[0]).stat().st_size, graph
            for rel in (graph, *data):
                assert m["files"][rel] == _sha(folder / rel), rel
        for figures in (g["validation"], g["validation"]["optimized"]):  # the exporter's check loaded both
            assert figures["rel_err"] <= REL_TOL, name
    return m


def _images(folder: Path) -> np.ndarray:
    pipe = Pipeline.load(folder, threads=1)
    images = pipe(["a red circle", "a green square"], seed=3, prior_steps=3, decoder_steps=3, sr_steps=2)
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture(scope="module")
def external_engines(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "tiny"
    export_all.export_folder(tiny_checkpoints, out, name="tiny", quiet=True, external_data_threshold=0)
    return out


def test_every_graph_keeps_its_weights_beside_it(external_engines, tiny_engines):
    m = check_external_folder(external_engines)
    inline = json.loads((tiny_engines / MANIFEST).read_text())
    assert set(m["graphs"]) == set(inline["graphs"])
    for g in inline["graphs"].values():  # below the default threshold (1 GiB) nothing is external
        assert g["external_data"] == [] == g["optimized_external_data"]
    assert not [p for p in tiny_engines.iterdir() if p.suffix == ".data"]


def test_runtime_gives_the_inline_folders_images(external_engines, tiny_engines, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    got, want = _images(external_engines), _images(tiny_engines)
    assert got.std() > 0
    np.testing.assert_array_equal(got, want)


def test_tampered_or_unlisted_data_file_is_refused(external_engines, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "tiny"
    shutil.copytree(external_engines, copy)
    data = copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineFolderError, match=r"decoder\.onnx\.data: sha256"):
        Pipeline.load(copy)

    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"]["prior.opt.onnx.data"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineFolderError, match=r"prior\.opt\.onnx\.data.*not listed in 'files'"):
        load_manifest(copy)


def test_rebuild_carries_the_data_files_over(external_engines, tiny_checkpoints, tmp_path):
    out = tmp_path / "engines" / "tiny"
    shutil.copytree(external_engines, out)
    before = json.loads((out / MANIFEST).read_text())
    # another name: a new folder fingerprint, the same graphs (carried over, data files with them)
    result = export_all.export_folder(tiny_checkpoints, out, name="renamed", quiet=True, external_data_threshold=0)
    assert result.status == "built" and result.exported == [] and sorted(result.reused) == sorted(before["graphs"])
    after = check_external_folder(out)
    for rel, digest in before["files"].items():
        if rel.endswith(".data"):
            assert after["files"][rel] == digest, rel


def test_negative_threshold_is_refused(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_all.main(["--checkpoints", str(tiny_checkpoints), "--out", str(out),
                            "--external-data-threshold", "-1"]) == 2
    assert "--external-data-threshold must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="external_data_threshold"):
        export_all.export_folder(tiny_checkpoints, out, quiet=True, external_data_threshold=-1)
    assert not out.exists()
