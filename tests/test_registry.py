"""The models' registry: one table kind -> (config, network), one deserialiser, one checkpoint loader.

Training writes the folders (``checkpoint.save_model``); the exporter, the torch reference backend and training
itself read them through ``dalle2_rt.models.registry``; these tests hold it to what each of them relies on.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dalle2_rt.models import registry  # noqa: E402
from dalle2_rt.models.decoder import Decoder, DecoderConfig  # noqa: E402
from dalle2_rt.models.prior import PriorPrefix, PriorStep  # noqa: E402
from dalle2_rt.models.sr import SRConfig  # noqa: E402
from dalle2_rt.models.unet import UNetConfig  # noqa: E402
from dalle2_rt.training import checkpoint  # noqa: E402
from dalle2_rt.training.config import TrainConfig  # noqa: E402
from dalle2_rt.training.stages import model_config  # noqa: E402
from tests.conftest import TINY_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_is_refused_by_name_at_any_depth():
    with pytest.raises(registry.ConfigError, match=r"SRConfig: unknown key 'sample_aug'"):
        registry.config_from_dict(SRConfig, {"image_size": 64, "sample_aug": 100})
    with pytest.raises(registry.ConfigError, match=r"decoder\.unet: unknown keys 'chanels', 'head'"):
        registry.config_from_dict(DecoderConfig, {"unet": {"chanels": 8, "head": 2}}, where="decoder")
    with pytest.raises(registry.ConfigError, match=r"SRConfig\.unet: expected an object"):
        registry.config_from_dict(SRConfig, {"unet": [1, 2]})


def test_missing_keys_take_defaults_and_lists_become_tuples():
    cfg = registry.config_from_dict(SRConfig, {"unet": {"channel_mults": [1, 3]}, "low_res_size": 8})
    assert cfg.low_res_size == 8 and cfg.image_size == SRConfig().image_size
    assert cfg.unet.channel_mults == (1, 3) and isinstance(cfg.unet.channel_mults, tuple)
    assert cfg.unet.in_channels == UNetConfig().in_channels  # a nested default, not SRConfig's own U-Net's
    # through JSON (tuples written as lists) and back, every kind's default config is itself again
    for kind in registry.KINDS.values():
        default = kind.config()
        assert registry.config_from_dict(kind.config, json.loads(json.dumps(registry.config_to_dict(default)))) \
            == default, kind.name


def test_training_overrides_are_refused_by_name():
    """A misspelt ``[model.<stage>]`` key in a training TOML was silently dropped; now it is named."""
    cfg = TrainConfig(model={"sr": {"unet": {"chanels": 8}}})
    with pytest.raises(registry.ConfigError, match=r"\[model\.sr\]\.unet: unknown key 'chanels'"):
        model_config(cfg, "sr")
    assert model_config(TrainConfig(model={"sr": {"unet": {"channels": 8}}}), "sr").unet.channels == 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random-weight decoder saved as a checkpoint folder; (folder, the network, its config)."""
    folder = tmp_path_factory.mktemp("registry") / "decoder" / "model"
    cfg = registry.config_from_dict(DecoderConfig, {**TINY_MODEL["decoder"], "embed_dim": 16, "text_width": 32})
    torch.manual_seed(0)
    net = Decoder(cfg).eval()
    checkpoint.save_model(folder, "decoder", net, cfg, extra={"step": 3})
    return folder, net, cfg


def test_load_rebuilds_the_network_from_its_folder(saved):
    folder, net, cfg = saved
    loaded = registry.load(folder)
    assert (loaded.kind, loaded.config, loaded.meta["step"]) == ("decoder", cfg, 3)
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    g = torch.Generator().manual_seed(1)
    s = cfg.image_size
    feeds = dict(x_t=torch.randn(2, 3, s, s, generator=g), t=torch.tensor([5.0, 900.0]),
                 image_embed=torch.randn(2, 16, generator=g), text_encodings=torch.randn(2, 77, 32, generator=g),
                 image_keep=torch.tensor([1.0, 0.0]), text_keep=torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        assert torch.equal(loaded.model(**feeds), net(**feeds))
    with pytest.raises(registry.CheckpointError, match="kind 'decoder', expected 'sr'"):
        registry.load(folder, expect="sr")


def test_views_are_the_graph_modules_of_a_kind(tiny_checkpoints):
    prior = registry.load(tiny_checkpoints / "prior" / "model")
    assert isinstance(prior.view("prior_prefix"), PriorPrefix) and isinstance(prior.view("prior_step"), PriorStep)
    assert prior.view("prior") is prior.model
    clip = registry.load(tiny_checkpoints / "clip" / "model")
    assert [type(clip.view(g)).__name__ for g in ("text_encoder", "image_encoder")] == ["ClipTextEncoder",
                                                                                       "ClipImageEncoder"]
    with pytest.raises(registry.CheckpointError, match="cannot come from a CLIP checkpoint"):
        clip.view("clip")


def test_check_weights_reads_the_header_against_the_config(saved, tmp_path):
    folder, _, cfg = saved
    registry.check_weights(folder, "decoder", cfg)  # the folder's own config: fits
    narrower = registry.config_from_dict(DecoderConfig, {**registry.config_to_dict(cfg), "context_dim": 24})
    with pytest.raises(registry.CheckpointError, match=r"weights do not fit the decoder config.*has shape"):
        registry.check_weights(folder, "decoder", narrower)
    copy = tmp_path / "model"
    copy.mkdir()
    data = (folder / registry.WEIGHTS).read_bytes()
    (copy / registry.WEIGHTS).write_bytes(data[:-100])
    with pytest.raises(registry.CheckpointError, match="not a complete safetensors file"):
        registry.check_weights(copy, "decoder", cfg)


def test_unknown_kind_and_unreadable_meta_are_checkpoint_errors(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"kind": "vae", "config": {}}))
    with pytest.raises(registry.CheckpointError, match="unknown checkpoint kind 'vae'"):
        registry.read_config(tmp_path)
    (tmp_path / "model.json").write_text("{")
    with pytest.raises(registry.CheckpointError, match="not valid JSON"):
        registry.read_config(tmp_path)
    with pytest.raises(registry.CheckpointError, match="not found"):
        registry.read_config(tmp_path / "nowhere")


def test_the_torch_backend_loads_without_training():
    """The runtime's torch reference backend reads checkpoints through the models' registry: importing it
    (and the registry) brings in neither dalle2_rt.training nor the exporter."""
    code = ("import sys, dalle2_rt.runtime.torch_reference; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['dalle2_rt', 'training'] "
            "or m.split('.')[0] in ('export', 'bench')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_deserialiser_is_torch_free():
    """``config_dict`` can serve readers that must not import torch (a TOML config, the runtime)."""
    code = "import sys, dalle2_rt.models.config_dict; print(sorted({m.split('.')[0] for m in sys.modules} & " \
           "{'torch', 'open_clip', 'safetensors', 'numpy'}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
