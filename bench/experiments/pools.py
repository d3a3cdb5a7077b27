"""ONNX Runtime thread pools. Decided: the CLI puts every session on one shared pool, and sessions with
pools of their own do not spin (``dalle2_rt/runtime/backends.py``; bench/RESULTS.md §A, 2026-11-28: one
image at 5/10/3 on 2 threads, 142 ms shared vs 170 ms own non-spinning vs 233 ms own spinning).

    python -m bench.experiments.pools [--engines DIR] [--threads 2] [--rounds 3] [--images 10]

Three ways:

- "shared pool": every session on one process-wide pool (``Pipeline.load(shared_threads=True)``, the CLI);
- "own pools, no spinning": a pool per session whose idle workers sleep (the library's default);
- "own pools, spinning": ONNX Runtime's own default, which the runtime used before.

The global pool is process-wide, so each variant runs in fresh processes (``--child``),
alternated. Each process loads the pipeline, warms it with one image and reports the median of ``images``
warm one-image calls at the given steps.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from ..sides import PROMPT
from ..timing import REPO
from . import engine_folder, parser, write_json

VARIANTS = ("shared pool", "own pools, no spinning", "own pools, spinning")


def _child(engines: str, threads: int, steps: list[int], images: int, variant: str) -> dict:
    from dalle2_rt.runtime import backends
    from dalle2_rt.runtime.pipeline import Pipeline

    if variant == "own pools, spinning":
        own = backends.OnnxRuntimeBackend._options

        def spinning(self):
            so = own(self)
            so.add_session_config_entry("session.intra_op.allow_spinning", "1")
            return so

        backends.OnnxRuntimeBackend._options = spinning
    pipe = Pipeline.load(engines, threads=threads, shared_threads=variant == "shared pool")
    settings = dict(zip(("prior_steps", "decoder_steps", "sr_steps"), steps))
    pipe(PROMPT, seed=0, **settings)
    times = []
    for i in range(images):
        t0 = time.perf_counter()
        pipe(PROMPT, seed=i, **settings)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "shared_pool": pipe.backend.shared_pool}


def measure(engines, threads: int = 2, steps_list=None, rounds: int = 3, images: int = 10, log=print) -> dict:
    """``steps_list``: (prior, decoder, SR) settings to time (None: the folder's defaults and 25/25/7)."""
    from ..compare import default_steps

    steps_list = steps_list or (default_steps(engines), (25, 25, 7))
    out = {}
    for steps in steps_list:
        key = "/".join(map(str, steps))
        runs = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name in VARIANTS:
                args = json.dumps({"engines": str(engines), "threads": threads, "steps": list(steps), "images": images,
                                   "variant": name})
                res = subprocess.run([sys.executable, "-m", "bench.experiments.pools", "--child", args], check=True,
                                     capture_output=True, text=True, cwd=REPO)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                if got["shared_pool"] != (name == "shared pool"):
                    raise RuntimeError(f"{name}: the backend reports shared_pool={got['shared_pool']}")
                runs[name].append(got["median"])
        out[key] = {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}
        if log:
            log(f"  {key}: " + ", ".join(f"{n} {v['median'] * 1e3:.0f} ms" for n, v in out[key].items()))
    return {"threads": threads, "images": images, "rounds": rounds, "steps": out}


def main(argv=None) -> int:
    p = parser("python -m bench.experiments.pools", __doc__)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (default 3)")
    p.add_argument("--images", type=int, default=10, help="warm one-image calls per process (default 10)")
    args = p.parse_args(argv)
    write_json(measure(engine_folder(args), args.threads, rounds=args.rounds, images=args.images), args.json)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(**json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
