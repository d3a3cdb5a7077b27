"""Paired check of candidate default step counts: the same captions and seeds at each setting.

The per-stage sweep (``steps_sweep.py``) moves one stage at a time, and at 200 captions its points are about
one standard error apart. This draws many more images per setting and compares each setting with the first
one image by image (same caption, same seed), so the standard error of the difference is that of the paired
differences — much smaller than that of two independent rates.

    python -m bench.steps_confirm 25,25,7 10,5,3 15,25,3 --captions 600 --seeds 0 1 --json out.json

Settings are prior,decoder,sr steps; the first is the reference. A setting qualifies as a default when its
fully-right rate is within ``--tolerance`` (2 points) of the best setting's.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import parse_caption

from .fidelity import eval_captions, generate_and_score, paired_difference


def _steps(text: str) -> tuple[int, int, int]:
    try:
        prior, decoder, sr = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRIOR,DECODER,SR step counts, got {text!r}") from None
    return prior, decoder, sr


def confirm(pipe: Pipeline, settings: list[tuple[int, int, int]], captions: int = 600, seeds=(0, 1),
            tolerance: float = 0.02, log=print) -> dict:
    caps = eval_captions(captions // 2, captions - captions // 2)
    kinds = [parse_caption(c).kind for c in caps] * len(seeds)  # generate_and_score's order: seed-major
    right, rows = {}, []
    for s in settings:
        summary, _, secs = generate_and_score(pipe, caps, seeds, prior_steps=s[0], decoder_steps=s[1], sr_steps=s[2])
        right[s] = np.array([r["fully_right"] for r in summary.results], float)
        if log:
            log(f"  {s}: fully right {right[s].mean():.1%} ({len(right[s])} images, {secs:.0f} s)")
        rows.append({"steps": list(s), "fully_right": float(right[s].mean()), "seconds": secs,
                     "single": float(np.mean([x for x, k in zip(right[s], kinds) if k == "single"])),
                     "two": float(np.mean([x for x, k in zip(right[s], kinds) if k == "two"]))})
    ref = settings[0]
    for row, s in zip(rows, settings):
        row["diff_vs_first"], row["diff_se"] = paired_difference(right[s], right[ref])
    best = max(r["fully_right"] for r in rows)
    for r in rows:
        r["within_tolerance_of_best"] = bool(r["fully_right"] >= best - tolerance - 1e-12)
    return {"captions": len(caps), "seeds": list(seeds), "images_per_setting": len(caps) * len(seeds),
            "tolerance": tolerance, "best": best, "settings": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steps_confirm", description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="+", type=_steps, help="PRIOR,DECODER,SR step counts; the first is the reference")
    p.add_argument("--engines", help="engine folder (default: the bundled engines)")
    p.add_argument("--captions", type=int, default=600, help="half single-, half two-object (default 600)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.engines, threads=args.threads)
    res = confirm(pipe, args.settings, args.captions, args.seeds)
    for r in res["settings"]:
        print(f"{r['steps']}: fully right {r['fully_right']:.1%} (single {r['single']:.1%}, two {r['two']:.1%}); "
              f"vs first {100 * r['diff_vs_first']:+.1f} ± {100 * r['diff_se']:.1f} points (paired SE); "
              f"{'within' if r['within_tolerance_of_best'] else 'NOT within'} 2 points of the best; "
              f"{r['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
