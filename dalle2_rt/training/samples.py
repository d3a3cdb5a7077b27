"""Periodic sample grids during training, drawn with the runtime's own numpy samplers.

The network is wrapped as the runtime's ``model(x_batch, t_batch) -> pred`` callable, so a grid is sampled
by exactly the loop that the exported engines run (no second sampler to drift). Grids are written
atomically (tmp + rename) as PNGs: row 1 the training images, row 2 the model's samples for them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle2_rt.runtime.parameterization import make_denoiser
from dalle2_rt.runtime.samplers import sample
from dalle2_rt.runtime.schedules import alphas_cumprod_for, q_sample, respace
from dalle2_rt.world import world_stream

GRID_SEED = 1234


def fixed_batch(n: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """The same ``n`` world images and captions at every grid, so grids are comparable over training."""
    it = world_stream(GRID_SEED, size=size, paraphrase_prob=0.0)
    items = [next(it) for _ in range(n)]
    return np.stack([i for i, _ in items]), [c for _, c in items]


def torch_model(module: torch.nn.Module, **cond: np.ndarray):
    """``(x, t) -> pred`` over numpy arrays, with the conditioning (already stacked to the batch) closed over."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cond.items()}

    @torch.no_grad()
    def model(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return module(x_t=torch.from_numpy(x), t=torch.from_numpy(t), **tensors).float().numpy()

    return model


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return np.clip((x.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def write_grid(rows: list[np.ndarray], path: Path) -> None:
    """Each row (B, H, W, 3) uint8, resized to the largest H; written as one PNG, atomically."""
    h = max(r.shape[1] for r in rows)
    tiles = [[np.asarray(Image.fromarray(im).resize((h, h), Image.NEAREST)) for im in r] for r in rows]
    grid = np.concatenate([np.concatenate(t, axis=1) for t in tiles], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)


def _schedule(cfg, steps: int):
    return respace(alphas_cumprod_for(cfg.schedule, cfg.num_timesteps), steps)


def decoder_grid(module, frozen_clip, path: Path, n: int = 8, steps: int = 25, guidance: float = 3.0) -> None:
    """Reconstructions: the decoder sampled from the CLIP image embedding and text of fixed world images."""
    cfg = module.cfg
    images, captions = fixed_batch(n)
    _, text_enc, image_embed = frozen_clip(images, captions)
    keep = np.r_[np.ones(n), np.zeros(n)].astype(np.float32)
    model = torch_model(module.eval(), image_embed=np.concatenate([image_embed.numpy()] * 2),
                        text_encodings=np.concatenate([text_enc.numpy()] * 2), image_keep=keep, text_keep=keep)
    schedule = _schedule(cfg, steps)
    rng = np.random.default_rng(GRID_SEED)
    x = rng.standard_normal((n, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    denoise = make_denoiser(model, kind=cfg.parameterization, schedule=schedule, guidance_scale=guidance,
                            clip_x0=(-1.0, 1.0))
    out = sample("ddim", denoise, x, schedule, rng=rng)
    module.train()
    write_grid([images, to_uint8(out)], path)


def sr_grid(module, path: Path, n: int = 8, steps: int = 10) -> None:
    """Upsampling: low-res world images (row 1, nearest-upscaled) -> the SR model's samples (row 2)."""
    cfg = module.cfg
    images, _ = fixed_batch(n, cfg.image_size)
    low = np.stack([np.asarray(Image.fromarray(im).resize((cfg.low_res_size,) * 2, Image.BOX)) for im in images])
    low_x = low.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1
    rng = np.random.default_rng(GRID_SEED)
    abar = alphas_cumprod_for(cfg.schedule, cfg.num_timesteps)
    low_aug = q_sample(low_x, abar[cfg.sample_aug_t], rng.standard_normal(low_x.shape, dtype=np.float32))
    model = torch_model(module.eval(), low_res=low_aug, aug_t=np.full(n, cfg.sample_aug_t, np.float32))
    schedule = _schedule(cfg, steps)
    x = rng.standard_normal((n, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    denoise = make_denoiser(model, kind=cfg.parameterization, schedule=schedule, clip_x0=(-1.0, 1.0))
    out = sample("ddim", denoise, x, schedule, rng=rng)
    module.train()
    write_grid([low, to_uint8(out), images], path)
