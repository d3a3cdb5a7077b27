"""Shared fixtures: tiny random-weight configurations that train and export in seconds."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_MODEL = {
    "clip": {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_layers": 1, "vision_width": 32,
             "vision_head_width": 16, "text_layers": 1, "text_width": 32, "text_heads": 2},
    "prior": {"dim": 32, "depth": 2, "heads": 2},
    "decoder": {"image_size": 16, "context_dim": 32, "num_image_tokens": 2,
                "unet": {"channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                         "heads": 2, "emb_dim": 32, "groups": 8}},
    "sr": {"image_size": 32, "low_res_size": 16,
           "unet": {"in_channels": 6, "channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
                    "attention_levels": [], "emb_dim": 32, "groups": 8}},
}


def tiny_config_dict(out_dir, steps: int = 4, batch_size: int = 4) -> dict:
    stage = {"steps": steps, "batch_size": batch_size, "lr": 1e-3, "warmup": 1}
    return {
        "run": {"out_dir": str(out_dir), "seed": 0, "log_every": 1, "ckpt_every": 2, "sample_every": 0,
                "threads": 1},
        "data": [{"kind": "world"}],
        "stages": {s: dict(stage) for s in ("clip", "prior", "decoder", "sr")},
        "model": TINY_MODEL,
    }


# --------------------------------------------------------------------------------------------------------
# Tiny random-weight checkpoints and their exported engine folder (session-scoped: built once, ~15 s)

import pytest  # noqa: E402 - appended section


def _randomize_(model, gen, scale: float = 0.05) -> None:
    """Add N(0, scale²) to every parameter: the zero-initialised output convolutions of the U-Nets would
    otherwise make every denoiser output 0, and a parity test over zeros proves nothing."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def write_tiny_checkpoints(ckpt_dir, model: dict | None = None, seed: int = 0):
    """Save random-weight models of TINY_MODEL (or ``model``) as ``<ckpt_dir>/<stage>/model``; return ckpt_dir.

    Configs are the stage dataclass defaults, then ``model[stage]``, then the dims linked to CLIP (as
    ``dalle2_rt.training.stages.model_config`` does for training).
    """
    from pathlib import Path

    import torch

    from dalle2_rt.models.clip import build_clip
    from dalle2_rt.models.decoder import Decoder
    from dalle2_rt.models.prior import DiffusionPrior
    from dalle2_rt.models.sr import SuperRes
    from dalle2_rt.training import checkpoint
    from dalle2_rt.training.config import TrainConfig
    from dalle2_rt.training.stages import clip_links, model_config

    ckpt_dir = Path(ckpt_dir)
    cfg = TrainConfig(model=model or TINY_MODEL)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ccfg = model_config(cfg, "clip")
        linked = clip_links(ccfg)
        stages = {
            "clip": (build_clip, ccfg, {"open_clip_cfg": ccfg.open_clip_cfg()}),
            "prior": (DiffusionPrior, model_config(cfg, "prior", **linked), {}),
            "decoder": (Decoder, model_config(cfg, "decoder", **linked), {}),
            "sr": (SuperRes, model_config(cfg, "sr"), {}),
        }
        for stage, (build, stage_cfg, extra) in stages.items():
            net = build(stage_cfg)
            _randomize_(net, gen)
            checkpoint.save_model(ckpt_dir / stage / "model", stage, net, stage_cfg, extra={"step": 0, **extra})
    return ckpt_dir


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A checkpoint directory of tiny random-weight models (clip, prior, decoder, sr)."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoints):
    """The engine folder exported from ``tiny_checkpoints`` (manifest.json, *.onnx, *.opt.onnx, tokenizer)."""
    from export.all import export_folder

    out = tiny_checkpoints.parent / "engines" / "tiny"
    export_folder(tiny_checkpoints, out, name="tiny", quiet=True)
    return out


@pytest.fixture
def private_hash_cache(tmp_path, monkeypatch):
    """Keep the verified-hash cache of a test out of the user's ~/.cache (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("private_hash_cache")``)."""
    monkeypatch.setenv("DALLE2_RT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_pipe(tiny_engines):
    """A Pipeline on ``tiny_engines``, one thread, shared by a module's tests."""
    from dalle2_rt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_engines, threads=1)

