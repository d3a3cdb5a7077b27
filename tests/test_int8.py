"""int8 variants (export/int8.py): written beside the fp32 graph, recorded in the manifest, run on the CPU by
default, refused where the folder or the option is bad, and the fp32 path unchanged."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import export.int8 as int8_module
from dalle2_rt.runtime import cpu
from dalle2_rt.runtime.errors import EngineFolderError, InputError
from dalle2_rt.runtime.manifest import load_manifest, verify_files
from dalle2_rt.runtime.pipeline import Pipeline
from export.all import export_folder
from export.all import main as export_main
from export.onnx_export import ValidationError
from tests.test_manifest_schema import check_manifest_schema

pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.fixture(autouse=True)
def int8_cpu(monkeypatch):
    """These tests run as on a CPU with int8 dot products, whatever this one has (runtime/cpu.py)."""
    monkeypatch.setenv(cpu.ENV, "AVX-512 VNNI")

FAST = {"prior_steps": 2, "decoder_steps": 2, "sr_steps": 2}
# Tiny random-weight U-Nets may quantise worse than trained ones (RMS_TOLERANCE): the tests that need a variant
# accept up to this.
TINY_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def int8_engines(tiny_checkpoints, tiny_engines, tmp_path_factory):
    """``tiny_engines`` rebuilt with an int8 sr0 (the fp32 graphs carried over unchanged)."""
    out = tmp_path_factory.mktemp("int8") / "engines"
    shutil.copytree(tiny_engines, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8_module, "RMS_TOLERANCE", TINY_TOLERANCE)
        result = export_folder(tiny_checkpoints, out, int8=("sr0",), quiet=True)
    assert result.status == "built" and result.exported == [] and "sr0" in result.reused
    return out


def test_the_manifest_records_the_variant_beside_the_fp32_graph(int8_engines, tiny_engines):
    data = check_manifest_schema(int8_engines)
    assert data["options"]["int8"] == ["sr0"]
    entry = data["graphs"]["sr0"]
    before = json.loads((tiny_engines / "manifest.json").read_text())["graphs"]["sr0"]
    assert entry["file"] == before["file"] and data["files"][entry["file"]] == \
        json.loads((tiny_engines / "manifest.json").read_text())["files"][before["file"]]  # fp32 graph unchanged
    q = entry["int8"]
    assert q["file"] == "sr0.int8.onnx" and q["format"] == "QDQ" and q["file"] in data["files"]
    assert 0 < q["validation"]["rms_rel_err"] <= q["validation"]["tolerance"] == TINY_TOLERANCE
    assert q["calibration"]["batches"] > 0 and q["validation"]["inputs"] > 0
    assert all("int8" not in g for name, g in data["graphs"].items() if name != "sr0")
    import onnx
    ops = {n.op_type for n in onnx.load(int8_engines / q["file"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised, not a copy


def test_matmuls_of_two_activations_are_found_and_named():
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="proj"),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.FLOAT, [4, 4],
                                                                              [0.2] * 16)),
             helper.make_node("MatMul", ["a", "c"], ["b"], name="const_proj"),
             helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
             helper.make_node("MatMul", ["b", "bt"], ["s"]),  # unnamed: scores
             helper.make_node("MatMul", ["s", "b"], ["y"], name="values")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [w])
    model = helper.make_model(graph)
    found = int8_module.activation_matmuls(model)
    assert len(found) == 2 and found[1] == "values" and found[0] == model.graph.node[4].name != ""
    onnx.checker.check_model(model)


def test_attention_stays_fp32_in_a_variant(tiny_checkpoints, tiny_engines, tmp_path):
    """The decoder's variant: every Conv and weight MatMul gets int8 inputs, no MatMul of two activations and
    no Softmax does (ONNX Runtime would otherwise fuse the softmax into a slow QLinearSoftmax)."""
    import onnx

    out = tmp_path / "engines"
    shutil.copytree(tiny_engines, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8_module, "RMS_TOLERANCE", TINY_TOLERANCE)
        export_folder(tiny_checkpoints, out, int8=("decoder",), quiet=True)
    entry = check_manifest_schema(out)["graphs"]["decoder"]["int8"]
    assert entry["fp32"].startswith("MatMul of two activations")
    graph = onnx.load(out / entry["file"]).graph
    weights = {i.name for i in graph.initializer}
    dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}

    def int8_input(name):  # the tensor comes out of a DequantizeLinear of an activation (not of a weight)
        return name in dequantized and dequantized[name].input[0] not in weights

    convs = [n for n in graph.node if n.op_type == "Conv"]
    pairs = [n for n in graph.node if n.op_type == "MatMul"
             and not any(x in weights or x in dequantized and dequantized[x].input[0] in weights for x in n.input)]
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    projections = [n for n in graph.node if n.op_type == "MatMul" and n not in pairs]
    assert convs and all(int8_input(n.input[0]) for n in convs)
    assert projections and all(int8_input(n.input[0]) and n.input[1] in dequantized for n in projections)
    assert pairs and softmax  # the tiny decoder has attention
    assert not any(int8_input(x) for n in pairs + softmax for x in n.input)


def test_the_cpu_runs_the_variant_unless_refused_and_the_fp32_path_is_unchanged(int8_engines, tiny_engines):
    q = Pipeline.load(int8_engines, threads=1)
    f = Pipeline.load(int8_engines, threads=1, int8=False)
    plain = Pipeline.load(tiny_engines, threads=1)
    assert q.engines["sr0"].description.endswith("sr0.int8.onnx")
    assert not f.engines["sr0"].description.endswith("sr0.int8.onnx")
    assert "int8 sr0" in q.backend.describe() and "int8" not in f.backend.describe()
    assert q.backend.int8_running == ["sr0"] and f.backend.int8_running == []
    args = (["a red circle", "a blue star above a green square"],)
    got_q, got_f, got_plain = (np.stack([np.asarray(im, dtype=np.float32) for im in p(*args, seed=3, **FAST)])
                               for p in (q, f, plain))
    assert np.array_equal(got_f, got_plain)  # int8=False: exactly the folder without variants
    diff = np.abs(got_q - got_f).mean() / 255
    assert 0 < diff < 0.1, diff  # the variant ran (pixels differ) and stays near fp32
    meta = q("a red circle", seed=3, **FAST)[0].info
    assert "int8 sr0" in meta["backend"]


def test_rebuilding_is_up_to_date_and_dropping_int8_removes_the_variant(int8_engines, tiny_checkpoints, tmp_path):
    out = tmp_path / int8_engines.name  # the folder's name is part of its fingerprint
    shutil.copytree(int8_engines, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8_module, "RMS_TOLERANCE", TINY_TOLERANCE)
        assert export_folder(tiny_checkpoints, out, int8=("sr0",), quiet=True).status == "up to date"
    result = export_folder(tiny_checkpoints, out, quiet=True)
    assert result.status == "built" and result.exported == []
    data = json.loads((out / "manifest.json").read_text())
    assert "int8" not in data["options"] and "int8" not in data["graphs"]["sr0"]
    assert not (out / "sr0.int8.onnx").exists()


def test_a_new_int8_revision_remakes_the_variants_and_nothing_else(int8_engines, tiny_checkpoints, tiny_engines,
                                                                   tmp_path, monkeypatch):
    import export.driver as driver

    out = tmp_path / "engines"
    shutil.copytree(int8_engines, out)
    monkeypatch.setattr(int8_module, "RMS_TOLERANCE", TINY_TOLERANCE)
    assert export_folder(tiny_checkpoints, out, int8=("sr0",), quiet=True).status == "up to date"
    monkeypatch.setattr(driver, "INT8_REVISION", driver.INT8_REVISION + 1)
    again = export_folder(tiny_checkpoints, out, int8=("sr0",), quiet=True)
    assert again.status == "built" and again.exported == [] and "sr0.int8.onnx" in load_manifest(out).files
    assert export_folder(tiny_checkpoints, tiny_engines, quiet=True).status == "up to date"  # no variant: same


def test_a_variant_over_the_tolerance_fails_the_export_and_leaves_out_alone(tiny_checkpoints, int8_engines,
                                                                          tmp_path, monkeypatch):
    out = tmp_path / "e"
    shutil.copytree(int8_engines, out)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(int8_module, "RMS_TOLERANCE", 1e-9)
    with pytest.raises(ValidationError, match="(decoder|sr0): the int8 variant.s RMS error .* over the tolerance"):
        export_folder(tiny_checkpoints, out, int8=("sr0", "decoder"), quiet=True)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]  # no build folder left behind


def test_the_command_line_refuses_a_bad_int8_graph_in_one_line(tiny_checkpoints, tmp_path, capsys):
    assert export_main(["--checkpoints", str(tiny_checkpoints), "--out", str(tmp_path / "x"), "--int8", "prior"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--int8 takes the decoder or an sr graph" in err and "prior" in err
    assert export_main(["--checkpoints", str(tiny_checkpoints), "--out", str(tmp_path / "x"), "--int8", "sr3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export: error: --int8 sr3: this folder has no such graph") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", [{"file": "../sr0.int8.onnx", "format": "QDQ"}, {"file": 3, "format": "QDQ"},
                                 {"file": "sr0.int8.onnx", "format": "QOperator"}, "sr0.int8.onnx"])
def test_a_hostile_int8_entry_is_refused(int8_engines, tmp_path, bad):
    folder = tmp_path / "e"
    shutil.copytree(int8_engines, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["graphs"]["sr0"]["int8"] = bad
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineFolderError):
        verify_files(load_manifest(folder))


def test_the_variant_is_covered_by_the_files_hashes(int8_engines, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(int8_engines, folder)
    with open(folder / "sr0.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineFolderError, match="sr0.int8.onnx"):
        Pipeline.load(folder, threads=1)


def test_a_backend_without_int8_refuses_asking_for_it_but_takes_fp32_only(int8_engines):
    with pytest.raises(InputError, match="the torch backend takes no int8 option"):
        Pipeline.load(int8_engines, backend="torch", threads=1, int8=True)
    # int8=False (--fp32) asks for what the backend does anyway (it runs the fp32 graphs): accepted
    assert Pipeline.load(int8_engines, backend="torch", threads=1, int8=False).backend.name == "torch"


def _cli_runs_the_variant(engines, out, flags) -> bool:
    """One CLI image into ``out`` with ``flags``: whether its PNG says the int8 SR ran."""
    from PIL import Image

    from dalle2_rt.cli import main as cli_main

    assert cli_main(["a red circle", "--engines", str(engines), "--seed", "1", "-o", str(out), "-q",
                     "--prior-steps", "2", "--decoder-steps", "2", "--sr-steps", "2", "--threads", "1"] + flags) == 0
    (png,) = out.glob("*.png")
    return "int8 sr0" in Image.open(png).info["backend"]


def test_info_and_the_fp32_flag(int8_engines, tmp_path, capsys):
    from dalle2_rt.cli import main as cli_main

    assert cli_main(["info", "--engines", str(int8_engines), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["int8"] == ["sr0"]
    assert _cli_runs_the_variant(int8_engines, tmp_path / "q", []) is True
    assert _cli_runs_the_variant(int8_engines, tmp_path / "f", ["--fp32"]) is False


def test_a_cpu_without_int8_dot_products_runs_fp32_unless_told(int8_engines, tmp_path, monkeypatch, capsys):
    from dalle2_rt.cli import main as cli_main

    monkeypatch.setenv(cpu.ENV, "")
    assert "int8" not in Pipeline.load(int8_engines, threads=1).backend.describe()
    assert "int8 sr0" in Pipeline.load(int8_engines, threads=1, int8=True).backend.describe()
    assert cli_main(["info", "--engines", str(int8_engines)]) == 0
    assert "not run by default: this CPU has no int8 dot-product instructions; --int8 runs them" in \
        capsys.readouterr().out
    assert _cli_runs_the_variant(int8_engines, tmp_path / "f", []) is False
    assert _cli_runs_the_variant(int8_engines, tmp_path / "q", ["--int8"]) is True
    with pytest.raises(SystemExit):
        cli_main(["a red circle", "--engines", str(int8_engines), "--fp32", "--int8"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("text, name", [
    ("processor: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n", "AMX"),
    ("flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n", "AVX-512 VNNI"),
    ("flags\t\t: fpu avx2 avx_vnni\n", "AVX-VNNI"),
    ("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n", None),  # AVX-512 without VNNI: saturating sums
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve\n", "Arm dot product"),
    ("Features\t: fp asimd\n", None),
    ("", None),
])
def test_the_cpu_reading(text, name):
    assert cpu._from_cpuinfo(text) == name


def test_the_flag_reading_takes_the_flags_lines_only():
    text = ("processor\t: 0\nflags\t\t: fpu avx2\nvmx flags\t: ept vpid\nbugs\t\t: spectre_v1\n"
            "processor\t: 1\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert cpu.flag_words(text) == {"fpu", "avx2", "avx512_vnni"}  # every core's, not "vmx flags" nor "bugs"
    assert cpu.flag_words("Features\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}


def test_the_cpu_reading_per_platform_and_the_override(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    monkeypatch.delenv(cpu.ENV)

    def reading(platform, machine, cpuinfo):
        cpu._detected.cache_clear()
        monkeypatch.setattr(cpu.sys, "platform", platform)
        monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo"
                                                                              else path, *a, **k))
        try:
            return cpu.int8_dot_product()
        finally:
            cpu._detected.cache_clear()

    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t\t: fpu avx2 avx512_vnni\n")
    assert reading("linux", "x86_64", flags) == "AVX-512 VNNI"
    assert reading("darwin", "arm64", tmp_path / "absent") == "Arm dot product"  # every Apple silicon CPU
    assert reading("win32", "AMD64", tmp_path / "absent") is None  # no /proc/cpuinfo: none assumed
    for value, want in (("AMX", "AMX"), ("0", None), ("none", None), ("", None), (" False ", None)):
        monkeypatch.setenv(cpu.ENV, value)
        assert cpu.int8_dot_product() == want


def test_the_package_copy_carries_the_variant(int8_engines, tmp_path):
    from export.package import package

    out = tmp_path / "pkg"
    assert package(int8_engines, out, log=lambda *_: None) is not None
    copy = load_manifest(out)
    verify_files(copy, use_cache=False)
    assert copy.graphs["sr0"].int8_file == out / "sr0.int8.onnx"
    want = Pipeline.load(int8_engines, threads=1)("a red circle", seed=2, **FAST)[0]
    got = Pipeline.load(out, threads=1)("a red circle", seed=2, **FAST)[0]
    assert np.array_equal(np.asarray(got), np.asarray(want)) and "int8 sr0" in got.info["backend"]


def test_the_frontier_measures_a_folder_with_and_without_its_variants(int8_engines, tmp_path):
    from bench.frontier import main as frontier_main

    out = tmp_path / "f.json"
    assert frontier_main(["--engines", str(int8_engines), "--fp32-too", "--single", "2", "--two", "2", "--reps", "1",
                          "--threads", "1", "--point", "fast", "prior_steps=2,decoder_steps=2,sr_steps=1",
                          "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["name"] for p in points] == ["engines int8 sr0", "engines fp32"]
    assert all(p["n_single"] == 2 and p["n_two"] == 2 and p["ms"] > 0 for p in points)


def test_a_triton_repository_serves_the_variant_on_cpu_instances(int8_engines, tmp_path):
    from export import triton as writer

    m = load_manifest(int8_engines)
    out = tmp_path / "repo"
    written = writer.write_repository(int8_engines, out, kind="cpu", int8=True, orchestrator=None)
    assert written["sr0"] == "onnxruntime_onnx (int8 variant)" and written["decoder"] == "onnxruntime_onnx"
    served = out / "sr0" / "1" / "model.onnx"
    assert served.read_bytes() == m.graphs["sr0"].int8_file.read_bytes()  # the variant, byte for byte
    assert (out / "decoder" / "1" / "model.onnx").read_bytes() == m.graphs["decoder"].file.read_bytes()
    text = (out / "sr0" / "config.pbtxt").read_text(encoding="utf-8")
    assert "KIND_CPU" in text and "sr0.int8.onnx" in text
    # --platform python (CPU instances by default) takes it too; without --int8 the fp32 graph is served
    assert writer.write_repository(int8_engines, out, platform="python", int8=True, orchestrator=None,
                                   force=True)["sr0"] == "backend python (int8 variant)"
    assert served.read_bytes() == m.graphs["sr0"].int8_file.read_bytes()
    writer.write_repository(int8_engines, out, kind="cpu", orchestrator=None, force=True)
    assert served.read_bytes() == m.graphs["sr0"].file.read_bytes()
    pytest.importorskip("tritonclient.grpc")
    assert writer.check_config(text, m.graphs["sr0"], m.sha256) == []  # same I/O as the fp32 graph


@pytest.mark.parametrize("options, message", [
    ({}, "--kind cpu"),  # auto: GPU instances for onnxruntime models
    ({"kind": "gpu"}, "--kind cpu"),
    ({"platform": "tensorrt", "kind": "gpu"}, "TensorRT plans are built from the fp32"),
    ({"kind": "cpu", "trt_key": "10.7.0-sm90"}, "--trt-key selects TensorRT plans"),
])
def test_a_triton_repository_refuses_int8_where_it_cannot_run(int8_engines, tmp_path, options, message):
    from export import triton as writer

    with pytest.raises(writer.RepositoryError, match=message):
        writer.write_repository(int8_engines, tmp_path / "repo", int8=True, orchestrator=None, **options)
    assert not (tmp_path / "repo").exists()


def test_triton_int8_on_a_folder_without_variants_is_one_line(tiny_engines, tmp_path, capsys):
    from export import triton as writer

    assert writer.main([str(tiny_engines), "--out", str(tmp_path / "repo"), "--kind", "cpu", "--int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("export.triton: error:") and "no int8 variants" in err and "\n" not in err
    assert not (tmp_path / "repo").exists()


def test_a_real_triton_server_runs_the_variant_as_the_local_runtime_does(int8_engines, tmp_path):
    """The Python-backend stand-in serves sr0's int8 file: its SR output is the local int8 run's, not fp32's."""
    pytest.importorskip("tritonclient.http", reason="the triton extra (tritonclient) is not installed")
    from dalle2_rt.triton import server as triton_server
    from export import triton as writer
    from tests.test_triton_server import _server_or_skip

    _server_or_skip()
    repo = tmp_path / "repo"
    writer.write_repository(int8_engines, repo, platform="python", int8=True, orchestrator=None)
    low_res = next(t for t in load_manifest(int8_engines).graphs["sr0"].inputs if t.name == "low_res")
    x = np.random.default_rng(0).uniform(-1, 1, (2, *low_res.shape[1:])).astype(np.float32)
    local_int8, local_fp32 = (Pipeline.load(int8_engines, threads=1, int8=v).upsample(x, seed=3, sr_steps=2)
                              for v in (None, False))
    with triton_server.LocalServer(repo, startup_timeout=240) as server:
        pipe = Pipeline.load(int8_engines, backend="triton", url=server.url)
        remote = pipe.upsample(x, seed=3, sr_steps=2)
        with pytest.raises(InputError, match="serves the int8 variant sr0.int8.onnx"):  # --fp32 cannot be honoured
            Pipeline.load(int8_engines, backend="triton", url=server.url, int8=False)
    assert pipe.backend.describe().endswith(" int8 sr0")  # PNG metadata names it, as the local runtime's does
    np.testing.assert_allclose(remote, local_int8, atol=1e-4)
    assert np.abs(remote - local_fp32).max() > 1e-3  # the variant really ran there
