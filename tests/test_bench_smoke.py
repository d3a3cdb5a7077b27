"""The benchmark harness on the tiny engines: it runs end to end and its results are well formed.

No timing is asserted (benchmarks print numbers; they are not timed tests). What is asserted: the FLOP
counter against hand-counted graphs and against torch's own counter, the random inputs every benchmark
feeds, the structure and consistency of each part's results, the worker protocol of the side-by-sides,
the chart file, and that the prefix-cache experiment (``bench/experiments``) still compares what it says.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from bench import flops  # noqa: E402


def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = min(m.ir_version, 10)
    return m


def test_flop_counter_by_hand(tmp_path):
    """Conv 3→8, 3×3, stride 1 on 16×16; MatMul (B,4,5,6)@(6,7); Gemm transB (B,7)x(3,7)ᵀ, at batch B."""
    f = helper.make_tensor_value_info
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], np.zeros(8 * 27, np.float32))
    m6 = helper.make_tensor("m", TensorProto.FLOAT, [6, 7], np.zeros(42, np.float32))
    gw = helper.make_tensor("gw", TensorProto.FLOAT, [3, 7], np.zeros(21, np.float32))
    model = _graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("MatMul", ["a", "m"], ["c"]),
         helper.make_node("Gemm", ["v", "gw"], ["o"], transB=1)],
        [f("x", TensorProto.FLOAT, ["batch", 3, 16, 16]), f("a", TensorProto.FLOAT, ["batch", 4, 5, 6]),
         f("v", TensorProto.FLOAT, ["batch", 7])],
        [f("y", TensorProto.FLOAT, None), f("c", TensorProto.FLOAT, None), f("o", TensorProto.FLOAT, None)],
        [w, m6, gw])
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    for b in (1, 3):
        c = flops.count_flops(path, b)
        conv = 2 * b * 8 * 16 * 16 * 3 * 9
        matmul = 2 * b * 4 * 5 * 6 * 7
        gemm = 2 * b * 7 * 3
        assert c["by_op"] == {"Conv": conv, "MatMul": matmul, "Gemm": gemm}
        assert c["flops"] == conv + matmul + gemm
    assert flops.count_params(path) == 8 * 27 + 42 + 21


def test_random_inputs_are_valid_graph_inputs():
    """Token rows as a tokenizer writes them, whole timesteps in range, keep flags on, the asked dtypes."""
    from bench.feeds import EOT, SOT, random_inputs

    inputs = [("tokens", "int64", ["batch", 77]), ("t", "float32", ["batch"]), ("image_keep", "float32", [None]),
              ("pixels", "float32", ["batch", 3, 8, 8]), ("x_t", "float32", ["batch", 4])]
    x = random_inputs(inputs, batch=3, seed=1)
    assert {k: (v.dtype.name, v.shape) for k, v in x.items()} == {
        "tokens": ("int64", (3, 77)), "t": ("float32", (3,)), "image_keep": ("float32", (3,)),
        "pixels": ("float32", (3, 3, 8, 8)), "x_t": ("float32", (3, 4))}
    tok = x["tokens"]
    assert (tok[:, 0] == SOT).all() and (tok[:, 6] == EOT).all() and (tok[:, 7:] == 0).all()
    assert ((tok[:, 1:6] >= 300) & (tok[:, 1:6] < 3000)).all()
    assert (x["t"] == np.round(x["t"])).all() and ((0 <= x["t"]) & (x["t"] < 1000)).all()
    assert (x["image_keep"] == 1).all() and ((0 <= x["pixels"]) & (x["pixels"] < 1)).all()
    # the seed fixes the inputs: benchmarks that interleave variants feed each the same arrays
    assert all(np.array_equal(v, x[k]) for k, v in random_inputs(inputs, batch=3, seed=1).items())
    assert not np.array_equal(random_inputs(inputs, batch=3, seed=2)["x_t"], x["x_t"])


def test_the_shape_probe_feeds_timesteps_any_chain_has():
    """A learned timestep table of 50 rows (an imported 50-step chain): the probe's ORT run must index it."""
    from onnx import numpy_helper

    table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "t"], ["emb"])], "g",
                              [helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert flops._probe_shapes(model, ["emb"], 3) == {"emb": (3, 4)}


def test_flop_counter_matches_torch(tiny_engines):
    """Our ONNX count equals torch.utils.flop_counter on the same modules (the torch backend's)."""
    torch = pytest.importorskip("torch")
    from bench.sides import _our_torch_counts
    from dalle2_rt.runtime.pipeline import Pipeline

    with torch.no_grad():
        counts = _our_torch_counts(Pipeline.load(tiny_engines, backend="torch", threads=1))
    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    for g in ("prior", "decoder", "sr0"):
        ours = flops.count_flops(tiny_engines / manifest["graphs"][g]["file"], 1)["flops"]
        assert ours == counts[g]["flops"], g
        assert ours > 0


def test_bench_quick_on_tiny_engines(tiny_engines, tmp_path):
    """``python -m bench --quick`` with tiny settings: every selected part produces well-formed numbers."""
    from bench.__main__ import main

    out = tmp_path / "out"
    rc = main(["--engines", str(tiny_engines), "--quick", "--parts", "flops,latency,cold,fidelity",
               "--counts", "1,2", "--sweep-captions", "2", "--out", str(out), "--no-chart-copy",
               "--fidelity-untrained"])
    res = json.loads((out / "results.json").read_text())
    assert rc == 0, res["errors"]
    assert set(res["parts"]) == {"flops", "latency", "cold", "fidelity"}
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"]

    for g, v in res["parts"]["flops"].items():
        assert v["gflop"] > 0 and v["params"] > 0, g

    lat = dict(res["parts"]["latency"])
    assert lat.pop("settings")["decoder"]["steps"] == 25  # the manifest default
    assert set(lat) == {"1", "2"}
    for n, v in lat.items():
        assert list(v["stages"]) == ["text_encoder", "prior", "decoder", "sr0", "output"]
        assert math.isclose(sum(v["stages"].values()), v["total"], rel_tol=1e-6)
        assert 0 < v["in_graphs"] <= v["total"]
        graphs = v["graphs"]
        # the prior's text prefix once for the one prompt (a cond and an uncond row, whatever n is), then 25
        # guided steps × (2 candidates × 2 branches) rows per image; 25 guided decoder steps, 7 SR
        assert "prior" not in graphs
        assert graphs["prior_prefix"]["calls"] == 1 and graphs["prior_prefix"]["rows_per_call"] == 2
        assert graphs["prior_step"]["calls"] == 25 and graphs["prior_step"]["rows_per_call"] == 4 * int(n)
        assert graphs["decoder"]["calls"] == 25 and graphs["decoder"]["rows_per_call"] == 2 * int(n)
        assert graphs["sr0"]["calls"] == 7 and graphs["sr0"]["rows_per_call"] == int(n)
        assert all(g["gflops"] > 0 for g in graphs.values())

    cold = res["parts"]["cold"]
    assert cold["cold_s"] > 0 and len(cold["cold_runs"]) == 2
    assert set(cold["phases"]) == {"import", "load", "first_image"}
    assert all(v > 10 for v in cold["max_rss_mb"].values())  # MB: a Python process with ORT loaded
    assert set(cold["load"]["sessions"]) == set(json.loads((tiny_engines / "manifest.json").read_text())["graphs"])

    fid = res["parts"]["fidelity"]
    assert set(fid["sweeps"]) == {"decoder", "prior", "sr"}
    for s in fid["sweeps"].values():
        assert s["chosen"] in [p["steps"] for p in s["points"]]
        assert all(0.0 <= p["fully_right"] <= 1.0 and p["images"] == 2 for p in s["points"])
    png = out / "fidelity_steps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (out / "RESULTS.md").read_text()
    for heading in ("Warm latency", "Cold start", "Fidelity vs steps", "Command: `python -m bench"):
        assert heading in md


def test_worker_protocol_alternates(tiny_engines):
    """Two workers answer in turn with one result per request (the side-by-side machinery)."""
    from bench.timing import Worker, alternate

    args = json.dumps({"engines": str(tiny_engines), "backend": "onnxruntime", "threads": 1})
    with Worker("a", [sys.executable, "-m", "bench.worker", "ours", args]) as a, \
            Worker("b", [sys.executable, "-m", "bench.worker", "ours", args]) as b:
        assert a.info["networks"]["decoder"]["flops"] > 0
        answers = alternate([a, b], {"a": {"images": 1, "steps": [2, 2, 2]}, "b": {"images": 2, "steps": [2, 2, 2]}},
                            rounds=2)
        assert [x["images"] for x in answers["a"]] == [1, 1]
        assert [x["images"] for x in answers["b"]] == [2, 2]
        assert all(x["seconds"] > 0 for v in answers.values() for x in v)
        with pytest.raises(RuntimeError, match="worker a"):
            a.ask({"op": "run", "images": 0})  # the pipeline's InputError comes back as the worker's error


def test_prefix_experiment_compares_the_cache_with_the_full_graph(tiny_engines):
    """Its variants run the graphs they are named after: the full prior at every step, or the prefix once."""
    from bench.experiments import prefix

    res = prefix.measure(tiny_engines, threads=2, repeats=1, log=None)
    steps = 25  # the tiny manifest's default prior steps
    assert {k: v["prior_graph_calls"] for k, v in res["variants"].items()} == {
        "full prior graph, 2 threads": {"prior": steps},
        "prefix cache, 2 threads": {"prior_prefix": 1, "prior_step": steps},
        "prefix cache, 1 thread": {"prior_prefix": 1, "prior_step": steps}}
    assert all(0 < v["prior_ms"] < v["image_ms"] for v in res["variants"].values())


def test_decoder_ranking_experiment_ranks_what_the_runtime_keeps(tiny_engines):
    """bench/experiments/decoder_ranking.py scores every one of the k samples; the one its scores rank first is,
    pixel for pixel, the image the runtime returns with decoder_candidates = k."""
    from bench.experiments import decoder_ranking
    from dalle2_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_engines, threads=1)
    images, scores, by_image = decoder_ranking.samples_of(pipe, "a red circle", 3, 2, 2.0)
    assert images.shape[0] == 3 and scores.shape == by_image.shape == (3,)
    kept = pipe("a red circle", seed=0, decoder_steps=2, decoder_guidance=2.0, decoder_candidates=3)[0]
    assert np.array_equal(np.asarray(kept), images[int(np.argmax(scores))])
    res = decoder_ranking.measure(pipe, [(2, 2.0)], single=1, two=1, k=2, log=None)
    (row,) = res["settings"]
    for kind in ("single", "two"):
        r = row[kind]
        assert r["n"] == 1 and r["first"] <= r["oracle@2"] and r["ranked@2"] <= r["oracle@2"]
        assert r["ranked_by_image@2"] <= r["oracle@2"]


def test_learned_ranker_experiment_trains_and_reports_each_epoch(tiny_engines, tmp_path, monkeypatch):
    """bench/experiments/learned_ranker.py on the tiny folder: samples drawn for training and evaluation captions
    (disjoint), CLIP's kept rates never above the oracle's, one row per epoch in --json."""
    pytest.importorskip("torch")
    from bench.experiments import learned_ranker

    drawn = []

    def first_is_right(image, caption):  # a random tiny decoder draws nothing right: the first of each 2 is
        drawn.append(caption)
        return {"fully_right": len(drawn) % 2 == 1}

    monkeypatch.setattr(learned_ranker, "score", first_is_right)
    out = tmp_path / "r.json"
    assert learned_ranker.main(["--engines", str(tiny_engines), "--threads", "1", "--train", "3,3,101",
                                "--eval", "2,2,7", "--k", "2", "--epochs", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["captions"]["eval"] == 4 and res["captions"]["train"] == 6 == len(drawn) // 2 - 4
    assert [row["epoch"] for row in res["epochs"]] == [0, 1]
    for part in ("val", "eval"):
        r = res["clip"][part]["2"]
        assert 0.0 <= r["two"] <= r["oracle_two"] == 1.0  # every caption has one right candidate of its 2


def test_a_long_legend_widens_the_chart_instead_of_being_cut(tmp_path):
    """The frontier's legend names engine folders: the longest must fit inside the image, with white beyond it."""
    from PIL import Image

    from bench.chart import scatter_chart

    name = "shapes-v2-steps3 (distilled) int8 decoder+sr0 two-object"
    for names, path in ((["a"], tmp_path / "short.png"), ([name, "b"], tmp_path / "long.png")):
        scatter_chart({n: [(100.0 + i, 70.0, 2.0, "defaults")] for i, n in enumerate(names)}, path, title="t",
                      xlabel="x", ylabel="y", chosen=(names[0], "defaults"))
    short, long = (np.asarray(Image.open(p).convert("L")) for p in (tmp_path / "short.png", tmp_path / "long.png"))
    assert short.shape == (620, 1000) and long.shape[0] == 620 and long.shape[1] > 1000
    inked = np.nonzero((long < 128).any(axis=0))[0]  # columns with dark (text) pixels
    assert inked.max() < long.shape[1] - 10  # the legend text ends inside, with a margin


def test_the_backends_report_says_when_onnxruntime_ran_int8_variants():
    """torch runs the fp32 model: a ratio against onnxruntime's int8 variants must not read as the same graphs."""
    from bench.report import _backends

    base = {"steps": [5, 3, 2], "ratio": 2.1, "median": {"onnxruntime": 0.09, "torch": 0.19},
            "seconds": {"onnxruntime": [0.09], "torch": [0.19]}}
    fp32 = "\n".join(_backends({**base, "onnxruntime_backend": "onnxruntime 1.32.0 [CPUExecutionProvider]",
                                "int8": False}, {}))
    assert "both running the same graphs" in fp32 and "int8" not in fp32
    backend = "onnxruntime 1.32.0 [CPUExecutionProvider, int8 decoder sr0]"
    int8 = "\n".join(_backends({**base, "onnxruntime_backend": backend, "int8": True}, {}))
    assert "same graphs (" not in int8 and "int8 decoder sr0" in int8 and "not the same arithmetic" in int8


def test_sr_noise_experiment_measures_speckle(tiny_engines, monkeypatch):
    """The speckle measure: zero on a flat image, higher on grain; the experiment reports each SR setting."""
    from PIL import Image

    from bench.experiments import sr_noise
    from dalle2_rt.runtime.pipeline import Pipeline

    flat = Image.new("RGB", (16, 16), (200, 30, 30))
    grain = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert sr_noise.speckle(flat) == 0.0 and sr_noise.speckle(Image.fromarray(grain)) > 20
    pipe = Pipeline.load(tiny_engines, threads=1)
    asked = []
    real_call = Pipeline.__call__

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("sr_steps"))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    out = sr_noise.measure(pipe, [1, 2], 1, 1, log=lambda *_: None)
    assert asked == [1, 1, 2, 2]  # each setting over both captions, SR steps as asked
    assert out["captions"] == 2 and set(out["sr_steps"]) == {1, 2}
    assert all(v[0] >= 0 and v[1] >= 0 for v in out["sr_steps"].values())
    assert 0 <= out["renders"][0] < 5  # the world's flat renders: edges only
