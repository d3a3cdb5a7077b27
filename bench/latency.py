"""Warm latency of the pipeline: end to end and per stage, and each graph's achieved GFLOP/s.

Stage times come from the pipeline's ``callback`` (it fires after every sampling step and once after each
encoder): a stage runs from the previous stage's last event to its own last event, so it includes the
host-side work of its loop (sampler arithmetic, guidance, noise draws). ``output`` is what follows the last
SR step (conversion to uint8 and PIL). Graph times come from wrapping each engine: the seconds spent inside
``engine(**arrays)``, which for onnxruntime is ``InferenceSession.run`` plus input casting. Achieved
GFLOP/s = the graph's FLOPs (``bench.flops``; linear in the batch) × calls / seconds in the graph.
"""
from __future__ import annotations

import time
from collections import defaultdict

from .flops import count_flops
from .sides import PROMPT
from .timing import median


class TimedEngine:
    """An engine that records (batch, seconds) of each call; otherwise the engine it wraps."""

    def __init__(self, engine, log: list):
        self._engine, self._log = engine, log
        self.spec, self.name, self.max_batch = engine.spec, engine.name, engine.max_batch
        self.description = engine.description

    def __call__(self, **arrays):
        t0 = time.perf_counter()
        out = self._engine(**arrays)
        self._log.append((self.name, len(next(iter(arrays.values()))), time.perf_counter() - t0))
        return out

    def __getattr__(self, item):
        return getattr(self._engine, item)


def instrument(pipe) -> list:
    """Wrap every engine of ``pipe`` in a ``TimedEngine``; returns the shared call log."""
    log: list = []
    pipe.engines = {g: TimedEngine(e, log) for g, e in pipe.engines.items()}
    return log


def timed_call(pipe, log: list, n: int, **settings) -> dict:
    """One call for ``n`` images: {"total", "stages": {name: s}, "graphs": {graph: {calls, seconds, rows}}}."""
    events: list[tuple[str, float]] = []

    def callback(stage, step, total, x0):
        events.append((stage, time.perf_counter()))

    log.clear()
    t0 = time.perf_counter()
    pipe(PROMPT, seed=0, num_images=n, callback=callback, **settings)
    t_end = time.perf_counter()
    last: dict[str, float] = {}
    order: list[str] = []
    for stage, t in events:
        if stage not in last:
            order.append(stage)
        last[stage] = t
    stages, start = {}, t0
    for stage in order:
        stages[stage] = last[stage] - start
        start = last[stage]
    stages["output"] = t_end - start
    graphs: dict[str, dict] = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "rows": 0})
    for name, rows, secs in log:
        g = graphs[name]
        g["calls"] += 1
        g["seconds"] += secs
        g["rows"] += rows
    return {"total": t_end - t0, "stages": stages, "graphs": dict(graphs)}


def measure(pipe, counts=(1, 4, 8), repeats: int = 3, log=print, **settings) -> dict:
    """Median of ``repeats`` warm calls for each image count, per stage and per graph, with GFLOP/s."""
    calls = instrument(pipe)
    flops1 = {g: count_flops(pipe.manifest.graphs[g].file, 1)["flops"] for g in pipe.engines}
    timed_call(pipe, calls, 1, **settings)  # warm-up: first runs allocate ORT's arenas
    out = {}
    for n in counts:
        runs = [timed_call(pipe, calls, n, **settings) for _ in range(repeats)]
        stages = {s: median([r["stages"][s] for r in runs]) for s in runs[0]["stages"]}
        graphs = {}
        for g in runs[0]["graphs"]:
            secs = median([r["graphs"][g]["seconds"] for r in runs])
            first = runs[0]["graphs"][g]
            flops = flops1[g] * first["rows"]
            graphs[g] = {"calls": first["calls"], "rows_per_call": first["rows"] / first["calls"], "seconds": secs,
                         "ms_per_call": 1e3 * secs / first["calls"], "gflop": flops / 1e9,
                         "gflops": flops / secs / 1e9}
        total = median([r["total"] for r in runs])
        out[n] = {"total": total, "per_image": total / n, "stages": stages, "graphs": graphs,
                  "in_graphs": sum(g["seconds"] for g in graphs.values()), "runs": [r["total"] for r in runs]}
        if log:
            log(f"  {n} image(s): {total:.3f} s  " + "  ".join(f"{s} {v:.3f}" for s, v in stages.items()))
    return out
