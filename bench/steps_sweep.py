"""Prompt fidelity against sampling steps: which step counts the defaults should be.

Each stage's steps are swept with the other stages at the manifest defaults; every point generates the
same captions (``bench.fidelity.eval_captions``, half single- and half two-object) with the same seeds,
so points differ only by the steps, and is scored by the shapes-world scorer
(``bench.fidelity.generate_and_score``). The chosen default of a stage is its fewest steps whose
fully-right rate is within ``tolerance`` (2 points) of the best point of its sweep. Because every point
scores the same (caption, seed) pairs, each point's difference from the best is also given with its paired
standard error (``diff_se``): the noise of the comparison the rule makes.
"""
from __future__ import annotations

import time

from .chart import line_chart
from .fidelity import eval_captions, generate_and_score, paired_difference

SWEEPS = {"decoder": (5, 10, 15, 25, 50), "prior": (5, 10, 25, 50), "sr": (3, 7, 15)}
QUICK_SWEEPS = {"decoder": (5, 25), "prior": (5, 25), "sr": (3, 7)}
KEY = {"prior": "prior_steps", "decoder": "decoder_steps", "sr": "sr_steps"}


def defaults(pipe) -> dict[str, int]:
    run = pipe.settings()
    return {"prior": run["prior"]["steps"], "decoder": run["decoder"]["steps"],
            "sr": run[pipe.sr_plans[0].name]["steps"] if pipe.sr_plans else 0}


def sweep(pipe, captions: int = 200, seeds=(0,), sweeps: dict | None = None, tolerance: float = 0.02,
          log=print) -> dict:
    sweeps = sweeps or SWEEPS
    if not pipe.sr_plans:
        sweeps = {k: v for k, v in sweeps.items() if k != "sr"}
    base = defaults(pipe)
    caps = eval_captions(captions // 2, captions - captions // 2)
    cache: dict[tuple, dict] = {}  # (prior, decoder, sr) -> result: the defaults point is shared by sweeps
    out = {"captions": len(caps), "seeds": list(seeds), "defaults": base, "tolerance": tolerance, "sweeps": {}}

    def point(steps: dict, label: str) -> dict:
        key = (steps["prior"], steps["decoder"], steps["sr"])
        if key not in cache:
            t0 = time.perf_counter()
            settings = {KEY[s]: n for s, n in steps.items() if s != "sr" or pipe.sr_plans}
            summary, _, secs = generate_and_score(pipe, caps, seeds, **settings)
            cache[key] = {"fully_right": summary.rate("fully_right"), "single": summary.rate("fully_right", "single"),
                          "two": summary.rate("fully_right", "two"), "seconds": secs, "images": summary.count(),
                          "right": [bool(r["fully_right"]) for r in summary.results]}
            if log:
                r = cache[key]
                log(f"  {label} (prior {key[0]}, decoder {key[1]}, sr {key[2]}): fully right {r['fully_right']:.1%} "
                    f"(single {r['single']:.1%}, two {r['two']:.1%}), {secs:.0f} s [{time.perf_counter() - t0:.0f} s]")
        return cache[key]

    for stage, values in sweeps.items():
        points = [{"steps": v, **point({**base, stage: v}, f"{stage} {v:>3d} steps")} for v in values]
        top = max(points, key=lambda p: p["fully_right"])
        best = top["fully_right"]
        for p in points:
            p["diff_vs_best"], p["diff_se"] = paired_difference(p["right"], top["right"])
        chosen = min(p["steps"] for p in points if p["fully_right"] >= best - tolerance - 1e-12)
        out["sweeps"][stage] = {"points": [{k: v for k, v in p.items() if k != "right"} for p in points],
                                "best": best, "chosen": chosen}
    out["at_defaults"] = {k: v for k, v in point(base, "defaults").items() if k != "right"}
    return out


def chart(result: dict, path, engines: str = "") -> None:
    names = {"decoder": "decoder", "prior": "prior", "sr": "SR"}
    series = {f"{names[s]} steps": [(p["steps"], 100 * p["fully_right"]) for p in r["points"]]
              for s, r in result["sweeps"].items()}
    marked = {f"{names[s]} steps": r["chosen"] for s, r in result["sweeps"].items()}
    d = result["defaults"]
    line_chart(series, path, marked=marked, xlabel="sampling steps of the swept stage",
               ylabel="fully right (%)",
               title=f"Fidelity vs steps{f' of {engines}' if engines else ''} ({result['captions']} captions x "
                     f"{len(result['seeds'])} seed; others at prior {d['prior']} / decoder {d['decoder']} / "
                     f"SR {d['sr']})")
