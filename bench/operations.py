"""unCLIP's operations (dalle2_rt/runtime/operations.py) scored in the shapes world, with standard errors.

    python -m bench.operations                           # the bundled engines, defaults below
    python -m bench.operations --n 40 --json out.json

On fresh renders of fully specified single-object captions (docs/world.md), drawn from a fixed seed:

- inversion: each render inverted (z_i, x_T) and decoded with η = 0: fully right by the scorer against its
  caption, and the mean absolute pixel error (0–255) at the decoder's 32×32 and at the output's 64×64;
- text diffs, per kind of single-attribute change (shape, colour, size, position, background): the caption
  with that attribute changed is the target, the render's caption the source; success = the edited image
  is fully right for the target caption (the attribute changed *and* every other one kept), at each θ;
- interpolation between two renders (latent="slerp"): endpoints fully right for their captions and their
  pixel error against the renders; the interior frames a valid scene (the scorer finds one object and
  the caption it makes of that object is fully right: no merged blobs).

Rates are ± binomial standard errors (√(p(1 − p)/n)); errors ± the standard error of the mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from dalle2_rt.runtime import operations as ops
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    CaptionSpec,
    caption_text,
    detect,
    random_full_single_spec,
    render,
    sample_scene,
    score,
)

KINDS = ("shape", "colour", "size", "position", "background")
AMOUNTS = (0.2, 0.35, 0.5)


def rate(flags) -> tuple[float, float]:
    """(mean, binomial standard error) of 0/1 outcomes, in percent."""
    x = np.asarray(flags, float)
    p = float(x.mean()) if len(x) else float("nan")
    return 100 * p, 100 * float(np.sqrt(p * (1 - p) / max(len(x), 1)))


def mean_se(values) -> tuple[float, float]:
    x = np.asarray(values, float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def output_side(pipe) -> int:
    """The side of the images an engine folder draws (its last stage's)."""
    return (pipe.sr_plans[-1] if pipe.sr_plans else pipe.decoder_plan).x_shape[-1]


def renders(n: int, seed: int, size: int = 64):
    """n (spec, caption, (size, size, 3) uint8 render) with every attribute named."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spec = random_full_single_spec(rng)
        out.append((spec, caption_text(spec), render(sample_scene(spec, rng), size)))
    return out


def changed(spec, kind: str, rng: np.random.Generator):
    """``spec`` with attribute ``kind`` changed to another value the world allows (the object's colour never
    equal to the background)."""
    def other(words, *exclude):
        options = [w for w in words if w not in exclude]
        return options[int(rng.integers(len(options)))]

    if kind == "shape":
        return dataclasses.replace(spec, shapes=(other(SHAPES, spec.shapes[0]),))
    if kind == "colour":
        return dataclasses.replace(spec, colours=(other(COLOURS, spec.colours[0], spec.background),))
    if kind == "size":
        return dataclasses.replace(spec, size="small" if spec.size == "large" else "large")
    if kind == "position":
        return dataclasses.replace(spec, position=other(POSITIONS, spec.position))
    return dataclasses.replace(spec, background=other(BACKGROUNDS, spec.background, spec.colours[0]))


def valid_scene(image: np.ndarray) -> bool:
    """One object found, and the caption the scorer's own reading of it makes is fully right."""
    det = detect(image)
    if len(det.objects) != 1:
        return False
    obj = next(iter(det.objects.values()))
    spec = CaptionSpec("single", (obj.colour,), (obj.shape,), background=det.background)
    return bool(score(image, caption_text(spec))["fully_right"])


def bench_inversion(pipe, items, settings, batch: int = 16) -> tuple[dict, list]:
    invs, right, err32, err64 = [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        inv = ops.invert(pipe, [r for _, _, r in chunk], **settings)
        x32 = ops.decode(pipe, inv.image_embed, inv.latent, steps=inv.steps, guidance=inv.guidance, upsample=False)
        x64 = pipe.upsample(x32, seed=0, indices=np.zeros(len(x32), int))
        for j, (_, cap, img) in enumerate(chunk):
            out = np.asarray(pipe.to_pil(x64[j:j + 1])[0])
            right.append(score(out, cap)["fully_right"])
            err32.append(127.5 * float(np.abs(x32[j] - inv.target[j]).mean()))
            err64.append(float(np.abs(out.astype(float) - img).mean()))
        invs.append(inv)
    secs = time.perf_counter() - t0
    inv = ops.Inversion(*(np.concatenate([getattr(v, f) for v in invs]) for f in ("image_embed", "latent", "target")),
                        invs[0].steps, invs[0].guidance)
    return {"n": len(items), "fully_right": rate(right), "pixel_error_32": mean_se(err32),
            "pixel_error_64": mean_se(err64), "seconds_per_image": secs / len(items)}, inv


def bench_edits(pipe, items, inv, amounts, seed: int, inv_text=None, edit_guidance=None) -> dict:
    rng = np.random.default_rng(seed)
    results = {}
    t0, decodes = time.perf_counter(), 0
    for kind in KINDS:
        success = {a: [] for a in amounts}
        for j, (spec, cap, _) in enumerate(items):
            target = caption_text(changed(spec, kind, rng))
            source = inv[j] if inv_text is None else inv_text[j]
            frames = ops.edit(pipe, source, cap, target, amount=list(amounts), seed=0, edit_guidance=edit_guidance)
            decodes += len(frames)
            for a, frame in zip(amounts, frames):
                success[a].append(score(np.asarray(frame), target)["fully_right"])
        results[kind] = {str(a): rate(v) for a, v in success.items()}
    mean = {}  # the unweighted mean over the kinds; its standard error from theirs (independent samples)
    for a in amounts:
        m, se = zip(*(results[k][str(a)] for k in KINDS))
        mean[str(a)] = (float(np.mean(m)), float(np.sqrt(np.sum(np.square(se))) / len(KINDS)))
    return {"by_kind": results, "mean": mean, "seconds_per_decode": (time.perf_counter() - t0) / decodes}


def bench_interpolation(pipe, items, inv, frames: int) -> dict:
    ends, interior, err = [], [], []
    for j in range(0, len(items) - 1, 2):
        out = ops.interpolate(pipe, inv[j], inv[j + 1], frames=frames, seed=0)
        pics = [np.asarray(f) for f in out]
        for k, end in ((j, pics[0]), (j + 1, pics[-1])):
            ends.append(score(end, items[k][1])["fully_right"])
            err.append(float(np.abs(end.astype(float) - items[k][2]).mean()))
        interior += [valid_scene(p) for p in pics[1:-1]]
    return {"pairs": len(items) // 2, "endpoints_fully_right": rate(ends), "endpoint_pixel_error_64": mean_se(err),
            "interior_valid": rate(interior)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.operations", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", help="engine folder (default: the bundled engines)")
    p.add_argument("--n", type=int, default=40, help="renders (default 40)")
    p.add_argument("--seed", type=int, default=2028, help="the renders' and edits' seed")
    p.add_argument("--amounts", type=float, nargs="+", default=list(AMOUNTS), help="text-diff θ values")
    p.add_argument("--frames", type=int, default=5, help="interpolation frames")
    p.add_argument("--decoder-steps", type=int)
    p.add_argument("--decoder-guidance", type=float)
    p.add_argument("--refine", type=int, default=ops.DEFAULT_REFINE)
    p.add_argument("--edit-guidance", type=float, help="the edited frames' decoder guidance (default: the folder's)")
    p.add_argument("--no-text", dest="text", action="store_false",
                   help="text diffs decode without the captions (the default conditions the decoder on them)")
    p.add_argument("--skip", nargs="*", default=[], choices=["edits", "interpolation"])
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.engines, threads=args.threads)
    settings = {"decoder_steps": args.decoder_steps, "decoder_guidance": args.decoder_guidance,
                "refine": args.refine}
    items = renders(args.n, args.seed, output_side(pipe))
    out = {"settings": {**settings, "n": args.n, "seed": args.seed, "text": args.text,
                        "edit_guidance": ops.edit_guidance_of(pipe, args.edit_guidance)}}
    out["inversion"], inv = bench_inversion(pipe, items, settings)
    print("inversion", json.dumps(out["inversion"]), flush=True)
    if "interpolation" not in args.skip:
        out["interpolation"] = bench_interpolation(pipe, items, inv, args.frames)
        print("interpolation", json.dumps(out["interpolation"]), flush=True)
    if "edits" not in args.skip:
        inv_text = None
        if args.text:
            inv_text = ops.invert(pipe, [r for _, _, r in items], captions=[c for _, c, _ in items], **settings)
        out["edits"] = bench_edits(pipe, items, inv, args.amounts, args.seed, inv_text, args.edit_guidance)
        print("edits", json.dumps(out["edits"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
