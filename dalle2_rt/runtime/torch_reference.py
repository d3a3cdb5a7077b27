"""The torch reference backend's loader: PyTorch modules rebuilt from the checkpoints a manifest names.

Imported only by ``backends.TorchBackend`` (lazily): this is the one runtime module that imports torch and
``dalle2_rt.models`` (never ``dalle2_rt.training``). Each entry of the manifest's ``sources`` is a checkpoint
folder (``model.safetensors`` + ``model.json`` with its ``kind`` and config), rebuilt by
``dalle2_rt.models.registry``; a graph is the module of its source (CLIP gives two graphs: the text and the
image encoder wrappers; the prior gives three: itself and its split at the text prefix, ``prior_prefix`` and
``prior_step``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dalle2_rt.models import registry

from .errors import EngineFolderError
from .manifest import Manifest

_CLIP_GRAPHS = tuple(registry.KINDS["clip"].views)  # text_encoder, image_encoder


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
        folder = registry.resolve(c)
        if (folder / registry.META).exists():
            return folder
    raise EngineFolderError(f"source checkpoint {str(raw)!r} of {name!r} not found "
                            f"(looked in {', '.join(str(c) for c in candidates)})")


def load_source(folder: Path) -> registry.Loaded:
    """The network of a checkpoint folder, weights loaded, eval mode (CLIP: the whole open_clip model)."""
    try:
        return registry.load(folder)
    except (registry.CheckpointError, RuntimeError) as e:  # RuntimeError: load_state_dict's mismatch report
        raise EngineFolderError(f"{folder}: {e}") from None


def graph_module(graph: str, loaded: registry.Loaded) -> torch.nn.Module:
    """The module of ``graph``: a wrapper over the source's network (CLIP's towers, the prior's split) or it."""
    try:
        return loaded.view(graph)
    except registry.CheckpointError as e:
        raise EngineFolderError(str(e)) from None
