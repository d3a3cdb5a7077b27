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

Step distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", one
halving) of such a guidance-distilled decoder, stage ``decoder_steps``: the teacher samples with 2S DDIM steps
on the runtime's trailing grid, the student (its copy) learns to take S. For a student step from t_i to t_{i+1}
the teacher takes its two steps from the same x_t (x0 clamped to [−1, 1] as the runtime does), and the student's
target is the x̃ that one DDIM step from x_t would need to land where the teacher landed (Eq. 8 of the paper),
expressed in the teacher's parameterisation. x_t is the world image noised to t_i; w (from the teacher's
``guidance_range``) and the keeps are drawn as above and given to both.

    dalle2-train decoder_steps --config configs/shapes-v2-steps.toml

Block removal (after Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion") of
a few-step decoder, stage ``decoder_compact``: the student is the teacher's U-Net with ``num_res_blocks`` residual
(+ attention) blocks per level instead of the teacher's, started from the teacher's own weights (each level keeps
its first blocks on the way down; on the way up its first blocks and its last, the one whose skip comes from the
level above, so every kept block sees inputs of the shapes it was trained on). It learns the teacher's
prediction at the timesteps the teacher samples at (its ``distilled_steps`` on the trailing grid), on world
images noised there, with w and the keeps drawn as above: the same sampler, about 30 % fewer FLOPs per step at
one block per level. With ``feature_weight`` > 0 the loss also compares each level's output (down, middle, up)
with the teacher's, as a share of the teacher's (BK-SDM's feature distillation). With ``operation_steps`` > 0 it
also learns the teacher at that trailing grid's timesteps (``compact_timesteps``), where unCLIP's operations run
the decoder at the defaults' ``operation_steps``.

    dalle2-train decoder_compact --config configs/shapes-v2-compact.toml

Step distillation of the super-resolution stage, ``sr_steps``: the same halving as ``decoder_steps`` for an SR
U-Net (no guidance, no text): the teacher takes 2S DDIM steps on the trailing grid from the world image at 64
noised to the student's timestep, conditioned on that image at 32 noise-augmented as in SR training (a level
drawn from 0 … T/4, the same for both), and the student, its copy, learns to land where the teacher landed in S.
At S = 1 the student learns the teacher's two-step sample in one pass from noise (999 → clean): half the SR cost.

    dalle2-train sr_steps --config configs/shapes-v2-sr1.toml
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dalle2_rt.models import registry
from dalle2_rt.models.clip import ClipImageEncoder, ClipTextEncoder
from dalle2_rt.models.decoder import Decoder
from dalle2_rt.models.sr import SuperRes
from dalle2_rt.runtime.schedules import respace
from dalle2_rt.training.config import TrainConfig
from dalle2_rt.training.data import to_pixels
from dalle2_rt.training.device import OnDevice, resolve_device
from dalle2_rt.training.diffusion import Diffusion
from dalle2_rt.training.loop import StageSpec, train_stage
from dalle2_rt.training.stages import sr_inputs

STAGE = "decoder_distill"
STEPS_STAGE = "decoder_steps"
COMPACT_STAGE = "decoder_compact"
SR_STEPS_STAGE = "sr_steps"
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


def _check_sources(stage: str, run, start: str | None, kind: str = "decoder") -> None:
    """A distillation stage's teacher folder and the student's start, before anything is loaded (``start``: what
    init_from must name; None where the stage builds its own start and init_from is optional)."""
    if not run.teacher or not (Path(run.teacher) / "model.json").is_file():
        raise DistillError(f"[stages.{stage}] teacher must name {registry.a_kind(kind)} model folder, got "
                           f"{run.teacher!r}")
    if start is not None and not run.init_from:
        raise DistillError(f"[stages.{stage}] init_from must name the student's start: {start}")


def _load_teacher(run, kind: str = "decoder") -> tuple[torch.nn.Module, object, dict]:
    """The teacher (a decoder, or the ``kind`` named), frozen in float32, its config and its model.json; a folder
    that is not one is a ``DistillError`` naming it."""
    try:
        loaded = registry.load(Path(run.teacher), expect=kind)
    except registry.CheckpointError as e:
        raise DistillError(f"teacher: {e}") from None
    return _frozen(loaded.model.float()), loaded.config, loaded.meta


def _frozen_parts(cfg: TrainConfig, run, teacher: Decoder, tcfg):
    """(the teacher on the training device, its diffusion, ``world(images, captions)`` → (text encodings, CLIP
    image embeddings, x0 in [−1, 1] at the decoder's size)) with the frozen CLIP of ``run.clip`` (default
    <out_dir>/clip/model)."""
    import open_clip

    clip_folder = Path(run.clip) if run.clip else cfg.stage_dir("clip") / "model"
    clip = registry.load(clip_folder, expect="clip")
    device = resolve_device(cfg.device)
    text = OnDevice(_frozen(ClipTextEncoder(clip.model)).to(device), device)
    image = OnDevice(_frozen(ClipImageEncoder(clip.model)).to(device), device)

    def world(images, captions):
        with torch.no_grad():
            _, text_enc = text(open_clip.tokenize(list(captions)))
            image_embed = image(to_pixels(images, clip.config.image_size))
        return text_enc, image_embed, to_pixels(images, tcfg.image_size) * 2 - 1

    return OnDevice(teacher.to(device), device), Diffusion(tcfg.schedule, tcfg.num_timesteps), world


def distill_spec(cfg: TrainConfig) -> StageSpec:
    run = cfg.stage(STAGE)
    _check_sources(STAGE, run, "the teacher (with init_fresh = [\"guidance_embed.\"]) or an earlier student; a "
                               "student from random weights is not what this stage is for")
    lo, hi = (float(v) for v in run.guidance_range)
    if not 0.0 <= lo <= hi:
        raise DistillError(f"[stages.{STAGE}] guidance_range must be [lo, hi] with 0 <= lo <= hi, "
                           f"got {run.guidance_range}")
    teacher, tcfg, _ = _load_teacher(run)
    if tcfg.guidance_input:
        raise DistillError(f"{run.teacher}: already a guidance-distilled decoder")
    scfg = dataclasses.replace(tcfg, guidance_input=True, guidance_range=(lo, hi))
    teacher, diffusion, world = _frozen_parts(cfg, run, teacher, tcfg)
    few = torch.from_numpy(schedule_timesteps(diffusion.abar.numpy()))

    def loss(model, images, captions, gen):
        b = len(captions)
        text_enc, image_embed, x0 = world(images, captions)
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


def _coef(abar: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    abar = abar.double().reshape(-1, *([1] * (ndim - 1)))
    return abar.sqrt(), (1 - abar).sqrt()


def pred_to_x0(pred: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str) -> torch.Tensor:
    """x0 from a network prediction in ``kind`` (eps / x0 / v) at ᾱ (B,), float64."""
    a, s = _coef(abar, x_t.dim())
    pred, x_t = pred.double(), x_t.double()
    if kind == "eps":
        return (x_t - s * pred) / a
    if kind == "x0":
        return pred
    if kind == "v":
        return a * x_t - s * pred
    raise DistillError(f"unknown parameterization {kind!r}; known: eps, x0, v")


def x0_to_pred(x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str) -> torch.Tensor:
    """The prediction in ``kind`` whose x0 at (x_t, ᾱ) is ``x0`` (the inverse of ``pred_to_x0``), float64."""
    a, s = _coef(abar, x_t.dim())
    x0, x_t = x0.double(), x_t.double()
    eps = (x_t - a * x0) / s
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    raise DistillError(f"unknown parameterization {kind!r}; known: eps, x0, v")


def ddim_step(x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, abar_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from ᾱ to ᾱ_next given the x0 estimate (samplers.sample_ddim with η = 0)."""
    a, s = _coef(abar, x_t.dim())
    a2, s2 = _coef(abar_next, x_t.dim())
    eps = (x_t.double() - a * x0.double()) / s
    return a2 * x0.double() + s2 * eps


def two_step_target(x_t: torch.Tensor, x_end: torch.Tensor, abar: torch.Tensor, abar_end: torch.Tensor) -> torch.Tensor:
    """The x̃ for which one DDIM step from (x_t, ᾱ) to ᾱ_end lands on ``x_end`` (Salimans & Ho 2022, Eq. 8)."""
    a, s = _coef(abar, x_t.dim())
    a2, s2 = _coef(abar_end, x_t.dim())
    ratio = s2 / s
    return (x_end.double() - ratio * x_t.double()) / (a2 - ratio * a)


def step_grids(abar: np.ndarray, student_steps: int) -> tuple[np.ndarray, ...]:
    """(student timesteps, ᾱ at them, the teacher's middle timestep and ᾱ per student step, ᾱ after each student
    step: 1.0 after the last).

    The teacher's trailing grid of 2S steps must hold the student's S steps at its even positions."""
    student = respace(abar, student_steps, "trailing")
    teacher = respace(abar, 2 * student_steps, "trailing")
    if not np.array_equal(teacher.timesteps[0::2], student.timesteps):
        raise DistillError(f"the trailing grid of {2 * student_steps} steps does not contain the one of "
                           f"{student_steps} ({teacher.timesteps.tolist()} vs {student.timesteps.tolist()}): "
                           "choose student_steps dividing the number of timesteps by a power of two")
    return (student.timesteps, student.alphas_cumprod, teacher.timesteps[1::2], teacher.alphas_cumprod[1::2],
            student.alphas_cumprod_prev)


def step_grid_tensors(diffusion: Diffusion, student_steps: int) -> tuple[torch.Tensor, ...]:
    """``step_grids`` of the diffusion's schedule, as tensors (what ``halving_loss`` draws from)."""
    return tuple(torch.from_numpy(np.asarray(v)) for v in step_grids(diffusion.abar.numpy(), student_steps))


def halving_loss(model, teacher, diffusion: Diffusion, grids: tuple, kind: str, x0: torch.Tensor,
                 conditioning: Callable[[], dict], gen: torch.Generator) -> torch.Tensor:
    """One step-distillation loss: each row's student step (drawn from ``grids``, ``step_grids`` as tensors) from
    x0 noised to its timestep; the target is what makes one DDIM step land where the teacher's two land (the
    teacher's x0 clamped to [−1, 1] as the runtime does), in the parameterisation ``kind``. ``conditioning()``:
    the other inputs both networks get, called after the step and the noise are drawn from ``gen``."""
    ts, abar_t, ts_mid, abar_mid, abar_end = grids
    i = torch.randint(0, len(ts), (x0.shape[0],), generator=gen)
    t, a, t_mid, a_mid, a_end = ts[i], abar_t[i], ts_mid[i], abar_mid[i], abar_end[i]
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    cond = conditioning()
    with torch.no_grad():
        # the teacher's two DDIM steps: t_i → its middle timestep → t_{i+1} (or the clean sample)
        x0_1 = pred_to_x0(teacher(x_t=x_t, t=t.float(), **cond), x_t, a, kind).clamp(-1, 1)
        x_mid = ddim_step(x0_1, x_t, a, a_mid).float()
        x0_2 = pred_to_x0(teacher(x_t=x_mid, t=t_mid.float(), **cond), x_mid, a_mid, kind).clamp(-1, 1)
        x_end = ddim_step(x0_2, x_mid, a_mid, a_end)
        end_is_clean = (a_end >= 1.0).reshape(-1, 1, 1, 1)
        target_x0 = torch.where(end_is_clean, x_end, two_step_target(x_t, x_end, a, a_end)).clamp(-1, 1)
        target = x0_to_pred(target_x0, x_t, a, kind).float()
    pred = model(x_t=x_t, t=t.float(), **cond)
    return (pred.float() - target).pow(2).mean()


def steps_spec(cfg: TrainConfig) -> StageSpec:
    run = cfg.stage(STEPS_STAGE)
    _check_sources(STEPS_STAGE, run, "the teacher or an earlier student")
    teacher, tcfg, _ = _load_teacher(run)
    if not tcfg.guidance_input or not tcfg.guidance_range:
        raise DistillError(f"{run.teacher}: not a guidance-distilled decoder (run decoder_distill first); step "
                           "distillation needs one pass per teacher step")
    # w is drawn from the scales the teacher learned (its model.json), and the student states the same range
    lo, hi = tcfg.guidance_range
    teacher, diffusion, world = _frozen_parts(cfg, run, teacher, tcfg)
    grids = step_grid_tensors(diffusion, run.student_steps)
    kind = tcfg.parameterization

    def loss(model, images, captions, gen):
        b = len(captions)
        text_enc, image_embed, x0 = world(images, captions)

        def conditioning() -> dict:
            w = lo + (hi - lo) * torch.rand(b, generator=gen)
            return dict(image_embed=image_embed, text_encodings=text_enc, image_keep=torch.ones(b),
                        text_keep=(torch.rand(b, generator=gen) < run.text_keep).float(), guidance=w)

        return halving_loss(model, teacher, diffusion, grids, kind, x0, conditioning, gen)

    return StageSpec(STEPS_STAGE, "decoder", Decoder(tcfg), tcfg, loss,
                     extra_meta={"distilled_steps": run.student_steps})


def train_decoder_steps(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Distill a guidance-distilled decoder's 2S DDIM steps into S (one progressive-distillation halving)."""
    return train_stage(steps_spec(cfg), cfg, max_steps=max_steps)


def _unet_layout(levels: int, blocks: int) -> tuple[list[tuple], list[tuple]]:
    """What ``UNet.down`` and ``UNet.up`` hold, in order: ("res", level, i) for a block stage, ("down", level)
    for a strided conv, ("ups", level) / ("upconv", level) for the upsampling pair (models/unet.py)."""
    down, up = [], []
    for level in range(levels):
        down += [("res", level, i) for i in range(blocks)]
        if level < levels - 1:
            down.append(("down", level))
    for level in reversed(range(levels)):
        for i in range(blocks + 1):
            up.append(("res", level, i))
            if level > 0 and i == blocks:
                up += [("ups", level), ("upconv", level)]
    return down, up


def compact_weights(teacher_state: dict, levels: int, teacher_blocks: int, blocks: int) -> dict:
    """The teacher decoder's state dict renamed onto a student U-Net with ``blocks`` (≤ the teacher's) block
    stages per level: down, the first ``blocks`` of each level; up, the first ``blocks`` and the last one."""
    if not 1 <= blocks <= teacher_blocks:
        raise DistillError(f"[stages.{COMPACT_STAGE}] num_res_blocks must be 1 … {teacher_blocks} (the teacher's), "
                           f"got {blocks}")
    t_down, t_up = _unet_layout(levels, teacher_blocks)
    s_down, s_up = _unet_layout(levels, blocks)

    def source(item: tuple, up: bool) -> tuple:
        if up and item[0] == "res" and item[2] == blocks:
            return ("res", item[1], teacher_blocks)  # the last block up: its skip is the level above's
        return item

    renames = {}
    for part, s_items, t_items in (("down", s_down, t_down), ("up", s_up, t_up)):
        for j, item in enumerate(s_items):
            renames[f"unet.{part}.{t_items.index(source(item, part == 'up'))}."] = f"unet.{part}.{j}."
    out = {}
    for name, value in teacher_state.items():
        if name.startswith(("unet.down.", "unet.up.")):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix in renames:
                out[renames[prefix] + name[len(prefix):]] = value
        else:
            out[name] = value
    return out


def level_modules(net: Decoder, levels: int, blocks: int) -> list:
    """The last module of each U-Net level's last block stage, down then the middle then up (7 for 3 levels)."""
    down, up = _unet_layout(levels, blocks)
    stages = [net.unet.down[down.index(("res", lv, blocks - 1))][-1] for lv in range(levels)]
    stages.append(net.unet.mid[-1])
    return stages + [net.unet.up[up.index(("res", lv, blocks))][-1] for lv in reversed(range(levels))]


def _level_features(teacher: Decoder, student: Decoder, levels: int, teacher_blocks: int, blocks: int) -> dict:
    """Forward hooks that keep, on every call, the output of each U-Net level (``level_modules``) for the teacher
    and the student in the same order: {"teacher": [...], "student": [...]}. Only these modules write: a copy of
    the student (the EMA's) carries the hooks but leaves the lists alone."""
    kept: dict[str, list] = {"teacher": [], "student": []}
    for who, net, n in (("teacher", teacher, teacher_blocks), ("student", student, blocks)):
        modules = level_modules(net, levels, n)
        outputs = kept[who] = [None] * len(modules)

        def keep(i, owner, outputs=outputs):
            def hook(called, args, output):
                if called is owner:
                    outputs[i] = output
            return hook

        for i, module in enumerate(modules):
            module.register_forward_hook(keep(i, module))
    return kept


def compact_timesteps(abar: np.ndarray, steps: int, operation_steps: int = 0) -> np.ndarray:
    """The timesteps block removal learns the teacher at, each drawn alike: those of the teacher's ``steps``-step
    trailing grid (where it samples), and with ``operation_steps`` those of that grid too (where the operations
    run the decoder; a 6-step grid holds the 3-step one's and adds three)."""
    grid = respace(abar, steps, "trailing").timesteps
    if operation_steps:
        grid = np.union1d(grid, respace(abar, operation_steps, "trailing").timesteps)
    return np.unique(np.asarray(grid, dtype=np.int64))


def compact_spec(cfg: TrainConfig) -> StageSpec:
    run = cfg.stage(COMPACT_STAGE)
    _check_sources(COMPACT_STAGE, run, None)
    teacher, tcfg, meta = _load_teacher(run)
    steps = meta.get("distilled_steps")
    if not tcfg.guidance_input or not tcfg.guidance_range or not steps:
        raise DistillError(f"{run.teacher}: not a step-distilled decoder (decoder_steps); block removal learns "
                           "the few steps such a decoder samples with")
    unet = tcfg.unet
    if run.init_from and (Path(run.init_from) / "model.json").is_file():
        start = registry.read_meta(Path(run.init_from)).get("config", {}).get("unet", {})
        if start.get("num_res_blocks") != run.num_res_blocks:
            raise DistillError(f"[stages.{COMPACT_STAGE}] init_from {run.init_from} has "
                               f"{start.get('num_res_blocks')} blocks per level, not num_res_blocks = "
                               f"{run.num_res_blocks}: name an earlier decoder_compact student, or leave init_from "
                               "out to start from the teacher's kept blocks")
    scfg = dataclasses.replace(tcfg, unet=dataclasses.replace(unet, num_res_blocks=run.num_res_blocks))
    student = Decoder(scfg)
    student.load_state_dict(compact_weights(teacher.state_dict(), len(unet.channel_mults), unet.num_res_blocks,
                                            run.num_res_blocks), strict=True)
    lo, hi = tcfg.guidance_range
    feats = (_level_features(teacher, student, len(unet.channel_mults), unet.num_res_blocks, run.num_res_blocks)
             if run.feature_weight else None)
    teacher, diffusion, world = _frozen_parts(cfg, run, teacher, tcfg)
    ts = torch.from_numpy(compact_timesteps(diffusion.abar.numpy(), steps, run.operation_steps))

    def loss(model, images, captions, gen):
        b = len(captions)
        text_enc, image_embed, x0 = world(images, captions)
        t = ts[torch.randint(0, len(ts), (b,), generator=gen)]
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        cond = dict(image_embed=image_embed, text_encodings=text_enc, image_keep=torch.ones(b),
                    text_keep=(torch.rand(b, generator=gen) < run.text_keep).float(),
                    guidance=lo + (hi - lo) * torch.rand(b, generator=gen))
        with torch.no_grad():
            target = teacher(x_t=x_t, t=t.float(), **cond).float()
        out = (model(x_t=x_t, t=t.float(), **cond).float() - target).pow(2).mean()
        if not run.feature_weight:
            return out
        # each level's output, as a share of the teacher's (BK-SDM's feature distillation, scale-free)
        pairs = list(zip(feats["student"], feats["teacher"], strict=True))
        feature = sum((s_ - t_).pow(2).mean() / t_.pow(2).mean().clamp_min(1e-6) for s_, t_ in pairs) / len(pairs)
        return out + run.feature_weight * feature

    return StageSpec(COMPACT_STAGE, "decoder", student, scfg, loss, extra_meta={"distilled_steps": steps})


def train_decoder_compact(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Distill a few-step decoder into one with fewer blocks per U-Net level (same sampler, fewer FLOPs)."""
    return train_stage(compact_spec(cfg), cfg, max_steps=max_steps)


def sr_steps_spec(cfg: TrainConfig) -> StageSpec:
    run = cfg.stage(SR_STEPS_STAGE)
    _check_sources(SR_STEPS_STAGE, run, "the teacher or an earlier student", kind="sr")
    teacher, tcfg, _ = _load_teacher(run, kind="sr")
    device = resolve_device(cfg.device)
    teacher = OnDevice(teacher.to(device), device)
    diffusion = Diffusion(tcfg.schedule, tcfg.num_timesteps)
    grids = step_grid_tensors(diffusion, run.student_steps)
    kind = tcfg.parameterization

    def loss(model, images, captions, gen):
        x0, cond = sr_inputs(images, tcfg, diffusion, gen)  # the conditioning as SR training draws it
        return halving_loss(model, teacher, diffusion, grids, kind, x0, lambda: cond, gen)

    return StageSpec(SR_STEPS_STAGE, "sr", SuperRes(tcfg), tcfg, loss,
                     extra_meta={"distilled_steps": run.student_steps})


def train_sr_steps(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Distill the SR stage's 2S DDIM steps into S (one progressive-distillation halving)."""
    return train_stage(sr_steps_spec(cfg), cfg, max_steps=max_steps)
