"""The one training loop every stage runs: AdamW, EMA, (DDP), progress, atomic resumable checkpoints.

A stage supplies a model, its config and a ``loss(model, images, captions, generator)``; the loop owns
everything else. Under ``torchrun`` it runs data-parallel (gloo on CPU, nccl on GPU): each rank draws its
own data, gradients are averaged by DDP, and only rank 0 writes checkpoints, logs and sample grids.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dalle2_rt.training import checkpoint
from dalle2_rt.training.config import StageRun, TrainConfig
from dalle2_rt.training.data import batch_stream, stage_sources
from dalle2_rt.training.device import OnDevice, resolve_device
from dalle2_rt.training.ema import EMA


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# The aux heads are linear read-outs that must keep up with a moving embedding; at the network's lr they
# stayed near chance for 100+ steps (background loss 1.05 against ln 3 = 1.10), so they learn 10× faster.
AUX_LR_SCALE = 10.0


@dataclass
class StageSpec:
    name: str
    kind: str  # what model.json says this is
    model: torch.nn.Module
    model_cfg: object
    loss: Callable  # (model, images uint8 (B,H,W,3), captions, generator) -> scalar loss
    sample_grid: Callable | None = None  # (ema_model, path) -> None
    extra_meta: dict | None = None
    # Trained with the model, saved in the training state, not exported (CLIP's attribute heads).
    aux: torch.nn.Module | None = None
    # The loss call gets ``labels=`` (one ``(spec, scene)`` or None per item): CLIP's attribute heads and hard
    # negatives read them.
    wants_labels: bool = False


def _lr(step: int, run: StageRun) -> float:
    """Linear warm-up, then constant or a cosine decay to ``lr * min_lr_ratio`` at ``run.steps``."""
    warm = min(1.0, (step + 1) / max(1, run.warmup))
    if run.schedule == "constant" or step < run.warmup:
        return run.lr * warm
    frac = min(1.0, (step - run.warmup) / max(1, run.steps - run.warmup))
    return run.lr * (run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _state_tensors(model, ema: EMA, opt: torch.optim.Optimizer, aux=None) -> tuple[dict, dict]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if aux is not None:
        tensors.update({f"aux.{k}": v for k, v in aux.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    opt_state = opt.state_dict()
    meta_opt = {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, st in opt_state["state"].items():
        meta_opt["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
                meta_opt["state"][str(idx)][k] = "tensor"
            else:
                meta_opt["state"][str(idx)][k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, meta_opt


def _restore(model, ema: EMA, opt, tensors: dict, meta: dict, aux=None) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if aux is not None:
        aux.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("aux.")})
    ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state = {}
    for idx, st in meta["optimizer"]["state"].items():
        state[int(idx)] = {k: tensors[f"opt.{idx}.{k}"] if v == "tensor" else v for k, v in st.items()}
    opt.load_state_dict({"param_groups": meta["optimizer"]["param_groups"], "state": state})
    torch.set_rng_state(tensors["rng.torch"])


class WarmStartError(ValueError):
    """``init_from`` names a folder this stage cannot start from."""


def warm_start(model, ema: EMA, spec: StageSpec, source: str, fresh: list[str] = ()) -> int:
    """Start from a finished model folder (``checkpoints/<name>/<stage>/model``: weights = the EMA weights
    it was exported from) when ``runs/`` holds no state: model and EMA both take its weights, the optimizer
    starts fresh. Its kind and config must match this stage's, so that no shape is silently reinterpreted.

    ``fresh`` lists parameter-name prefixes that are not loaded (a new image tower on a trained text tower):
    then the configs may differ (the differences are printed), every other parameter of the model must be in
    the folder with the same shape, and the folder's parameters under ``fresh`` are ignored.

    Returns the steps the folder's weights had trained (``trained_steps`` for earlier runs' warm starts; a
    folder written before that field read ``step``, which counts its own run only, a lower bound)."""
    folder = Path(source)
    if not (folder / "model.json").is_file():
        raise WarmStartError(f"init_from {folder}: not a model folder (no model.json)")
    meta = checkpoint.read_model_meta(folder)
    if meta.get("kind") != spec.kind:
        raise WarmStartError(f"init_from {folder}: a {meta.get('kind')!r} model, this stage trains {spec.kind!r}")
    ours = json.loads(json.dumps(dataclasses.asdict(spec.model_cfg)))  # tuples -> lists, as model.json has them
    # a field added after the folder was written holds its default there
    theirs = {**json.loads(json.dumps(dataclasses.asdict(type(spec.model_cfg)()))), **meta["config"]}
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff and not fresh:
        raise WarmStartError(f"init_from {folder}: config differs from this stage's in {', '.join(diff)}")

    def is_fresh(name: str) -> bool:
        return name.startswith(tuple(fresh))  # no prefixes: nothing is fresh

    weights = {k: v.float() for k, v in checkpoint.load_weights(folder).items() if not is_fresh(k)}
    expected = {k: v.shape for k, v in model.state_dict().items() if not is_fresh(k)}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k])
    for what, names in (("lacks", missing), ("has unknown", extra), ("has a different shape for", wrong)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            outside = f" (outside init_fresh {list(fresh)})" if fresh else ""
            raise WarmStartError(f"init_from {folder}: {what} {shown}{outside}")
    # the EMA is a copy of the model made before this call, so the fresh parameters already agree in both
    model.load_state_dict(weights, strict=not fresh)
    ema.model.load_state_dict(weights, strict=not fresh)
    fresh_note = f"; fresh: {', '.join(fresh)}, config differs in {', '.join(diff) or 'nothing'}" if fresh else ""
    before = int(meta.get("trained_steps", meta.get("step", 0)))
    print(f"{spec.name}: warm start from {folder} (trained {before} steps; fresh optimizer{fresh_note})",
          file=sys.stderr, flush=True)
    return before


def train_stage(spec: StageSpec, cfg: TrainConfig, *, max_steps: int | None = None) -> Path:
    """Train one stage to ``cfg.stage(name).steps`` (resuming from its folder if a state is there).

    ``max_steps`` stops early after that many steps of this call (tests, time-boxed runs); a checkpoint
    is written at the stop. Returns the stage folder.
    """
    ddp = init_distributed()
    run = cfg.stage(spec.name)
    folder = cfg.stage_dir(spec.name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + 1000 * ddp.rank)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ddp.world > 1:
        torch.cuda.set_device(ddp.local_rank)
        device = torch.device("cuda", ddp.local_rank)
    model = spec.model.to(device)
    if spec.aux is not None:
        spec.aux.to(device)
    ema = EMA(model, run.ema_decay)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    if spec.aux is not None:
        groups.append({"params": list(spec.aux.parameters()), "lr_scale": AUX_LR_SCALE})
    opt = torch.optim.AdamW(groups, lr=run.lr, weight_decay=run.weight_decay)
    step = 0
    before = 0  # steps the weights had trained before this run (a warm start's), so model.json counts them all
    saved = checkpoint.load_train_state(folder / "state")
    if saved is not None:
        tensors, meta = saved
        _restore(model, ema, opt, tensors, meta, spec.aux)
        step, before = meta["step"], meta.get("steps_before", 0)
        torch.manual_seed(cfg.seed + 1000 * ddp.rank + step)
    elif run.init_from:
        before = warm_start(model, ema, spec, run.init_from, run.init_fresh)
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type != "cpu":
        net = OnDevice(net, device)

    def save() -> None:
        if not ddp.main:
            return
        tensors, meta_opt = _state_tensors(model, ema, opt, spec.aux)
        checkpoint.save_train_state(folder / "state", tensors,
                                    {"step": step, "steps_before": before, "optimizer": meta_opt})
        # step: this run's; trained_steps: all the weights have seen, warm starts included
        checkpoint.save_model(folder / "model", spec.kind, ema.model, spec.model_cfg, half=cfg.half_weights,
                              extra={"step": step, "trained_steps": before + step, **(spec.extra_meta or {})})

    skips = None
    if any(src.kind != "world" for src in cfg.data):
        from dalle2_rt.training.datasets import SkipCounter

        skips = SkipCounter()
    data = batch_stream(stage_sources(cfg.data, run.two_object_prob), run.batch_size,
                        seed=cfg.seed * 1_000_003 + 7 * step + ddp.rank, size=64, skips=skips)
    gen = torch.Generator().manual_seed(cfg.seed + 31 * ddp.rank + step)
    end = run.steps if max_steps is None else min(run.steps, step + max_steps)
    log_path = folder / "train.log.jsonl"
    if ddp.main:
        folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=run.steps, initial=step, desc=spec.name, disable=not ddp.main or not sys.stderr.isatty(),
               dynamic_ncols=True)
    model.train()
    t_last, ema_loss = time.time(), None
    while step < end:
        images, captions, labels = next(data)
        for g in opt.param_groups:
            g["lr"] = _lr(step, run) * g.get("lr_scale", 1.0)
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                            enabled=run.bf16):
            extra = {"labels": labels} if spec.wants_labels else {}
            loss = spec.loss(net, images, captions, gen, **extra)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{spec.name}: loss became {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if ddp.main and (step % cfg.log_every == 0 or step == end):
            now = time.time()
            rate = cfg.log_every / max(now - t_last, 1e-9)
            t_last = now
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "loss_avg": ema_loss, "it_s": rate,
                                    "skipped": skips.total if skips else 0, "time": now}) + "\n")
            if not sys.stderr.isatty():
                print(f"{spec.name} step {step}/{run.steps} loss {ema_loss:.4f} {rate:.2f} it/s", file=sys.stderr,
                      flush=True)
        if step % cfg.ckpt_every == 0 or step == end:
            save()
        if ddp.main and spec.sample_grid and cfg.sample_every and step % cfg.sample_every == 0:
            spec.sample_grid(ema.model, folder / "samples" / f"{step:07d}.png")
    bar.close()
    if not (folder / "model").exists():  # steps already reached (e.g. an imported CLIP with steps = 0)
        save()
    if ddp.world > 1:
        dist.barrier()
    return folder
