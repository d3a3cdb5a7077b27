"""Prompt fidelity of an engine folder, measured with the shapes world's scorer (no eyeballing).

    python -m bench.fidelity                       # the bundled engines: 100 single + 100 two-object captions × 2 seeds
    python -m bench.fidelity --engines DIR --single 50 --two 50 --seeds 0 1 --json out.json

Captions are fresh random canonical captions (docs/world.md grammar) drawn from a fixed seed, distinct from each
other; each is generated with every seed and every image is scored per attribute. Also measures CLIP's
image→caption retrieval: top-1 among 100 captions for renders of those captions, strict (the exact caption)
and consistent (a caption that the scorer says is true of the image: "a blue star" is also true of an image
drawn for "a large blue star at the top").
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from dalle2_rt.cli import add_sampling_options, sampling_options
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import caption_text, random_caption_spec, render, sample_scene, score, score_many


def eval_captions(n_single: int, n_two: int, seed: int = 2026) -> list[str]:
    """Distinct random canonical captions: ``n_single`` single-object, then ``n_two`` two-object."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"single": [], "two": []}
    want = {"single": n_single, "two": n_two}
    seen = set()
    while any(len(out[k]) < want[k] for k in out):
        spec = random_caption_spec(rng, two_object_prob=0.5)
        text = caption_text(spec)
        if len(out[spec.kind]) < want[spec.kind] and text not in seen:
            seen.add(text)
            out[spec.kind].append(text)
    return out["single"] + out["two"]


def generate_and_score(pipe: Pipeline, captions: list[str], seeds=(0, 1), batch: int = 16, **settings):
    """Generate one image per (caption, seed) and score it; returns (ScoreSummary, images, seconds)."""
    images, caps = [], []
    t0 = time.perf_counter()
    for seed in seeds:
        for i in range(0, len(captions), batch):
            chunk = captions[i:i + batch]
            images += [np.asarray(im) for im in pipe(chunk, seed=seed, num_images=1, **settings)]
            caps += chunk
    return score_many(images, caps), images, time.perf_counter() - t0


def paired_difference(right, reference) -> tuple[float, float]:
    """Mean and standard error of the per-image differences of two 0/1 "fully right" lists scored on the
    same (caption, seed) pairs: the noise of comparing two settings image by image."""
    diff = np.asarray(right, float) - np.asarray(reference, float)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def clip_retrieval(pipe: Pipeline, n: int = 100, seed: int = 77) -> dict:
    """Top-1 image→caption retrieval among ``n`` distinct captions, with the exported CLIP graphs."""
    rng = np.random.default_rng(seed)
    caps, imgs = [], []
    while len(caps) < n:
        spec = random_caption_spec(rng)
        text = caption_text(spec)
        if text not in caps:
            caps.append(text)
            imgs.append(render(sample_scene(spec, rng), 64))
    text_embed = pipe.engines[pipe.manifest.stages["text_encoder"]["graph"]](tokens=pipe.tokenizer(caps))["text_embed"]
    size = pipe.manifest.stages["image_encoder"]["image_size"]
    pixels = np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    assert pixels.shape[-1] == size, (pixels.shape, size)
    image_embed = pipe.engines[pipe.manifest.stages["image_encoder"]["graph"]](pixels=pixels)["image_embed"]
    best = (image_embed @ text_embed.T).argmax(1)
    two = np.array([random_kind(c) == "two" for c in caps])
    strict = best == np.arange(n)
    consistent = np.array([score(imgs[i], caps[b])["fully_right"] for i, b in enumerate(best)])
    return {"n": n, "strict_top1": float(strict.mean()), "consistent_top1": float(consistent.mean()),
            "strict_single": float(strict[~two].mean()), "strict_two": float(strict[two].mean()),
            "consistent_single": float(consistent[~two].mean()), "consistent_two": float(consistent[two].mean())}


def random_kind(caption: str) -> str:
    from dalle2_rt.world import parse_caption

    return parse_caption(caption).kind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", help="engine folder (default: the bundled engines)")
    p.add_argument("--single", type=int, default=100, help="single-object captions (default 100)")
    p.add_argument("--two", type=int, default=100, help="two-object captions (default 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--no-retrieval", action="store_true", help="skip the CLIP retrieval measurement")
    add_sampling_options(p.add_argument_group("sampling (overrides of the manifest's defaults)"))
    p.add_argument("--stages", action="store_true",
                   help="fidelity by stage instead (CLIP, prior, decoder reconstruction, SR, end to end; "
                        "bench/stages.py) at the manifest defaults or the overrides above")
    p.add_argument("--groups", type=int, default=4,
                   help="--stages: groups of 100 captions for CLIP, prior and end to end (default 4)")
    p.add_argument("--recon", type=int, default=400,
                   help="--stages: fully specified single-object renders for decoder and SR (default 400)")
    p.add_argument("--recon-two", type=int, default=200,
                   help="--stages: two-object renders for decoder reconstruction (default 200; 0 skips them)")
    args = p.parse_args(argv)
    settings = {k: v for k, v in sampling_options(args).items() if v is not None}
    pipe = Pipeline.load(args.engines, threads=args.threads)
    if args.stages:
        from bench.stages import main_stages

        return main_stages(pipe, args, settings)
    captions = eval_captions(args.single, args.two)
    summary, _, secs = generate_and_score(pipe, captions, args.seeds, **settings)
    print(summary)
    n_img = len(captions) * len(args.seeds)
    print(f"{n_img} images in {secs:.1f} s ({secs / n_img:.3f} s/image)")
    retrieval = None if args.no_retrieval else clip_retrieval(pipe)
    if retrieval:
        print("CLIP image→caption top-1 among 100:", json.dumps(retrieval))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary.as_dict(), "retrieval": retrieval, "images": n_img, "seconds": secs,
                       "settings": pipe.settings(**settings)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
