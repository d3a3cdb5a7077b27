"""Fidelity by stage: where each lost point of prompt fidelity goes (`python -m bench.fidelity --stages`).

Every row is measured on fresh random captions and renders of the shapes world, scored exactly:

- **CLIP**: image→caption and caption→image retrieval, top-1 among groups of 100 (strict: the exact caption or
  render; consistent: one the scorer says is true of the pair), and, for the strict image→caption misses, which
  attribute the retrieved caption got wrong.
- **decoder reconstruction**: a ground-truth render of a fully specified single-object caption → image encoder →
  decoder (no text, as `variations`) → scorer at 32×32, then → SR → scorer at 64×64; the same for renders of
  random two-object captions (whether the embedding and the decoder keep two objects, their colours and relation).
- **SR alone**: the ground-truth render box-filtered to 32×32 (as training makes it) → SR → scorer.
- **prior**: caption → text encoder → prior (manifest defaults, candidates included) → predicted image embedding;
  retrieval of the caption's render among the group's 100 renders (all, and single- / two-object), and cosine
  to that render's embedding.
- **end to end** at the manifest defaults.

Rates come with their binomial standard error; cosines with the standard error of the mean.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from dalle2_rt.runtime.images import to_uint8
from dalle2_rt.runtime.stages import normalize
from dalle2_rt.world import (
    CaptionSpec,
    caption_text,
    random_caption_spec,
    random_full_single_spec,
    render,
    sample_scene,
    score_many,
    score_spec,
    two_object_scenes,
)

SPEC_FIELDS = ("kind", "colours", "shapes", "size", "position", "relation", "background")


@dataclass
class Rate:
    right: int
    n: int

    @property
    def rate(self) -> float:
        return self.right / self.n if self.n else float("nan")

    @property
    def se(self) -> float:
        p = self.rate
        return float(np.sqrt(p * (1 - p) / self.n)) if self.n else float("nan")

    def __str__(self) -> str:
        return f"{self.rate:6.1%} ± {self.se:.1%} (n={self.n})"

    def as_dict(self) -> dict:
        return {"right": self.right, "n": self.n, "rate": self.rate, "se": self.se}


def _rate(flags) -> Rate:
    flags = np.asarray(flags, bool)
    return Rate(int(flags.sum()), int(flags.size))


# --------------------------------------------------------------------------------------------------------
# data: captions, fully specified specs, renders

def caption_groups(n_groups: int, seed: int, group: int = 100) -> list[list[tuple[CaptionSpec, np.ndarray]]]:
    """``n_groups`` groups of ``group`` distinct random canonical captions (the training mix of one- and
    two-object captions, optional parts present or not), each with one 64×64 render."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_groups):
        seen, items = set(), []
        while len(items) < group:
            spec = random_caption_spec(rng)
            text = caption_text(spec)
            if text not in seen:
                seen.add(text)
                items.append((spec, render(sample_scene(spec, rng), 64)))
        out.append(items)
    return out


def full_single_specs(n: int, seed: int) -> list[tuple[CaptionSpec, np.ndarray]]:
    """Single-object specs naming every attribute (size, position, background), with a render each: the
    strictest check of a reconstruction, since every attribute the scorer knows is judged."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spec = random_full_single_spec(rng)
        out.append((spec, render(sample_scene(spec, rng), 64)))
    return out


def two_object_specs(n: int, seed: int) -> list[tuple[CaptionSpec, np.ndarray]]:
    """Random canonical two-object specs (background named or not, as in training), with a render each."""
    return [(spec, render(scene, 64)) for spec, scene in two_object_scenes(n, seed)]


def box_down(images: np.ndarray, factor: int = 2) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float (B, H/f, W/f, 3) by averaging f×f blocks (training's adaptive_avg_pool2d)."""
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).astype(np.float64).mean((2, 4))


# --------------------------------------------------------------------------------------------------------
# the stages, run through the pipeline's own pieces

class StageCalls:
    """One stage at a time over a loaded ``Pipeline`` through its public stages, with its seed contract (row n
    of a call is image j = 0 of its own prompt), at the manifest's default settings or the ``Pipeline.settings``
    overrides given (steps, guidance, sampler, candidates: every stage and the end-to-end row use them)."""

    def __init__(self, pipe, **overrides):
        self.pipe = pipe
        self.manifest, self.pixel_range = pipe.manifest, pipe.pixel_range
        self.overrides = overrides
        self.run = pipe.settings(**overrides)

    def encode_text(self, captions: list[str]) -> dict[str, np.ndarray]:
        return self.pipe.encode_text(captions)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N, D) unit norm; each image prepared as ``variations`` prepares its input."""
        return self.pipe.encode_image(list(images))

    def prior_embeddings(self, captions: list[str], seed: int) -> np.ndarray:
        """(N, D) unit-norm image embeddings chosen by the prior (candidates as the manifest says)."""
        emb = self.pipe.prior(self.encode_text(captions), seed=seed, indices=np.zeros(len(captions), np.int64),
                              **self.overrides)
        return normalize(emb).astype(np.float32)

    def decode(self, image_embed: np.ndarray, seed: int) -> np.ndarray:
        """(N, D) image embeddings -> (N, 3, h, w) decoder samples, no text and one sample each (as
        ``variations``)."""
        return self.pipe.decode(image_embed, seed=seed, indices=np.zeros(len(image_embed), np.int64),
                                **{**self.overrides, "decoder_candidates": 1})

    def low_res_size(self) -> int:
        """The first SR stage's input side (32 for the bundled model)."""
        spec = self.manifest.graphs[self.pipe.sr_plans[0].graph]
        return int(next(t.shape[-1] for t in spec.inputs if t.name == "low_res"))

    def upsample(self, x: np.ndarray, seed: int) -> np.ndarray:
        return self.pipe.upsample(x, seed=seed, indices=np.zeros(len(x), np.int64), **self.overrides)

    def __call__(self, captions, seed: int):
        return self.pipe(captions, seed=seed, **self.overrides)


def encode_text(pipe, captions: list[str]) -> np.ndarray:
    """(N, D) unit-norm text embeddings from the folder's text encoder."""
    return pipe.encode_text(captions)["text_embed"]


def encode_images(pipe, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) renders -> (N, D) unit-norm image embeddings from the folder's image encoder."""
    return pipe.encode_images(images)


def _spec_diff(a: CaptionSpec, b: CaptionSpec) -> list[str]:
    return [f for f in SPEC_FIELDS if getattr(a, f) != getattr(b, f)]


def clip_rows(pipe, groups) -> dict:
    i2t_strict, i2t_cons, t2i_strict, t2i_cons = [], [], [], []
    confusions: dict[str, int] = {}
    by_kind = {"single": [], "two": []}
    for items in groups:
        specs = [s for s, _ in items]
        imgs = np.stack([im for _, im in items])
        sim = encode_images(pipe, imgs) @ encode_text(pipe, [caption_text(s) for s in specs]).T  # (image, caption)
        best_cap, best_img = sim.argmax(1), sim.argmax(0)
        n = len(items)
        for i in range(n):
            ok = best_cap[i] == i
            i2t_strict.append(ok)
            by_kind[specs[i].kind].append(ok)
            i2t_cons.append(ok or score_spec(imgs[i], specs[best_cap[i]])["fully_right"])
            if not ok:
                for f in _spec_diff(specs[i], specs[best_cap[i]]):
                    confusions[f] = confusions.get(f, 0) + 1
            ok_t = best_img[i] == i
            t2i_strict.append(ok_t)
            t2i_cons.append(ok_t or score_spec(imgs[best_img[i]], specs[i])["fully_right"])
    misses = len(i2t_strict) - int(np.sum(i2t_strict))
    return {"image_to_caption_strict": _rate(i2t_strict), "image_to_caption_consistent": _rate(i2t_cons),
            "image_to_caption_strict_single": _rate(by_kind["single"]),
            "image_to_caption_strict_two": _rate(by_kind["two"]),
            "caption_to_image_strict": _rate(t2i_strict), "caption_to_image_consistent": _rate(t2i_cons),
            "confusions": {"misses": misses, "by_field": dict(sorted(confusions.items(), key=lambda kv: -kv[1]))}}


def prior_rows(pipe, groups, seed: int) -> dict:
    strict, cosines, kinds = [], [], []
    for items in groups:
        specs = [s for s, _ in items]
        true = encode_images(pipe, np.stack([im for _, im in items]))  # (N, D)
        pred = pipe.prior_embeddings([caption_text(s) for s in specs], seed=seed)  # (N, D) unit norm
        strict += list((pred @ true.T).argmax(1) == np.arange(len(items)))
        cosines += list((pred * true).sum(1))
        kinds += [s.kind for s in specs]
    c = np.asarray(cosines)
    by_kind = {k: _rate([ok for ok, kind in zip(strict, kinds) if kind == k]) for k in ("single", "two")}
    return {"render_retrieval_strict": _rate(strict),
            "render_retrieval_strict_single": by_kind["single"], "render_retrieval_strict_two": by_kind["two"],
            "cosine_to_render": {"mean": float(c.mean()), "se": float(c.std(ddof=1) / np.sqrt(len(c))),
                                 "n": len(c)}}


def reconstruction_rows(pipe, items, seed: int, batch: int = 16) -> dict:
    specs = [s for s, _ in items]
    imgs = np.stack([im for _, im in items])
    low, high = [], []
    for c in range(0, len(items), batch):
        embed = encode_images(pipe, imgs[c:c + batch])
        x = pipe.decode(embed, seed=seed)  # (B, 3, 32, 32) in the pixel range
        low.append(to_uint8(np.clip(x, *pipe.pixel_range), pipe.pixel_range))
        high.append(to_uint8(np.clip(pipe.upsample(x, seed=seed), *pipe.pixel_range), pipe.pixel_range))
    caps = [caption_text(s) for s in specs]
    return {"at_32": score_many(np.concatenate(low), caps), "at_64": score_many(np.concatenate(high), caps)}


def sr_rows(pipe, items, seed: int, batch: int = 16) -> dict:
    caps = [caption_text(s) for s, _ in items]
    imgs = np.stack([im for _, im in items])
    out = []
    lo, hi = pipe.pixel_range
    factor = imgs.shape[1] // pipe.low_res_size()
    for c in range(0, len(items), batch):
        low = box_down(imgs[c:c + batch], factor).transpose(0, 3, 1, 2) / 255.0 * (hi - lo) + lo  # (B, 3, h, h)
        out.append(to_uint8(np.clip(pipe.upsample(low.astype(np.float32), seed=seed), lo, hi),
                            pipe.pixel_range))
    gt = score_many(list(imgs), caps)  # the scorer on the renders themselves: the ceiling of every row
    return {"sr": score_many(np.concatenate(out), caps), "ground_truth": gt}


def end_to_end_rows(pipe, groups, seed: int, batch: int = 16) -> dict:
    caps = [caption_text(s) for items in groups for s, _ in items]
    images = []
    for c in range(0, len(caps), batch):
        images += [np.asarray(im) for im in pipe(caps[c:c + batch], seed=seed)]
    return {"end_to_end": score_many(images, caps)}


# --------------------------------------------------------------------------------------------------------
# the report

def _summary_row(name: str, summary, kind: str = "all") -> dict:
    t = summary.tallies[kind]
    row = {"row": name, "n": summary.count(kind)}
    for attr, tally in t.items():
        if tally.named:
            row[attr] = Rate(tally.right, tally.named)
    return row


def diagnose(pipe, *, groups: int = 4, recon: int = 400, recon_two: int = 200, seed: int = 2027,
             gen_seed: int = 0, log=print) -> dict:
    """Every row of the diagnosis; ``groups`` of 100 captions for CLIP, prior and end to end (60 % single-object
    on average, as in training), ``recon`` fully specified single-object renders for decoder and SR, and
    ``recon_two`` two-object renders for the decoder (0 skips them)."""
    t0 = time.perf_counter()
    cap_groups = caption_groups(groups, seed)
    e2e_groups = caption_groups(groups, seed + 1)
    singles = full_single_specs(recon, seed + 2)
    out = {"clip": clip_rows(pipe, cap_groups)}
    log(f"  clip done ({time.perf_counter() - t0:.0f} s)")
    out["prior"] = prior_rows(pipe, cap_groups, gen_seed)
    log(f"  prior done ({time.perf_counter() - t0:.0f} s)")
    out.update(reconstruction_rows(pipe, singles, gen_seed))
    if recon_two:
        two = reconstruction_rows(pipe, two_object_specs(recon_two, seed + 3), gen_seed)
        out.update({"two_at_32": two["at_32"], "two_at_64": two["at_64"]})
    log(f"  decoder reconstruction done ({time.perf_counter() - t0:.0f} s)")
    out.update(sr_rows(pipe, singles, gen_seed))
    log(f"  SR done ({time.perf_counter() - t0:.0f} s)")
    out.update(end_to_end_rows(pipe, e2e_groups, gen_seed))
    log(f"  end to end done ({time.perf_counter() - t0:.0f} s)")
    out["seconds"] = time.perf_counter() - t0
    return out


SCORED = ("ground_truth", "at_32", "at_64", "sr")
ATTRS = ("fully_right", "colour", "shape", "size", "position", "relation", "background")


def render_table(d: dict) -> str:
    """Markdown tables of a ``diagnose`` result."""
    lines = ["| CLIP (groups of 100) | top-1 ± SE |", "|---|---|"]
    for k, v in d["clip"].items():
        if isinstance(v, Rate):
            lines.append(f"| {k.replace('_', ' ')} | {v} |")
    conf = d["clip"]["confusions"]
    lines.append("| strict image→caption misses, field wrong | "
                 + ", ".join(f"{k} {v}" for k, v in conf["by_field"].items()) + f" (of {conf['misses']}) |")
    p = d["prior"]
    cos = p["cosine_to_render"]
    lines += ["", "| prior | value |", "|---|---|",
              f"| render retrieval top-1 among 100 | {p['render_retrieval_strict']} |",
              f"| … single-object / two-object captions | {p['render_retrieval_strict_single']} / "
              f"{p['render_retrieval_strict_two']} |",
              f"| cosine to the render's embedding | {cos['mean']:.3f} ± {cos['se']:.3f} (n={cos['n']}) |"]
    lines += ["", "| pixels: fully right and per attribute | " + " | ".join(ATTRS) + " |",
              "|---|" + "---|" * len(ATTRS)]
    rows = [("ground-truth renders (scorer ceiling)", d["ground_truth"], "single"),
            ("decoder reconstruction 32×32", d["at_32"], "single"),
            ("decoder reconstruction + SR 64×64", d["at_64"], "single"),
            ("SR alone (ground truth 32→64)", d["sr"], "single"),
            ("decoder reconstruction, two-object 32×32", d.get("two_at_32"), "two"),
            ("decoder reconstruction + SR, two-object 64×64", d.get("two_at_64"), "two"),
            ("end to end, single-object", d["end_to_end"], "single"),
            ("end to end, two-object", d["end_to_end"], "two")]
    for name, summary, kind in rows:
        if summary is None:  # a row the run skipped
            continue
        t = summary.tallies[kind]
        cells = [str(Rate(t[a].right, t[a].named)) if t[a].named else "-" for a in ATTRS]
        lines.append(f"| {name} (n={summary.count(kind)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(d: dict) -> dict:
    def conv(v):
        if isinstance(v, Rate):
            return v.as_dict()
        if hasattr(v, "as_dict"):
            return v.as_dict()
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(d)


def main_stages(pipe, args, overrides: dict) -> int:
    calls = StageCalls(pipe, **overrides)
    shown = {stage: calls.run[stage] for stage in calls.run if isinstance(calls.run[stage], dict)}
    print(f"fidelity by stage: {pipe.manifest.folder} {json.dumps(shown)}", flush=True)
    d = diagnose(calls, groups=args.groups, recon=args.recon, recon_two=args.recon_two)
    print(render_table(d))
    print(f"({d['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(d), f, indent=2)
    return 0
