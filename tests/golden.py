"""Golden images of the bundled engines: two prompts and seeds at the manifest's defaults, committed as PNGs.

    python -m tests.golden            # compare the engines' images with tests/golden/ (what the test does)
    python -m tests.golden --update   # rewrite tests/golden/ from engines/shapes-v2 (after the model changes)

The references pin the whole chain (tokenizer, every graph, the samplers, the noise order of the seed contract,
candidate ranking, pixel conversion): a change that moves every backend's pixels at once fails here, where the
cross-backend tests cannot see it. Regenerate them when the bundled model or its defaults change on purpose,
and look at the new images before committing them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "tests" / "golden"
# (prompt, seed): one single-object caption with every attribute named, one two-object caption.
CASES = (
    ("a large red circle on the left, black background", 0),
    ("a yellow triangle above a purple cross, gray background", 7),
)
# onnxruntime's CPU kernels differ in the last bits between instruction sets (AVX2, AVX-512) and versions; a few
# sampling steps carry that to a few levels of 255. A real change moves far more pixels by far more.
MAX_MEAN_ABS = 1.0  # mean |difference| over all pixels and channels, in levels of 255
MAX_SHARE_OFF = 0.01  # share of pixel values off by more than OFF_LEVELS
OFF_LEVELS = 8


def path(prompt: str, seed: int) -> Path:
    slug = "-".join(prompt.replace(",", "").split()[:6])
    return FOLDER / f"{slug}-s{seed}.png"


def render(pipe) -> list[np.ndarray]:
    """Each case's image at the manifest's defaults, uint8 (H, W, 3)."""
    return [np.asarray(pipe(prompt, seed=seed, num_images=1)[0]) for prompt, seed in CASES]


def difference(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(mean |got - want|, share of values off by more than OFF_LEVELS)."""
    d = np.abs(got.astype(int) - want.astype(int))
    return float(d.mean()), float((d > OFF_LEVELS).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    p.add_argument("--update", action="store_true", help="rewrite the reference images")
    p.add_argument("--engines", default=str(REPO / "engines" / "shapes-v2"))
    args = p.parse_args(argv)
    from dalle2_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.engines, threads=1)
    worst = 0
    for (prompt, seed), image in zip(CASES, render(pipe)):
        target = path(prompt, seed)
        if args.update:
            FOLDER.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target, optimize=True)
            print(f"wrote {target.relative_to(REPO)}")
            continue
        mean, share = difference(image, np.asarray(Image.open(target).convert("RGB")))
        ok = mean <= MAX_MEAN_ABS and share <= MAX_SHARE_OFF
        worst |= not ok
        print(f"{'ok ' if ok else 'OFF'} {target.name}: mean |diff| {mean:.3f}, "
              f"share off by > {OFF_LEVELS}: {share:.4f}")
    return int(worst)


if __name__ == "__main__":
    sys.exit(main())
