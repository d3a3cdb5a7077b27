"""ONNX Runtime thread pools: one shared by every session (the runtime's default) vs one per session.

The pool is process-wide, so each variant runs in fresh processes (``python -m bench.pools --child``),
alternated: shared, per-session, shared, … Each process loads the pipeline, warms it with one image and
reports the median of ``images`` warm one-image calls at the given steps.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .sides import PROMPT

VARIANTS = {"shared pool": "1", "a pool per session": "0"}


def _child(engines: str, threads: int, steps: list[int], images: int) -> dict:
    from dalle2_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines, threads=threads)
    settings = dict(zip(("prior_steps", "decoder_steps", "sr_steps"), steps))
    pipe(PROMPT, seed=0, **settings)
    times = []
    for i in range(images):
        t0 = time.perf_counter()
        pipe(PROMPT, seed=i, **settings)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "shared_pool": pipe.backend.shared_pool}


def measure(engines, threads: int = 2, steps_list=((5, 10, 3), (25, 25, 7)), rounds: int = 3, images: int = 10,
            log=print) -> dict:
    out = {}
    for steps in steps_list:
        key = "/".join(map(str, steps))
        runs = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, flag in VARIANTS.items():
                env = {**os.environ, "DALLE2_RT_ORT_SHARED_POOL": flag}
                args = json.dumps({"engines": str(engines), "threads": threads, "steps": list(steps), "images": images})
                res = subprocess.run([sys.executable, "-m", "bench.pools", "--child", args], env=env, check=True,
                                     capture_output=True, text=True)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                if got["shared_pool"] != (flag == "1"):
                    raise RuntimeError(f"{name}: the backend reports shared_pool={got['shared_pool']}")
                runs[name].append(got["median"])
        out[key] = {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}
        if log:
            log(f"  {key}: " + ", ".join(f"{n} {v['median'] * 1e3:.0f} ms" for n, v in out[key].items()))
    return {"threads": threads, "images": images, "rounds": rounds, "steps": out}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(**json.loads(sys.argv[2]))))
    else:
        print("usage: python -m bench.pools --child JSON (run by bench.pools.measure)", file=sys.stderr)
        sys.exit(2)
