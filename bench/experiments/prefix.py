"""The prior's prefix cache. Decided: the prior runs as ``prior_prefix`` once and ``prior_step`` at every
step wherever the manifest offers them (bench/RESULTS.md §A, 2026-11-28: one image at the defaults, prior
stage 29 → 8 ms and the whole image 130 → 110 ms on 2 threads; the images are those of the full graph, as
the tests check).

    python -m bench.experiments.prefix [--engines DIR] [--threads 2] [--repeats 7]

Three pipelines over the same engine folder, called alternately in one process (one image, the defaults):
the full prior graph at every step (``Pipeline.load(prefix_cache=False)``), the cache (``prior_prefix``
once, ``prior_step`` in the loop) at the given thread count, and the cache on one intra-op thread. The
prior stage is timed by the pipeline's callback (``latency.timed_call``), so it includes the loop's host
work.
"""
from __future__ import annotations

import sys

from ..latency import instrument, timed_call
from ..timing import median
from . import engine_folder, parser, write_json


def measure(engines, threads: int = 2, repeats: int = 5, log=print) -> dict:
    from dalle2_rt.runtime.pipeline import Pipeline

    plural = "s" if threads > 1 else ""
    variants = {f"full prior graph, {threads} thread{plural}": {"threads": threads, "prefix_cache": False},
                f"prefix cache, {threads} thread{plural}": {"threads": threads, "prefix_cache": True}}
    if threads != 1:
        variants["prefix cache, 1 thread"] = {"threads": 1, "prefix_cache": True}
    pipes = {}
    for name, options in variants.items():
        pipe = Pipeline.load(engines, **options)
        pipes[name] = (pipe, instrument(pipe))
        timed_call(pipe, pipes[name][1], 1)  # warm
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (pipe, calls) in pipes.items():
            runs[name].append(timed_call(pipe, calls, 1))
    out = {}
    for name, rs in runs.items():
        out[name] = {"prior_ms": 1e3 * median([r["stages"]["prior"] for r in rs]),
                     "image_ms": 1e3 * median([r["total"] for r in rs]),
                     "prior_graph_calls": {g: v["calls"] for g, v in rs[0]["graphs"].items() if g.startswith("prior")}}
        if log:
            log(f"  {name}: prior stage {out[name]['prior_ms']:.0f} ms, image {out[name]['image_ms']:.0f} ms")
    return {"repeats": repeats, "variants": out}


def main(argv=None) -> int:
    p = parser("python -m bench.experiments.prefix", __doc__)
    p.add_argument("--repeats", type=int, default=7, help="alternated calls per variant (default 7)")
    args = p.parse_args(argv)
    write_json(measure(engine_folder(args), args.threads, args.repeats), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
