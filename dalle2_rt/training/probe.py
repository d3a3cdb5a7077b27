"""How much of the world a CLIP checkpoint's embeddings carry: the quick check to run while CLIP trains.

    python -m dalle2_rt.training.probe runs/shapes-v2/clip/model [--n 3000]

Prints (1) image→caption retrieval top-1 among groups of 100 fresh random canonical captions (strict: the
exact caption), and (2) a linear probe (multinomial logistic regression, 80/20 split) per attribute on the image
embedding of fresh fully specified single-object renders — the measurement of ../shared/FINDINGS.md, where
shapes-v1 read position at 21.5 % (chance 20 %). Runs on the torch checkpoint, so no export is needed.
"""
from __future__ import annotations

import argparse
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
)


def _load(folder: Path):
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


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, split: float = 0.8) -> float:
    """Test accuracy of a multinomial logistic regression (L2 1e-4, LBFGS) trained on the first 80 %."""
    k = int(len(x) * split)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:k] @ w + b, y[:k]) + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
