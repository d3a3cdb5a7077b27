"""``manifest.json`` of an engine folder (schema ``dalle2-rt/engine-manifest`` v1, ARCHITECTURE.md), built here.

Its machine-readable contract is ``dalle2_rt/runtime/manifest.schema.json`` (JSON Schema, closed objects): a key
added here is added there too, or tests/test_manifest_schema.py fails on every folder the exporter writes.

Top-level keys (everything the runtime needs to run the folder without this code):
  schema, schema_version   "dalle2-rt/engine-manifest", 1
  name                     the folder's model name
  created                  exporter (dalle2-rt version), export_revision, torch, onnx, onnxruntime,
                           opset, the torch exporter used, utc time
  options                  the export options that shape the graphs (opset, max_batch)
  fingerprint              sha256 over exporter versions + options + source digests + defaults: a folder
                           with the same fingerprint is up to date
  sources                  {stage: {path, sha256 (of model.safetensors), meta_sha256 (of model.json),
                           kind, step}}; path is repository-relative when the checkpoint is in the repo
  tokenizer                the entry written by export/tokenizer.py
  graphs                   {graph: {file, optimized_file, optimized_for {provider, level, onnxruntime},
                           external_data, optimized_external_data (the data files file / optimized_file
                           reference, [] when the weights are inline; onnx_export.py), source (stage),
                           inputs/outputs [{name, dtype, shape}], profile {batch: {min, opt, max}},
                           timestep_inputs, validation {...}, fingerprint, trt {key: plan}}}
  stages                   text_encoder, image_encoder, prior, decoder, sr [...] as in ARCHITECTURE.md:
                           graph, parameterization, schedule (alphas_cumprod as float64), embed_scale,
                           clip_x0, guidance_on, conditioning inputs, image sizes, defaults
  output                   {image_size, pixel_range}
  trt                      {key: build record (trt.trt_entry)}; empty when no engines were built
  files                    {relative path: sha256} of every file but manifest.json
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import onnxruntime
import torch

from dalle2_rt.runtime.schedules import alphas_cumprod_for

from .sources import Source, SourceError, Sources, sha256_file
from .specs import GraphSpec

SCHEMA = "dalle2-rt/engine-manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
EXPORT_REVISION = 6  # bump when a change here alters what an export writes (forces rebuilds)
SPACING = "trailing"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Sampling defaults per stage; a stage checkpoint's model.json "defaults" overrides them key by key.
DEFAULTS = {
    "prior": {"sampler": "ddim", "steps": 25, "guidance": 4.0, "candidates": 2},
    "decoder": {"sampler": "ddim", "steps": 25, "guidance": 5.0, "candidates": 1},
    "sr": {"sampler": "ddim", "steps": 7},
}
# x0 clipping bounds. Prior: its space is the unit-norm embedding × √D, so each coordinate is ~N(0, 1)
# (|x| ≤ √D in any case); ±10 only catches blow-ups. Images: the data range.
PRIOR_CLIP_X0 = [-10.0, 10.0]
IMAGE_CLIP_X0 = [-1.0, 1.0]


def exporter_version() -> str:
    try:
        return f"dalle2-rt {version('dalle2-rt')}"
    except PackageNotFoundError:
        return "dalle2-rt (not installed)"


def tool_versions(opset: int, exporter: str) -> dict:
    """What made the graphs; all of it enters the fingerprints."""
    return {"exporter": exporter_version(), "export_revision": EXPORT_REVISION, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": opset,
            "torch_exporter": exporter}


def digest(obj) -> str:
    """sha256 of a JSON-able object in canonical form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _source_digests(src: Source) -> dict:
    return {"sha256": src.sha256, "meta_sha256": src.meta_sha256}


def graph_fingerprint(spec: GraphSpec, src: Source, tools: dict) -> str:
    """Identifies one graph's files: tools, its I/O and profile, its checkpoint."""
    return digest({"tools": tools, "io": spec.io_entry(), "source": _source_digests(src), "name": spec.name})


def folder_fingerprint(name: str, sources: Sources, tools: dict, options: dict) -> str:
    """Identifies the whole folder short of TensorRT plans (which are keyed by machine, see trt.py)."""
    return digest({"name": name, "tools": tools, "options": options, "defaults": DEFAULTS,
                   "clip_x0": [PRIOR_CLIP_X0, IMAGE_CLIP_X0], "spacing": SPACING,
                   "sources": {s.stage: _source_digests(s) for s in sources.all()}})


def source_entry(src: Source) -> dict:
    path = src.folder.resolve()
    try:
        shown = path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        shown = str(path)
    return {"path": shown, "kind": src.kind, "step": src.meta.get("step"), **_source_digests(src)}


# keys a checkpoint's defaults may add beyond DEFAULTS' (absent: the runtime's own default)
OPTIONAL_DEFAULTS = {"decoder": ("choice_step", "operation_steps")}


def stage_defaults(kind: str, src: Source) -> dict:
    known = (*DEFAULTS[kind], *OPTIONAL_DEFAULTS.get(kind, ()))
    return {**DEFAULTS[kind], **{k: v for k, v in src.defaults.items() if k in known}}


def _schedule(cfg) -> dict:
    abar = alphas_cumprod_for(cfg.schedule, cfg.num_timesteps)
    return {"name": cfg.schedule, "num_timesteps": cfg.num_timesteps,
            "alphas_cumprod": [float(a) for a in abar], "spacing": SPACING}


def stage_entries(sources: Sources, graphs: dict[str, GraphSpec]) -> dict:
    """The manifest's ``stages``: what the pipeline does with each graph."""
    c, p, d = sources.clip.config, sources.prior.config, sources.decoder.config
    prior_kind = getattr(p, "parameterization", "x0")
    decoder_kind = getattr(d, "parameterization", "eps")
    stages = {
        "text_encoder": {"graph": "text_encoder", "embed_dim": c.embed_dim, "text_width": c.text_width,
                         "context_length": c.context_length},
        "image_encoder": {"graph": "image_encoder", "image_size": c.image_size, "input_range": [0, 1],
                          "embed_dim": c.embed_dim},
        "prior": {"graph": "prior", "parameterization": prior_kind, "schedule": _schedule(p),
                  "embed_dim": p.embed_dim, "embed_scale": p.embed_scale,
                  "clip_x0": PRIOR_CLIP_X0,
                  "guidance_on": prior_kind, "cond_input": "cond_keep",
                  "defaults": stage_defaults("prior", sources.prior)},
        "decoder": {"graph": "decoder", "parameterization": decoder_kind, "image_size": d.image_size,
                    "channels": d.unet.out_channels, "schedule": _schedule(d), "clip_x0": IMAGE_CLIP_X0,
                    "guidance_on": decoder_kind, "cond_inputs": ["image_keep", "text_keep"],
                    "defaults": stage_defaults("decoder", sources.decoder)},
        "sr": [],
    }
    if getattr(d, "guidance_input", False):
        # guidance-distilled (Meng et al. 2023): the scale w is this graph input, one row per sample, no
        # unconditional half (ARCHITECTURE.md, "What a C or C++ host needs", step 6)
        stages["decoder"]["guidance_input"] = "guidance"
        if getattr(d, "guidance_range", None):  # the scales it was trained on: the runtime refuses others
            lo, hi = (float(v) for v in d.guidance_range)
            stages["decoder"]["guidance_range"] = [lo, hi]
            defaults = stages["decoder"]["defaults"]
            if "guidance" not in sources.decoder.defaults:  # the exporter's own default, brought into the range
                defaults["guidance"] = min(max(float(defaults["guidance"]), lo), hi)
            elif not lo <= float(defaults["guidance"]) <= hi:
                raise SourceError(f"{sources.decoder.path}: defaults guidance {defaults['guidance']} is outside "
                                  f"{lo:g} … {hi:g}, the scales this guidance-distilled decoder was trained on")
    if "prior_prefix" in graphs and "prior_step" in graphs:
        stages["prior"]["prefix_cache"] = {"prefix_graph": "prior_prefix", "step_graph": "prior_step",
                                           "cache": [t.name for t in graphs["prior_prefix"].outputs]}
    sr_graphs = [g for g in graphs.values() if g.source in {s.stage for s in sources.sr}]
    for spec, src in zip(sr_graphs, sources.sr):
        s = src.config
        stages["sr"].append({
            "graph": spec.name, "parameterization": s.parameterization, "image_size": s.image_size,
            "low_res_size": s.low_res_size, "channels": s.unet.out_channels, "schedule": _schedule(s),
            "clip_x0": IMAGE_CLIP_X0, "noise_aug_t": int(s.sample_aug_t), "defaults": stage_defaults("sr", src)})
    return stages


def output_entry(sources: Sources) -> dict:
    last = sources.sr[-1].config if sources.sr else sources.decoder.config
    return {"image_size": last.image_size, "pixel_range": [-1, 1]}


def file_table(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under ``folder`` except the manifest."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def build_manifest(*, name: str, tools: dict, options: dict, fingerprint: str, sources: Sources,
                   tokenizer: dict, graphs: dict[str, dict], stages: dict, output: dict, trt: dict,
                   files: dict[str, str]) -> dict:
    """The manifest object; every key is documented in this module's docstring."""
    created = {**tools, "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": created,
        "options": options,
        "fingerprint": fingerprint,
        "sources": {s.stage: source_entry(s) for s in sources.all()},
        "tokenizer": tokenizer,
        "graphs": graphs,
        "stages": stages,
        "output": output,
        "trt": trt,
        "files": files,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when there is none (or it is not readable JSON of our schema)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        return None
    return data
