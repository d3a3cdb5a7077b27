"""Paired check of candidate default step counts. Decided: the defaults are 5/5/3 (prior/decoder/SR), the
rule's pick (bench/RESULTS.md §D, 2026-11-28: 9.7 % fully right on 1,200 images, 1.8 points below the best
setting measured, 25/10/3; decoder 10 is 1.5 ± 0.7 points better on the same images for ~45 ms more).

The same captions and seeds at each setting.

The per-stage sweep (``bench/steps_sweep.py``) moves one stage at a time, and at 200 captions its points are about
one standard error apart. This draws many more images per setting and compares each setting with the first
one image by image (same caption, same seed), so the standard error of the difference is that of the paired
differences — much smaller than that of two independent rates.

    python -m bench.experiments.steps_confirm 25,25,7 10,5,3 15,25,3 --captions 600 --seeds 0 1 --json out.json

Settings are prior,decoder,sr steps; the first is the reference. A setting qualifies as a default when its
fully-right rate is within 2 points (``confirm(tolerance=)``) of the best setting's.
"""
from __future__ import annotations

import sys

import numpy as np

from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import parse_caption

from ..compare import steps_arg
from ..fidelity import eval_captions, generate_and_score, paired_difference
from . import engine_folder, parser, write_json


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
    p = parser("python -m bench.experiments.steps_confirm", __doc__)
    p.add_argument("settings", nargs="+", type=steps_arg,
                   help="PRIOR,DECODER,SR step counts; the first is the reference")
    p.add_argument("--captions", type=int, default=600, help="half single-, half two-object (default 600)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    res = confirm(Pipeline.load(engine_folder(args), threads=args.threads), args.settings, args.captions, args.seeds)
    for r in res["settings"]:
        print(f"{r['steps']}: fully right {r['fully_right']:.1%} (single {r['single']:.1%}, two {r['two']:.1%}); "
              f"vs first {100 * r['diff_vs_first']:+.1f} ± {100 * r['diff_se']:.1f} points (paired SE); "
              f"{'within' if r['within_tolerance_of_best'] else 'NOT within'} 2 points of the best; "
              f"{r['seconds']:.0f} s")
    write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
