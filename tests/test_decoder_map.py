"""The decoder's spatial map (``spatial_map``): zero at the start (a warm start changes nothing), then a
per-place bias that the exported graph computes as PyTorch does."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dalle2_rt.models.decoder import Decoder, DecoderConfig  # noqa: E402
from dalle2_rt.models.unet import UNetConfig  # noqa: E402

from .conftest import TINY_MODEL, write_tiny_checkpoints  # noqa: E402

UNET = UNetConfig(channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), heads=2, emb_dim=32,
                  groups=8)


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 16, 16, generator=g), torch.tensor([3, 700]), torch.randn(b, 16, generator=g),
            torch.randn(b, 77, 32, generator=g), torch.ones(b), torch.ones(b))


def test_the_map_starts_at_zero_so_a_warm_start_is_the_old_decoder_exactly():
    torch.manual_seed(0)
    plain = Decoder(DecoderConfig(image_size=16, embed_dim=16, text_width=32, context_dim=32, unet=UNET))
    mapped = Decoder(DecoderConfig(image_size=16, embed_dim=16, text_width=32, context_dim=32, unet=UNET,
                                   spatial_map=4))
    missing, unexpected = mapped.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["image_to_map.weight", "image_to_map.bias"] and not unexpected
    x = _inputs()
    assert torch.equal(plain(*x), mapped(*x))
    with torch.no_grad():  # once trained, one map cell is a bias on that cell's pixels only
        mapped.image_to_map.weight[0 * 16 + 0 * 4 + 3] = 1.0  # output (channel 0, row 0, column 3) of the 4x4 map
        torch.nn.init.normal_(mapped.unet.conv_out.weight, std=0.1)  # zero-initialised: the output would be 0
    seen = {}
    mapped.unet.register_forward_pre_hook(lambda m, args: seen.update(bias=args[3]))
    changed = mapped(*x)
    bias = seen["bias"].abs().sum(dim=(0, 1))  # (16, 16)
    assert bias.shape == (16, 16) and bias[:4, 12:].min() > 0  # the 4x4-pixel block of cell (0, 3)...
    bias[:4, 12:] = 0
    assert bias.sum() == 0  # ...and nothing else
    plain.unet.conv_out.load_state_dict(mapped.unet.conv_out.state_dict())
    assert not torch.allclose(changed, plain(*x))  # and it reaches the prediction

def test_the_hidden_map_path_starts_at_zero_then_places_what_a_linear_map_cannot():
    torch.manual_seed(0)
    cfg = dict(image_size=16, embed_dim=16, text_width=32, context_dim=32, unet=UNET, spatial_map=4)
    mapped = Decoder(DecoderConfig(**cfg))
    deep = Decoder(DecoderConfig(**cfg, spatial_hidden=8))
    missing, unexpected = deep.load_state_dict(mapped.state_dict(), strict=False)
    assert sorted(missing) == ["map_hidden.bias", "map_hidden.weight", "map_out.bias", "map_out.weight"]
    assert not unexpected
    x = _inputs()
    with torch.no_grad():
        torch.nn.init.normal_(mapped.unet.conv_out.weight, std=0.1)
        deep.unet.conv_out.load_state_dict(mapped.unet.conv_out.state_dict())
        assert torch.equal(mapped(*x), deep(*x))  # a warm start computes what the linear map did
        torch.nn.init.normal_(deep.map_out.weight, std=0.1)
        assert not torch.allclose(mapped(*x), deep(*x))  # once trained, the hidden path reaches the prediction
    seen = {}
    deep.unet.register_forward_pre_hook(lambda m, args: seen.update(bias=args[3]))
    with torch.no_grad():
        a = deep(*x)
        first = seen["bias"]
        x2 = (x[0], x[1], -x[2], *x[3:])  # the map is not odd in the embedding, as a linear one would be
        deep(*x2)
    assert a.shape == (2, 3, 16, 16) and not torch.allclose(seen["bias"], -first, atol=1e-4)


def test_a_map_size_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ValueError, match="must divide image_size"):
        Decoder(DecoderConfig(image_size=16, embed_dim=16, text_width=32, context_dim=32, unet=UNET, spatial_map=5))
    with pytest.raises(ValueError, match="spatial_hidden needs spatial_map"):
        Decoder(DecoderConfig(image_size=16, embed_dim=16, text_width=32, context_dim=32, unet=UNET,
                              spatial_hidden=8))


@pytest.mark.parametrize("hidden", [0, 16])
def test_a_decoder_with_a_map_exports_and_validates(tmp_path, hidden):
    from export.all import export_folder

    model = {**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], "spatial_map": 4, "spatial_hidden": hidden}}
    ckpt = write_tiny_checkpoints(tmp_path / "ckpt", model=model)
    meta = json.loads((ckpt / "decoder" / "model" / "model.json").read_text())
    assert meta["config"]["spatial_map"] == 4 and meta["config"]["spatial_hidden"] == hidden
    export_folder(ckpt, tmp_path / "engines", quiet=True)  # raises if any graph disagrees with PyTorch
    from dalle2_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tmp_path / "engines", threads=1)
    a = pipe("a red circle", seed=3, prior_steps=1, decoder_steps=2, sr_steps=1)[0]
    b = pipe("a red circle", seed=3, prior_steps=1, decoder_steps=2, sr_steps=1)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
