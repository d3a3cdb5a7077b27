"""Negative prompts scored in the shapes world: does an attribute the prompt leaves open stay away from the
negative prompt's value, while the prompt itself is still drawn?

    python -m bench.negative                    # the bundled engines, 60 captions per kind
    python -m bench.negative --n 100 --json out.json

For each kind (background, position) n single-object captions that leave that attribute unnamed (colour,
shape and size named), each with a value to avoid drawn at random: the background ("black background") or
the position ("on the left") as the negative prompt. Every caption is generated twice with the same seed,
without and with its negative prompt (the folder's defaults otherwise), and scored exactly:

- hit: the image shows the value to avoid (the scorer's background, or the object's position judged as the
  caption with that position would be) — without a negative prompt about 1/3 (backgrounds) and 1/5
  (positions) of images land on a given value; a working negative prompt takes it towards 0;
- right: the image is fully right for its own caption (what the prompt asked for is still drawn).

Rates are ± binomial standard errors (√(p(1 − p)/n)), with the paired difference's standard error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from bench.operations import rate
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import BACKGROUNDS, POSITIONS, caption_text, random_full_single_spec
from dalle2_rt.world.scorer import score_spec

KINDS = ("background", "position")


def cases(kind: str, n: int, seed: int) -> list[tuple[object, str, str, str]]:
    """n (spec, caption, value to avoid, negative prompt) leaving ``kind`` open."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    values = tuple(BACKGROUNDS) if kind == "background" else POSITIONS
    out = []
    for _ in range(n):
        spec = dataclasses.replace(random_full_single_spec(rng), **{kind: None})
        if kind == "background":  # a single object's position is named only without a background here
            spec = dataclasses.replace(spec, position=None)
        avoid = values[int(rng.integers(len(values)))]
        out.append((spec, caption_text(spec), avoid, f"{avoid} background" if kind == "background" else avoid))
    return out


def hits(image, spec, kind: str, avoid: str) -> bool:
    """The image shows ``avoid`` for ``kind``: the caption naming that value is right on that attribute."""
    return bool(score_spec(image, dataclasses.replace(spec, **{kind: avoid}))[kind])


def paired_se(a, b) -> float:
    """Standard error (percent) of the mean paired difference b − a of 0/1 outcomes."""
    d = np.asarray(b, float) - np.asarray(a, float)
    return 100 * float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def run_kind(pipe, kind: str, n: int, seed: int) -> dict:
    items = cases(kind, n, seed)
    arms = {"without": [], "with": []}
    for j, (spec, caption, avoid, negative) in enumerate(items):
        for arm, neg in (("without", None), ("with", negative)):
            image = np.asarray(pipe(caption, seed=seed + j, negative_prompt=neg)[0])
            arms[arm].append((hits(image, spec, kind, avoid), score_spec(image, spec)["fully_right"]))
    out = {"n": n}
    for what, col in (("hit", 0), ("right", 1)):
        a, b = ([r[col] for r in arms[arm]] for arm in ("without", "with"))
        out[what] = {"without": rate(a), "with": rate(b), "diff_se": paired_se(a, b)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.negative", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--engines", help="engine folder (default: the bundled engines)")
    p.add_argument("--n", type=int, default=60, help="captions per kind (default 60)")
    p.add_argument("--seed", type=int, default=2031, help="captions' and images' seed")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.engines, threads=args.threads)
    out = {"engines": pipe.manifest.name, "seed": args.seed}
    print(f"{'kind':<11} {'n':>4}  {'hits without':>13} {'hits with':>11}  {'right without':>14} {'right with':>11}")
    for kind in args.kinds:
        r = out[kind] = run_kind(pipe, kind, args.n, args.seed)

        def cell(v):
            return f"{v[0]:5.1f} ± {v[1]:3.1f}"

        print(f"{kind:<11} {r['n']:>4}  {cell(r['hit']['without']):>13} {cell(r['hit']['with']):>11}  "
              f"{cell(r['right']['without']):>14} {cell(r['right']['with']):>11}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
