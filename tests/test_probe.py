"""The CLIP probes (dalle2_rt/training/probe.py): the fits they rest on, and the two-object read-back on
embeddings whose content is known."""
import numpy as np
import pytest
import torch

from dalle2_rt.training import probe
from dalle2_rt.world import COLOURS, SHAPES, two_object_scenes


def test_ridge_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    w = torch.randn(6, 2, generator=gen)
    y = x @ w + torch.tensor([0.5, -1.0])
    got_w, got_b = probe._ridge(x, y, lam=1e-8)
    assert torch.allclose(got_w, w, atol=1e-3) and torch.allclose(got_b, torch.tensor([0.5, -1.0]), atol=1e-3)


def test_logistic_fit_separates_separable_classes():
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (150,), generator=gen)
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.1 * torch.randn(150, 3, generator=gen)
    w, b = probe._fit_logistic(x, y, 3)
    assert ((x @ w + b).argmax(1) == y).all()


def _oracle(scenes) -> torch.Tensor:
    """Per colour: the object's shape one-hot and its centre, zeros when absent (what the attribute heads ask
    the image embedding to carry linearly)."""
    rows = []
    for _, scene in scenes:
        v = np.zeros((len(COLOURS), len(SHAPES) + 2), np.float32)
        for o in scene.objects:
            c = tuple(COLOURS).index(o.colour)
            v[c, SHAPES.index(o.shape)] = 1.0
            v[c, -2:] = (o.cx, o.cy)
        rows.append(v.ravel())
    return torch.tensor(np.stack(rows))


@pytest.fixture(scope="module")
def scenes():
    return two_object_scenes(600, seed=3)


def test_read_back_is_complete_when_the_embedding_holds_the_scene(scenes):
    got = probe.read_back(_oracle(scenes), scenes)
    assert got == {"both shapes": 1.0, "relation": 1.0, "shapes and relation": 1.0}


def test_read_back_is_near_chance_on_noise(scenes):
    noise = torch.randn(len(scenes), 56, generator=torch.Generator().manual_seed(4))
    got = probe.read_back(noise, scenes)
    assert got["both shapes"] < 0.2  # chance (1/5)^2 = 4 %
    assert 0.3 < got["relation"] < 0.7  # a coin
    assert got["shapes and relation"] <= min(got["both shapes"], got["relation"])


def test_two_object_probe_runs_on_a_checkpoint(tiny_checkpoints):
    got = probe.two_object_probe(tiny_checkpoints / "clip" / "model", n=60)
    assert set(got) == {"both shapes", "relation", "shapes and relation"}
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_hard_negative_preference_counts_every_kind_per_render(tiny_checkpoints):
    got = probe.hard_negative_preference(tiny_checkpoints / "clip" / "model", n=120)
    singles = {"colour", "shape", "size", "position"}
    twos = {"objects swapped", "colours traded", "shapes traded", "relation inverted", "one shape", "one colour"}
    assert set(got) == singles | twos
    # every render gets one negative of each kind that applies: colour and shape always (single), so those two
    # counts are the single renders, and the two-object kinds that always apply count the rest
    assert got["colour"][1] == got["shape"][1] and got["objects swapped"][1] == got["one colour"][1]
    assert got["colour"][1] + got["objects swapped"][1] == 120
    assert got["size"][1] <= got["colour"][1] and got["shapes traded"][1] <= got["objects swapped"][1]
    assert all(0.0 <= frac <= 1.0 for frac, _ in got.values())


def test_the_cli_s_measurements_share_one_load_until_the_weights_change(tmp_path):
    import os

    from dalle2_rt.training import stages
    from dalle2_rt.training.config import config_from_dict
    from tests.conftest import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict(tmp_path, steps=1))
    stages.train_clip(cfg)
    folder = cfg.stage_dir("clip") / "model"
    first = probe._load(folder)
    assert probe._load(folder) is first  # retrieval, linear probe and read-back: one load
    weights = folder / "model.safetensors"
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the folder rewritten
    assert probe._load(folder) is not first
