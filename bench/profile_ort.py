"""Where the time goes in the graphs, and what session settings change it — measured, one graph at a time.

Each experiment times ``InferenceSession.run`` of one graph on fixed random inputs (median of a few runs
after a warm-up), changing one thing against the runtime's own setting (``backends.OnnxRuntimeBackend``:
the exporter's ``*.opt.onnx``, ORT_ENABLE_ALL, the thread count asked for):

- threads: intra-op threads 1 vs 2.
- optimisation level: DISABLE / BASIC / EXTENDED / ALL on the plain ``.onnx``, and ALL on ``*.opt.onnx``.
- spinning: ``session.intra_op.allow_spinning`` 0 vs 1 (idle workers spin for work by default).
- batching: one call of 2B rows vs two calls of B rows (cond/uncond stacked, as the runtime does, or not),
  and ms per row as the batch grows (what several images per call buy).
- int8: the decoder/SR U-Nets quantised statically (QDQ, per-channel weights, activations calibrated on
  sampled inputs) — speed, and the output error against fp32 on the same inputs.
- op breakdown: ORT's profiler on the decoder at the guided batch, time summed per op type.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .timing import median


def sample_feeds(spec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of a manifest graph at ``batch`` rows: noise-like floats, t in the schedule, keep flags 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = [batch if d == "batch" else d for d in t.shape]
        if t.dtype == "int64":  # tokens: start, a few words, end, padding
            tok = np.zeros(shape, np.int64)
            tok[:, 0], tok[:, 1:6], tok[:, 6] = 49406, rng.integers(300, 3000, (shape[0], 5)), 49407
            feeds[t.name] = tok
        elif t.name in ("t", "aug_t"):
            feeds[t.name] = rng.integers(0, 1000, shape).astype(np.float32)
        elif t.name.endswith("_keep"):
            feeds[t.name] = np.ones(shape, np.float32)
        elif t.name == "pixels":
            feeds[t.name] = rng.uniform(0, 1, shape).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def session(path, *, threads: int = 2, level: str = "ALL", spinning: bool | None = None, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{'ENABLE_' if level != 'DISABLE' else ''}"
                                          f"{level if level != 'DISABLE' else 'DISABLE_ALL'}")
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_run(sess, feeds, repeats: int = 5) -> float:
    """Median seconds of ``sess.run`` after one warm-up run."""
    return interleaved({"x": (sess, feeds)}, repeats)["x"]


SETTLE_S = 0.05  # pause between runs of different sessions: let the last one's idle workers stop spinning


def interleaved(variants: dict, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each variant's ``sess.run(feeds)``, the variants taking turns (A, B, A, B, ...)
    so that drift of the machine's load falls on all of them; one warm-up run each first.

    Each session has its own intra-op pool whose idle workers spin for a while after a run (ORT's
    default); without the short pause the next variant would share the cores with them. (One variant
    alone runs back to back, as the pipeline's steps do.)"""
    for sess, feeds in variants.values():
        sess.run(None, feeds)
    xs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, (sess, feeds) in variants.items():
            if len(variants) > 1:
                time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            sess.run(None, feeds)
            xs[k].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in xs.items()}


def _files(manifest, graph):
    spec = manifest.graphs[graph]
    return spec, spec.file, spec.optimized_file or spec.file


def guided_batch(graph: str, candidates: int = 2) -> int:
    """Rows of one call for one image at the runtime's defaults."""
    return {"prior": 2 * candidates, "decoder": 2}.get(graph, 1)


def threads_and_levels(manifest, graphs=("prior", "decoder", "sr0"), repeats: int = 5, log=print) -> dict:
    out = {}
    for g in graphs:
        spec, plain, opt = _files(manifest, g)
        feeds = sample_feeds(spec, guided_batch(g))
        variants = {f"opt ALL, {n} thread(s)": session(opt, threads=n) for n in (1, 2)}
        variants.update({f"plain {lv}, 2 threads": session(plain, level=lv)
                         for lv in ("DISABLE", "BASIC", "EXTENDED", "ALL")})
        variants.update({f"opt ALL, 2 threads, spinning {'on' if s else 'off'}": session(opt, spinning=s)
                         for s in (False, True)})
        r = interleaved({k: (v, feeds) for k, v in variants.items()}, repeats)
        out[g] = {k: 1e3 * v for k, v in r.items()}  # ms per call
        if log:
            log(f"  {g} (batch {guided_batch(g)}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[g].items()))
    return out


def batching(manifest, graphs=("prior", "decoder", "sr0"), batches=(1, 2, 4, 8, 16), repeats: int = 5,
             log=print) -> dict:
    """ms per call and per row at each batch; and 2B in one call vs two calls of B (B = one image's rows)."""
    out = {}
    for g in graphs:
        spec, _, opt = _files(manifest, g)
        sess = session(opt)
        rows = {}
        for b in batches:
            if spec.max_batch and b > spec.max_batch:
                continue
            rows[b] = 1e3 * time_run(sess, sample_feeds(spec, b), repeats)
        half = max(1, guided_batch(g) // 2)
        split = 2 * 1e3 * time_run(sess, sample_feeds(spec, half), repeats)
        out[g] = {"ms_per_call": rows, "ms_per_row": {b: v / b for b, v in rows.items()},
                  "stacked_2B_ms": rows.get(2 * half), "two_calls_of_B_ms": split, "B": half}
        if log:
            log(f"  {g}: " + ", ".join(f"b{b} {v:.1f} ms ({v / b:.1f}/row)" for b, v in rows.items())
                + f"; 2×b{half} {split:.1f} ms")
    return out


def op_breakdown(manifest, graph: str = "decoder", runs: int = 5) -> dict:
    """ORT profiler: total µs per op type over ``runs`` calls of ``graph`` at its guided batch."""
    spec, _, opt = _files(manifest, graph)
    feeds = sample_feeds(spec, guided_batch(graph))
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(opt, profile=os.path.join(tmp, "ort"))
        sess.run(None, feeds)  # warm-up, profiled too: dropped below by taking the last `runs` model_run spans
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs_seen[-runs]["ts"] if len(runs_seen) >= runs else 0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    total = sum(by_op.values())
    return {"graph": graph, "batch": guided_batch(graph), "runs": runs,
            "ms_per_call": {k: v / runs / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "share": {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


class _Calib:
    """Calibration reader for onnxruntime.quantization: the given input batches, in turn."""

    def __init__(self, batches: list[dict]):
        self.items = iter(batches)

    def get_next(self):
        return next(self.items, None)


def quantize(plain: Path, calibration: list[dict], out: Path) -> Path:
    """Static QDQ int8 of ``plain`` (Conv/MatMul/Gemm; per-channel int8 weights, uint8 activations, MinMax
    ranges over ``calibration``) written to ``out``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(plain), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _Calib(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    pre.unlink()
    return out


def int8(manifest, graphs=("decoder", "sr0"), repeats: int = 5, log=print) -> dict:
    """Speed and output error of the int8 graphs, calibrated and tested on random inputs (rough scales:
    ``int8_fidelity`` calibrates on real sampling trajectories and scores the images instead)."""
    out = {}
    for g in graphs:
        spec, plain, opt = _files(manifest, g)
        feeds = sample_feeds(spec, guided_batch(g), seed=7)
        with tempfile.TemporaryDirectory() as tmp:
            q = quantize(plain, [sample_feeds(spec, 2, seed=100 + i) for i in range(8)], Path(tmp) / "q.onnx")
            fp32, i8 = session(opt), session(q)
            ref, got = fp32.run(None, feeds)[0], i8.run(None, feeds)[0]
            ms = interleaved({"fp32": (fp32, feeds), "int8": (i8, feeds)}, repeats)
            out[g] = {"fp32_ms": 1e3 * ms["fp32"], "int8_ms": 1e3 * ms["int8"],
                      "rel_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
                      "rms_rel_err": float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))}
        if log:
            r = out[g]
            log(f"  {g}: fp32 {r['fp32_ms']:.1f} ms, int8 {r['int8_ms']:.1f} ms, max err {r['rel_err']:.3f} "
                f"of scale, rms {r['rms_rel_err']:.3f}")
    return out


class _SessionEngine:
    """An engine over an arbitrary ORT session (for swapping a quantised graph into a loaded Pipeline)."""

    def __init__(self, engine, sess):
        self.spec, self.name, self.max_batch = engine.spec, engine.name, engine.max_batch
        self.description = f"int8 {engine.name}"
        self._sess, self._outputs = sess, [t.name for t in engine.spec.outputs]

    def __call__(self, **arrays):
        feeds = {t.name: np.ascontiguousarray(arrays[t.name], dtype=t.dtype) for t in self.spec.inputs}
        return dict(zip(self._outputs, self._sess.run(self._outputs, feeds)))


class _Recorder:
    """Wraps an engine and keeps every ``every``-th call's inputs (calibration data from real trajectories)."""

    def __init__(self, engine, every: int = 3):
        self._engine, self.every, self.calls, self.kept = engine, every, 0, []
        self.spec, self.name, self.max_batch = engine.spec, engine.name, engine.max_batch
        self.description = engine.description

    def __call__(self, **arrays):
        if self.calls % self.every == 0:
            self.kept.append({t.name: np.array(arrays[t.name], dtype=t.dtype) for t in self.spec.inputs})
        self.calls += 1
        return self._engine(**arrays)


def int8_fidelity(pipe, captions: list[str], seeds=(0,), graphs=("decoder", "sr0"), calib_captions: int = 6,
                  threads: int = 2, baseline: dict | None = None, log=print) -> dict:
    """Fidelity with the decoder/SR swapped for int8 graphs calibrated on sampled trajectories (captions
    other than the evaluation ones), against the same captions and seeds in fp32 (``baseline`` =
    {"fully_right", "s_per_image"} when the caller already has it, e.g. the sweep's default point)."""
    from .fidelity import eval_captions, generate_and_score

    original = dict(pipe.engines)
    recorders = {g: _Recorder(original[g]) for g in graphs}
    pipe.engines.update(recorders)
    calib = eval_captions(calib_captions // 2, calib_captions - calib_captions // 2, seed=99)
    pipe(calib, seed=123)
    pipe.engines.update(original)
    n = len(captions) * len(seeds)
    out = {"graphs": list(graphs), "captions": len(captions), "seeds": list(seeds),
           "calibration_batches": {g: len(r.kept) for g, r in recorders.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        swapped = {}
        for g in graphs:
            q = quantize(pipe.manifest.graphs[g].file, recorders[g].kept, Path(tmp) / f"{g}.int8.onnx")
            swapped[g] = _SessionEngine(original[g], session(q, threads=threads))
        if baseline is None:
            summary32, _, secs32 = generate_and_score(pipe, captions, seeds)
            baseline = {"fully_right": summary32.rate("fully_right"), "s_per_image": secs32 / n}
        pipe.engines.update(swapped)
        try:
            summary8, _, secs8 = generate_and_score(pipe, captions, seeds)
        finally:
            pipe.engines.update(original)
    out.update({"fp32": baseline, "int8": {"fully_right": summary8.rate("fully_right"), "s_per_image": secs8 / n}})
    if log:
        log(f"  int8 {'+'.join(graphs)}: fully right {out['int8']['fully_right']:.1%} vs fp32 "
            f"{out['fp32']['fully_right']:.1%}; {out['int8']['s_per_image']:.2f} vs {out['fp32']['s_per_image']:.2f} "
            "s/image (batches of 16)")
    return out
