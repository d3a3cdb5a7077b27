"""DALLE2-pytorch 1.15.x checkpoints -> engine folder: ``python -m export.all --from-dalle2-pytorch``.

    python -m export.all --from-dalle2-pytorch \\
        --prior prior.pth --prior-config train_prior_config.json \\
        --decoder decoder.pth --decoder-config train_decoder_config.json \\
        --clip ViT-B-32 --clip-weights open_clip_vit_b32.bin --out engines/laion

Sources (all local files; nothing is downloaded): a ``DiffusionPrior`` (with its ``DiffusionPriorNetwork``) and a
``Decoder`` (one ``Unet``, or a base ``Unet`` + upsamplers), each as a plain ``state_dict`` file or a trainer's
saved dict (``DiffusionPriorTrainer`` / ``DecoderTrainer.save``: ``model`` plus ``ema`` / ``ema_model``; the EMA
weights are used where present unless ``--dalle2-weights model``), each with its config JSON: LAION's
``TrainDiffusionPriorConfig`` / ``TrainDecoderConfig`` (the ``prior`` / ``decoder`` entry is read) or that entry
alone. The CLIP side is an open_clip model the user names (a built-in architecture name or a model-config JSON)
and its weights file (``OpenClipAdapter``). DALLE2-pytorch itself must be importable where this runs
(``pip install dalle2-pytorch==1.15.6``); the networks are rebuilt with its own classes from the config.

What DALLE2-pytorch does, and where it goes in the manifest (no key names the family):
  predict_x_start / predict_v         ``parameterization`` x0 / v, else eps (per stage, per unet)
  beta_schedule per unet, timesteps   ``schedule``: its ᾱ and β (float64, its formulas) and ``betas``
  prior eps/v: x0 clamped to ±1       ``clip_x0`` [-1, 1] (x0 prior: none); decoder ``clip_denoised``: [-1, 1]
  image_embed_scale, no final l2norm  ``embed_norm`` mean_std with mean 0, std 1/scale: the decoder gets
                                      pred / scale, not normalised (``sampling_final_clamp_l2norm``: ``scale``)
  null text / image parameters        inside the graphs, selected by ``cond_keep`` / ``image_keep`` / ``text_keep``
  learned_variance (first unet)       ``variance: learned_range`` (its Eq. 15 interpolation; guidance on the
                                      prediction channels only, v from the conditional half)
  upsampler lowres_cond               ``sr[m]``: nearest resize folded into the graph, ``noise_aug_t: null``
  unnormalize to [0, 1]               ``output.pixel_range`` [-1, 1] (the runtime maps it to uint8 itself)
  DDPM over all T steps               ``defaults``: ddpm, T steps (``sample_timesteps``: ddim with that many)
  its DDIM loops (fewer steps than T) ``schedule.spacing``: the prior's ``linspace_floor_shifted`` (its grid from
                                      −1, ᾱ_{t−1} in the update) with ``ddim_eta`` 1; each unet's ``linspace_floor``
                                      (down to t = 0) with its ``ddim_sampling_eta`` (its last step adds no noise;
                                      ours does, at σ of t = 0, when that η > 0)
Refused with one line (``export: error: …``): self-conditioning, l2norm clamping while sampling, dynamic
thresholding, Imagen noise augmentation of the low-res image (``use_noise_for_lowres_cond``), upsamplers
conditioned on text, VQGAN latent unets, learned variance on an upsampler, configs whose keys its classes do not
take, weights that do not match the config, and a config number that sizes a network (widths, depths, heads,
image sizes, timesteps; ``PRIOR_KEYS`` … ``UNET_KEYS``) outside the bounds our own config field for the same
quantity states, checked before DALLE2-pytorch allocates anything from it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from dalle2_rt.models import registry
from dalle2_rt.models.clip import OPEN_CLIP_KEYS, ClipConfig
from dalle2_rt.models.config_dict import ConfigError, check_foreign
from dalle2_rt.models.decoder import DecoderConfig
from dalle2_rt.models.prior import PriorConfig
from dalle2_rt.models.unet import UNetConfig

from . import manifest as mf
from .dalle2_pytorch_wrappers import DecoderGraph, PriorGraph, TextEncoderGraph, UpsamplerGraph
from .driver import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportError, ExportResult, Options, build
from .onnx_export import EXPORTER, EXTERNAL_DATA_THRESHOLD
from .sources import SourceError, sha256_file
from .specs import BATCH, BatchProfile, GraphSpec, TensorSpec
from .tokenizer import write_tokenizer

KIND = "dalle2-pytorch"
EXPORT_REVISION = 2  # bump when this module changes what it writes
CANDIDATES = 2  # DiffusionPrior.sample's num_samples_per_batch
WEIGHTS = ("ema", "model")
# The numbers of its configs that size a network, and the field of ours that bounds the same quantity.
PRIOR_KEYS = {  # DiffusionPrior's arguments, "net": DiffusionPriorNetwork's (and its CausalTransformer's)
    "image_embed_dim": (PriorConfig, "embed_dim"), "image_size": (ClipConfig, "image_size"),
    "timesteps": (PriorConfig, "num_timesteps"), "sample_timesteps": (PriorConfig, "num_timesteps"),
    "net.dim": (PriorConfig, "dim"), "net.depth": (PriorConfig, "depth"), "net.heads": (PriorConfig, "heads"),
    "net.dim_head": (ClipConfig, "vision_head_width"), "net.ff_mult": (PriorConfig, "mlp_ratio"),
    "net.max_text_len": (PriorConfig, "context_length"), "net.num_timesteps": (PriorConfig, "num_timesteps"),
    "net.num_time_embeds": (DecoderConfig, "num_image_tokens"),
    "net.num_image_embeds": (DecoderConfig, "num_image_tokens"),
    "net.num_text_embeds": (DecoderConfig, "num_image_tokens"),
}
DECODER_KEYS = {  # Decoder's arguments (a list: one value per unet)
    "image_size": (DecoderConfig, "image_size"), "image_sizes": (DecoderConfig, "image_size"),
    "channels": (UNetConfig, "in_channels"), "timesteps": (DecoderConfig, "num_timesteps"),
    "sample_timesteps": (DecoderConfig, "num_timesteps"),
}
UNET_KEYS = {  # each Unet's arguments
    "dim": (UNetConfig, "channels"), "init_dim": (UNetConfig, "channels"), "dim_mults": (UNetConfig, "channel_mults"),
    "num_resnet_blocks": (UNetConfig, "num_res_blocks"), "attn_heads": (UNetConfig, "heads"),
    "attn_dim_head": (ClipConfig, "vision_head_width"), "resnet_groups": (UNetConfig, "groups"),
    "channels": (UNetConfig, "in_channels"), "channels_out": (UNetConfig, "out_channels"),
    "image_embed_dim": (DecoderConfig, "embed_dim"), "text_embed_dim": (DecoderConfig, "text_width"),
    "cond_dim": (DecoderConfig, "context_dim"), "num_image_tokens": (DecoderConfig, "num_image_tokens"),
    "num_time_tokens": (DecoderConfig, "num_image_tokens"), "max_text_len": (DecoderConfig, "context_length"),
}


# --------------------------------------------------------------------------------------------------------
# schedules: DALLE2-pytorch's NoiseScheduler formulas, in float64 numpy


def betas_for(name: str, T: int) -> np.ndarray:
    """β_t (T,) float64 of DALLE2-pytorch's ``beta_schedule`` names."""
    scale = 1000 / T
    lo, hi = scale * 1e-4, scale * 0.02
    if name == "cosine":  # Nichol & Dhariwal Eq. 17, s = 0.008, β clipped to [0, 0.999]
        x = np.linspace(0, T, T + 1, dtype=np.float64)
        f = np.cos(((x / T) + 0.008) / 1.008 * math.pi * 0.5) ** 2
        abar = f / f[0]
        return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    if name == "linear":
        return np.linspace(lo, hi, T, dtype=np.float64)
    if name == "quadratic":
        return np.linspace(lo ** 0.5, hi ** 0.5, T, dtype=np.float64) ** 2
    if name == "sigmoid":
        return 1 / (1 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64))) * (hi - lo) + lo
    raise SourceError(f"beta_schedule {name!r} is not supported (cosine, linear, quadratic, sigmoid)")


def schedule_entry(name: str, T: int) -> dict:
    betas = betas_for(name, T)
    abar = np.cumprod(1 - betas)
    return {"name": name, "num_timesteps": T, "alphas_cumprod": [float(a) for a in abar], "spacing": "trailing",
            "betas": [float(b) for b in betas]}


# --------------------------------------------------------------------------------------------------------
# reading the sources


@dataclass(frozen=True)
class Component:
    """One source file set, as the manifest's ``sources`` records it."""

    stage: str  # prior | decoder | clip
    kind: str
    folder: Path
    meta: dict
    sha256: str  # of the weights file
    meta_sha256: str  # of the config file (or the architecture name)


def _read_json(path: Path) -> dict:
    try:
        data = registry.read_json(path)  # a regular file, bounded in size, depth and numbers
    except FileNotFoundError:
        raise SourceError(f"{path}: cannot read (no such file)") from None
    except registry.CheckpointError as e:
        raise SourceError(str(e)) from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a JSON object")
    return data


def check_sizes(config: dict, table: dict, where: str) -> None:
    """``config``'s numbers that ``table`` names, within our bounds for the same quantity (``check_foreign``)."""
    try:
        check_foreign(config, table, where)
    except ConfigError as e:
        raise SourceError(str(e)) from None


def _section(path: Path, key: str) -> dict:
    """The ``prior`` / ``decoder`` entry of a LAION train config, or the file itself when it is that entry."""
    data = _read_json(path)
    section = data.get(key, data)
    if not isinstance(section, dict):
        raise SourceError(f"{path}: {key!r} is not an object")
    return dict(section)


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle torch refuses: one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise SourceError(f"{path}: cannot load: {type(e).__name__}: {first[:200]}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a trainer's saved dict")
    return obj


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def prior_state(obj: dict, weights: str) -> dict:
    """The DiffusionPrior state_dict of a plain file or a DiffusionPriorTrainer save (EMA first)."""
    if "model" not in obj:
        return obj
    if weights == "ema" and isinstance(obj.get("ema_model"), dict):
        return obj["ema_model"]
    if weights == "ema" and isinstance(obj.get("ema"), dict):
        return _strip(obj["ema"], "ema_model.")
    return obj["model"]


def decoder_state(obj: dict, weights: str) -> dict:
    """The Decoder state_dict of a plain file or a DecoderTrainer save: ``ema`` (a ModuleList of EMA wrappers,
    keys ``<i>.ema_model.…``) replaces each unet's weights when present."""
    if "model" not in obj:
        return obj
    state = dict(obj["model"])
    if weights == "ema" and isinstance(obj.get("ema"), dict):
        for key, value in obj["ema"].items():
            index, _, rest = key.partition(".")
            if rest.startswith("ema_model."):
                state[f"unets.{index}.{rest[len('ema_model.'):]}"] = value
    return state


def _build(what: str, path: Path, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    try:
        return make()
    except (TypeError, AssertionError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise SourceError(f"{path}: cannot build the {what} from its config: {first[:300]}") from None


def _load_into(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("clip.")}  # a frozen CLIP saved alongside
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} vs "
                 f"{tuple(own[shapes[0]].shape)})" if shapes else ""]
        raise SourceError(f"{path}: the weights do not match the {what} config: "
                          + "; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)
    module.eval().requires_grad_(False)


def _dalle2():
    try:
        import dalle2_pytorch
    except ImportError as e:
        raise ExportError(f"--from-dalle2-pytorch needs DALLE2-pytorch where the export runs "
                          f"(pip install dalle2-pytorch==1.15.6): {e}") from None
    return dalle2_pytorch


def build_prior(config: Path, weights: Path, which: str):
    cfg = _section(config, "prior")
    net_cfg = cfg.pop("net", None)
    if not isinstance(net_cfg, dict):
        raise SourceError(f"{config}: the prior config has no 'net' object (DiffusionPriorNetwork's arguments)")
    cfg.pop("clip", None)  # the CLIP side comes from --clip
    for key, bad in (("sampling_clamp_l2norm", True), ("self_cond", True)):
        if cfg.get(key) == bad or net_cfg.get(key) == bad:
            raise SourceError(f"{config}: {key} = true is not supported")
    check_sizes({**cfg, "net": net_cfg}, PRIOR_KEYS, f"{config}: prior")
    d2 = _dalle2()
    prior = _build("DiffusionPrior", config, lambda: d2.DiffusionPrior(
        net=d2.DiffusionPriorNetwork(**net_cfg), clip=None, **cfg))
    _load_into(prior, prior_state(_torch_load(weights), which), "DiffusionPrior", weights)
    return prior


def build_decoder(config: Path, weights: Path, which: str):
    cfg = _section(config, "decoder")
    unets = cfg.pop("unets", None)
    if not isinstance(unets, list) or not unets or not all(isinstance(u, dict) for u in unets):
        raise SourceError(f"{config}: the decoder config has no 'unets' list of Unet arguments")
    cfg.pop("clip", None)
    for key in ("use_dynamic_thres", "use_noise_for_lowres_cond", "vae"):
        if any(v for v in np.atleast_1d(cfg.get(key) or False)):
            raise SourceError(f"{config}: {key} is not supported")
    if any(u.get("self_cond") for u in unets):
        raise SourceError(f"{config}: self_cond = true is not supported")
    if any(u.get("cond_on_text_encodings") for u in unets[1:]):
        raise SourceError(f"{config}: an upsampler unet conditioned on text encodings is not supported "
                          "(the runtime's super-resolution stages take the low-res image only)")
    check_sizes(cfg, DECODER_KEYS, f"{config}: decoder")
    for i, unet in enumerate(unets):
        check_sizes(unet, UNET_KEYS, f"{config}: decoder.unets[{i}]")
    d2 = _dalle2()
    decoder = _build("Decoder", config, lambda: d2.Decoder(tuple(d2.Unet(**u) for u in unets), clip=None, **cfg))
    if any(decoder.learned_variance[1:]):
        raise SourceError(f"{config}: learned variance on an upsampler unet is not supported")
    _load_into(decoder, decoder_state(_torch_load(weights), which), "Decoder", weights)
    return decoder


def build_clip(name: str, weights: Path):
    try:
        import open_clip
    except ImportError as e:
        raise ExportError(f"--clip needs open_clip (pip install open_clip_torch): {e}") from None
    arch = name
    if name.endswith(".json"):  # a model-config file: registered under its stem, as open_clip does
        path = Path(name)
        check_sizes(_read_json(path), OPEN_CLIP_KEYS, f"{path}: open_clip")
        open_clip.add_model_config(path)
        arch = path.stem
    if arch not in open_clip.list_models():
        raise SourceError(f"--clip {name!r} is neither an open_clip architecture nor a model-config .json")
    if not weights.is_file():
        raise SourceError(f"{weights}: no such file")
    try:
        model = open_clip.create_model(arch, pretrained=str(weights), device="cpu")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise SourceError(f"{weights}: cannot load it into open_clip {arch!r}: {type(e).__name__}: "
                          f"{first[:300]}") from None
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------
# the family


def _kind(predict_v: bool, predict_x_start: bool) -> str:
    return "v" if predict_v else "x0" if predict_x_start else "eps"


class Dalle2PytorchFamily:
    """DALLE2-pytorch prior + decoder checkpoints and an open_clip model, as the export driver's ``Family``."""

    def __init__(self, *, prior: Path, prior_config: Path, decoder: Path, decoder_config: Path, clip: str,
                 clip_weights: Path, weights: str = "ema"):
        if weights not in WEIGHTS:
            raise SourceError(f"--dalle2-weights must be one of {WEIGHTS}, got {weights!r}")
        self.folder = Path(decoder).parent
        self.prior = build_prior(Path(prior_config), Path(prior), weights)
        self.decoder = build_decoder(Path(decoder_config), Path(decoder), weights)
        self.clip = build_clip(clip, Path(clip_weights))
        self.components = [
            Component("clip", "open_clip", Path(clip_weights).parent, {"architecture": clip},
                      sha256_file(Path(clip_weights)), mf.digest(clip if not clip.endswith(".json")
                                                                 else sha256_file(Path(clip)))),
            Component("prior", "dalle2-pytorch:DiffusionPrior", Path(prior).parent, {"weights": weights},
                      sha256_file(Path(prior)), sha256_file(Path(prior_config))),
            Component("decoder", "dalle2-pytorch:Decoder", Path(decoder).parent, {"weights": weights},
                      sha256_file(Path(decoder)), sha256_file(Path(decoder_config))),
        ]
        self._check_dims()

    def _check_dims(self) -> None:
        p, d = self.prior, self.decoder
        width = int(self.clip.ln_final.weight.shape[0])
        embed = int(self.clip.text_projection.shape[1]) if hasattr(self.clip, "text_projection") else None
        problems = []
        if embed is not None and embed != p.image_embed_dim:
            problems.append(f"the prior's image_embed_dim {p.image_embed_dim} is not CLIP's embedding size {embed}")
        if p.condition_on_text_encodings and p.net.dim != width:
            problems.append(f"the prior (dim {p.net.dim}) attends to text encodings of CLIP's width {width}")
        base = d.unets[0]
        if base.cond_on_text_encodings and base.text_embed_dim != width:
            problems.append(f"unet 1's text_embed_dim {base.text_embed_dim} is not CLIP's text width {width}")
        if d.condition_on_text_encodings != base.cond_on_text_encodings:
            problems.append("only the first unet may condition on text encodings")
        if problems:
            raise SourceError("the checkpoints do not fit together: " + "; ".join(problems))

    # --- the driver's Family ---

    def all(self) -> list[Component]:
        return list(self.components)

    def tools(self, opset: int) -> dict:
        try:
            d2 = version("dalle2-pytorch")
        except PackageNotFoundError:
            d2 = "unknown"
        return {**mf.tool_versions(opset, EXPORTER), "converter": f"{KIND}/{EXPORT_REVISION}", "dalle2_pytorch": d2}

    def _digests(self, names) -> dict:
        return {c.stage: [c.sha256, c.meta_sha256] for c in self.components if c.stage in names}

    def fingerprint(self, name: str, tools: dict, options: dict) -> str:
        return mf.digest({"name": name, "tools": tools, "options": options,
                          "sources": self._digests({"clip", "prior", "decoder"})})

    def graph_fingerprint(self, spec: GraphSpec, tools: dict) -> str:
        return mf.digest({"tools": tools, "io": spec.io_entry(), "name": spec.name,
                          "sources": self._digests({spec.source})})

    def _text_dims(self) -> tuple[int, int, int, int]:
        L = int(self.clip.context_length)
        W = int(self.clip.ln_final.weight.shape[0])
        return L, W, int(self.prior.image_embed_dim), int(self.clip.vocab_size)

    def graph_specs(self, max_batch: int) -> list[GraphSpec]:
        L, W, D, vocab = self._text_dims()
        p, d = self.prior, self.decoder
        enc = TensorSpec("text_encodings", (BATCH, L, W))
        specs = [GraphSpec("text_encoder", "clip", inputs=(TensorSpec("tokens", (BATCH, L), "int64", "tokens",
                                                                                vocab),),
                           outputs=(TensorSpec("text_embed", (BATCH, D)), enc), batch=BatchProfile(1, 1, max_batch),
                           factory=lambda: TextEncoderGraph(self.clip).eval())]
        Tp = p.noise_scheduler.num_timesteps
        specs.append(GraphSpec(
            "prior", "prior",
            inputs=(TensorSpec("x_t", (BATCH, D)), TensorSpec("t", (BATCH,), fill="timestep", high=Tp),
                    TensorSpec("text_embed", (BATCH, D), fill="unit"),
                    *((enc,) if p.condition_on_text_encodings else ()),
                    TensorSpec("cond_keep", (BATCH,), fill="keep")),
            outputs=(TensorSpec("pred", (BATCH, D)),),
            batch=BatchProfile(1, 2 * CANDIDATES, 2 * max_batch * CANDIDATES),
            factory=lambda: PriorGraph(self.prior.net).eval()))
        sizes, C = d.image_sizes, d.channels
        for i, unet in enumerate(d.unets):
            s = int(sizes[i])
            T = d.noise_schedulers[i].num_timesteps
            x = TensorSpec("x_t", (BATCH, C, s, s))
            t = TensorSpec("t", (BATCH,), fill="timestep", high=T)
            out = (TensorSpec("pred", (BATCH, unet.channels_out, s, s)),)
            if i == 0:
                specs.append(GraphSpec(
                    "decoder", "decoder",
                    inputs=(x, t, TensorSpec("image_embed", (BATCH, D), fill="unit"),
                            *((enc,) if unet.cond_on_text_encodings else ()),
                            TensorSpec("image_keep", (BATCH,), fill="keep"),
                            TensorSpec("text_keep", (BATCH,), fill="keep")),
                    outputs=out, batch=BatchProfile(1, 2, 2 * max_batch),
                    factory=lambda u=unet: DecoderGraph(u).eval()))
            else:
                low = int(sizes[i - 1])
                specs.append(GraphSpec(
                    f"sr{i - 1}", "decoder",
                    inputs=(x, t, TensorSpec("low_res", (BATCH, C, low, low), fill="signed")),
                    outputs=out, batch=BatchProfile(1, 1, 2 * max_batch),
                    factory=lambda u=unet, s=s: UpsamplerGraph(u, s).eval()))
        return specs

    def stage_entries(self, specs: list[GraphSpec]) -> dict:
        L, W, D, _ = self._text_dims()
        p, d = self.prior, self.decoder
        prior_kind = _kind(p.predict_v, p.predict_x_start)
        Tp = p.noise_scheduler.num_timesteps
        scale = float(p.image_embed_scale)
        norm = ({"kind": "scale", "scale": scale} if p.sampling_final_clamp_l2norm and p.predict_x_start
                else {"kind": "mean_std", "mean": [0.0] * D, "std": [1.0 / scale] * D})
        prior_betas = p.noise_scheduler.betas  # the schedule's name is not kept on the module: match it
        # its DDIM loops (S < T): the prior's on trunc(linspace(−1, T, S + 1)) with ᾱ_{t−1} in the update and η = 1
        # (DiffusionPrior.p_sample_loop_ddim's default, which sample() keeps), the decoder's on
        # trunc(linspace(0, T, S + 2)) down to t = 0 with its ddim_sampling_eta (schedules.respace)
        prior_schedule = {**self._schedule_of(prior_betas, Tp), "spacing": "linspace_floor_shifted", "ddim_eta": 1.0}

        def defaults(sample_timesteps, T, guidance, **extra):
            steps = int(sample_timesteps or T)
            return {"sampler": "ddpm" if steps == T else "ddim", "steps": steps, "guidance": guidance, **extra}

        stages = {
            "text_encoder": {"graph": "text_encoder", "embed_dim": D, "text_width": W, "context_length": L},
            "prior": {"graph": "prior", "parameterization": prior_kind, "schedule": prior_schedule,
                      "embed_dim": D, "embed_scale": scale, "embed_norm": norm,
                      # p_sample(clip_denoised=True) clamps x0 to ±1 unless the network predicts x0
                      "clip_x0": None if prior_kind == "x0" else [-1.0, 1.0],
                      "variance": "small", "guidance_on": prior_kind, "cond_input": "cond_keep",
                      "defaults": defaults(p.sample_timesteps, Tp, 1.0, candidates=CANDIDATES)},
            "sr": [],
        }
        for i in range(len(d.unets)):
            sched = d.noise_schedulers[i]
            kind = _kind(d.predict_v[i], d.predict_x_start[i])
            schedule = {**self._schedule_of(sched.betas, sched.num_timesteps), "spacing": "linspace_floor"}
            if float(d.ddim_sampling_eta) > 0:
                schedule["ddim_eta"] = float(d.ddim_sampling_eta)
            entry = {"parameterization": kind, "schedule": schedule,
                     "clip_x0": [-1.0, 1.0] if d.clip_denoised else None,
                     "variance": "learned_range" if d.learned_variance[i] else "small",
                     "image_size": int(d.image_sizes[i]), "channels": int(d.channels)}
            if i == 0:
                stages["decoder"] = {"graph": "decoder", **entry, "guidance_on": kind,
                                     "cond_inputs": ["image_keep", "text_keep"],
                                     "defaults": defaults(d.sample_timesteps[0], sched.num_timesteps, 1.0,
                                                          candidates=1)}
            else:
                stages["sr"].append({"graph": f"sr{i - 1}", **entry, "low_res_size": int(d.image_sizes[i - 1]),
                                     "noise_aug_t": None, "low_res_resize": {"mode": "nearest", "in_graph": True},
                                     "defaults": {k: v for k, v in defaults(d.sample_timesteps[i],
                                                                            sched.num_timesteps, 1.0).items()
                                                  if k != "guidance"}})
        return stages

    @staticmethod
    def _schedule_of(betas: torch.Tensor, T: int) -> dict:
        """The schedule entry whose β (our float64 rebuild of its formula) the module's float32 buffer holds."""
        stored = betas.double().numpy()
        for name in ("cosine", "linear", "quadratic", "sigmoid"):
            ours = betas_for(name, T)
            if np.allclose(ours, stored, rtol=1e-6, atol=1e-9):
                return schedule_entry(name, T)
        raise SourceError("a noise schedule is none of cosine, linear, quadratic, sigmoid (jsd is not supported)")

    def output_entry(self, stages: dict) -> dict:
        last = stages["sr"][-1] if stages["sr"] else stages["decoder"]
        return {"image_size": last["image_size"], "pixel_range": [-1, 1]}

    def write_tokenizer(self, folder: Path) -> dict:
        return write_tokenizer(folder, context_length=int(self.clip.context_length))


def export_dalle2_pytorch(*, prior: str | Path, prior_config: str | Path, decoder: str | Path,
                          decoder_config: str | Path, clip: str, clip_weights: str | Path, weights: str = "ema",
                          out: str | Path | None = None, name: str | None = None, opset: int = DEFAULT_OPSET,
                          max_batch: int = DEFAULT_MAX_BATCH, force: bool = False, quiet: bool = False,
                          precision: str = "fp16", trt: bool = False,
                          external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, int8: tuple[str, ...] = (),
                          log: Callable[[str], None] | None = None) -> ExportResult:
    """Convert DALLE2-pytorch checkpoints into the engine folder ``out`` (default ``engines/<decoder's folder>``),
    through the export driver as ``export.all.export_folder``: every source is loaded and checked before the
    first graph is exported, and ``out`` is as it was after any error."""
    options = Options(opset=opset, max_batch=max_batch, precision=precision, trt=trt, force=force,
                      external_data_threshold=external_data_threshold, int8=tuple(int8))
    family = Dalle2PytorchFamily(prior=Path(prior), prior_config=Path(prior_config), decoder=Path(decoder),
                                 decoder_config=Path(decoder_config), clip=clip, clip_weights=Path(clip_weights),
                                 weights=weights)
    out = Path(out) if out is not None else Path("engines") / family.folder.name
    return build(family, out, name=name or out.name, options=options, quiet=quiet, log=log)
