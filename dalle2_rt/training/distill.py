"""Guidance distillation of the decoder (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage 1).

The teacher is a trained decoder sampled with classifier-free guidance: two rows per sample, the conditional
prediction and the unconditional one (every ``*_keep`` at 0), combined as ``pred_u + w (pred_c − pred_u)``. The
student is the same network with the scale w as one more input (``DecoderConfig.guidance_input``: a sinusoidal
MLP of w added to the timestep embedding, zero at the start), warm-started from the teacher, and trained to
predict the teacher's guided prediction in one pass: each sampling step then runs B rows instead of 2B.

Each training step draws world images, their frozen-CLIP embeddings and text encodings, a timestep (a share of
them from the few-step schedules' own timesteps, where sampling evaluates the network), noise, and w uniform in
``guidance_range``; the loss is the MSE between the student's prediction and the teacher's guided one, in the
teacher's parameterisation (v for the bundled decoder). The exported graph takes ``guidance`` as an input and has
no unconditional half (``export/specs.py``, manifest ``stages.decoder.guidance_input: "guidance"``).

    dalle2-train decoder_distill --config configs/shapes-v2-fast.toml
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from dalle2_rt.models import registry
from dalle2_rt.models.clip import ClipImageEncoder, ClipTextEncoder
from dalle2_rt.models.decoder import Decoder
from dalle2_rt.runtime.schedules import respace
from dalle2_rt.training.config import TrainConfig
from dalle2_rt.training.data import to_pixels
from dalle2_rt.training.device import OnDevice, resolve_device
from dalle2_rt.training.diffusion import Diffusion
from dalle2_rt.training.loop import StageSpec, train_stage

STAGE = "decoder_distill"
# the sampling step counts whose timesteps the schedule share draws from (the runtime's trailing spacing)
FEW_STEPS = (2, 3, 4, 5, 6, 8)


class DistillError(ValueError):
    """The distillation stage's configuration names no usable teacher or CLIP."""


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def schedule_timesteps(abar: np.ndarray) -> np.ndarray:
    """Every timestep that a trailing-spaced schedule of ``FEW_STEPS`` steps evaluates, once each."""
    return np.unique(np.concatenate([respace(abar, s, "trailing").timesteps for s in FEW_STEPS]))


def guided_target(teacher: Decoder, x_t, t, image_embed, text_enc, image_keep, text_keep, w) -> torch.Tensor:
    """The teacher's classifier-free-guided prediction: one call of 2B rows (conditional, then every keep at 0)."""
    b = x_t.shape[0]
    zeros = torch.zeros(b)
    with torch.no_grad():
        pred = teacher(x_t=torch.cat([x_t, x_t]), t=torch.cat([t, t]), image_embed=torch.cat([image_embed] * 2),
                       text_encodings=torch.cat([text_enc] * 2), image_keep=torch.cat([image_keep, zeros]),
                       text_keep=torch.cat([text_keep, zeros]))
    cond, uncond = pred[:b], pred[b:]
    return uncond + w.reshape(-1, 1, 1, 1) * (cond - uncond)


def distill_spec(cfg: TrainConfig) -> StageSpec:
    run = cfg.stage(STAGE)
    if not run.teacher or not (Path(run.teacher) / "model.json").is_file():
        raise DistillError(f"[stages.{STAGE}] teacher must name a decoder model folder, got {run.teacher!r}")
    if not run.init_from:
        raise DistillError(f"[stages.{STAGE}] init_from must name the student's start: the teacher (with init_fresh = "
                           "[\"guidance_embed.\"]) or an earlier student; a student from random weights is not "
                           "what this stage is for")
    lo, hi = (float(v) for v in run.guidance_range)
    if not 0.0 <= lo <= hi:
        raise DistillError(f"[stages.{STAGE}] guidance_range must be [lo, hi] with 0 <= lo <= hi, "
                           f"got {run.guidance_range}")
    loaded = registry.load(Path(run.teacher), expect="decoder")
    teacher, tcfg = _frozen(loaded.model.float()), loaded.config
    if tcfg.guidance_input:
        raise DistillError(f"{run.teacher}: already a guidance-distilled decoder")
    scfg = dataclasses.replace(tcfg, guidance_input=True, guidance_range=(lo, hi))
    clip_folder = Path(run.clip) if run.clip else cfg.stage_dir("clip") / "model"
    clip = registry.load(clip_folder, expect="clip")
    device = resolve_device(cfg.device)
    text = OnDevice(_frozen(ClipTextEncoder(clip.model)).to(device), device)
    image = OnDevice(_frozen(ClipImageEncoder(clip.model)).to(device), device)
    teacher = OnDevice(teacher.to(device), device)
    diffusion = Diffusion(tcfg.schedule, tcfg.num_timesteps)
    few = torch.from_numpy(schedule_timesteps(diffusion.abar.numpy()))
    import open_clip

    def loss(model, images, captions, gen):
        b = len(captions)
        with torch.no_grad():
            _, text_enc = text(open_clip.tokenize(list(captions)))
            image_embed = image(to_pixels(images, clip.config.image_size))
        x0 = to_pixels(images, tcfg.image_size) * 2 - 1
        t = diffusion.sample_t(b, gen)
        pick = torch.rand(b, generator=gen) < run.schedule_t_share
        t = torch.where(pick, few[torch.randint(0, len(few), (b,), generator=gen)], t)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = diffusion.q_sample(x0, t, noise)
        w = lo + (hi - lo) * torch.rand(b, generator=gen)
        image_keep = torch.ones(b)
        text_keep = (torch.rand(b, generator=gen) < run.text_keep).float()
        target = guided_target(teacher, x_t, t.float(), image_embed, text_enc, image_keep, text_keep, w)
        pred = model(x_t=x_t, t=t.float(), image_embed=image_embed, text_encodings=text_enc, image_keep=image_keep,
                     text_keep=text_keep, guidance=w)
        return (pred.float() - target.float()).pow(2).mean()

    return StageSpec(STAGE, "decoder", Decoder(scfg), scfg, loss)


def train_decoder_distill(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Distill the guided teacher decoder into one that takes w as an input (one pass per step)."""
    return train_stage(distill_spec(cfg), cfg, max_steps=max_steps)
