"""How much of the world a CLIP checkpoint's embeddings carry: the quick check to run while CLIP trains.

    python -m dalle2_rt.training.probe runs/shapes-v2/clip/model [--n 3000]

Prints (1) image→caption retrieval top-1 among groups of 100 fresh random canonical captions (strict: the
exact caption), and (2) a linear probe (multinomial logistic regression, 80/20 split) per attribute on the image
embedding of fresh fully specified single-object renders — the measurement by which (docs/history.md)
shapes-v1 read position at 21.5 % (chance 20 %), and (3) how much of a two-object render reads back from its
embedding (`two_object_probe`), and (4) how often an image prefers its own caption to one changed in a single
thing (`hard_negative_preference`). Runs on the torch checkpoint, so no export is needed.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch

from dalle2_rt.models.clip import ClipImageEncoder, ClipTextEncoder
from dalle2_rt.training.data import to_pixels
from dalle2_rt.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_text,
    random_caption_spec,
    random_full_single_spec,
    render,
    sample_scene,
    two_object_scenes,
)


def _load(folder: Path):
    """The folder's encoders, loaded once per process for each version of its weights (the CLI's three
    measurements share one load; a folder rewritten since, e.g. by a training step, loads again)."""
    weights = Path(folder).resolve() / "model.safetensors"
    return _load_version(weights.parent, weights.stat().st_mtime_ns if weights.exists() else None)


@functools.lru_cache(maxsize=4)
def _load_version(folder: Path, _mtime_ns):
    from dalle2_rt.training.stages import load_clip, tokenize

    clip, cfg = load_clip(folder)
    return ClipTextEncoder(clip), ClipImageEncoder(clip), cfg, tokenize


@torch.no_grad()
def retrieval(folder: Path, groups: int = 3, seed: int = 11) -> tuple[float, int]:
    text_enc, image_enc, cfg, tokenize = _load(folder)
    rng = np.random.default_rng(seed)
    hits = n = 0
    for _ in range(groups):
        caps, imgs = [], []
        while len(caps) < 100:
            spec = random_caption_spec(rng)
            if caption_text(spec) not in caps:
                caps.append(caption_text(spec))
                imgs.append(render(sample_scene(spec, rng), 64))
        t = text_enc(tokenize(caps))[0]
        i = image_enc(to_pixels(np.stack(imgs), cfg.image_size))
        hits += int(((i @ t.T).argmax(1) == torch.arange(100)).sum())
        n += 100
    return hits / n, n


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-4):
    """Weights and bias of a multinomial logistic regression of y on x (L2 ``l2`` on the weights, LBFGS)."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, split: float = 0.8) -> float:
    """Test accuracy of a multinomial logistic regression (L2 1e-4, LBFGS) trained on the first 80 %."""
    k = int(len(x) * split)
    w, b = _fit_logistic(x[:k], y[:k], classes)
    return float(((x[k:] @ w + b).argmax(1) == y[k:]).float().mean())


@torch.no_grad()
def _embed_singles(folder: Path, n: int, seed: int):
    _, image_enc, cfg, _ = _load(folder)
    rng = np.random.default_rng(seed)
    labels = {a: [] for a in ("colour", "background", "size", "shape", "position")}
    imgs = []
    for _ in range(n):
        spec = random_full_single_spec(rng)
        imgs.append(render(sample_scene(spec, rng), 64))
        labels["colour"].append(tuple(COLOURS).index(spec.colours[0]))
        labels["background"].append(tuple(BACKGROUNDS).index(spec.background))
        labels["size"].append(tuple(SIZES).index(spec.size))
        labels["shape"].append(SHAPES.index(spec.shapes[0]))
        labels["position"].append(POSITIONS.index(spec.position))
    emb = torch.cat([image_enc(to_pixels(np.stack(imgs[i:i + 256]), cfg.image_size)) for i in range(0, n, 256)])
    return emb, {a: torch.tensor(v) for a, v in labels.items()}


def linear_probe(folder: Path, n: int = 3000, seed: int = 5) -> dict[str, float]:
    emb, labels = _embed_singles(folder, n, seed)
    sizes = {"colour": len(COLOURS), "background": len(BACKGROUNDS), "size": len(SIZES), "shape": len(SHAPES),
             "position": len(POSITIONS)}
    with torch.enable_grad():
        return {a: _probe(emb, labels[a], sizes[a]) for a in sizes}


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares weights and bias of y on x, L2 ``lam`` (on both)."""
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)
    sol = torch.linalg.solve(xb.T @ xb + lam * torch.eye(xb.shape[1]), xb.T @ y)
    return sol[:-1], sol[-1]


def read_back(emb: torch.Tensor, scenes: list, split: float = 0.8) -> dict[str, float]:
    """Whether embeddings ``emb`` (N, D) of two-object ``scenes`` read back into the scene the way the attribute
    heads ask for it: per colour, a linear classifier of that object's shape and a linear regression of its
    centre, each fitted on the first 80 % of the renders that hold the colour. On the held-out rest (colours
    given: colour reads at 100 %): the fraction whose both shapes read right, whose relation (from the read
    centres, along the caption's axis) reads right, and both."""
    k = int(len(scenes) * split)
    shape_w, centre_w = {}, {}
    for c in COLOURS:
        pairs = [(i, o) for i in range(k) for o in scenes[i][1].objects if o.colour == c]
        if not pairs:
            continue
        x = emb[[i for i, _ in pairs]]
        with torch.enable_grad():
            shape_w[c] = _fit_logistic(x, torch.tensor([SHAPES.index(o.shape) for _, o in pairs]), len(SHAPES))
        centre_w[c] = _ridge(x, torch.tensor([[o.cx, o.cy] for _, o in pairs], dtype=torch.float32))
    shapes_ok, relation_ok = [], []
    for i in range(k, len(scenes)):
        spec, scene = scenes[i]
        if any(c not in shape_w for c in spec.colours):
            continue
        e = emb[i:i + 1]
        truth = {o.colour: o for o in scene.objects}
        read = {}
        for c in spec.colours:
            (w, b), (cw, cb) = shape_w[c], centre_w[c]
            read[c] = (SHAPES[int((e @ w + b).argmax())], (e @ cw + cb)[0].tolist())
        shapes_ok.append(all(read[c][0] == truth[c].shape for c in spec.colours))
        (ax, ay), (bx, by) = read[spec.colours[0]][1], read[spec.colours[1]][1]
        ahead = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}
        relation_ok.append(ahead[spec.relation] > 0)
    s, r = np.asarray(shapes_ok), np.asarray(relation_ok)
    return {"both shapes": float(s.mean()), "relation": float(r.mean()),
            "shapes and relation": float((s & r).mean())}


@torch.no_grad()
def two_object_probe(folder: Path, n: int = 3000, seed: int = 7) -> dict[str, float]:
    """``read_back`` of a CLIP checkpoint's image embeddings of ``n`` fresh two-object renders."""
    _, image_enc, cfg, _ = _load(folder)
    scenes = two_object_scenes(n, seed)
    imgs = np.stack([render(scene, 64) for _, scene in scenes])
    emb = torch.cat([image_enc(to_pixels(imgs[i:i + 256], cfg.image_size)) for i in range(0, n, 256)])
    return read_back(emb, scenes)


@torch.no_grad()
def hard_negative_preference(folder: Path, n: int = 1000, seed: int = 13) -> dict[str, tuple[float, int]]:
    """How often the image embedding of a fresh render is closer to its own canonical caption than to a hard
    negative of it (world/negatives.py), per kind of negative: ``{kind: (fraction, count)}`` over ``n`` renders,
    half of them two-object. 100 % means CLIP binds what it reads; 50 % is a coin."""
    from dalle2_rt.world.negatives import hard_negatives

    text_enc, image_enc, cfg, tokenize = _load(folder)
    rng = np.random.default_rng(seed)
    wins: dict[str, list[bool]] = {}
    for start in range(0, n, 100):
        specs = [random_caption_spec(rng, 0.5) for _ in range(min(100, n - start))]
        imgs = np.stack([render(sample_scene(s, rng), 64) for s in specs])
        img = image_enc(to_pixels(imgs, cfg.image_size))
        negs = [hard_negatives(spec, rng) for spec in specs]
        texts = [caption_text(x) for spec, neg in zip(specs, negs) for x in (spec, *neg.values())]
        txt = text_enc(tokenize(texts))[0]  # one call per 100 renders: each render's own caption, then its negatives
        row = 0
        for i, neg in enumerate(negs):
            sims = (txt[row:row + 1 + len(neg)] @ img[i]).tolist()
            row += 1 + len(neg)
            for kind, sim in zip(neg, sims[1:]):
                wins.setdefault(kind, []).append(sims[0] > sim)
    return {k: (float(np.mean(v)), len(v)) for k, v in wins.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle2_rt.training.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("clip", help="a CLIP model folder (model.json + model.safetensors)")
    p.add_argument("--n", type=int, default=3000, help="renders for the linear probe (default 3000)")
    args = p.parse_args(argv)
    folder = Path(args.clip)
    if not (folder / "model.json").exists():
        print(f"probe: {folder} is not a model folder (no model.json)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    top1, n = retrieval(folder)
    print(f"image→caption strict top-1 among 100: {top1:.1%} (n={n})")
    for attr, acc in linear_probe(folder, args.n).items():
        print(f"linear probe {attr:10s} {acc:.1%}")
    for what, acc in two_object_probe(folder, args.n).items():
        print(f"two-object read-back, {what}: {acc:.1%}")
    for kind, (acc, count) in hard_negative_preference(folder).items():
        print(f"own caption over a hard negative, {kind:17s} {acc:.1%} (n={count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
