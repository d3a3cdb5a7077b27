"""The GPU check: CUDA and TensorRT paths of the runtime on the bundled engines, against the CPU run.

    make gpu-check                       # = .venv/bin/python scripts/gpu_check.py   (one GPU, <= 10 minutes)

NOT EXERCISED YET: written without a GPU (no machine of this project had one); the APIs used are those of
onnxruntime-gpu >= 1.21, TensorRT 10 and cuda-python. What it does, in one go:

1. ``nvidia-smi``: the GPU's name, driver and memory (no GPU: exits 2 saying so).
2. Makes ``.venv/gpu-env`` (a venv of its own: ``onnxruntime-gpu`` and ``onnxruntime`` must not share one)
   with onnxruntime-gpu[cuda,cudnn] (CUDA 12 and cuDNN 9 from PyPI), tensorrt-cu12, cuda-python 12, numpy,
   pillow, regex, ftfy; no torch. ``GPU_CHECK_PIP`` replaces that package list (e.g. for CUDA 13 wheels).
3. In that env (``measure``, this same file): copies ``engines/shapes-v2`` and builds a TensorRT plan of each
   graph the pipeline runs into the copy with ``export.trt.build_plan`` (the exporter's own builder:
   optimisation profile from the manifest's batch range, fp16 with normalisation, softmax, reductions and the
   timestep embedding pinned to fp32, timing cache), records them in the copy's manifest
   (``graphs.<g>.trt``, ``trt.<key>``, ``files``) as ``python -m export.all --trt`` would.
4. Runs the same prompts and seeds on: onnxruntime CPU (the reference), onnxruntime CUDA EP, and the native
   TensorRT backend (``backend="tensorrt"``, the plans above); ``--ort-trt-ep`` adds onnxruntime's TensorRT
   EP (it builds its own engines on first use: minutes). Checks each path's images against the CPU run
   (bounds in ``BOUNDS``, written before any GPU run; the measured figures are printed either way).
5. Latency: per stage (text encoder, prior, decoder, SR; from the pipeline's callback timestamps) and end to
   end, batch 1 (median of 5) and 16 images (median of 3), at the manifest's default steps; the table (GPU
   name in its title) goes to stdout and ``out/gpu-check/results.md`` (+ ``results.json``), ready to paste
   into bench/RESULTS.md. Exit status 0 only if every path ran and stayed within its bound.

Not covered: a real Triton server with the onnxruntime/TensorRT backends (NGC container; the repository
from ``python -m export.triton`` is what it would load), and ``python -m export.all --trt`` itself (it needs
CUDA torch in the same env as TensorRT; this check builds through the same ``build_plan`` without torch).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = ROOT / ".venv" / "gpu-env"
OUT = ROOT / "out" / "gpu-check"
PACKAGES = ["onnxruntime-gpu[cuda,cudnn]>=1.21", "tensorrt-cu12>=10.0,<11", "cuda-python>=12.6,<13",
            "numpy", "pillow", "regex", "ftfy"]
PROMPTS = ["a large red circle on the left, black background", "a yellow triangle above a purple cross"]
# Per path: (mean, max) absolute difference from the CPU run on uint8 pixels. fp32 CUDA: cuDNN/cuBLAS
# kernels (TF32 where onnxruntime enables it) reorder sums, and 13 sampling steps carry the differences on;
# torch-vs-onnxruntime on the CPU is <= 3 (tests/test_runtime.py). fp16 TensorRT: ~3 decimal digits per op.
BOUNDS = {"onnxruntime-cuda": (1.0, 24), "onnxruntime-trt-ep": (3.0, 64), "tensorrt-fp16": (3.0, 64)}
STAGES = ("text_encoder", "prior", "decoder", "sr0")


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def gpu_facts() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        print(f"gpu-check: no NVIDIA GPU here (nvidia-smi: {e}); this check needs one", file=sys.stderr)
        raise SystemExit(2) from None
    name, driver, memory = (s.strip() for s in out[0].split(","))
    return {"name": name, "driver": driver, "memory": memory, "count": len(out)}


def make_env() -> Path:
    python = ENV / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(ENV)])
    packages = os.environ.get("GPU_CHECK_PIP", "").split() or PACKAGES
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([str(python), "-m", "pip", "install", "-q", *packages])
    return python


def driver(args) -> int:
    started = time.monotonic()
    gpu = gpu_facts()
    print(f"gpu-check: {gpu['name']} (driver {gpu['driver']}, {gpu['memory']})", flush=True)
    python = make_env()
    print(f"gpu-check: environment ready after {time.monotonic() - started:.0f} s", flush=True)
    # tensorrt's pip wheels keep libnvinfer in tensorrt_libs; onnxruntime's TensorRT EP dlopens it by name
    where = "import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))"
    libs = subprocess.run([str(python), "-c", where], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    cmd = [str(python), str(Path(__file__).resolve()), "measure", "--engines", str(args.engines),
           "--gpu", json.dumps(gpu), "--precision", args.precision]
    if args.ort_trt_ep:
        cmd.append("--ort-trt-ep")
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    print(f"gpu-check: {time.monotonic() - started:.0f} s in all", flush=True)
    return proc.returncode


# --------------------------------------------------------------------------------------------------------
# measure: runs inside .venv/gpu-env (onnxruntime-gpu, tensorrt, cuda-python; no torch)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def graphs_run(data: dict) -> list[str]:
    """The graphs the pipeline opens (the full prior is skipped where its prefix-cache pair replaces it)."""
    st = data["stages"]
    names = [st["text_encoder"]["graph"], *([st["image_encoder"]["graph"]] if "image_encoder" in st else [])]
    pc = st["prior"].get("prefix_cache")
    names += [pc["prefix_graph"], pc["step_graph"]] if pc else [st["prior"]["graph"]]
    names.append(st["decoder"]["graph"])
    for sr in st.get("sr", []):
        names += [sr["graph"], *([sr["last_step_graph"]] if sr.get("last_step_graph") else [])]
    return names


def build_plans(folder: Path, precision: str) -> str:
    """TensorRT plans of the graphs the pipeline runs (``graphs_run``) in ``folder`` (a copy), recorded in its
    manifest; returns the key."""
    import tensorrt as trt

    from dalle2_rt.runtime import trt_keys
    from export import trt as export_trt

    cc = trt_keys.device_compute_capability(0)
    export_trt.check_precision(precision, trt.__version__)
    key = trt_keys.engine_key(trt.__version__, cc)
    data = json.loads((folder / "manifest.json").read_text())
    out_dir = folder / trt_keys.engine_dir(key)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache, plans, pinned, seconds = b"", {}, {}, {}
    for name in graphs_run(data):
        entry = data["graphs"][name]
        t0 = time.perf_counter()
        plan, cache, pinned[name] = export_trt.build_plan(trt, logger, folder / entry["file"], entry,
                                                          entry.get("timestep_inputs", []), precision, cache)
        rel = trt_keys.plan_path(key, name)
        (folder / rel).write_bytes(plan)
        plans[name], seconds[name] = rel, time.perf_counter() - t0
        entry.setdefault("trt", {})[key] = rel
        data["files"][rel] = _sha(folder / rel)
        print(f"  plan {name}: {precision}, {pinned[name]} layers pinned to fp32, {seconds[name]:.1f} s", flush=True)
    (out_dir / trt_keys.TIMING_CACHE).write_bytes(cache)
    data.setdefault("trt", {})[key] = export_trt.trt_entry(
        key, trt_version=trt.__version__, cc=cc, device=_device_name(), precision=precision, plans=plans,
        fp32_counts=pinned, validation={}, failed={}, build_seconds=seconds)
    (folder / "manifest.json").write_text(json.dumps(data, indent=1))
    return key


def _device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def timed_call(pipe, prompts: list[str], n: int, seed: int = 0):
    """(images, {stage: seconds, "total": seconds}) of one call; a stage's time runs from the previous
    stage's last callback to its own last one (host work included)."""
    marks = {}

    def callback(stage, step, total, x0):
        marks[stage] = time.perf_counter()

    t0 = time.perf_counter()
    images = pipe(prompts, seed=seed, num_images=n, callback=callback)
    t1 = time.perf_counter()
    times, previous = {}, t0
    for stage in STAGES:
        if stage in marks:
            times[stage], previous = marks[stage] - previous, marks[stage]
    times["total"] = t1 - t0
    return images, times


def measure(args) -> int:
    import numpy as np
    import onnxruntime as ort

    from dalle2_rt.runtime.pipeline import Pipeline

    gpu = json.loads(args.gpu)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls(directory="")  # CUDA and cuDNN from the nvidia-* wheels of this env
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}: {available}", flush=True)
    if "CUDAExecutionProvider" not in available:
        print("gpu-check: FAIL onnxruntime has no CUDAExecutionProvider here", flush=True)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    folder = OUT / "engines"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(args.engines, folder)
    results = {"gpu": gpu, "onnxruntime": ort.__version__, "paths": {}, "failures": []}
    try:
        results["trt_key"] = build_plans(folder, args.precision)
    except Exception as e:  # noqa: BLE001 - reported; the ONNX Runtime paths still run
        results["failures"].append(f"TensorRT plans: {type(e).__name__}: {e}")
        print(f"gpu-check: FAIL building plans: {e}", flush=True)

    paths = {"onnxruntime-cpu": dict(backend="onnxruntime", providers=["CPUExecutionProvider"]),
             "onnxruntime-cuda": dict(backend="onnxruntime", providers=["CUDAExecutionProvider"])}
    if args.ort_trt_ep:
        paths["onnxruntime-trt-ep"] = dict(backend="onnxruntime",
                                           providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    if "trt_key" in results:
        paths[f"tensorrt-{args.precision}"] = dict(backend="tensorrt")
    reference = {}
    for name, options in paths.items():
        print(f"gpu-check: {name}", flush=True)
        try:
            pipe = Pipeline.load(folder, **options)
            timed_call(pipe, PROMPTS[:1], 1)  # warm-up: first-call allocations, kernel selection
            row = {"backend": pipe.backend.describe()}
            for n, repeats in ((1, 5), (16, 3)):
                runs = [timed_call(pipe, PROMPTS[:1], n, seed=r) for r in range(repeats)]
                row[f"batch{n}"] = {k: statistics.median(t[k] for _, t in runs) for k in runs[0][1]}
            images = np.stack([np.asarray(im) for im in pipe(PROMPTS, seed=7, num_images=4)]).astype(np.int16)
        except Exception as e:  # noqa: BLE001 - one path failing does not hide the others
            results["failures"].append(f"{name}: {type(e).__name__}: {e}")
            print(f"gpu-check: FAIL {name}: {e}", flush=True)
            continue
        if not reference:
            reference["images"] = images
        else:
            diff = np.abs(images - reference["images"])
            mean_bound, max_bound = BOUNDS.get(name, (3.0, 64))
            row["vs_cpu"] = {"mean": float(diff.mean()), "max": int(diff.max()),
                             "bound": [mean_bound, max_bound]}
            if diff.mean() > mean_bound or diff.max() > max_bound:
                results["failures"].append(f"{name}: images differ from the CPU run by mean {diff.mean():.2f}, "
                                           f"max {diff.max()} (bound {mean_bound}, {max_bound})")
        results["paths"][name] = row
    table = markdown(results)
    print(table)
    (OUT / "results.md").write_text(table + "\n")
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    for failure in results["failures"]:
        print(f"gpu-check: FAIL {failure}")
    print(f"gpu-check: {'FAILED' if results['failures'] else 'passed'}; tables in {OUT / 'results.md'}")
    return 1 if results["failures"] else 0


def markdown(results: dict) -> str:
    gpu = results["gpu"]
    lines = [f"GPU check on {gpu['name']} (driver {gpu['driver']}), onnxruntime {results['onnxruntime']}, "
             f"TensorRT key {results.get('trt_key', 'none')}; engines/shapes-v2 at its default steps; "
             f"`make gpu-check`, {time.strftime('%Y-%m-%d')}", "",
             "| path | batch | text enc | prior | decoder | SR | end to end | per image | vs CPU (mean / max of 255) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["paths"].items():
        vs = row.get("vs_cpu")
        vs_text = f"{vs['mean']:.2f} / {vs['max']}" if vs else "reference"
        for n in (1, 16):
            t = row.get(f"batch{n}", {})
            cells = [f"{1e3 * t[s]:.1f} ms" if s in t else "—" for s in STAGES]
            lines.append(f"| {name} | {n} | {' | '.join(cells)} | {1e3 * t['total']:.1f} ms | "
                         f"{1e3 * t['total'] / n:.1f} ms | {vs_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("measure", help="(inside .venv/gpu-env) build plans, run the paths, print the table")
    for q in (p, m):
        q.add_argument("--engines", type=Path, default=ROOT / "engines" / "shapes-v2")
        q.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
        q.add_argument("--ort-trt-ep", action="store_true", help="also onnxruntime's TensorRT EP (slow first run)")
    m.add_argument("--gpu", required=True, help="JSON of gpu_facts()")
    args = p.parse_args(argv)
    if not (args.engines / "manifest.json").exists():
        raise SystemExit(f"gpu-check: {args.engines} has no manifest.json (make engines)")
    return measure(args) if args.command == "measure" else driver(args)


if __name__ == "__main__":
    sys.exit(main())
