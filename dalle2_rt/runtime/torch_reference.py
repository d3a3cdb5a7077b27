"""The torch reference backend's loader: PyTorch modules rebuilt from the checkpoints a manifest names.

Imported only by ``backends.TorchBackend`` (lazily): this is the one runtime module that imports torch and
``dalle2_rt.models``. Each entry of the manifest's ``sources`` is a checkpoint folder written by
``dalle2_rt.training.checkpoint`` (``model.safetensors`` + ``model.json`` with its ``kind`` and config); a
graph is the module of its source (CLIP gives two graphs: the text and the image encoder wrappers; the prior
gives three: itself and its split at the text prefix, ``prior_prefix`` and ``prior_step``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dalle2_rt.models.clip import ClipConfig, ClipImageEncoder, ClipTextEncoder, build_clip
from dalle2_rt.models.decoder import Decoder, DecoderConfig
from dalle2_rt.models.prior import DiffusionPrior, PriorConfig, PriorPrefix, PriorStep
from dalle2_rt.models.sr import SRConfig, SuperRes
from dalle2_rt.training import checkpoint

from .errors import EngineFolderError
from .manifest import Manifest

_MODELS = {"prior": (PriorConfig, DiffusionPrior), "decoder": (DecoderConfig, Decoder), "sr": (SRConfig, SuperRes)}
_CLIP_GRAPHS = {"text_encoder": ClipTextEncoder, "image_encoder": ClipImageEncoder}
_PRIOR_GRAPHS = {"prior_prefix": PriorPrefix, "prior_step": PriorStep}


def source_name(graph: str, raw: dict, sources: dict) -> str:
    """Which ``sources`` entry holds ``graph``'s weights: the graph's own ``source`` key, else by name."""
    if raw.get("source"):
        name = raw["source"]
    elif graph in _CLIP_GRAPHS:
        name = "clip"
    elif graph in sources:
        name = graph
    elif re.fullmatch(r"sr\d+", graph) and "sr" in sources:
        name = "sr"
    else:
        name = graph
    if name not in sources:
        raise EngineFolderError(f"manifest 'sources' has no entry {name!r} for graph {graph!r}; "
                                "the torch backend cannot find its checkpoint")
    return name


def resolve_source(manifest: Manifest, name: str) -> Path:
    """The checkpoint folder of ``sources[name].path``: absolute, or relative to the engine folder, the
    repository that holds it (``<repo>/engines/<name>``) or the working directory."""
    raw = Path(manifest.sources[name]["path"]).expanduser()
    bases = [manifest.folder, manifest.folder.parent.parent, Path.cwd(), Path(__file__).resolve().parents[2]]
    candidates = [raw] if raw.is_absolute() else [b / raw for b in bases]
    for c in candidates:
        folder = checkpoint.resolve(c)
        if (folder / "model.json").exists():
            return folder
    raise EngineFolderError(f"source checkpoint {str(raw)!r} of {name!r} not found "
                            f"(looked in {', '.join(str(c) for c in candidates)})")


def load_source(folder: Path):
    """(kind, module) of a checkpoint folder; CLIP comes back as the open_clip model."""
    meta = checkpoint.read_model_meta(folder)
    kind = meta["kind"]
    if kind == "clip":
        model = build_clip(checkpoint.config_from_dict(ClipConfig, meta["config"]))
    elif kind in _MODELS:
        cfg_cls, model_cls = _MODELS[kind]
        model = model_cls(checkpoint.config_from_dict(cfg_cls, meta["config"]))
    else:
        raise EngineFolderError(f"{folder}: unknown checkpoint kind {kind!r}")
    model.load_state_dict(checkpoint.load_weights(folder))
    return kind, model.eval().requires_grad_(False)


def graph_module(graph: str, loaded) -> torch.nn.Module:
    kind, model = loaded
    if kind == "clip":
        if graph not in _CLIP_GRAPHS:
            raise EngineFolderError(f"graph {graph!r} cannot come from a CLIP checkpoint")
        return _CLIP_GRAPHS[graph](model).eval()
    if kind == "prior" and graph in _PRIOR_GRAPHS:
        return _PRIOR_GRAPHS[graph](model).eval()
    return model
