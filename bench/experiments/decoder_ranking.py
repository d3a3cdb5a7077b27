"""Decoder candidates ranked by CLIP: how often one of k decoder samples is fully right (the oracle), how often
the runtime's ranking keeps a fully right one, and what the first sample alone scores. Decided: the bundled
model draws 3 decoder samples per image at 5 steps, guidance 2 (bench/RESULTS.md §G2).

    python -m bench.experiments.decoder_ranking 10,2 5,2 --single 50 --two 100 --k 4 --json out.json

Per caption (bench.fidelity's fresh captions, seed 0, image 0): the prior as the runtime runs it, then k decoder
samples from one conditioning row each (the runtime's decoder stream, k rows), every sample through SR and
scored by the world's scorer; the ranking is the runtime's own (``stages.rank_pixels`` + ``select_samples``:
the image encoder on each 32×32 sample, cosine with the text embedding), taken over the first m samples for each
m ≤ k. Settings are DECODER_STEPS,DECODER_GUIDANCE.
"""
from __future__ import annotations

import sys

import numpy as np

from dalle2_rt.runtime import pipeline as P
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.runtime.stage_runner import guidance_halves
from dalle2_rt.runtime.stages import rank_pixels, select_candidates, select_samples
from dalle2_rt.world import parse_caption, score

from ..fidelity import eval_captions
from . import engine_folder, parser, write_json


def setting_arg(text: str) -> tuple[int, float]:
    steps, guidance = text.split(",")
    return int(steps), float(guidance)


def samples_of(pipe: Pipeline, caption: str, k: int, steps: int, guidance: float, seed: int = 0):
    """(k SR'd uint8 images (k, S, S, 3), their ranking scores (k,)) for image 0 of ``caption`` at ``seed``."""
    run = pipe.settings(decoder_steps=steps, decoder_guidance=guidance, decoder_candidates=k)
    tokens = pipe.tokenizer.encode([caption])[0]
    text = pipe._text([caption], tokens, None)
    empty = pipe._empty_text()
    call = P._Call(seed, np.zeros(1, np.int64), run, None)
    c = run["candidates"]
    prior = guidance_halves(pipe.prior, text, {pipe.prior.cond_input: 1.0}, np.zeros(c, np.int64), empty)
    pred = pipe._sample(pipe.prior, prior, call, call.streams(P.PRIOR, rows=c))
    embed = select_candidates(pred, text["text_embed"], c, pipe.embed_norm)[0]
    cond = {"image_embed": embed, **text}
    dec = guidance_halves(pipe.decoder, cond, {"image_keep": 1.0, "text_keep": 1.0}, np.zeros(k, np.int64), empty)
    x = pipe._sample(pipe.decoder, dec, call, call.streams(P.DECODER, rows=k))  # (k, C, h, w)
    stage = pipe.manifest.stages["image_encoder"]
    engine = pipe.engines[stage["graph"]]
    pixels = rank_pixels(x, pipe.pixel_range, int(stage["image_size"]), stage.get("input_range", (0.0, 1.0)))
    image_embed = next(iter(P.call_chunked(engine, "image_encoder", {"pixels": pixels}).values()))
    scores = select_samples(x, image_embed, text["text_embed"], k)[2][0]
    # each sample through SR as the runtime would take it on: with image 0's SR stream
    high = pipe._upsample(x, P._Call(seed, np.zeros(k, np.int64), run, None))
    return P.to_uint8(np.clip(high, *pipe.pixel_range), pipe.pixel_range), scores


def measure(pipe: Pipeline, settings, single: int = 50, two: int = 100, k: int = 4, log=print) -> dict:
    captions = eval_captions(single, two)
    out = {"captions": len(captions), "k": k, "settings": []}
    for steps, guidance in settings:
        rows = {"single": [], "two": []}
        for caption in captions:
            images, scores = samples_of(pipe, caption, k, steps, guidance)
            right = np.array([bool(score(im, caption)["fully_right"]) for im in images])
            row = {"first": right[0]}
            for m in range(2, k + 1):
                row[f"oracle@{m}"] = right[:m].any()
                row[f"ranked@{m}"] = right[int(np.argmax(scores[:m]))]
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
    args = p.parse_args(argv)
    pipe = Pipeline.load(engine_folder(args), threads=args.threads)
    write_json(measure(pipe, args.settings, args.single, args.two, args.k), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
