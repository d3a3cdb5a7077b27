"""The TensorRT builder's pure logic (no TensorRT needed): profiles, engine keys, fp32 layer selection."""
from __future__ import annotations

import json

import onnx
import pytest

from dalle2_rt.runtime import trt_keys
from dalle2_rt.runtime.errors import BackendUnavailableError
from export import trt
from export.trt import LayerInfo, check_precision, fp32_layers, profile_shapes, trt_entry

# --------------------------------------------------------------------------------------------------------
# Optimisation profiles


def test_profile_shapes_from_manifest_entry(tiny_engines):
    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]
    dec = profile_shapes(graphs["decoder"])
    assert dec["x_t"] == ((1, 3, 16, 16), (2, 3, 16, 16), (16, 3, 16, 16))
    assert dec["t"] == ((1,), (2,), (16,))
    assert dec["text_encodings"] == ((1, 77, 32), (2, 77, 32), (16, 77, 32))
    assert profile_shapes(graphs["prior"])["x_t"] == ((1, 16), (4, 16), (32, 16))  # 2 · 8 · 2 candidates
    assert profile_shapes(graphs["text_encoder"])["tokens"] == ((1, 77), (1, 77), (8, 77))
    assert profile_shapes(graphs["sr0"])["low_res"][2] == (16, 3, 16, 16)
    assert set(profile_shapes(graphs["decoder"])) == {t["name"] for t in graphs["decoder"]["inputs"]}


def test_profile_shapes_from_spec_agree_with_manifest(tiny_engines, tiny_checkpoints):
    from export.sources import find_sources
    from export.specs import graph_specs

    graphs = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]
    for spec in graph_specs(find_sources(tiny_checkpoints)):
        assert profile_shapes(spec.io_entry()) == profile_shapes(graphs[spec.name]), spec.name


def test_profile_shapes_refuses_a_second_dynamic_axis():
    entry = {"inputs": [{"name": "x", "shape": ["batch", "height"]}], "profile": {"batch": {"min": 1, "opt": 1,
                                                                                           "max": 2}}}
    with pytest.raises(ValueError, match="only the 'batch' axis"):
        profile_shapes(entry)


# --------------------------------------------------------------------------------------------------------
# Engine keys


def test_engine_key_naming():
    assert trt_keys.engine_key("10.7.0", (9, 0)) == "10.7.0-sm90"
    assert trt_keys.engine_key("10.7.0.post1", "8.6") == "10.7.0-sm86"
    assert trt_keys.engine_key("10.3", 89) == "10.3.0-sm89"
    assert trt_keys.engine_key("10.13.2.6", (12, 0)) == "10.13.2-sm120"
    assert trt_keys.plan_path("10.7.0-sm90", "decoder") == "trt/10.7.0-sm90/decoder.plan"
    assert trt_keys.parse_key("10.7.0-sm120") == ("10.7.0", "120")
    with pytest.raises(ValueError):
        trt_keys.parse_key("10.7-sm90")
    with pytest.raises(ValueError):
        trt_keys.engine_key("ten", (9, 0))


def test_check_engine_compatible():
    entry = {"file": "decoder.onnx", "trt": {"10.7.0-sm90": "trt/10.7.0-sm90/decoder.plan",
                                             "10.7.0-sm86": "trt/10.7.0-sm86/decoder.plan"}}
    assert trt_keys.check_engine_compatible(entry, "10.7.0.post1", (8, 6)) == "trt/10.7.0-sm86/decoder.plan"
    assert trt_keys.check_engine_compatible(entry["trt"], "10.7.0", (9, 0)) == "trt/10.7.0-sm90/decoder.plan"
    with pytest.raises(trt_keys.EngineMismatchError, match=r"10\.8\.0-sm90.*built for TensorRT 10\.7\.0"):
        trt_keys.check_engine_compatible(entry, "10.8.0", (9, 0), graph="decoder")
    with pytest.raises(trt_keys.EngineMismatchError, match="engines for 10.7.0-sm86, 10.7.0-sm90 only"):
        trt_keys.check_engine_compatible(entry, "10.7.0", (8, 9))
    with pytest.raises(BackendUnavailableError, match="no TensorRT engines were built"):
        trt_keys.check_engine_compatible({"trt": {}}, "10.7.0", (8, 9))


# --------------------------------------------------------------------------------------------------------
# fp32 layer selection


def _net():
    """A miniature U-Net step in TensorRT layer terms: a timestep embedding, a norm, attention, a conv."""
    L = LayerInfo
    return [
        L("freq_const", "CONSTANT", (), ("freqs",)),
        L("t_unsq", "SHUFFLE", ("t",), ("t1",)),
        L("t_mul", "ELEMENTWISE", ("t1", "freqs"), ("args",)),
        L("t_cos", "UNARY", ("args",), ("cos",)),
        L("t_sin", "UNARY", ("args",), ("sin",)),
        L("t_cat", "CONCATENATION", ("cos", "sin"), ("feat",)),
        L("w1", "CONSTANT", (), ("w1",)),
        L("t_fc1", "MATRIX_MULTIPLY", ("feat", "w1"), ("h",)),
        L("t_act", "ACTIVATION", ("h",), ("emb",)),
        L("x_shape", "SHAPE", ("x_t",), ("xs",), float_outputs=False),
        L("t_shape", "SHAPE", ("t",), ("ts",), float_outputs=False),
        L("conv", "CONVOLUTION", ("x_t",), ("c",)),
        L("gn", "NORMALIZATION", ("c",), ("n",)),
        L("add", "ELEMENTWISE", ("n", "emb"), ("a",)),
        L("qk", "MATRIX_MULTIPLY", ("a", "a"), ("logits",)),
        L("sm", "SOFTMAX", ("logits",), ("p",)),
        L("l2", "REDUCE", ("p",), ("r",)),
    ]


def test_fp32_layers_by_type_and_timestep_path():
    chosen = fp32_layers(_net(), ["x_t", "t"], ["t"])
    assert set(chosen) == {"gn", "sm", "l2", "t_unsq", "t_mul", "t_cos", "t_sin", "t_cat", "freq_const"}
    assert "LayerNorm/GroupNorm" in chosen["gn"] and "timestep" in chosen["t_cos"]
    # the walk stops at the first projection; shape layers and the rest of the network keep fp16
    assert not {"t_fc1", "t_act", "w1", "t_shape", "x_shape", "conv", "add", "qk"} & set(chosen)


def test_fp32_layers_without_timestep_inputs():
    assert set(fp32_layers(_net(), ["x_t", "t"], [])) == {"gn", "sm", "l2"}


def test_fp32_layers_follow_a_constant_chain_feeding_the_timestep_path():
    L = LayerInfo
    net = [L("idx", "CONSTANT", (), ("i",)), L("scale", "ELEMENTWISE", ("i",), ("e",)),
           L("exp", "UNARY", ("e",), ("freqs",)), L("mul", "ELEMENTWISE", ("t", "freqs"), ("args",)),
           L("sin", "UNARY", ("args",), ("s",)), L("fc", "MATRIX_MULTIPLY", ("s",), ("h",))]
    assert set(fp32_layers(net, ["t"], ["t"])) == {"idx", "scale", "exp", "mul", "sin"}


# ONNX op -> the TensorRT layer the parser makes of it (for the ops these graphs use)
_TRT_TYPE = {"Gemm": "MATRIX_MULTIPLY", "MatMul": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION",
             "LayerNormalization": "NORMALIZATION", "InstanceNormalization": "NORMALIZATION", "Softmax": "SOFTMAX",
             "ReduceL2": "REDUCE", "Sin": "UNARY", "Cos": "UNARY", "Erf": "UNARY", "Sigmoid": "ACTIVATION",
             "Concat": "CONCATENATION", "Shape": "SHAPE", "Resize": "RESIZE", "Split": "SLICE", "Slice": "SLICE",
             "Gather": "GATHER", "Constant": "CONSTANT"}


@pytest.mark.parametrize("graph", ["decoder", "sr0", "prior"])
def test_timestep_selection_on_the_exported_graph(tiny_engines, graph):
    """On the real ONNX graph: the timestep walk takes the sinusoidal embedding and stops at its first Gemm."""
    model = onnx.load(str(tiny_engines / f"{graph}.onnx"), load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    layers = [LayerInfo(n.name, _TRT_TYPE.get(n.op_type, "SHUFFLE" if n.op_type in ("Reshape", "Unsqueeze",
                                                                                     "Transpose") else "ELEMENTWISE"),
                        tuple(i for i in n.input if i and i not in consts), tuple(n.output),
                        float_outputs=n.op_type != "Shape")
              for n in model.graph.node]
    ops = {n.name: n.op_type for n in model.graph.node}
    timestep_inputs = ["t", "aug_t"] if graph == "sr0" else ["t"]
    chosen = fp32_layers(layers, [i.name for i in model.graph.input], timestep_inputs)
    by_time = {name for name, why in chosen.items() if why == trt.TIMESTEP_REASON}
    kinds = sorted(ops[n] for n in by_time)
    assert kinds.count("Sin") == kinds.count("Cos") == len(timestep_inputs)
    assert not {"Gemm", "MatMul", "Conv", "Softmax", "LayerNormalization"} & set(kinds)
    assert len(by_time) <= 8 * len(timestep_inputs)
    norm_ops = {n for n, op in ops.items() if op in ("LayerNormalization", "InstanceNormalization", "Softmax")}
    assert norm_ops and norm_ops <= set(chosen)


# --------------------------------------------------------------------------------------------------------
# Precision requests, manifest entry, no TensorRT here


def test_check_precision():
    check_precision("fp16", "10.7.0")
    check_precision("fp32", "11.0.0")
    with pytest.raises(trt.TrtUnavailable, match="strongly typed"):
        check_precision("fp16", "11.1.0")
    with pytest.raises(trt.TrtUnavailable, match="TensorRT 10"):
        check_precision("fp32", "8.6.1")
    with pytest.raises(trt.TrtUnavailable, match="precision"):
        check_precision("int8", "10.7.0")


def test_trt_manifest_entry():
    e = trt_entry("10.7.0-sm90", trt_version="10.7.0.post1", cc=(9, 0), device="H100", precision="fp16",
                  plans={"decoder": "trt/10.7.0-sm90/decoder.plan"}, fp32_counts={"decoder": 31},
                  validation={"decoder": {"rel_err": 1e-3}}, failed={"text_encoder": "boom"},
                  build_seconds={"decoder": 12.345})
    assert e["tensorrt"] == "10.7.0" and e["compute_capability"] == "9.0" and e["precision"] == "fp16"
    assert e["timing_cache"] == "trt/10.7.0-sm90/timing.cache" and e["dir"] == "trt/10.7.0-sm90"
    assert e["plans"] == {"decoder": "trt/10.7.0-sm90/decoder.plan"} and e["failed"] == {"text_encoder": "boom"}
    assert e["build_seconds"] == {"decoder": 12.35} and e["tf32"] is False


def test_probe_says_why_without_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(trt.TrtUnavailable, match="TensorRT is not installed"):
            trt.probe()
    else:
        pytest.skip("tensorrt is installed here")


# --------------------------------------------------------------------------------------------------------
# The build path of both exporters (export.trt.build_missing), with TensorRT faked


FAKE_KEY = "10.7.0-sm90"


def fake_tensorrt(monkeypatch) -> list[dict]:
    """Stand-ins for ``trt.probe`` (TensorRT 10.7 on an sm90 GPU) and ``trt.build_engines`` (writes a plan per
    graph after checking that the graph's files, external data included, are in the build folder and that the
    spec's sample inputs match the manifest's I/O); returns the log of build calls."""
    import types

    import numpy as np

    calls: list[dict] = []

    def build_engines(folder, graphs, *, precision, sample_for, log, only=None):
        names = [g for g in graphs if only is None or g in only]
        plans = {}
        for name in names:
            entry = graphs[name]
            for rel in (entry["file"], *entry.get("external_data", [])):
                assert (folder / rel).is_file(), rel  # TensorRT parses the .onnx by path, data beside it
            feeds = sample_for(name)(2)
            assert {k: (v.dtype, v.shape[1:]) for k, v in feeds.items()} == {
                t["name"]: (np.dtype(t["dtype"]), tuple(t["shape"][1:])) for t in entry["inputs"]}
            plans[name] = trt_keys.plan_path(FAKE_KEY, name)
            (folder / plans[name]).parent.mkdir(parents=True, exist_ok=True)
            (folder / plans[name]).write_bytes(f"plan {name} {precision}".encode())
        (folder / trt_keys.engine_dir(FAKE_KEY) / trt_keys.TIMING_CACHE).write_bytes(b"cache")
        calls.append({"precision": precision, "graphs": names})
        return FAKE_KEY, trt_entry(FAKE_KEY, trt_version="10.7.0", cc=(9, 0), device="fake", precision=precision,
                                   plans=plans, fp32_counts={n: 0 for n in names}, validation={}, failed={},
                                   build_seconds={n: 0.0 for n in names}), plans

    monkeypatch.setattr(trt, "probe", lambda: (types.SimpleNamespace(__version__="10.7.0"), (9, 0), "fake"))
    monkeypatch.setattr(trt, "build_engines", build_engines)
    return calls


def check_plans(folder, precision: str) -> dict:
    """Every graph of ``folder`` has its fake plan at ``precision``, listed and hashed; the runtime accepts it."""
    import hashlib

    from dalle2_rt.runtime.manifest import load_manifest, verify_files

    m = json.loads((folder / "manifest.json").read_text())
    record = m["trt"][FAKE_KEY]
    assert record["precision"] == precision and set(record["plans"]) == set(m["graphs"])
    for name, g in m["graphs"].items():
        plan = g["trt"][FAKE_KEY]
        assert plan == record["plans"][name] and (folder / plan).read_bytes() == f"plan {name} {precision}".encode()
        assert m["files"][plan] == hashlib.sha256((folder / plan).read_bytes()).hexdigest()
    verify_files(load_manifest(folder), use_cache=False)
    return m


def test_native_export_builds_plans_through_build_missing(tiny_engines, tiny_checkpoints, tmp_path, monkeypatch):
    import shutil

    from export import all as export_all

    calls = fake_tensorrt(monkeypatch)
    out = tmp_path / "tiny"
    shutil.copytree(tiny_engines, out)
    result = export_all.export_folder(tiny_checkpoints, out, name="tiny", quiet=True, trt=True)
    graphs = sorted(json.loads((tiny_engines / "manifest.json").read_text())["graphs"])
    assert result.status == "built" and result.exported == [] and sorted(result.reused) == graphs
    assert [sorted(c["graphs"]) for c in calls] == [graphs]
    check_plans(out, "fp16")
    assert export_all.export_folder(tiny_checkpoints, out, name="tiny", quiet=True, trt=True).status == "up to date"
    export_all.export_folder(tiny_checkpoints, out, name="tiny", quiet=True, trt=True, precision="fp32")
    assert len(calls) == 2 and calls[1]["precision"] == "fp32"
    check_plans(out, "fp32")


def test_the_trt_builder_module_imports_no_torch():
    """scripts/gpu_check.py builds plans with export.trt in an environment without torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, export.trt; print(sorted(m for m in ('torch', 'open_clip', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
