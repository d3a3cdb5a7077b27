"""A real tritonserver on loopback: the client backend and the orchestrator model, end to end.

The server is the one nvidia-pytriton 0.7.0 bundles (tritonserver 2.51, Python backend only), started once
for this module on free ports over a repository written by ``python -m export.triton --platform python`` from
the tiny engines: every graph is served by the Python-backend stand-in that runs the same plain ONNX file
with onnxruntime, and the orchestrator runs the runtime's loop by BLS. Images must equal the local
runtime's within the bound the torch-vs-onnxruntime test uses (3/255 per pixel); here they come out equal.
Skipped, saying why, where the triton extra or the stub's numpy<2 environment (``make triton-env``) is missing.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_rt import cli
from dalle2_rt.runtime import operations as local_ops
from dalle2_rt.runtime.errors import EngineFolderError
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.triton import server as triton_server
from export import triton as writer

FAST = {"prior_steps": 3, "decoder_steps": 3, "sr_steps": 2}
PIXEL_BOUND = 3  # of 255: tests/test_runtime.py::test_torch_backend_matches_onnxruntime_within_3_of_255

httpclient = pytest.importorskip("tritonclient.http", reason="the triton extra (tritonclient) is not installed")


def _server_or_skip():
    try:
        facts = triton_server.python_facts(triton_server.stub_python())
        triton_server.pytriton_dist(facts)
    except triton_server.ServerError as e:
        pytest.skip(str(e))
    if facts["numpy"] is None or int(facts["numpy"].split(".")[0]) >= 2:
        pytest.skip(f"the Python-backend stub needs an environment with numpy<2 (make triton-env); "
                    f"{triton_server.stub_python()} has numpy {facts['numpy']}")


pytestmark = pytest.mark.usefixtures("private_hash_cache")


@pytest.fixture(scope="module")
def served(tiny_engines, tmp_path_factory):
    _server_or_skip()
    repo = tmp_path_factory.mktemp("triton-served") / "repo"
    writer.write_repository(tiny_engines, repo, platform="python")
    with triton_server.LocalServer(repo, startup_timeout=240) as server:
        yield server


@pytest.fixture(scope="module")
def local(tiny_engines) -> Pipeline:
    return Pipeline.load(tiny_engines, threads=1)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(int)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_client_backend_gives_the_local_images(tiny_engines, served, local, scheme):
    url = served.url if scheme == "http" else served.grpc_url
    remote = Pipeline.load(tiny_engines, backend="triton", url=url)
    assert remote.backend.describe().startswith("triton 2.51") and url in remote.backend.describe()
    prompts = ["a red circle", "two blue squares"]
    x0 = {"local": [], "remote": []}
    for name, p in (("local", local), ("remote", remote)):
        p(prompts[0], seed=4, num_images=2, callback=lambda s, i, n, x, name=name: s == "prior" and
          x0[name].append(x), **FAST)
    for a, b in zip(x0["remote"], x0["local"], strict=True):  # the prior's unclipped estimates
        np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())
    for options in ({}, {"sampler": "ddpm", "decoder_guidance": 2.0}):
        got = remote(prompts, seed=4, num_images=2, **FAST, **options)
        want = local(prompts, seed=4, num_images=2, **FAST, **options)
        assert np.abs(pixels(got) - pixels(want)).max() <= PIXEL_BOUND
        assert [im.info["prompt"] for im in got] == [im.info["prompt"] for im in want]
        assert got[0].info["backend"].startswith("triton")
    var = remote.variations(Image.new("RGB", (32, 32), (9, 90, 200)), seed=1, decoder_steps=2, sr_steps=1)
    ref = local.variations(Image.new("RGB", (32, 32), (9, 90, 200)), seed=1, decoder_steps=2, sr_steps=1)
    assert np.abs(pixels(var) - pixels(ref)).max() <= PIXEL_BOUND


def test_one_client_pipeline_serves_several_threads(tiny_engines, served, local):
    remote = Pipeline.load(tiny_engines, backend="triton", url=served.url)  # HTTP: one client per thread
    prompts = ["a red circle", "two blue squares", "a green star"]
    results = {}

    def work(p):
        results[p] = pixels(remote(p, seed=5, **FAST))

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for p in prompts:
        assert np.abs(results[p] - pixels(local(p, seed=5, **FAST))).max() <= PIXEL_BOUND


def _infer(url: str, prompts: list[str], **values):
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=300.0)
    dtypes = {"num_images": np.int32, "seed": np.uint64, "prior_steps": np.int32, "decoder_steps": np.int32,
              "sr_steps": np.int32, "prior_guidance": np.float64, "decoder_guidance": np.float64,
              "candidates": np.int32, "decoder_candidates": np.int32, "frames": np.int32, "refine": np.int32,
              "amount": np.float64, "text": np.bool_}
    arrays = {"prompt": np.array([p.encode() for p in prompts], dtype=object)} if prompts else {}
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
            continue
        arrays[name] = np.array([value.encode()], dtype=object) if isinstance(value, str) else \
            np.array(value if isinstance(value, list) else [value], dtype=dtypes[name])
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else
                                       {np.dtype(np.int32): "INT32", np.dtype(np.uint64): "UINT64",
                                        np.dtype(np.float64): "FP64", np.dtype(np.uint8): "UINT8",
                                        np.dtype(np.bool_): "BOOL"}[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("unclip", inputs)
    return result.as_numpy("images"), [json.loads(m) for m in result.as_numpy("metadata")]


def test_orchestrator_runs_the_loop_in_the_server(served, local):
    prompts = ["a red circle", "two blue squares"]
    images, meta = _infer(served.url, prompts, num_images=2, seed=4, sampler="ddpm", decoder_guidance=2.0, **FAST)
    want = local(prompts, seed=4, num_images=2, sampler="ddpm", decoder_guidance=2.0, **FAST)
    assert images.dtype == np.uint8 and images.shape == pixels(want).shape
    assert np.abs(images.astype(int) - pixels(want)).max() <= PIXEL_BOUND
    assert [(m["prompt"], m["seed"], m["index"]) for m in meta] == \
        [(im.info["prompt"], "4", im.info["index"]) for im in want]
    assert meta[0]["backend"] == "triton in-server bls" and meta[0]["manifest_sha256"] == local.manifest.sha256
    assert meta[0]["steps"] == want[0].info["steps"] and meta[0]["guidance"] == want[0].info["guidance"]
    # unset inputs take the manifest's defaults, as a local call does
    images, meta = _infer(served.url, ["a green star"], seed=9)
    assert np.abs(images.astype(int) - pixels(local("a green star", seed=9))).max() <= PIXEL_BOUND


def test_orchestrator_runs_edits_and_interpolations_in_the_server(served, local):
    picture = pixels(local("a red circle", seed=1, **FAST))[0].astype(np.uint8)
    images, meta = _infer(served.url, [], operation="edit", image=picture, source="a red circle",
                          target="a red star", amount=[0.0, 0.5], seed=2, decoder_steps=3, refine=1)
    want = local.edit(Image.fromarray(picture), "a red circle", "a red star", amount=[0.0, 0.5], seed=2,
                      decoder_steps=3, refine=1)
    assert images.shape == pixels(want).shape and np.abs(images.astype(int) - pixels(want)).max() <= PIXEL_BOUND
    assert [m["amount"] for m in meta] == [im.info["amount"] for im in want]
    # an interpolation from an image to a prompt
    images, _ = _infer(served.url, ["a blue square"], operation="interpolate", image=picture, frames=3, seed=3,
                       decoder_steps=3, refine=1)
    b = local_ops.from_prompt(local, "a blue square", seed=3, index=1, decoder_steps=3)
    want = local.interpolate(Image.fromarray(picture), b, frames=3, seed=3, decoder_steps=3, refine=1)
    assert images.shape == pixels(want).shape and np.abs(images.astype(int) - pixels(want)).max() <= PIXEL_BOUND


def test_orchestrator_reports_a_bad_request_and_stays_up(served):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown sampler 'nope'"):
        _infer(served.url, ["a red circle"], sampler="nope")
    with pytest.raises(InferenceServerException, match="prompt is empty"):
        _infer(served.url, ["  "])
    with pytest.raises(InferenceServerException, match="edit needs image, target"):
        _infer(served.url, [], operation="edit", source="a red circle")
    images, _ = _infer(served.url, ["a red circle"], seed=0, **FAST)
    assert images.shape[0] == 1


def test_client_refuses_models_written_from_another_folder(tiny_engines, served, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_engines, other)
    data = json.loads((other / "manifest.json").read_text())
    data["stages"]["decoder"]["defaults"]["steps"] = 2  # another manifest, same graphs
    (other / "manifest.json").write_text(json.dumps(data))
    for url in (served.url, served.grpc_url):
        with pytest.raises(EngineFolderError, match="written from another manifest"):
            Pipeline.load(other, backend="triton", url=url)


def test_thin_client_needs_only_the_manifest_and_tokenizer(served, local, tmp_path):
    thin = tmp_path / "thin"
    shutil.copytree(Path(served.repository) / "unclip" / "1" / "engine", thin)
    assert sorted(p.name for p in thin.iterdir()) == ["manifest.json", "tokenizer.json"]
    remote = Pipeline.load(thin, backend="triton", url=served.grpc_url, verify=False)
    got = remote("a red circle", seed=2, **FAST)
    assert np.abs(pixels(got) - pixels(local("a red circle", seed=2, **FAST))).max() <= PIXEL_BOUND


def test_cli_backend_triton(tiny_engines, served, tmp_path, capsys):
    args = ["a red circle", "--seed", "4", "-q", "--engines", str(tiny_engines), "--prior-steps", "3",
            "--decoder-steps", "3", "--sr-steps", "2"]
    assert cli.main([*args, "--backend", "triton", "--url", served.grpc_url, "-o", str(tmp_path / "t")]) == 0
    assert cli.main([*args, "--threads", "1", "-o", str(tmp_path / "l")]) == 0
    (got,), (want,) = (list((tmp_path / d).glob("*.png")) for d in ("t", "l"))
    assert np.abs(pixels([Image.open(got)]) - pixels([Image.open(want)])).max() <= PIXEL_BOUND
    assert Image.open(got).info["backend"].startswith("triton")
    capsys.readouterr()
    assert cli.main([*args, "--backend", "triton", "-o", str(tmp_path / "x")]) == 2
    assert "--url" in capsys.readouterr().err


def test_demo_writes_a_png_through_the_orchestrator(served, tmp_path):
    paths = triton_server.demo(served.url, "a red circle", tmp_path, seed=0)
    assert len(paths) == 1 and Image.open(paths[0]).info["prompt"] == "a red circle"


def test_server_start_failure_names_the_model(tiny_engines, tmp_path):
    repo = tmp_path / "repo"
    writer.write_repository(tiny_engines, repo, platform="python", orchestrator=None)
    for model in repo.iterdir():  # one model is enough (each starts a stub process)
        if model.name != "decoder":
            shutil.rmtree(model)
    broken = repo / "decoder" / "1" / "model.onnx"
    broken.unlink()  # a new file, whatever the writer made (a copy, or a link to the engine folder's graph)
    broken.write_bytes(b"not onnx")
    with pytest.raises(triton_server.ServerError, match="decoder"):
        triton_server.LocalServer(repo, startup_timeout=120).start()

