"""Batches for training: the shapes-world stream mixed with users' image folders and tar shards.

The sources are the plain generators of ``dalle2_rt.world`` and ``training.datasets``; this module only
mixes them by weight and stacks items into uint8 batches (B, H, W, 3) with their captions.
"""
from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from dalle2_rt.training.config import DataSource
from dalle2_rt.world import world_stream


def source_stream(src: DataSource, seed: int, size: int, skips) -> Iterator[tuple[np.ndarray, str]]:
    if src.kind == "world":
        return world_stream(seed, size=size, two_object_prob=src.two_object_prob, labels=True)
    from dalle2_rt.training.datasets import iter_image_folder, iter_tar_shards

    if src.kind == "folder":
        return iter_image_folder(src.path, size=size, skips=skips)
    paths = sorted(glob.glob(src.path)) or [src.path]
    return iter_tar_shards(paths, size=size, skips=skips)


def stage_sources(sources: list[DataSource], two_object_prob: float | None) -> list[DataSource]:
    """The sources one stage draws from: a stage's ``two_object_prob`` replaces every world source's share."""
    if two_object_prob is None:
        return list(sources)
    return [replace(s, two_object_prob=two_object_prob) if s.kind == "world" else s for s in sources]


def batch_stream(sources: list[DataSource], batch_size: int, seed: int, size: int = 64,
                 skips=None) -> Iterator[tuple[np.ndarray, list[str], list]]:
    """Endless batches: images uint8 (B, size, size, 3), their captions, and their labels: ``(spec, scene)``
    for a shapes-world item, ``None`` for a user's image (a folder or a shard knows only its caption).

    ``skips`` (a ``datasets.SkipCounter``) counts the broken items the file-based sources skipped."""
    # Factories, not generator objects: mixed_stream restarts a finite source (a folder, shards) when it
    # runs out, so every source cycles for as long as training runs.
    openers = [lambda s=s, i=i: source_stream(s, seed + 7919 * i, size, skips) for i, s in enumerate(sources)]
    from dalle2_rt.training.datasets import mixed_stream

    items = mixed_stream(openers, [s.weight for s in sources], seed)
    while True:
        imgs, caps, labels = [], [], []
        for img, cap, *label in items:
            imgs.append(img)
            caps.append(cap)
            labels.append(label[0] if label else None)
            if len(imgs) == batch_size:
                break
        if not imgs:
            raise RuntimeError("the training data yielded no usable item (every source empty or skipped)")
        yield np.stack(imgs), caps, labels


def to_pixels(images: np.ndarray, size: int | None = None):
    """uint8 (B, H, W, 3) -> float tensor (B, 3, size, size) in [0, 1]; box-filter downsampling."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and size != x.shape[-1]:
        x = F.adaptive_avg_pool2d(x, size) if x.shape[-1] % size == 0 else F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x
