"""Where the time goes in the graphs, and what session settings change it — measured, one graph at a time.

Each experiment times ``InferenceSession.run`` of one graph on fixed random inputs (median of a few runs
after a warm-up), changing one thing against the runtime's own setting (``backends.OnnxRuntimeBackend``:
the exporter's ``*.opt.onnx``, ORT_ENABLE_ALL, the thread count asked for):

- threads: intra-op threads 1 vs 2.
- optimisation level: DISABLE / BASIC / EXTENDED / ALL on the plain ``.onnx``, and ALL on ``*.opt.onnx``.
- spinning: ``session.intra_op.allow_spinning`` 0 vs 1 (idle workers spin for work by default).
- batching: one call of 2B rows vs two calls of B rows (cond/uncond stacked, as the runtime does, or not),
  and ms per row as the batch grows (what several images per call buy).
- op breakdown: ORT's profiler on the decoder at the guided batch, time summed per op type.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from .feeds import graph_inputs
from .timing import median


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


def graph_files(manifest, graph):
    """(spec, plain .onnx, the optimised .opt.onnx or else the plain one) of a manifest graph."""
    spec = manifest.graphs[graph]
    return spec, spec.file, spec.optimized_file or spec.file


def guided_batch(graph: str, candidates: int = 2) -> int:
    """Rows of one call for one image at the runtime's defaults."""
    return {"prior": 2 * candidates, "decoder": 2}.get(graph, 1)


def threads_and_levels(manifest, graphs=("prior", "decoder", "sr0"), repeats: int = 5, log=print) -> dict:
    out = {}
    for g in graphs:
        spec, plain, opt = graph_files(manifest, g)
        feeds = graph_inputs(spec, guided_batch(g))
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
        spec, _, opt = graph_files(manifest, g)
        sess = session(opt)
        rows = {}
        for b in batches:
            if spec.max_batch and b > spec.max_batch:
                continue
            rows[b] = 1e3 * time_run(sess, graph_inputs(spec, b), repeats)
        half = max(1, guided_batch(g) // 2)
        split = 2 * 1e3 * time_run(sess, graph_inputs(spec, half), repeats)
        out[g] = {"ms_per_call": rows, "ms_per_row": {b: v / b for b, v in rows.items()},
                  "stacked_2B_ms": rows.get(2 * half), "two_calls_of_B_ms": split, "B": half}
        if log:
            log(f"  {g}: " + ", ".join(f"b{b} {v:.1f} ms ({v / b:.1f}/row)" for b, v in rows.items())
                + f"; 2×b{half} {split:.1f} ms")
    return out


def op_breakdown(manifest, graph: str = "decoder", runs: int = 5) -> dict:
    """ORT profiler: total µs per op type over ``runs`` calls of ``graph`` at its guided batch."""
    spec, _, opt = graph_files(manifest, graph)
    feeds = graph_inputs(spec, guided_batch(graph))
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
