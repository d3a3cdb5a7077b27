"""Decoder candidates ranked by CLIP: how often one of k decoder samples is fully right (the oracle), how often
the runtime's ranking keeps a fully right one, and what the first sample alone scores. Decided: the bundled
model draws 3 decoder samples per image at 5 steps, guidance 2 (bench/RESULTS.md §G2).

    python -m bench.experiments.decoder_ranking 10,2 5,2 --single 50 --two 100 --k 4 --json out.json

Per caption (bench.fidelity's fresh captions, seed 0, image 0): the prior as the runtime runs it, then k decoder
samples from one conditioning row each (the runtime's decoder stream, k rows), every sample through SR and
scored by the world's scorer; the ranking is the runtime's own (``Pipeline.clip_scores``:
the image encoder on each 32×32 sample, cosine with the text embedding), taken over the first m samples for each
m ≤ k; ``ranked_by_image@m`` ranks by the cosine with the prior's image embedding (the decoder's conditioning)
instead. Settings are DECODER_STEPS,DECODER_GUIDANCE.

Ranking by the image embedding, measured 2026-12-07 on the 3-step student at 3,000 steps (a folder exported from
that checkpoint, the one ``make engines-steps3`` built then; ``… 3,3 --k 4 --single 200 --two 300 --caption-seed 7
--threads 1``): two-object ranked by the text 69.0 / 76.3 /
78.3 % at k = 2 / 3 / 4, by the image embedding 70.3 / 74.7 / 78.7 %, oracle 74.3 / 82.3 / 87.3 %; single-object
99.5 % either way at k = 4. No consistent gain: not adopted. The 9 points between the oracle and either ranking
are what a better ranker could still buy.
"""
from __future__ import annotations

import sys

import numpy as np

from dalle2_rt.runtime.images import to_uint8
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.world import parse_caption, score

from ..fidelity import eval_captions
from . import engine_folder, parser, write_json


def setting_arg(text: str) -> tuple[int, float]:
    steps, guidance = text.split(",")
    return int(steps), float(guidance)


def draw_candidates(pipe: Pipeline, caption: str, k: int, seed: int = 0, **options):
    """(the text encoding, the prior's image embedding (1, D), the k decoder samples (k, C, h, w), each through SR
    as uint8 (k, S, S, 3)) for image 0 of ``caption`` at ``seed``; ``options``: sampling settings."""
    options = {**options, "decoder_candidates": k}
    text = pipe.encode_text([caption])
    embed = pipe.prior(text, seed=seed, indices=[0], **options)  # (1, D)
    x = pipe.decode(embed, text, seed=seed, indices=[0], keep_candidates=True, **options)  # (k, C, h, w)
    # each sample through SR as the runtime would take it on: with image 0's SR stream
    high = pipe.upsample(x, seed=seed, indices=np.zeros(k, np.int64), **options)
    return text, embed, x, to_uint8(np.clip(high, *pipe.pixel_range), pipe.pixel_range)


def samples_of(pipe: Pipeline, caption: str, k: int, steps: int, guidance: float, seed: int = 0):
    """(k SR'd uint8 images (k, S, S, 3), their ranking scores (k,), the scores against the prior's image
    embedding (k,)) for image 0 of ``caption`` at ``seed``."""
    text, embed, x, images = draw_candidates(pipe, caption, k, seed, decoder_steps=steps, decoder_guidance=guidance)
    scores = pipe.clip_scores(x, np.repeat(text["text_embed"], k, 0))  # (k,): the runtime's ranking
    by_image = pipe.clip_scores(x, np.repeat(embed, k, 0))  # (k,): against the decoder's own conditioning
    return images, scores, by_image


def measure(pipe: Pipeline, settings, single: int = 50, two: int = 100, k: int = 4, log=print,
            caption_seed: int = 2026) -> dict:
    captions = eval_captions(single, two, seed=caption_seed)
    out = {"captions": len(captions), "k": k, "settings": []}
    for steps, guidance in settings:
        rows = {"single": [], "two": []}
        for caption in captions:
            images, scores, by_image = samples_of(pipe, caption, k, steps, guidance)
            right = np.array([bool(score(im, caption)["fully_right"]) for im in images])
            row = {"first": right[0]}
            for m in range(2, k + 1):
                row[f"oracle@{m}"] = right[:m].any()
                row[f"ranked@{m}"] = right[int(np.argmax(scores[:m]))]
                row[f"ranked_by_image@{m}"] = right[int(np.argmax(by_image[:m]))]
            rows[parse_caption(caption).kind].append(row)
        result = {"decoder_steps": steps, "decoder_guidance": guidance}
        for kind, rs in rows.items():
            n = len(rs)
            result[kind] = {"n": n, **{key: float(np.mean([r[key] for r in rs])) for key in rs[0]}} if n else {}
        if log:
            for kind in ("single", "two"):
                r = result[kind]
                if r:
                    log(f"  decoder {steps} steps, guidance {guidance}, {kind} (n={r['n']}): "
                        + ", ".join(f"{key} {v:.1%}" for key, v in r.items() if key != "n"))
        out["settings"].append(result)
    return out


def main(argv=None) -> int:
    p = parser("python -m bench.experiments.decoder_ranking", __doc__)
    p.add_argument("settings", nargs="+", type=setting_arg, help="DECODER_STEPS,DECODER_GUIDANCE")
    p.add_argument("--single", type=int, default=50, help="single-object captions (default 50)")
    p.add_argument("--two", type=int, default=100, help="two-object captions (default 100)")
    p.add_argument("--k", type=int, default=4, help="decoder samples per caption (default 4)")
    p.add_argument("--caption-seed", type=int, default=2026,
                   help="seed of the fresh captions (default 2026, the frontier's; another keeps them unseen)")
    args = p.parse_args(argv)
    pipe = Pipeline.load(engine_folder(args), threads=args.threads)
    write_json(measure(pipe, args.settings, args.single, args.two, args.k, caption_seed=args.caption_seed),
               args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
