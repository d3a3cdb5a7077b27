"""One documented Python function per unCLIP stage; ``dalle2-train`` calls exactly these.

    from dalle2_rt.training import load_config, train_clip, train_prior, train_decoder, train_sr
    cfg = load_config("configs/shapes-v2.toml")
    train_clip(cfg); train_prior(cfg); train_decoder(cfg); train_sr(cfg)

Each trains (or resumes) its stage into ``<out_dir>/<stage>/`` and returns that folder. The prior and the
decoder read the trained CLIP from ``<out_dir>/clip/model`` and keep it frozen.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from dalle2_rt.models import registry
from dalle2_rt.models.clip import ClipConfig, ClipImageEncoder, ClipTextEncoder, build_clip, load_open_clip_checkpoint
from dalle2_rt.models.decoder import Decoder
from dalle2_rt.models.prior import DiffusionPrior
from dalle2_rt.models.sr import SuperRes
from dalle2_rt.training import samples
from dalle2_rt.training.attributes import AttributeHeads, image_targets, text_targets
from dalle2_rt.training.config import TrainConfig
from dalle2_rt.training.data import to_pixels
from dalle2_rt.training.device import OnDevice, resolve_device
from dalle2_rt.training.diffusion import Diffusion
from dalle2_rt.training.loop import StageSpec, train_stage
from dalle2_rt.world.captions import caption_text
from dalle2_rt.world.negatives import hard_negative


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(cfg: TrainConfig, stage: str, **linked):
    """The stage's model config: dataclass defaults, then the TOML's [model.<stage>], then ``linked``.
    A TOML key the stage's config has no field for is refused, named (``registry.ConfigError``)."""
    cls = registry.kind(stage).config
    merged = _deep_merge(dataclasses.asdict(cls()), {**cfg.model.get(stage, {}), **linked})
    return registry.config_from_dict(cls, merged, where=f"[model.{stage}]")


def clip_links(c: ClipConfig) -> dict:
    """The prior's and the decoder's config fields that must equal their CLIP's (``model_config``'s ``linked``)."""
    return {"embed_dim": c.embed_dim, "text_width": c.text_width, "context_length": c.context_length}


def load_clip(folder: Path) -> tuple[torch.nn.Module, ClipConfig]:
    """The trained CLIP of a stage folder (``<out_dir>/clip/model``), frozen, in eval mode."""
    loaded = registry.load(folder, expect="clip")
    return loaded.model, loaded.config


def tokenize(captions: list[str]) -> torch.Tensor:
    return open_clip.tokenize(captions)


def _drop_mask(batch: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """1.0 = keep the conditioning, 0.0 = drop it (replaced by the learned null inside the model)."""
    return (torch.rand(batch, generator=gen) >= p).float()


def clip_spec(cfg: TrainConfig) -> StageSpec:
    if cfg.init_clip:
        if not cfg.init_clip_config:
            raise ValueError("init_clip needs init_clip_config (the open_clip model-config JSON)")
        oc = json.loads(Path(cfg.init_clip_config).read_text())
        oc = oc.get("model_cfg", oc)  # accept open_clip's {"model_cfg": ...} wrapper too
        clip, ccfg = load_open_clip_checkpoint(cfg.init_clip, oc)
    else:
        ccfg = model_config(cfg, "clip")
        clip = build_clip(ccfg)

    weight = cfg.stage("clip").attribute_weight
    neg_share = cfg.stage("clip").hard_negatives
    heads = AttributeHeads(ccfg.embed_dim) if weight > 0 else None

    def loss(model, images, captions, gen, labels=None):
        pixels = to_pixels(images, ccfg.image_size)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).reshape(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).reshape(1, 3, 1, 1)
        texts = list(captions) + hard_negative_captions(labels, neg_share, gen)
        img, txt, scale = model((pixels - mean) / std, tokenize(texts))[:3]
        return clip_contrastive(img, txt, scale, list(captions), texts) + (
            0.0 if heads is None else weight * _head_loss(heads, img, txt[:len(captions)], labels))

    return StageSpec("clip", "clip", clip, ccfg, loss,
                     extra_meta={"open_clip_cfg": ccfg.open_clip_cfg()} if ccfg.vision_tower == "vit" else {},
                     aux=heads, wants_labels=heads is not None or neg_share > 0)


def hard_negative_captions(labels, share: float, gen: torch.Generator) -> list[str]:
    """For each labelled item, with probability ``share``, the canonical caption of a hard negative of its spec
    (world/negatives.py): a caption false of that image that differs from its own in one attribute."""
    if not share or not labels:
        return []
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return [caption_text(hard_negative(lab[0], rng)) for lab in labels if lab and rng.random() < share]


def clip_contrastive(img: torch.Tensor, txt: torch.Tensor, scale, captions: list[str], texts: list[str]):
    """Symmetric InfoNCE between B images and their B captions, with ``texts[B:]`` (hard negatives) as extra
    columns of the image→text softmax only: they have no image of their own. Identical texts are positives of
    each other, not negatives."""
    b = len(captions)
    logits = scale * img @ txt.t()  # (B, B + H)
    same = torch.tensor([[a == t for t in texts] for a in captions], dtype=torch.float32)
    i2t = torch.sum(-(same / same.sum(1, keepdim=True)) * F.log_softmax(logits, 1), 1).mean()
    square = same[:, :b]
    t2i = torch.sum(-(square / square.sum(1, keepdim=True)) * F.log_softmax(logits[:, :b].t(), 1), 1).mean()
    return 0.5 * (i2t + t2i)


def _head_loss(heads: AttributeHeads, img: torch.Tensor, txt: torch.Tensor, labels) -> torch.Tensor:
    specs = [lab[0] if lab else None for lab in labels]
    scenes = [lab[1] if lab else None for lab in labels]
    parts = heads.losses(img, txt, image_targets(scenes), text_targets(specs))
    return sum(parts.values()) / len(parts)


class _FrozenClip:
    """Text and image encodings of a batch from the frozen CLIP (no gradients)."""

    def __init__(self, cfg: TrainConfig):
        self.clip, self.cfg = load_clip(cfg.stage_dir("clip") / "model")
        device = resolve_device(cfg.device)
        self.text = OnDevice(ClipTextEncoder(self.clip).to(device), device)
        self.image = OnDevice(ClipImageEncoder(self.clip).to(device), device)

    @torch.no_grad()
    def __call__(self, images, captions):
        text_embed, text_enc = self.text(tokenize(captions))
        image_embed = self.image(to_pixels(images, self.cfg.image_size))
        return text_embed, text_enc, image_embed


def prior_spec(cfg: TrainConfig) -> StageSpec:
    frozen = _FrozenClip(cfg)
    c = frozen.cfg
    pcfg = model_config(cfg, "prior", **clip_links(c))
    diffusion = Diffusion(pcfg.schedule, pcfg.num_timesteps)

    def loss(model, images, captions, gen):
        text_embed, text_enc, image_embed = frozen(images, captions)
        x0 = image_embed * pcfg.embed_scale  # unit norm × √D: ~unit variance per dimension
        keep = _drop_mask(len(captions), 0.1, gen)
        return diffusion.loss(model, x0, "x0", gen, text_embed=text_embed, text_encodings=text_enc, cond_keep=keep)

    return StageSpec("prior", "prior", DiffusionPrior(pcfg), pcfg, loss)


def decoder_spec(cfg: TrainConfig) -> StageSpec:
    frozen = _FrozenClip(cfg)
    c = frozen.cfg
    dcfg = model_config(cfg, "decoder", **clip_links(c))
    diffusion = Diffusion(dcfg.schedule, dcfg.num_timesteps)

    def loss(model, images, captions, gen):
        _, text_enc, image_embed = frozen(images, captions)
        x0 = to_pixels(images, dcfg.image_size) * 2 - 1  # [-1, 1]
        b = len(captions)
        return diffusion.loss(model, x0, dcfg.parameterization, gen, image_embed=image_embed,
                              text_encodings=text_enc,
                              image_keep=_drop_mask(b, 0.1, gen), text_keep=_drop_mask(b, 0.5, gen))

    return StageSpec("decoder", "decoder", Decoder(dcfg), dcfg, loss,
                     sample_grid=lambda model, path: samples.decoder_grid(model, frozen, path))


def sr_inputs(images, scfg, diffusion: Diffusion, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """(x0 at the SR's size in [−1, 1], its conditioning {low_res, aug_t}) for world images: the image at the low
    resolution, noise-augmented (Ho et al. 2022, CDM) at a random level in [0, T/4) given to the network, so that
    sampling can condition on a lightly noised base-model output."""
    x0 = to_pixels(images, scfg.image_size) * 2 - 1
    low = to_pixels(images, scfg.low_res_size) * 2 - 1
    aug_t = torch.randint(0, scfg.num_timesteps // 4, (x0.shape[0],), generator=gen)
    low = diffusion.q_sample(low, aug_t, torch.randn(low.shape, generator=gen))
    return x0, {"low_res": low, "aug_t": aug_t.float()}


def sr_spec(cfg: TrainConfig) -> StageSpec:
    scfg = model_config(cfg, "sr")
    diffusion = Diffusion(scfg.schedule, scfg.num_timesteps)

    def loss(model, images, captions, gen):
        x0, cond = sr_inputs(images, scfg, diffusion, gen)
        return diffusion.loss(model, x0, scfg.parameterization, gen, **cond)

    return StageSpec("sr", "sr", SuperRes(scfg), scfg, loss, sample_grid=samples.sr_grid)


SPECS = {"clip": clip_spec, "prior": prior_spec, "decoder": decoder_spec, "sr": sr_spec}


def train_clip(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Train CLIP contrastively on the configured data (symmetric InfoNCE, Radford et al. 2021)."""
    return train_stage(clip_spec(cfg), cfg, max_steps=max_steps)


def train_prior(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Train the diffusion prior (x0-MSE; text dropped 10 % of the time) on the frozen CLIP."""
    return train_stage(prior_spec(cfg), cfg, max_steps=max_steps)


def train_decoder(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Train the decoder U-Net (MSE on its parameterization's target, v for the bundled model; image embedding dropped
    10 %, text 50 %) on the frozen CLIP."""
    return train_stage(decoder_spec(cfg), cfg, max_steps=max_steps)


def train_sr(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Train the 32→64 super-resolution U-Net with Gaussian noise augmentation of the low-res image."""
    return train_stage(sr_spec(cfg), cfg, max_steps=max_steps)


def train_all(cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """CLIP, then the prior, the decoder and the upsampler, in one process."""
    for fn in (train_clip, train_prior, train_decoder, train_sr):
        fn(cfg, max_steps=max_steps)
    return Path(cfg.out_dir)
