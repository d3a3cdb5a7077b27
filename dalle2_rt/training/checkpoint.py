"""Checkpoints: safetensors weights with the config dataclass beside them as JSON — no pickle.

Layout of a stage folder ``<dir>/<stage>/``:
  model.safetensors + model.json   EMA weights and config (what export and inference load)
  state.safetensors + state.json   raw weights, EMA, optimizer moments, RNG, step (what resume loads)
Each save writes a sibling temporary folder and renames it into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one.

This module writes; reading a model folder (``model.json`` -> config dataclass -> network + weights) is
``dalle2_rt.models.registry``'s, shared with the exporter and the torch reference backend. Its readers are
re-exported below under the names training has always used.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dalle2_rt.models.registry import config_from_dict, config_to_dict, load_weights, resolve
from dalle2_rt.models.registry import read_meta as read_model_meta

__all__ = ["config_from_dict", "config_to_dict", "load_train_state", "load_weights", "read_model_meta", "resolve",
           "save_model", "save_train_state"]


def _write_atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then swap the folder into ``target``."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_model(folder: Path, kind: str, model: torch.nn.Module, cfg, *, half: bool = False, extra=None) -> None:
    """Write ``model.safetensors`` + ``model.json`` ({"kind", "config", ...extra}) atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"kind": kind, "config": config_to_dict(cfg), **(extra or {})}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))

    _write_atomic_dir(Path(folder), write)


def save_train_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))

    _write_atomic_dir(Path(folder), write)


def load_train_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    folder = resolve(Path(folder))
    if not (folder / "state.json").exists():
        return None
    return load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())
