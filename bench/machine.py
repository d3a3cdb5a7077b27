"""What the benchmarks ran on, and how fast this CPU multiplies fp32 matrices (the yardstick for GFLOP/s).

The sgemm rate is measured two ways, each with 1 and with 2 threads: numpy's ``A @ B`` (its BLAS) and an
ONNX Runtime session holding one MatMul (MLAS, the kernels our graphs run on). Each is the best of a few
repeats of a square n×n×n product (2n³ FLOPs) — a peak the graphs can be held against, not a typical rate.
The thread count of numpy's BLAS is fixed at import, so each numpy measurement runs in a fresh process.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from dalle2_rt.runtime.cpu import cpuinfo_flags

from .feeds import random_inputs

SGEMM_N = 2048


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD flags that matter for MLAS kernels (avx2, avx512f, avx512_vnni, avx512_bf16, amx)."""
    have = cpuinfo_flags()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")
            if f in have]


def describe() -> dict:
    import onnxruntime as ort

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "flags": cpu_flags(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _best(fn, repeats: int) -> float:
    fn()  # warm: first call pays allocation and thread-pool start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_sgemm(n: int = SGEMM_N, repeats: int = 5) -> float:
    """GFLOP/s of numpy's fp32 n×n @ n×n in this process (its BLAS thread count as set at import)."""
    a, b = _operands(n).values()
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def ort_sgemm(threads: int, n: int = SGEMM_N, repeats: int = 5) -> float:
    """GFLOP/s of an ONNX Runtime CPU MatMul of two fp32 n×n inputs with ``threads`` intra-op threads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = _operands(n)
    return 2 * n**3 / _best(lambda: sess.run(None, feeds), repeats) / 1e9


def _operands(n: int) -> dict[str, np.ndarray]:
    """{"a", "b"}: two random fp32 n×n matrices (the MatMul graph's inputs; numpy multiplies the same)."""
    return random_inputs([("a", "float32", (n, n)), ("b", "float32", (n, n))])


def sgemm_rates(threads=(1, 2)) -> dict:
    """{"numpy": {threads: GFLOP/s}, "onnxruntime": {threads: GFLOP/s}, "n": SGEMM_N}."""
    out = {"n": SGEMM_N, "numpy": {}, "onnxruntime": {}}
    for t in threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "OPENBLAS_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        code = "import json, bench.machine as m; print(json.dumps(m.numpy_sgemm()))"
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out["numpy"][t] = round(json.loads(res.stdout.strip().splitlines()[-1]), 1)
        out["onnxruntime"][t] = round(ort_sgemm(t), 1)
    return out


if __name__ == "__main__":
    print(json.dumps({**describe(), "sgemm_gflops": sgemm_rates()}, indent=2))
