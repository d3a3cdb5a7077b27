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
