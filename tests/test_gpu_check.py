"""The parts of scripts/gpu_check.py that run without a GPU: its timing, its table, and its refusal.

The check itself (onnxruntime-gpu, TensorRT plans, CUDA and TensorRT paths) has never run: no GPU here.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dalle2_rt.runtime.pipeline import Pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_call_splits_a_call_into_its_stages(gpu_check, tiny_engines, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline.load(tiny_engines, threads=1)
    images, times = gpu_check.timed_call(pipe, ["a red circle"], 2)
    assert len(images) == 2
    assert set(times) == {*gpu_check.STAGES, "total"}
    assert all(v > 0 for v in times.values())
    assert sum(times[s] for s in gpu_check.STAGES) <= times["total"] + 1e-6


def test_plans_are_built_for_the_graphs_the_pipeline_opens(gpu_check, tiny_engines):
    import json

    data = json.loads((tiny_engines / "manifest.json").read_text())
    assert gpu_check.graphs_run(data) == ["text_encoder", "image_encoder", "prior_prefix", "prior_step", "decoder",
                                          "sr0"]
    assert set(gpu_check.graphs_run(data)) == set(Pipeline.load(tiny_engines, threads=1).engines)


def test_table_has_a_row_per_path_and_batch(gpu_check):
    row = {"batch1": {"text_encoder": 0.001, "prior": 0.002, "decoder": 0.003, "sr0": 0.004, "total": 0.011},
           "batch16": {"text_encoder": 0.002, "prior": 0.02, "decoder": 0.03, "sr0": 0.04, "total": 0.1}}
    results = {"gpu": {"name": "NVIDIA H200", "driver": "570"}, "onnxruntime": "1.22.0", "trt_key": "10.7.0-sm90",
               "paths": {"onnxruntime-cpu": row, "tensorrt-fp16": {**row, "vs_cpu": {"mean": 0.5, "max": 7}}}}
    table = gpu_check.markdown(results).splitlines()
    assert "NVIDIA H200" in table[0] and "10.7.0-sm90" in table[0]
    assert table[4] == "| onnxruntime-cpu | 1 | 1.0 ms | 2.0 ms | 3.0 ms | 4.0 ms | 11.0 ms | 11.0 ms | reference |"
    assert table[7] == ("| tensorrt-fp16 | 16 | 2.0 ms | 20.0 ms | 30.0 ms | 40.0 ms | 100.0 ms | 6.2 ms "
                        "| 0.50 / 7 |")


def test_without_a_gpu_it_says_so(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no nvidia-smi on this PATH
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no NVIDIA GPU here" in proc.stderr
