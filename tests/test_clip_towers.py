"""The conv image tower (``vision_tower = "conv"``): it keeps the layout, exports, and warm-starts onto a trained
text tower (``init_fresh``), while a mismatch outside the fresh part is still refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dalle2_rt.models.clip import ClipConfig, ClipImageEncoder, ConvImageTower, build_clip
from dalle2_rt.training import loop, stages
from dalle2_rt.training.config import config_from_dict

from .conftest import TINY_MODEL, tiny_config_dict, write_tiny_checkpoints

CONV = {**TINY_MODEL["clip"], "vision_tower": "conv", "conv_width": 8}


def test_conv_tower_features_depend_on_where_a_thing_is():
    torch.manual_seed(0)
    tower = ConvImageTower(32, 8, 16).eval()
    left, right = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    left[..., 12:20, 2:10] = 1.0
    right[..., 12:20, 22:30] = 1.0  # the same patch, moved
    pooled = torch.nn.Sequential(tower.stem, tower.levels)  # a global average of these would barely differ
    a, b = tower(left), tower(right)
    assert a.shape == (1, 16)
    assert (a - b).norm() > 0.2 * a.norm()
    assert torch.allclose(pooled(left).mean((2, 3)), pooled(right).mean((2, 3)), atol=0.2 * float(a.norm()))


def test_config_refuses_an_unknown_tower_and_a_size_the_grid_cannot_take():
    with pytest.raises(ValueError, match="'vit' or 'conv'"):
        ClipConfig(vision_tower="resnet")
    with pytest.raises(ValueError, match="divisible by 16"):
        ClipConfig(vision_tower="conv", image_size=40)
    clip = build_clip(ClipConfig(**CONV))
    assert isinstance(clip.visual, ConvImageTower)
    emb = ClipImageEncoder(clip)(torch.rand(2, 3, 32, 32))
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("pooled", [False, True], ids=["grid", "grid+pooled"])
def test_a_conv_tower_clip_exports_and_the_runtime_encodes_images_as_torch_does(tmp_path, pooled):
    from dalle2_rt.runtime.pipeline import Pipeline
    from dalle2_rt.training import checkpoint
    from export.all import export_folder

    clip_model = {**CONV, "conv_pooled": pooled}
    ckpt = write_tiny_checkpoints(tmp_path / "ckpt", model={**TINY_MODEL, "clip": clip_model})
    export_folder(ckpt, tmp_path / "engines", quiet=True)  # validates every graph against PyTorch
    meta = json.loads((ckpt / "clip" / "model" / "model.json").read_text())
    assert meta["config"]["vision_tower"] == "conv" and meta["config"]["conv_pooled"] == pooled
    clip = build_clip(ClipConfig(**meta["config"]))
    if pooled:  # a real path, not the silent one it starts as: the export must carry it
        torch.nn.init.normal_(clip.visual.what.weight, std=0.5)
    clip.load_state_dict({k: v.float() for k, v in checkpoint.load_weights(ckpt / "clip" / "model").items()})
    pixels = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    want = ClipImageEncoder(clip.eval())(torch.from_numpy(pixels)).detach().numpy()
    pipe = Pipeline.load(tmp_path / "engines", threads=1)
    got = pipe.engines["image_encoder"](pixels=pixels)["image_embed"]
    np.testing.assert_allclose(got, want, atol=1e-4)
    images = pipe("a red circle", seed=1, num_images=2, prior_steps=1, decoder_steps=1, sr_steps=1)
    assert [im.size for im in images] == [(32, 32)] * 2


def _clip_spec(tmp_path, name, clip_model, init_fresh=()):
    d = tiny_config_dict(tmp_path / name, steps=2)
    d["model"] = {**TINY_MODEL, "clip": clip_model}
    d["stages"]["clip"]["init_fresh"] = list(init_fresh)
    cfg = config_from_dict(d)
    return cfg, stages.clip_spec(cfg)


def test_init_fresh_warm_starts_the_text_tower_and_leaves_the_new_image_tower_fresh(tmp_path):
    vit_cfg, _ = _clip_spec(tmp_path, "vit", TINY_MODEL["clip"])
    stages.train_clip(vit_cfg)
    origin = vit_cfg.stage_dir("clip") / "model"
    from dalle2_rt.training import checkpoint

    trained = checkpoint.load_weights(origin)
    _, spec = _clip_spec(tmp_path, "conv", CONV, init_fresh=["visual."])
    initial = {k: v.clone() for k, v in spec.model.state_dict().items() if k.startswith("visual.")}
    ema = loop.EMA(spec.model)
    with pytest.raises(loop.WarmStartError, match="vision_tower"):  # without init_fresh: refused, named
        loop.warm_start(spec.model, ema, spec, str(origin))
    loop.warm_start(spec.model, ema, spec, str(origin), ["visual."])
    for model in (spec.model, ema.model):
        state = model.state_dict()
        for k, v in state.items():
            if k.startswith("visual."):
                assert torch.equal(v, initial[k]), k  # the new tower is untouched...
            else:
                assert torch.equal(v, trained[k].float()), k  # ...the rest is the trained CLIP's
    # a part outside init_fresh that does not fit is still refused, by name
    _, wider = _clip_spec(tmp_path, "wide", {**CONV, "text_width": 64}, init_fresh=["visual."])
    with pytest.raises(loop.WarmStartError, match="different shape for .*token_embedding"):
        loop.warm_start(wider.model, loop.EMA(wider.model), wider, str(origin), ["visual."])


def test_the_pooled_path_starts_silent_and_is_used_once_trained():
    torch.manual_seed(0)
    grid_only, pooled = ConvImageTower(32, 8, 16).eval(), ConvImageTower(32, 8, 16, pooled=True).eval()
    missing = pooled.load_state_dict(grid_only.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["what.bias", "what.weight"]
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(pooled(x), grid_only(x))  # zero-initialised: a warm start computes what it did
    torch.nn.init.normal_(pooled.what.weight, std=0.5)
    assert not torch.allclose(pooled(x), grid_only(x), atol=1e-3)  # and once trained, the path is used


def test_init_fresh_adds_the_pooled_path_to_a_trained_conv_clip(tmp_path):
    conv_cfg, _ = _clip_spec(tmp_path, "conv", CONV)
    stages.train_clip(conv_cfg)
    origin = conv_cfg.stage_dir("clip") / "model"
    from dalle2_rt.training import checkpoint

    trained = checkpoint.load_weights(origin)
    _, spec = _clip_spec(tmp_path, "pooled", {**CONV, "conv_pooled": True}, init_fresh=["visual.what."])
    loop.warm_start(spec.model, loop.EMA(spec.model), spec, str(origin), ["visual.what."])
    state = spec.model.state_dict()
    assert set(state) - set(trained) == {"visual.what.weight", "visual.what.bias"}
    assert all(torch.equal(state[k], v.float()) for k, v in trained.items())
    pixels = torch.rand(2, 3, 32, 32)
    before = build_clip(ClipConfig(**CONV))
    before.load_state_dict({k: v.float() for k, v in trained.items()})
    assert torch.allclose(ClipImageEncoder(spec.model.eval())(pixels), ClipImageEncoder(before.eval())(pixels))
