"""Checkpoints: safetensors weights with the config dataclass beside them as JSON — no pickle.

Layout of a stage folder ``<dir>/<stage>/``:
  model.safetensors + model.json   EMA weights and config (what export and inference load)
  state.safetensors + state.json   raw weights, EMA, optimizer moments, RNG, step (what resume loads)
Each save writes a sibling temporary folder and renames it into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, data: dict):
    """Rebuild a (possibly nested) config dataclass from its dict, ignoring unknown keys."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


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


def resolve(target: Path) -> Path:
    """The checkpoint folder to read: ``target``, or ``target.old`` if a kill hit between the two renames."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    return target if target.exists() or not old.exists() else old


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


def read_model_meta(folder: Path) -> dict:
    return json.loads((resolve(folder) / "model.json").read_text())


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved weights, upcast to fp32."""
    state = load_file(str(resolve(folder) / "model.safetensors"))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


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
