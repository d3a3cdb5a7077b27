"""Training configuration: one dataclass per run, read from a TOML file by ``dalle2-train --config``.

Example (see ``configs/shapes-v2.toml`` for the bundled model's recipe)::

    [run]
    out_dir = "runs/shapes-v2"
    steps = 4000
    batch_size = 32
    lr = 3e-4

    [[data]]
    kind = "world"          # world | folder | shards
    weight = 1.0

    [model.decoder.unet]    # overrides of the stage's model config dataclass
    channels = 64
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dalle2_rt.models import config_dict

STAGES = ("clip", "prior", "decoder", "sr", "decoder_distill", "decoder_steps", "decoder_compact", "sr_steps")


@dataclass
class DataSource:
    kind: str = "world"  # world | folder | shards
    path: str = ""  # folder, or a glob of .tar shards
    weight: float = 1.0
    two_object_prob: float = 0.4  # world only: the share of two-object scenes (a stage that lacks them can ask more)


@dataclass
class StageRun:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    bf16: bool = False  # CPU/GPU autocast in bfloat16
    schedule: str = "constant"  # learning rate after warm-up: constant | cosine (to lr * min_lr_ratio at `steps`)
    min_lr_ratio: float = 0.1
    # A finished model folder to start from when <out_dir>/<stage>/state does not exist (a new machine: the
    # committed checkpoints/<name>/<stage>/model). Weights and EMA are loaded, the optimizer starts fresh.
    init_from: str = ""
    # Parameter-name prefixes that init_from does not load (they start fresh), e.g. ["visual."] for a new image
    # tower on a trained text tower. With it the configs may differ; every loaded tensor must match in shape.
    init_fresh: list[str] = field(default_factory=list)
    attribute_weight: float = 0.0  # CLIP only: weight of the attribute-head loss (training/attributes.py)
    # CLIP only: the chance that a world item also brings a hard-negative caption into the batch's texts, its
    # caption changed in one attribute (world/negatives.py); 0 = in-batch negatives only
    hard_negatives: float = 0.0
    # This stage's share of two-object scenes in every world source, overriding [[data]]'s (None: as [[data]] says)
    two_object_prob: float | None = None
    # decoder_distill only (guidance distillation, training/distill.py): the teacher decoder's model folder, the
    # CLIP model folder it was trained on (default <out_dir>/clip/model), the range the scale w is drawn from, and
    # the share of steps whose t is one of the few-step schedules' timesteps (the rest uniform over 0 … T-1)
    teacher: str = ""
    clip: str = ""
    guidance_range: list[float] = field(default_factory=lambda: [1.0, 4.0])
    schedule_t_share: float = 0.5
    text_keep: float = 0.8  # the share of rows conditioned on text too (the rest: image only, as variations run)
    # decoder_steps only (progressive step distillation, training/distill.py): the sampling steps the student learns
    # to take; the teacher (a guidance-distilled decoder) takes twice as many on the same trailing grid, and w is
    # drawn from the teacher's own guidance_range (this section's guidance_range is decoder_distill's); sr_steps
    # likewise for an SR teacher (no guidance)
    student_steps: int = 2
    # decoder_compact only (block removal, training/distill.py): residual blocks per U-Net level of the student,
    # fewer than the teacher's (a step-distilled decoder, sampled at its own steps)
    num_res_blocks: int = 1
    # … and the weight of the level-output loss beside the output's (0: the output alone)
    feature_weight: float = 0.0
    # … and a second trailing grid whose timesteps it also learns the teacher at (0: the sampling grid alone): the
    # decoder's operation_steps, where unCLIP's operations (inversion, decoding a latent) query the decoder
    operation_steps: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "cpu"  # cpu | cuda | auto (cuda when torch sees a GPU); see training/device.py
    log_every: int = 10
    ckpt_every: int = 200  # steps between checkpoints
    sample_every: int = 1000  # steps between sample grids (0 = never)
    half_weights: bool = False  # save model.safetensors in fp16 (the bundled model, to stay small)
    init_clip: str = ""  # a user's open_clip checkpoint file to start CLIP from (steps = 0: import it as is)
    init_clip_config: str = ""  # its open_clip model-config JSON (required with init_clip)
    data: list[DataSource] = field(default_factory=lambda: [DataSource()])
    stages: dict[str, StageRun] = field(default_factory=dict)  # per-stage overrides of StageRun
    model: dict[str, dict] = field(default_factory=dict)  # per-stage overrides of the model config

    def stage(self, name: str) -> StageRun:
        return self.stages.get(name, StageRun())

    def stage_dir(self, name: str) -> Path:
        return Path(self.out_dir) / name


class ConfigError(ValueError):
    pass


def _build(cls, data: dict, where: str):
    """The project's one deserialiser (``models/config_dict.py``: an unknown key is refused by name)."""
    try:
        return config_dict.config_from_dict(cls, data, where=where)
    except config_dict.ConfigError as e:
        raise ConfigError(str(e)) from None


def _check_share(share: float, where: str) -> None:
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"{where}: two_object_prob must be in [0, 1], got {share}")


def config_from_dict(data: dict) -> TrainConfig:
    data = dict(data)
    run = data.pop("run", {})
    sources = [_build(DataSource, d, "[[data]]") for d in data.pop("data", [{}])]
    for s in sources:
        if s.kind not in ("world", "folder", "shards"):
            raise ConfigError(f"[[data]]: kind must be world, folder or shards, got {s.kind!r}")
        if s.kind != "world" and not s.path:
            raise ConfigError(f"[[data]]: kind {s.kind!r} needs a path")
        _check_share(s.two_object_prob, "[[data]]")
    stages = {}
    for name, overrides in data.pop("stages", {}).items():
        if name not in STAGES:
            raise ConfigError(f"[stages.{name}]: unknown stage; known: {', '.join(STAGES)}")
        stages[name] = _build(StageRun, overrides, f"[stages.{name}]")
        if stages[name].schedule not in ("constant", "cosine"):
            raise ConfigError(f"[stages.{name}]: schedule must be constant or cosine, got {stages[name].schedule!r}")
        if not 0.0 <= stages[name].hard_negatives <= 1.0:
            raise ConfigError(f"[stages.{name}]: hard_negatives must be in [0, 1], got {stages[name].hard_negatives}")
        if stages[name].hard_negatives and name != "clip":
            raise ConfigError(f"[stages.{name}]: hard_negatives applies to CLIP only")
        if not 1 <= stages[name].student_steps <= 500:
            raise ConfigError(f"[stages.{name}]: student_steps must be in 1 … 500, got {stages[name].student_steps}")
        if not 0 <= stages[name].operation_steps <= 500:
            raise ConfigError(f"[stages.{name}]: operation_steps must be in 0 … 500 (0: none), got "
                              f"{stages[name].operation_steps}")
        if stages[name].num_res_blocks < 1 or stages[name].feature_weight < 0:
            raise ConfigError(f"[stages.{name}]: num_res_blocks must be at least 1 and feature_weight at least 0, "
                              f"got {stages[name].num_res_blocks} and {stages[name].feature_weight}")
        if stages[name].two_object_prob is not None:
            _check_share(stages[name].two_object_prob, f"[stages.{name}]")
    model = data.pop("model", {})
    for name in model:
        if name not in STAGES:
            raise ConfigError(f"[model.{name}]: unknown stage; known: {', '.join(STAGES)}")
    if data:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(data))}; known: run, data, stages, model")
    cfg = _build(TrainConfig, run, "[run]")
    return dataclasses.replace(cfg, data=sources, stages=stages, model=model)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(data)
