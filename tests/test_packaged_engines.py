"""The engine folder the package carries (dalle2_rt/engines/shapes-v2, made by `make package-engines`).

Its contract: it is the exported folder of the current checkpoints with float16-stored weights, and it draws
the same pixels. So these fail when checkpoints/ changed and the copy was not rebuilt, when its files do not
match their hashes, and when its graphs or images differ from the exported folder (engines/shapes-v2, which
`make test` exports first) beyond the bound export/package.py states (none: outputs equal). Also here: the
optimised copies ONNX Runtime makes at first use in the user cache directory (backends.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dalle2_rt.runtime.backends import BackendOptions, OnnxRuntimeBackend
from dalle2_rt.runtime.locate import package_engines
from dalle2_rt.runtime.manifest import MANIFEST, load_manifest, sha256_file, verify_files
from dalle2_rt.runtime.pipeline import DEFAULT_ENGINES, Pipeline

REPO = Path(__file__).resolve().parents[1]
PACKAGED = package_engines()
EXPORTED = REPO / "engines" / DEFAULT_ENGINES
CHECKPOINTS = REPO / "checkpoints" / DEFAULT_ENGINES
REBUILD = "rebuild it with `make package-engines` and commit dalle2_rt/engines"
FEW_STEPS = dict(prior_steps=4, decoder_steps=4, sr_steps=2)


@pytest.fixture(scope="module")
def packaged():
    return load_manifest(PACKAGED)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache directory for this test."""
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DALLE2_RT_ORT_CACHE", raising=False)
    return tmp_path / "cache"


def _exported_from_current_checkpoints():
    """engines/shapes-v2 when it was exported from the checkpoints the package copy names; else skip."""
    if not (EXPORTED / MANIFEST).is_file():
        pytest.skip("engines/shapes-v2 is not built (make engines)")
    exported = load_manifest(EXPORTED)
    if {n: s["sha256"] for n, s in exported.sources.items()} != {
            n: s["sha256"] for n, s in load_manifest(PACKAGED).sources.items()}:
        pytest.skip("engines/shapes-v2 was exported from other checkpoints (make engines)")
    return exported


def test_the_copy_names_the_current_checkpoints(packaged):
    """Checkpoints retrained or added without `make package-engines`: the wheel would ship the old model."""
    if not CHECKPOINTS.is_dir():
        pytest.skip("no checkpoints/ here (an installed package)")
    trained = {p.parents[1].name for p in CHECKPOINTS.glob("*/model/model.safetensors")}
    assert set(packaged.sources) == trained, f"stages differ from checkpoints/: {REBUILD}"
    for name, src in packaged.sources.items():
        folder = REPO / src["path"]
        assert sha256_file(folder / "model.safetensors") == src["sha256"], f"{name} was retrained: {REBUILD}"
        assert sha256_file(folder / "model.json") == src["meta_sha256"], f"{name}'s model.json changed: {REBUILD}"


def test_the_copy_is_intact_and_conforms(packaged):
    from tests.test_manifest_schema import check_manifest_schema

    verify_files(packaged, use_cache=False)
    check_manifest_schema(PACKAGED)
    record = packaged.data["package"]
    assert record["max_abs_err"] == 0.0 and set(record["graphs"]) == set(packaged.graphs)
    assert all(g["float16_initializers"] > 0 for g in record["graphs"].values())
    graphs = packaged.data["graphs"]
    assert all("optimized_file" not in g and g["trt"] == {} for g in graphs.values())  # made at first use
    # the prior's three graphs read one weights file: its tensors are stored once
    assert {graphs[g]["external_data"][0] for g in ("prior", "prior_prefix", "prior_step")} == {"prior.weights"}


def test_the_copy_stores_half_the_bytes_of_the_exported_graphs(packaged):
    size = sum(packaged.path(rel).stat().st_size for rel in packaged.files)
    assert size < 45e6  # on disk; the wheel compresses it to ~35 MB (tests/test_packaging.py checks < 40)
    if (EXPORTED / MANIFEST).is_file():
        exported = load_manifest(EXPORTED)
        plain = sum(g.file.stat().st_size for g in exported.graphs.values())
        weights = sum(packaged.path(rel).stat().st_size for rel in packaged.files if rel.endswith(".weights"))
        assert weights < 0.5 * plain


def test_graphs_equal_the_exported_ones(packaged):
    """Every graph against its exported source on the same inputs, and the recorded source is that file."""
    pytest.importorskip("onnx")  # export/package.py imports it (the train extra)
    from export.package import MAX_ABS_ERR, max_abs_err

    exported = _exported_from_current_checkpoints()
    assert set(packaged.graphs) == set(exported.graphs)
    for name, spec in exported.graphs.items():
        record = packaged.data["package"]["graphs"][name]
        assert record["source_sha256"] == exported.files[spec.file.name], f"{name}: {REBUILD}"
        assert max_abs_err(spec, spec.file, packaged.graphs[name].file, seed=7) <= MAX_ABS_ERR, name


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(int)


def test_images_equal_the_exported_folders_in_the_first_and_later_processes(packaged, cache):
    """Pixel for pixel, both when the optimised copies are made (a fresh install's first image) and when
    they are read back from the cache (every later process)."""
    _exported_from_current_checkpoints()
    prompt = ["a red circle on the left", "two blue squares"]
    want = _pixels(Pipeline.load(EXPORTED, threads=1)(prompt, seed=3, num_images=2, **FEW_STEPS))
    first = Pipeline.load(PACKAGED, threads=1)
    made = sorted((cache / "ort-optimized").glob("*.onnx"))
    assert len(made) == len({e.file for e in first.engines.values()}) and made
    assert _pixels(first(prompt, seed=3, num_images=2, **FEW_STEPS)).tolist() == want.tolist()
    later = Pipeline.load(PACKAGED, threads=1)
    assert sorted((cache / "ort-optimized").glob("*.onnx")) == made
    assert _pixels(later(prompt, seed=3, num_images=2, **FEW_STEPS)).tolist() == want.tolist()


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime's optimised copy in the user cache directory (backends.py)


def _run_sr(engine) -> dict:
    rng = np.random.default_rng(0)
    feeds = {t.name: (rng.standard_normal([2 if isinstance(d, str) else d for d in t.shape]) * 0.5).astype(t.dtype)
             for t in engine.spec.inputs}
    return engine(**feeds)


def test_the_optimised_copy_is_made_once_then_read(packaged, cache):
    first = OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0")
    assert first.file.parent == cache / "ort-optimized" and first.file.name.startswith("sr0-")
    stamp = first.file.stat()
    again = OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0")
    assert again.file == first.file and again.file.stat().st_mtime_ns == stamp.st_mtime_ns
    assert [p.name for p in first.file.parent.iterdir()] == [first.file.name]  # no temporary file left
    a, b = _run_sr(first), _run_sr(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_damaged_copy_is_made_again(packaged, cache):
    made = OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0").file
    good = _run_sr(OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0"))
    made.write_bytes(b"not a graph")
    engine = OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0")
    assert engine.file == made and made.stat().st_size > 1000
    assert all(np.array_equal(good[k], v) for k, v in _run_sr(engine).items())


def test_without_a_writable_cache_the_plain_graph_runs(packaged, cache, monkeypatch):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the cache folder would go")
    engine = OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0")
    assert engine.file == packaged.graphs["sr0"].file
    assert np.isfinite(_run_sr(engine)["pred"]).all()
    monkeypatch.setenv("DALLE2_RT_CACHE", str(cache.parent / "other"))
    monkeypatch.setenv("DALLE2_RT_ORT_CACHE", "0")  # switched off: nothing written
    assert OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0").file == packaged.graphs["sr0"].file
    assert not (cache.parent / "other").exists()


def test_the_copy_is_named_by_the_graph_and_its_weights(packaged, cache):
    backend = OnnxRuntimeBackend(packaged, BackendOptions(threads=1))
    spec = packaged.graphs["prior_step"]
    name = backend._cached_copy(spec, "CPUExecutionProvider")
    retrained = dataclasses.replace(packaged, files={**packaged.files, "prior.weights": "0" * 64})
    assert OnnxRuntimeBackend(retrained, BackendOptions(threads=1))._cached_copy(spec, "CPUExecutionProvider") != name
    assert backend._cached_copy(spec, "CUDAExecutionProvider") is None  # its fused nodes are the CPU's
    assert f"ort{backend.version}" in name.name


def test_folders_with_a_valid_optimised_graph_do_not_use_the_cache(cache):
    if not (EXPORTED / MANIFEST).is_file():
        pytest.skip("engines/shapes-v2 is not built (make engines)")
    exported = load_manifest(EXPORTED)
    backend = OnnxRuntimeBackend(exported, BackendOptions(threads=1))
    if exported.graphs["sr0"].optimized_for.get("onnxruntime") != backend.version:
        pytest.skip("engines/shapes-v2 was optimised by another onnxruntime (make engines)")
    assert backend.engine("sr0").file == exported.graphs["sr0"].optimized_file and not cache.exists()


def test_float16_storage_keeps_what_float16_would_round(tmp_path):
    """Only exact values are narrowed: a weight with a value float16 rounds stays float32, and the graph's
    output is the same bit for bit."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.package import narrow_weights

    rng = np.random.default_rng(0)
    exact = rng.standard_normal((16, 8)).astype(np.float16).astype(np.float32)
    rounded = rng.standard_normal((8, 8)).astype(np.float16).astype(np.float32)
    rounded[0, 0] = 1.0 + 2.0 ** -20  # float16 has 10 fraction bits: this one value would round
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(exact, "w"), numpy_helper.from_array(rounded, "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "a.onnx")
    counts = narrow_weights(model)
    onnx.save(model, tmp_path / "b.onnx")
    assert counts["float16"] == 1 and counts["float32"] == 1
    stored = {i.name: i.data_type for i in model.graph.initializer}
    assert stored == {"w__fp16": TensorProto.FLOAT16, "v": TensorProto.FLOAT}
    x = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, x)[0]
            for f in ("a.onnx", "b.onnx"))
    assert np.array_equal(a, b)



def test_the_checkpoint_check_fails_on_a_retrained_stage(packaged, tmp_path, monkeypatch):
    """The consistency test above can fail: against a copy of checkpoints/ where one stage was retrained."""
    if not CHECKPOINTS.is_dir():
        pytest.skip("no checkpoints/ here (an installed package)")
    import shutil
    import sys

    here, fake = sys.modules[__name__], tmp_path / "repo"
    checkpoints = fake / CHECKPOINTS.relative_to(REPO)
    shutil.copytree(CHECKPOINTS, checkpoints)
    monkeypatch.setattr(here, "REPO", fake)
    monkeypatch.setattr(here, "CHECKPOINTS", checkpoints)
    test_the_copy_names_the_current_checkpoints(packaged)  # the copy as it is: passes
    weights = fake / packaged.sources["decoder"]["path"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2] + b"\0\0")
    with pytest.raises(AssertionError, match="decoder was retrained: rebuild it with `make package-engines`"):
        test_the_copy_names_the_current_checkpoints(packaged)


def test_packaging_another_folder_keeps_its_images(tiny_engines, tmp_path, cache):
    """export/package.py on the tiny random-weight folder (float32 weights that float16 would round: they stay
    float32): the copy loads and draws the source's pixels; rerun, it is left alone."""
    pytest.importorskip("onnx")
    from export.package import package

    out = tmp_path / "tiny"
    assert package(tiny_engines, out, log=lambda *_: None) is not None
    assert package(tiny_engines, out, log=lambda *_: None) is None  # up to date
    copy = load_manifest(out)
    verify_files(copy, use_cache=False)
    assert copy.data["package"]["made_from"] == load_manifest(tiny_engines).sha256
    steps = dict(prior_steps=2, decoder_steps=2, sr_steps=1)
    want = _pixels(Pipeline.load(tiny_engines, threads=1)("a red circle", seed=1, num_images=2, **steps))
    got = _pixels(Pipeline.load(out, threads=1)("a red circle", seed=1, num_images=2, **steps))
    assert got.tolist() == want.tolist()


def test_copies_unused_for_a_month_go_when_one_is_made(packaged, cache):
    import os
    import time

    from dalle2_rt.runtime.backends import CACHE_KEEP_DAYS

    folder = cache / "ort-optimized"
    folder.mkdir(parents=True)
    stale, recent = folder / "decoder-old-cpu-ort0.onnx", folder / "decoder-new-cpu-ort0.onnx"
    for path, days in ((stale, CACHE_KEEP_DAYS + 1), (recent, CACHE_KEEP_DAYS - 1)):
        path.write_bytes(b"an older copy")
        os.utime(path, (time.time() - days * 86400,) * 2)
    made = OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0").file
    assert sorted(folder.iterdir()) == sorted([recent, made])
    os.utime(made, (time.time() - 2 * 86400,) * 2)
    assert OnnxRuntimeBackend(packaged, BackendOptions(threads=1)).engine("sr0").file == made
    assert time.time() - made.stat().st_mtime < 60  # read: its last use is now
