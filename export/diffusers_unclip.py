"""diffusers ``UnCLIPPipeline`` folder (karlo) -> engine folder: ``python -m export.all --from-diffusers PATH``.

Reads a folder written by ``UnCLIPPipeline.save_pretrained`` (or a karlo-v1-alpha snapshot), component by
component, from disk only (``HF_HUB_OFFLINE``, ``local_files_only``): text_encoder + tokenizer, prior,
text_proj + decoder, super_res_first, super_res_last and the three UnCLIPSchedulers. ``UnclipFolder`` is this
family for the export driver (``driver.py``, shared with our own checkpoints): opening it checks every component
(configs, read as untrusted files, their numbers that size a network within the bounds of our own config field for
the same quantity, ``CONFIG_KEYS``; whole weight files) before anything is exported. Writes one ONNX graph per
network (``onnx_export.py``: trace, ONNX Runtime check at several batch sizes, optimised copy), the tokenizer as
``clip-bpe/1`` (``hf_clip_tokenizer.py``) and a manifest whose stage entries describe everything this family does
differently from ours; the runtime reads those keys and never the model's name. The keys are listed in
ARCHITECTURE.md, "Schema additions for imported families"; the wrappers that give the networks our graph I/O are
in ``diffusers_wrappers.py``.

What UnCLIPPipeline (diffusers 0.42) does, and where it goes:
  tokens, attention mask         tokenizer file + ``text_encoder.text_mask: "tokens"``
  uncond = text encoder on ""    ``uncond_text: "empty_prompt"`` (prior, decoder)
  prior (x0, clip ±r, CFG on x0) ``parameterization: "x0"``, ``clip_x0``, inputs text_embed/text_mask
  latents·clip_std + clip_mean   ``prior.embed_norm: {"kind": "mean_std", ...}`` (no L2 normalisation)
  text_proj + learned CFG embed  folded into the decoder graph (``image_keep`` = 0 picks the learned one)
  learned-range variance         ``decoder.variance: "learned_range"`` (guidance on eps, v from the cond half)
  fixed_small_log variance       ``variance: "small"``
  UnCLIPScheduler timesteps      ``schedule.spacing: "linspace"``; its float32 ᾱ and β_t recorded as they are
                                 (``schedule.betas``: step() uses β_t between adjacent timesteps)
  bicubic-antialias upscale      folded into the SR graphs; ``noise_aug_t: null`` (no augmentation)
  super_res_first / _last        ``sr[0].graph`` / ``sr[0].last_step_graph``
  (x·0.5 + 0.5).clamp(0, 1)      ``output.pixel_range: [-1, 1]``
Size: protobuf caps a file at 2 GB and karlo's prior (~1B parameters, ~4 GB) and decoder are larger in fp32, so
a graph with more than ``--external-data-threshold`` bytes of weights (1 GiB) is written as ``<graph>.onnx`` +
``<graph>.onnx.data`` (``onnx_export.py``), and so is its optimised copy; the manifest lists the data files
(graph entry ``external_data`` / ``optimized_external_data``, and ``files``). ``--trt`` builds plans through
the native exporter's path (``trt.build_missing``). Known limits: exercised only on a tiny random-weight
pipeline (the tests force the threshold to 0 so that every graph takes the external-data path); the real
karlo-v1-alpha weights and the TensorRT plans have never been run through this converter here (no GPU, no
TensorRT, no karlo snapshot on this machine).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from dalle2_rt.models import registry
from dalle2_rt.models.clip import ClipConfig
from dalle2_rt.models.config_dict import ConfigError, check_foreign
from dalle2_rt.models.decoder import DecoderConfig
from dalle2_rt.models.prior import PriorConfig
from dalle2_rt.models.sr import SRConfig
from dalle2_rt.models.unet import UNetConfig
from dalle2_rt.runtime.schedules import respace

from . import manifest as mf
from .diffusers_wrappers import SR_RESIZE, DecoderGraph, PriorGraph, SuperResGraph, TextEncoderGraph
from .driver import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportError, ExportResult, Options, build
from .hf_clip_tokenizer import write_tokenizer
from .onnx_export import EXPORTER, EXTERNAL_DATA_THRESHOLD
from .sources import SourceError, sha256_file
from .specs import BATCH, BatchProfile, GraphSpec, TensorSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / diffusers read it: never download

KIND = "diffusers-unclip"
EXPORT_REVISION = 3  # bump when this module changes what it writes
COMPONENTS = ("text_encoder", "tokenizer", "prior", "text_proj", "decoder", "super_res_first", "super_res_last",
              "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
NETWORKS = ("text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last")
# The components whose files make each graph: its fingerprint covers their digests (text_proj is folded into
# the decoder graph).
GRAPH_COMPONENTS = {"text_encoder": ("text_encoder",), "prior": ("prior",), "decoder": ("text_proj", "decoder"),
                    "super_res_first": ("super_res_first",), "super_res_last": ("super_res_last",)}
# UnCLIPPipeline.__call__ defaults (diffusers 0.42); DDPM is what UnCLIPScheduler.step is.
DEFAULTS = {
    "prior": {"sampler": "ddpm", "steps": 25, "guidance": 4.0, "candidates": 1},
    "decoder": {"sampler": "ddpm", "steps": 25, "guidance": 8.0},
    "sr": {"sampler": "ddpm", "steps": 7},
}
CANDIDATES_MAX = 2  # the prior graph's batch range allows this many candidates per guided image
# The numbers of each component's config that size its network (or the graphs' sample inputs), and the field of
# ours that bounds the same quantity: checked when the folder is opened, before diffusers builds anything.
_UNET_KEYS = {"in_channels": (UNetConfig, "in_channels"), "out_channels": (UNetConfig, "out_channels"),
              "block_out_channels": (UNetConfig, "channels"), "layers_per_block": (UNetConfig, "num_res_blocks"),
              "attention_head_dim": (ClipConfig, "vision_head_width"), "norm_num_groups": (UNetConfig, "groups")}
CONFIG_KEYS = {
    "text_encoder": {"projection_dim": (ClipConfig, "embed_dim"), "hidden_size": (ClipConfig, "text_width"),
                     "intermediate_size": (PriorConfig, "dim"), "num_hidden_layers": (ClipConfig, "text_layers"),
                     "num_attention_heads": (ClipConfig, "text_heads"),
                     "max_position_embeddings": (ClipConfig, "context_length"),
                     "vocab_size": (ClipConfig, "vocab_size")},
    "prior": {"embedding_dim": (PriorConfig, "embed_dim"), "num_embeddings": (PriorConfig, "context_length"),
              "num_layers": (PriorConfig, "depth"), "num_attention_heads": (PriorConfig, "heads"),
              "attention_head_dim": (ClipConfig, "vision_head_width"),
              "additional_embeddings": (DecoderConfig, "num_image_tokens"),
              "time_embed_dim": (PriorConfig, "dim"), "clip_embed_dim": (PriorConfig, "embed_dim")},
    "text_proj": {"clip_embeddings_dim": (DecoderConfig, "embed_dim"),
                  "clip_extra_context_tokens": (DecoderConfig, "num_image_tokens"),
                  "cross_attention_dim": (DecoderConfig, "context_dim"), "time_embed_dim": (UNetConfig, "emb_dim")},
    "decoder": {**_UNET_KEYS, "sample_size": (DecoderConfig, "image_size"),
                "cross_attention_dim": (DecoderConfig, "context_dim")},
    "super_res_first": {**_UNET_KEYS, "sample_size": (SRConfig, "image_size")},
    "super_res_last": {**_UNET_KEYS, "sample_size": (SRConfig, "image_size")},
    **{f"{k}_scheduler": {"num_train_timesteps": (PriorConfig, "num_timesteps")}
       for k in ("prior", "decoder", "super_res")},
    "tokenizer": {"model_max_length": (ClipConfig, "context_length")},
}
PREDICTION = {"epsilon": "eps", "sample": "x0"}  # UnCLIPScheduler prediction_type -> our parameterization
VARIANCE = {"fixed_small_log": "small", "learned_range": "learned_range"}


def _text_proj_class():
    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:  # diffusers before the unclip pipelines moved to deprecated/
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    return UnCLIPTextProjModel


def _loaders() -> dict[str, Callable[[Path], object]]:
    try:
        import diffusers
        import transformers
        from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError as e:
        raise ExportError(f"--from-diffusers needs diffusers and transformers (pip install 'dalle2-rt[diffusers]'): "
                          f"{e}") from None

    for lib in (diffusers, transformers):  # the export prints its own progress
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

    def model(cls):
        return lambda p: cls.from_pretrained(p, local_files_only=True).float().eval().requires_grad_(False)

    def scheduler(p: Path):
        cfg = _read_json(p / "scheduler_config.json", p.name)
        if cfg.get("_class_name") != "UnCLIPScheduler":
            raise SourceError(f"{p}: scheduler {cfg.get('_class_name')!r}; this converter reads UnCLIPScheduler")
        return UnCLIPScheduler.from_config(cfg)

    return {
        "text_encoder": model(CLIPTextModelWithProjection),
        "tokenizer": lambda p: CLIPTokenizer.from_pretrained(p, local_files_only=True),
        "prior": model(PriorTransformer), "text_proj": model(_text_proj_class()),
        "decoder": model(UNet2DConditionModel),
        "super_res_first": model(UNet2DModel), "super_res_last": model(UNet2DModel),
        "prior_scheduler": scheduler, "decoder_scheduler": scheduler, "super_res_scheduler": scheduler,
    }


@dataclass(frozen=True)
class Component:
    """One sub-folder of the pipeline: what the manifest's ``sources`` records (duck-types ``sources.Source``)."""

    stage: str
    kind: str
    folder: Path
    meta: dict
    sha256: str  # over every file of the sub-folder: {relative path: sha256}
    meta_sha256: str  # of its config file


def _read_json(path: Path, component: str | None = None) -> dict:
    """A config file of the folder (a regular file, bounded in size, depth and numbers), and with ``component``
    its numbers that size a network checked (``CONFIG_KEYS``)."""
    try:
        data = registry.read_json(path, limit=16 * 2**20)  # tokenizer_config.json can list many added tokens
    except FileNotFoundError:
        raise SourceError(f"{path}: not found") from None
    except registry.CheckpointError as e:
        raise SourceError(str(e)) from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    try:
        check_foreign(data, CONFIG_KEYS.get(component, {}), f"{path}: config")
    except ConfigError as e:
        raise SourceError(str(e)) from None
    return data


def _check_weights(sub: Path) -> None:
    """The weight files ``from_pretrained`` would read in ``sub`` are there and whole, read from their headers
    only (karlo's are GBs): a safetensors file whose header does not cover the file (truncated), a torch zip
    archive without its central directory (truncated), a shard an index names that is missing."""
    from safetensors import SafetensorError, safe_open

    plain = [p for p in sorted(sub.iterdir()) if p.is_file() and p.suffix in (".safetensors", ".bin")
             and "." not in p.stem]  # name.fp16.safetensors is a variant, which from_pretrained skips
    if not plain:
        raise SourceError(f"{sub}: no weights (*.safetensors or *.bin)")
    for index in sub.glob("*.index.json"):
        shards = set(_read_json(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (sub / s).is_file())
        if missing:
            raise SourceError(f"{index}: shard(s) {', '.join(missing)} not found")
    for path in plain:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{path}: not a complete safetensors file ({e})") from None
        else:
            # torch.save writes a zip archive (since torch 1.6), whose central directory is at the end.
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as e:
                raise SourceError(f"{path}: not a complete torch archive ({e})") from None


class UnclipFolder:
    """The folder's components as the export driver's ``Family``, loaded on first use (karlo's networks are
    GBs: each graph loads only its own). Opening it checks what can be checked without loading a network:
    the folder and every component exist, each has its config, and each network's weight files are whole."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not self.folder.exists():
            raise SourceError(f"{self.folder} does not exist")
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder} is not a directory (--from-diffusers takes a pipeline folder)")
        index = self.folder / "model_index.json"
        if not index.is_file():
            raise SourceError(f"{self.folder}: no model_index.json; not a diffusers pipeline folder")
        self.index = _read_json(index)
        if self.index.get("_class_name") != "UnCLIPPipeline":
            raise SourceError(f"{index}: pipeline {self.index.get('_class_name')!r}; --from-diffusers reads an "
                              "UnCLIPPipeline (text-to-image unCLIP, e.g. karlo-v1-alpha)")
        missing = [c for c in COMPONENTS if not (self.folder / c).is_dir()]
        if missing:
            raise SourceError(f"{self.folder}: missing component folders {missing}")
        for name in COMPONENTS:
            self._check(name)
        self._loaders = _loaders()
        self._cache: dict[str, object] = {}
        self.components = [self._component(c) for c in COMPONENTS]
        self.configs = {c.stage: c.meta for c in self.components}

    def _check(self, name: str) -> None:
        sub = self.folder / name
        if name in NETWORKS:
            _read_json(sub / "config.json", name)
            _check_weights(sub)
        elif name.endswith("_scheduler"):
            _read_json(sub / "scheduler_config.json", name)
        elif not (sub / "tokenizer.json").is_file() and not all((sub / f).is_file() for f in ("vocab.json",
                                                                                              "merges.txt")):
            raise SourceError(f"{sub}: no tokenizer.json, nor vocab.json + merges.txt")
        elif (sub / "tokenizer_config.json").exists():
            _read_json(sub / "tokenizer_config.json", name)

    def _component(self, name: str) -> Component:
        sub = self.folder / name
        files = {p.relative_to(sub).as_posix(): sha256_file(p) for p in sorted(sub.rglob("*")) if p.is_file()}
        config_name = next((f for f in ("config.json", "scheduler_config.json", "tokenizer_config.json")
                            if f in files), None)
        meta = _read_json(sub / config_name) if config_name else {}
        kind = ":".join(self.index.get(name, ["", ""])) or name
        return Component(name, kind, sub, meta, mf.digest(files), files.get(config_name, ""))

    def get(self, name: str, *, keep: bool = True):
        if name in self._cache:
            return self._cache[name]
        try:
            obj = self._loaders[name](self.folder / name)
        except SourceError:
            raise
        except Exception as e:
            # from_pretrained reports a broken folder as OSError, ValueError, KeyError, RuntimeError or a
            # SafetensorError (an Exception); whichever, the export says so in one line (the cause stays chained).
            first = (str(e).strip().splitlines() or [""])[0]
            raise SourceError(f"{self.folder / name}: cannot load {name}: {type(e).__name__}: {first}") from e
        if keep:
            self._cache[name] = obj
        return obj

    def config(self, component: str, key: str):
        """``key`` of a component's config, or a SourceError naming the file and the key."""
        cfg = self.configs[component]
        if key not in cfg:
            raise SourceError(f"{self.folder / component}: its config has no {key!r}")
        return cfg[key]

    # --- the driver's Family ---

    def all(self) -> list[Component]:  # what manifest.build_manifest reads of a Sources
        return list(self.components)

    def tools(self, opset: int) -> dict:
        return {**mf.tool_versions(opset, EXPORTER), "converter": f"{KIND}/{EXPORT_REVISION}",
                **{n: version(n) for n in ("diffusers", "transformers", "tokenizers")}}

    def _digests(self, names) -> dict:
        by_name = {c.stage: c for c in self.components}
        return {n: [by_name[n].sha256, by_name[n].meta_sha256] for n in names}

    def fingerprint(self, name: str, tools: dict, options: dict) -> str:
        return mf.digest({"name": name, "tools": tools, "options": options, "defaults": DEFAULTS,
                          "sources": self._digests(COMPONENTS)})

    def graph_fingerprint(self, spec: GraphSpec, tools: dict) -> str:
        return mf.digest({"tools": tools, "io": spec.io_entry(), "name": spec.name,
                          "sources": self._digests(GRAPH_COMPONENTS[spec.name])})

    def graph_specs(self, max_batch: int) -> list[GraphSpec]:
        return graph_specs(self, max_batch=max_batch)

    def stage_entries(self, specs: list[GraphSpec]) -> dict:
        return stage_entries(self)

    def output_entry(self, stages: dict) -> dict:
        return {"image_size": stages["sr"][-1]["image_size"], "pixel_range": [-1, 1]}

    def write_tokenizer(self, folder: Path) -> dict:
        return write_tokenizer(folder, self.get("tokenizer"))


# --------------------------------------------------------------------------------------------------------
# graph specs


def _dims(pipe: UnclipFolder) -> dict:
    """The sizes the graphs are exported at, checked for agreement between components."""
    c = pipe.config
    tok = pipe.get("tokenizer")
    d = {
        "embed_dim": int(c("text_encoder", "projection_dim")), "text_width": int(c("text_encoder", "hidden_size")),
        "context_length": int(tok.model_max_length), "vocab_size": int(c("text_encoder", "vocab_size")),
        "channels": int(c("decoder", "in_channels")), "decoder_size": int(c("decoder", "sample_size")),
        "decoder_out": int(c("decoder", "out_channels")), "sr_size": int(c("super_res_first", "sample_size")),
    }
    problems = []
    checks = [
        ("prior.embedding_dim", c("prior", "embedding_dim"), d["embed_dim"]),
        ("prior.num_embeddings", c("prior", "num_embeddings"), d["context_length"]),
        ("text_proj.clip_embeddings_dim", c("text_proj", "clip_embeddings_dim"), d["embed_dim"]),
        ("text_encoder.hidden_size (prior and text_proj project it as an embedding)", d["text_width"], d["embed_dim"]),
        ("super_res_first.in_channels", c("super_res_first", "in_channels"), 2 * d["channels"]),
        ("super_res_first.out_channels", c("super_res_first", "out_channels"), d["channels"]),
    ]
    for key in ("in_channels", "out_channels", "sample_size"):
        checks.append((f"super_res_last.{key}", c("super_res_last", key), c("super_res_first", key)))
    for what, got, want in checks:
        if int(got) != int(want):
            problems.append(f"{what} = {got}, expected {want}")
    if d["context_length"] > int(c("text_encoder", "max_position_embeddings")):
        problems.append(f"tokenizer model_max_length {d['context_length']} > text_encoder max_position_embeddings")
    if problems:
        raise SourceError(f"{pipe.folder}: components do not fit together: " + "; ".join(problems))
    return d


def graph_specs(pipe: UnclipFolder, *, max_batch: int) -> list[GraphSpec]:
    d = _dims(pipe)
    D, L, W, C = d["embed_dim"], d["context_length"], d["text_width"], d["channels"]
    s, S = d["decoder_size"], d["sr_size"]
    T = {k: int(pipe.get(f"{k}_scheduler").config.num_train_timesteps) for k in ("prior", "decoder", "super_res")}
    tokens = TensorSpec("tokens", (BATCH, L), "int64", "tokens", d["vocab_size"])
    mask = TensorSpec("text_mask", (BATCH, L), fill="keep")  # 1/0 per position; "keep" draws both

    def t(kind):
        return TensorSpec("t", (BATCH,), fill="timestep", high=T[kind])

    def sr(name):
        return GraphSpec(
            name, name,
            inputs=(TensorSpec("x_t", (BATCH, C, S, S)), t("super_res"),
                    TensorSpec("low_res", (BATCH, C, s, s), fill="signed")),
            outputs=(TensorSpec("pred", (BATCH, C, S, S)),),
            batch=BatchProfile(1, 1, max_batch),
            factory=lambda: SuperResGraph(pipe.get(name, keep=False), s).eval())

    return [
        GraphSpec("text_encoder", "text_encoder", inputs=(tokens,),
                  outputs=(TensorSpec("text_embed", (BATCH, D)), TensorSpec("text_encodings", (BATCH, L, W))),
                  batch=BatchProfile(1, 1, max_batch),
                  factory=lambda: TextEncoderGraph(pipe.get("text_encoder", keep=False)).eval()),
        GraphSpec("prior", "prior",
                  inputs=(TensorSpec("x_t", (BATCH, D)), t("prior"), TensorSpec("text_embed", (BATCH, D)),
                          TensorSpec("text_encodings", (BATCH, L, W)), mask),
                  outputs=(TensorSpec("pred", (BATCH, D)),),
                  batch=BatchProfile(1, 2, 2 * max_batch * CANDIDATES_MAX),
                  factory=lambda: PriorGraph(pipe.get("prior", keep=False)).eval()),
        GraphSpec("decoder", "decoder",
                  inputs=(TensorSpec("x_t", (BATCH, C, s, s)), t("decoder"), TensorSpec("image_embed", (BATCH, D)),
                          TensorSpec("text_embed", (BATCH, D)), TensorSpec("text_encodings", (BATCH, L, W)), mask,
                          TensorSpec("image_keep", (BATCH,), fill="keep")),
                  outputs=(TensorSpec("pred", (BATCH, d["decoder_out"], s, s)),),
                  batch=BatchProfile(1, 2, 2 * max_batch),
                  factory=lambda: DecoderGraph(pipe.get("text_proj", keep=False),
                                               pipe.get("decoder", keep=False)).eval()),
        sr("super_res_first"),
        sr("super_res_last"),
    ]


# --------------------------------------------------------------------------------------------------------
# stage entries


def scheduler_stage(scheduler, *, steps: int) -> dict:
    """parameterization, schedule, clip_x0 and variance of one UnCLIPScheduler, checked against our respace."""
    cfg = scheduler.config
    if cfg.prediction_type not in PREDICTION or cfg.variance_type not in VARIANCE:
        raise SourceError(f"UnCLIPScheduler prediction_type {cfg.prediction_type!r} / variance_type "
                          f"{cfg.variance_type!r}: not supported")
    abar = scheduler.alphas_cumprod.double().numpy()  # the scheduler's own float32 cumprod
    # Its set_timesteps is round(arange(S)·(T−1)/(S−1)) reversed: our "linspace" spacing. Checked, not assumed.
    for n in sorted({2, 3, steps, 7, 25, 50}):
        if n > len(abar):
            continue
        scheduler.set_timesteps(n)
        ours = respace(abar, n, "linspace").timesteps
        if not np.array_equal(scheduler.timesteps.numpy(), ours):
            raise SourceError(f"UnCLIPScheduler timesteps for {n} steps differ from linspace spacing")
    r = float(cfg.clip_sample_range)
    return {
        "parameterization": PREDICTION[cfg.prediction_type],
        "schedule": {"name": cfg.beta_schedule, "num_timesteps": int(cfg.num_train_timesteps),
                     "alphas_cumprod": [float(a) for a in abar], "spacing": "linspace",
                     # its step() takes betas[t] itself between adjacent timesteps (schedules.respace)
                     "betas": [float(b) for b in scheduler.betas.double().numpy()]},
        "clip_x0": [-r, r] if cfg.clip_sample else None,
        "variance": VARIANCE[cfg.variance_type],
    }


def _prior_mean_std(pipe: UnclipFolder) -> tuple[list[float], list[float]]:
    """PriorTransformer.clip_mean / clip_std (float64 lists), read from its safetensors without loading the
    network (karlo's prior is 4 GB in fp32); the whole module only when the weights are in another format."""
    from safetensors import safe_open

    for file in sorted((pipe.folder / "prior").glob("*.safetensors")):
        if "." in file.name.removesuffix(".safetensors"):
            continue  # a variant (name.fp16.safetensors): from_pretrained loads the plain file
        with safe_open(str(file), framework="pt") as f:
            if {"clip_mean", "clip_std"} <= set(f.keys()):
                return tuple(f.get_tensor(k).double().reshape(-1).tolist() for k in ("clip_mean", "clip_std"))
    prior = pipe.get("prior", keep=False)
    return tuple(t.detach().double().reshape(-1).tolist() for t in (prior.clip_mean, prior.clip_std))


def stage_entries(pipe: UnclipFolder) -> dict:
    d = _dims(pipe)
    mean, std = _prior_mean_std(pipe)
    prior_sched = scheduler_stage(pipe.get("prior_scheduler"), steps=DEFAULTS["prior"]["steps"])
    decoder_sched = scheduler_stage(pipe.get("decoder_scheduler"), steps=DEFAULTS["decoder"]["steps"])
    sr_sched = scheduler_stage(pipe.get("super_res_scheduler"), steps=DEFAULTS["sr"]["steps"])
    learned = d["decoder_out"] == 2 * d["channels"]
    if learned != (decoder_sched["variance"] == "learned_range"):
        raise SourceError(f"decoder has {d['decoder_out']} output channels for {d['channels']} input channels but "
                          f"its scheduler's variance is {decoder_sched['variance']!r}")
    if prior_sched["variance"] == "learned_range" or sr_sched["variance"] == "learned_range":
        raise SourceError("learned_range variance is only supported on the decoder")
    return {
        "text_encoder": {"graph": "text_encoder", "embed_dim": d["embed_dim"], "text_width": d["text_width"],
                         "context_length": d["context_length"], "text_embed_normalized": False,
                         "text_mask": "tokens"},
        "prior": {"graph": "prior", **prior_sched, "embed_dim": d["embed_dim"],
                  "embed_norm": {"kind": "mean_std", "mean": mean, "std": std},
                  "guidance_on": prior_sched["parameterization"], "uncond_text": "empty_prompt", "cond_inputs": [],
                  "defaults": dict(DEFAULTS["prior"])},
        "decoder": {"graph": "decoder", **decoder_sched, "image_size": d["decoder_size"], "channels": d["channels"],
                    "guidance_on": decoder_sched["parameterization"], "uncond_text": "empty_prompt",
                    "cond_inputs": ["image_keep"], "defaults": dict(DEFAULTS["decoder"])},
        "sr": [{"graph": "super_res_first", "last_step_graph": "super_res_last", **sr_sched,
                "image_size": d["sr_size"], "low_res_size": d["decoder_size"], "channels": d["channels"],
                "noise_aug_t": None, "low_res_resize": {**SR_RESIZE, "in_graph": True},
                "defaults": dict(DEFAULTS["sr"])}],
    }


# --------------------------------------------------------------------------------------------------------
# the folder


def export_diffusers(folder: str | Path, out: str | Path | None = None, *, name: str | None = None,
                     opset: int = DEFAULT_OPSET, max_batch: int = DEFAULT_MAX_BATCH, force: bool = False,
                     quiet: bool = False, precision: str = "fp16", trt: bool = False,
                     external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, int8: tuple[str, ...] = (),
                     log: Callable[[str], None] | None = None) -> ExportResult:
    """Convert the UnCLIPPipeline ``folder`` into the engine folder ``out`` (default ``engines/<folder name>``).

    Through the export driver, as ``export.all.export_folder``: every component is checked before the first
    graph is exported; built as a hidden sibling and renamed into place; a folder whose fingerprint (component
    digests, options, tool versions) matches is left alone, unless ``trt`` asks for plans it lacks: then its
    graphs are carried over and only the plans are built (``trt.build_missing``). Without TensorRT or a GPU,
    ``trt`` is reported in ``result.trt_message`` and the ONNX folder is still written.
    ``external_data_threshold``: as ``export_folder``'s (karlo's ~4 GB prior exceeds the 1 GiB default and gets
    ``prior.onnx.data``).
    """
    options = Options(opset=opset, max_batch=max_batch, precision=precision, trt=trt, force=force,
                      external_data_threshold=external_data_threshold, int8=tuple(int8))
    pipe = UnclipFolder(folder)
    out = Path(out) if out is not None else Path("engines") / pipe.folder.name
    return build(pipe, out, name=name or out.name, options=options, quiet=quiet, log=log)
