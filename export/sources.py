"""The checkpoints an export reads: one stage folder per network, found, hashed and rebuilt from its config.

A checkpoint directory holds ``<stage>/model/`` folders (``model.safetensors`` + ``model.json`` = {"kind",
"config", "step", ...}; read through ``dalle2_rt.models.registry``). Stages: ``clip``, ``prior``,
``decoder`` (all required) and any number of super-resolution stages ``sr``, ``sr1``, ``sr2`` … (ordered by
their number, ``sr`` being 0), which form a chain: each SR stage's ``low_res_size`` is the previous stage's
``image_size``. A stage's sampling defaults in the manifest are the exporter's built-in ones, overridden key by
key by its ``model.json`` "defaults", then by the directory's ``defaults.json`` entry for the stage (the
model's chosen defaults, committed beside the checkpoints: ``registry.read_defaults``).

``find_sources`` checks everything it can before a graph is exported: each model.json and defaults.json is a
small regular file (``registry.read_json``) with only known keys (top level, config, defaults), config values
within the bounds their dataclass fields state (``config_dict.bounded``) and checked defaults, each safetensors
file is complete and holds exactly the tensors, at the shapes, of the network its config builds (read from the
header; ``registry.check_weights``), floating where the network's are and finite (``registry.check_values``), and
the stages fit together.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle2_rt.models import registry
from dalle2_rt.runtime.manifest import sha256_file  # one hashing routine: the runtime checks what export writes

REQUIRED = ("clip", "prior", "decoder")
_SR_STAGE = re.compile(r"^sr(\d*)$")


class SourceError(ValueError):
    """The checkpoint directory is missing a stage, or its stages do not fit together."""


@dataclass(frozen=True)
class Source:
    """One stage checkpoint: where it is, what it is, and the digests that identify it."""

    stage: str  # folder name: clip, prior, decoder, sr, sr1, …
    kind: str  # clip | prior | decoder | sr
    folder: Path  # the model folder holding model.safetensors + model.json
    meta: dict  # model.json
    config: object  # the rebuilt config dataclass
    sha256: str  # of model.safetensors
    meta_sha256: str  # of model.json (config, defaults) and any defaults.json override: identifies the manifest

    @property
    def defaults(self) -> dict:
        return dict(self.meta.get("defaults") or {})

    def build(self) -> torch.nn.Module:
        """The network with its weights, in eval mode, gradients off (CLIP: the open_clip model)."""
        return registry.load(self.folder, self.kind).model


def _load(ckpt_dir: Path, stage: str, kind: str, chosen: dict | None = None) -> Source:
    """``chosen``: the stage's entry of the directory's defaults.json, applied over model.json's defaults."""
    folder = registry.resolve(ckpt_dir / stage / "model")
    weights, meta_file = folder / registry.WEIGHTS, folder / registry.META
    if not weights.exists() or not meta_file.exists():
        raise SourceError(f"{ckpt_dir / stage / 'model'}: no {registry.WEIGHTS} + {registry.META} "
                          f"(train the {stage!r} stage, or point --checkpoints at a checkpoint directory)")
    try:
        _, config, meta = registry.read_config(folder, expect=kind)
        registry.check_weights(folder, kind, config)
        registry.check_values(folder, kind, config)
    except registry.CheckpointError as e:
        raise SourceError(f"stage {stage!r}: {e}") from None
    meta_sha256 = sha256_file(meta_file)
    merged = {**meta.get("defaults", {}), **(chosen or {})}
    if merged != meta.get("defaults", {}):  # defaults.json says more than model.json: the digest must show it
        meta = {**meta, "defaults": merged}
        meta_sha256 = hashlib.sha256(json.dumps([meta_sha256, merged], sort_keys=True).encode()).hexdigest()
    return Source(stage, kind, folder, meta, config, sha256_file(weights), meta_sha256)


@dataclass(frozen=True)
class Sources:
    clip: Source
    prior: Source
    decoder: Source
    sr: tuple[Source, ...]  # the upsampler chain, lowest resolution first

    def all(self) -> list[Source]:
        return [self.clip, self.prior, self.decoder, *self.sr]


def _sr_index(name: str) -> int:
    digits = _SR_STAGE.match(name).group(1)
    return int(digits) if digits else 0


def find_sources(ckpt_dir: str | Path) -> Sources:
    """The stages of ``ckpt_dir``; raises SourceError when one is missing or the dimensions disagree."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise SourceError(f"checkpoint directory {ckpt_dir} does not exist")
    if not ckpt_dir.is_dir():
        raise SourceError(f"{ckpt_dir} is not a directory (--checkpoints takes a checkpoint directory)")
    try:
        chosen = registry.read_defaults(ckpt_dir)
    except registry.CheckpointError as e:
        raise SourceError(str(e)) from None
    clip, prior, decoder = (_load(ckpt_dir, s, s, chosen.get(s)) for s in REQUIRED)
    sr_names = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _SR_STAGE.match(p.name)), key=_sr_index)
    unknown = sorted(set(chosen) - {*REQUIRED, *sr_names})
    if unknown:
        raise SourceError(f"{ckpt_dir / registry.DEFAULTS}: no stage folder for {', '.join(map(repr, unknown))}")
    indices = [_sr_index(n) for n in sr_names]
    if len(set(indices)) != len(indices):
        raise SourceError(f"{ckpt_dir}: SR stages {sr_names} give one position twice (sr and sr0 are both 0)")
    sources = Sources(clip, prior, decoder, tuple(_load(ckpt_dir, n, "sr", chosen.get(n)) for n in sr_names))
    check_links(sources)
    return sources


def check_links(s: Sources) -> None:
    """The dimensions each stage takes from the one before it must agree."""
    c = s.clip.config
    problems = []
    for src in (s.prior, s.decoder):
        for field in ("embed_dim", "text_width", "context_length"):
            if getattr(src.config, field) != getattr(c, field):
                problems.append(f"{src.stage}.{field} = {getattr(src.config, field)} but clip.{field} = "
                                f"{getattr(c, field)}")
    size = s.decoder.config.image_size
    for src in s.sr:
        if src.config.low_res_size != size:
            problems.append(f"{src.stage}.low_res_size = {src.config.low_res_size} but the stage before it "
                            f"outputs {size}×{size}")
        size = src.config.image_size
    if problems:
        raise SourceError("checkpoints do not fit together: " + "; ".join(problems))
