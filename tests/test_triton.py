"""The Triton model repository writer (export/triton.py) and its configs, without a server.

Each written config.pbtxt is parsed with Triton's own schema (tritonclient's generated ``model_config_pb2``:
a field or enum name Triton does not know fails to parse) and compared with the manifest. Nothing here loads
an ``onnxruntime_onnx`` or ``tensorrt_plan`` model into a real Triton backend (this machine's tritonserver has
only the Python backend); tests/test_triton_server.py runs a real server.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dalle2_rt.runtime.backends.triton import config_dims, config_problems
from dalle2_rt.runtime.errors import BackendUnavailableError, InputError
from dalle2_rt.runtime.manifest import load_manifest
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.triton import orchestrator_io
from dalle2_rt.triton.server import free_port, free_ports
from export import triton as writer

pytest.importorskip("tritonclient.grpc", reason="the triton extra (tritonclient[grpc]) is not installed")
from google.protobuf import text_format  # noqa: E402 - tritonclient brings protobuf
from google.protobuf.json_format import MessageToDict  # noqa: E402

KEY = "10.7.0-sm90"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(repo: Path, model: str) -> dict:
    text = (repo / model / "config.pbtxt").read_text(encoding="utf-8")
    return MessageToDict(writer.parse_config(text), preserving_proto_field_name=True)


@pytest.fixture(scope="module")
def ort_repo(tiny_engines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    writer.write_repository(tiny_engines, out, platform="onnxruntime", instances=2, gpus=[0, 1], kind="gpu",
                            orchestrator_instances=3)
    return out


def test_one_onnxruntime_model_per_graph_matching_the_manifest(tiny_engines, ort_repo):
    m = load_manifest(tiny_engines)
    assert sorted(p.name for p in ort_repo.iterdir()) == sorted([*m.graphs, "unclip"])
    for name, spec in m.graphs.items():
        text = (ort_repo / name / "config.pbtxt").read_text(encoding="utf-8")
        assert writer.check_config(text, spec, m.sha256) == []
        config = _config(ort_repo, name)
        assert config["platform"] == "onnxruntime_onnx" and "backend" not in config
        assert int(config["max_batch_size"]) == spec.raw["profile"]["batch"]["max"]
        batch = spec.raw["profile"]["batch"]
        assert [int(s) for s in config["dynamic_batching"]["preferred_batch_size"]] == \
            sorted({batch["opt"], batch["max"]})
        assert config["instance_group"] == [{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}]
        # the plain graph, byte for byte (its hash is the manifest's), not the provider-specific *.opt.onnx
        assert _sha(ort_repo / name / "1" / "model.onnx") == m.files[spec.file.name]
        assert not (ort_repo / name / "1" / "model.py").exists()
    # the documented shapes of one graph, by hand: dims without the batch axis, (B,) tensors as [1] + reshape []
    dec = {t["name"]: t for t in _config(ort_repo, "decoder")["input"]}
    assert [int(d) for d in dec["x_t"]["dims"]] == list(m.graphs["decoder"].inputs[0].shape[1:])
    assert dec["x_t"]["data_type"] == "TYPE_FP32" and "reshape" not in dec["x_t"]
    assert [int(d) for d in dec["t"]["dims"]] == [1] and dec["t"]["reshape"] == {}
    tokens = _config(ort_repo, "text_encoder")["input"][0]
    assert (tokens["name"], tokens["data_type"], [int(d) for d in tokens["dims"]]) == ("tokens", "TYPE_INT64", [77])


def test_orchestrator_model_carries_the_manifest_tokenizer_and_runtime(tiny_engines, ort_repo):
    m = load_manifest(tiny_engines)
    config = _config(ort_repo, "unclip")
    assert config["backend"] == "python" and int(config.get("max_batch_size", 0)) == 0
    assert config["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
    assert [(t["name"], t["data_type"], bool(t.get("optional"))) for t in config["input"]] == \
        [(n, d, o) for n, d, _, o, _ in orchestrator_io.INPUTS]
    size = m.data["output"]["image_size"]
    images, meta = config["output"]
    assert (images["name"], images["data_type"], [int(d) for d in images["dims"]]) == \
        ("images", "TYPE_UINT8", [-1, size, size, 3])
    assert (meta["name"], meta["data_type"]) == ("metadata", "TYPE_STRING")
    assert config["parameters"]["dalle2_rt.manifest_sha256"]["string_value"] == m.sha256
    version = ort_repo / "unclip" / "1"
    assert (version / "engine" / "manifest.json").read_bytes() == (tiny_engines / "manifest.json").read_bytes()
    tok = m.tokenizer["file"]
    assert _sha(version / "engine" / tok) == m.tokenizer["sha256"]
    assert (version / "model.py").read_text() == writer.ORCHESTRATOR_MODEL.read_text()
    for module in ("runtime/pipeline.py", "runtime/backends/triton.py", "triton/orchestrator_io.py", "__init__.py"):
        assert (version / "dalle2_rt" / module).is_file(), module
    assert not (version / "dalle2_rt" / "models").exists()  # the torch side is not vendored
    # a thin client: manifest + tokenizer alone open a pipeline (the graphs are the server's)
    with pytest.raises(InputError, match="needs the server's address"):
        Pipeline.load(version / "engine", backend="triton", verify=False)


def _with_fake_plans(engines: Path, dst: Path, graphs: list[str]) -> Path:
    """A copy of ``engines`` whose manifest lists (fake) TensorRT plans of ``graphs`` under KEY."""
    shutil.copytree(engines, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for g in graphs:
        rel = f"trt/{KEY}/{g}.plan"
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(f"not a real plan: {g}".encode())
        data["graphs"][g]["trt"] = {KEY: rel}
        data["files"][rel] = _sha(dst / rel)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_tensorrt_plan_models_where_the_folder_has_plans(tiny_engines, tmp_path):
    folder = _with_fake_plans(tiny_engines, tmp_path / "engines", ["decoder", "sr0"])
    m = load_manifest(folder)
    written = writer.write_repository(folder, tmp_path / "repo")  # auto: plans where there are, else ONNX
    assert written["decoder"] == written["sr0"] == "tensorrt_plan"
    assert written["prior_step"] == "onnxruntime_onnx"
    for g in ("decoder", "sr0"):
        config = _config(tmp_path / "repo", g)
        assert config["platform"] == "tensorrt_plan" and config["instance_group"][0]["kind"] == "KIND_GPU"
        assert writer.check_config((tmp_path / "repo" / g / "config.pbtxt").read_text(), m.graphs[g], m.sha256) == []
        assert (tmp_path / "repo" / g / "1" / "model.plan").read_bytes() == f"not a real plan: {g}".encode()
    with pytest.raises(writer.RepositoryError, match="has no TensorRT plan for 10.7.0-sm90"):
        writer.write_repository(folder, tmp_path / "all-trt", platform="tensorrt")
    with pytest.raises(writer.RepositoryError, match="no TensorRT plans for '9.0.0-sm80'"):
        writer.write_repository(folder, tmp_path / "other", trt_key="9.0.0-sm80")
    with pytest.raises(writer.RepositoryError, match="runs on a GPU"):
        writer.write_repository(folder, tmp_path / "cpu", kind="cpu", force=True)


def test_python_stand_in_models_share_the_onnxruntime_config(tiny_engines, ort_repo, tmp_path):
    writer.write_repository(tiny_engines, tmp_path / "repo", platform="python", instances=2, gpus=[0, 1],
                            kind="gpu")
    for g in load_manifest(tiny_engines).graphs:
        ort_cfg, py_cfg = _config(ort_repo, g), _config(tmp_path / "repo", g)
        assert py_cfg.pop("backend") == "python" and ort_cfg.pop("platform") == "onnxruntime_onnx"
        assert py_cfg.pop("parameters").pop("dalle2_rt.threads") == {"string_value": "1"}
        ort_cfg.pop("parameters")
        assert py_cfg == ort_cfg
        assert (tmp_path / "repo" / g / "1" / "model.py").read_text() == writer.GRAPH_MODEL.read_text()


def test_check_config_reports_what_differs(tiny_engines, ort_repo):
    m = load_manifest(tiny_engines)
    spec = m.graphs["decoder"]
    text = (ort_repo / "decoder" / "config.pbtxt").read_text()
    wrong_dims = text.replace('name: "x_t"\n  data_type: TYPE_FP32\n  dims: [ ',
                              'name: "x_t"\n  data_type: TYPE_FP32\n  dims: [ 7, ', 1)
    assert wrong_dims != text and any("input" in p for p in writer.check_config(wrong_dims, spec, m.sha256))
    wrong_type = text.replace("TYPE_FP32", "TYPE_FP16", 1)
    assert any("input" in p for p in writer.check_config(wrong_type, spec, m.sha256))
    wrong_batch = text.replace(f"max_batch_size: {spec.max_batch}", "max_batch_size: 3")
    assert any("max_batch_size" in p for p in writer.check_config(wrong_batch, spec, m.sha256))
    assert any("manifest_sha256" in p for p in writer.check_config(text, spec, "0" * 64))
    with pytest.raises(text_format.ParseError):  # the schema: a field Triton's config does not have
        writer.parse_config(text.replace("max_batch_size", "max_batch"))
    with pytest.raises(text_format.ParseError):  # ... or an enum value
        writer.parse_config(text.replace("KIND_GPU", "KIND_TPU"))


def test_config_dims_rule():
    assert config_dims(("batch", 3, 32, 32), True) == ([3, 32, 32], None)
    assert config_dims(("batch",), True) == ([1], [])
    assert config_dims(("batch", "tokens"), True) == ([-1], None)
    assert config_dims(("batch", 4), False) == ([-1, 4], None)


def test_served_config_problems(tiny_engines):
    m = load_manifest(tiny_engines)
    spec = m.graphs["sr0"]
    good = {"input": [{"name": t.name, "data_type": "TYPE_FP32"} for t in spec.inputs],
            "output": [{"name": "pred", "data_type": "TYPE_FP32"}],
            "parameters": {"dalle2_rt.manifest_sha256": {"string_value": m.sha256}}}
    assert config_problems(good, spec, m.sha256) == []
    assert config_problems(good, spec, "f" * 64)  # written from another folder
    bad = dict(good, output=[{"name": "pred", "data_type": "TYPE_FP16"}])
    assert config_problems(bad, spec, m.sha256)


def test_graph_files_are_copies_unless_linked(tiny_engines, ort_repo, tmp_path):
    src = tiny_engines / "decoder.onnx"
    assert not (ort_repo / "decoder" / "1" / "model.onnx").samefile(src)  # editing the repository spares the folder
    writer.write_repository(tiny_engines, tmp_path / "linked", platform="onnxruntime", link=True)
    assert (tmp_path / "linked" / "decoder" / "1" / "model.onnx").samefile(src)


def test_existing_output_needs_force_and_the_cli_says_so(tiny_engines, tmp_path, capsys):
    out = tmp_path / "repo"
    assert writer.main([str(tiny_engines), "--out", str(out), "--no-orchestrator"]) == 0
    assert not (out / "unclip").exists()
    assert writer.main([str(tiny_engines), "--out", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert writer.main([str(tiny_engines), "--out", str(out), "--force"]) == 0
    assert (out / "unclip" / "config.pbtxt").is_file()
    assert not list(tmp_path.glob(".repo.*"))  # nothing left aside
    assert writer.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_writer_imports_no_torch(tiny_engines, tmp_path):
    code = ("import sys; from export.triton import write_repository; "
            f"write_repository({str(tiny_engines)!r}, {str(tmp_path / 'repo')!r}); "
            "bad = [m for m in ('torch', 'onnx', 'open_clip') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_free_ports_are_distinct_and_bindable():
    # tritonserver takes three ports at once (HTTP, GRPC, metrics): the same one twice makes it refuse to start
    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
    for port in ports:  # released: each can be bound again
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_unreachable_server_is_one_clear_error(tiny_engines):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailableError, match="cannot reach the server"):
        Pipeline.load(tiny_engines, backend="triton", url=url)
    with pytest.raises(InputError, match="http://HOST:PORT"):
        Pipeline.load(tiny_engines, backend="triton", url="ftp://x")


def test_cli_url_goes_with_the_triton_backend(tiny_engines, tmp_path, capsys):
    from dalle2_rt import cli

    assert cli.main(["a red circle", "--url", "http://127.0.0.1:1", "--engines", str(tiny_engines),
                     "-o", str(tmp_path)]) == 2
    assert "--url goes with --backend triton" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
