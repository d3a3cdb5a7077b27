"""DALLE2-pytorch 1.15.6 over the checkpoints ``bench/dalle2_import.py`` made: it builds them, then samples from
them as a warm side-by-side worker. Runs inside bench/.venv-dalle2 (``dalle2_venv.py``).

    bench/.venv-dalle2/bin/python bench/dalle2_import_side.py make FOLDER
    bench/.venv-dalle2/bin/python bench/dalle2_import_side.py serve '{"folder": FOLDER, "threads": 2}'

FOLDER holds the configs the parent wrote: ``prior.json`` ({"prior": a ``DiffusionPriorConfig`` entry of
LAION's ``TrainDiffusionPriorConfig``}), ``decoder.json`` ({"decoder": a ``DecoderConfig`` entry}),
``tiny-clip.json`` (an open_clip model config) and ``seed.json``.

- ``make``: the networks built by DALLE2-pytorch's own config classes (``DiffusionPriorConfig(...).create()``,
  ``DecoderConfig(...).create()``) and open_clip, every parameter random from the seed (its zero-initialised
  output layers too, so that no prediction is trivially 0), saved as a user has them: ``prior.pth`` a plain
  state_dict, ``decoder.pth`` a trainer-style dict ({"model": state_dict, "version"}), ``clip.pt`` the
  open_clip state_dict.
- ``serve``: the same networks with the saved weights, CLIP attached as its ``OpenClipAdapter`` over the local
  files; each request ``{"op": "run", "images": n, "steps": [prior, decoder, sr] | null, "guidance": [prior,
  decoder], "seed"}`` makes n images of ``prompt`` (``bench.sides.PROMPT``) the way ``DALLE2.forward`` does —
  its tokenizer, ``prior.sample`` (2 candidates per image, the one closest to the text kept) then
  ``decoder.sample(text=...)`` — except that the upsampler gets guidance 1 (``DALLE2.forward`` passes one
  ``cond_scale`` to every unet, and an upsampler's unguided and guided predictions are the same network run
  twice). ``steps`` null: its defaults, DDPM over all training steps; fewer steps switch every stage to its
  DDIM loops. Answers ``{"seconds", "stages": {"prior", "decoder"}, "shape"}``, timed here (start-up excluded).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # its sampling loops draw progress bars

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sides import PROMPT  # noqa: E402 - stdlib-only modules, importable from this venv
from bench.timing import serve  # noqa: E402

CLIP_NAME = "tiny-clip"  # the open_clip model config's file stem, which open_clip registers it under


def networks(folder: Path):
    """(prior, decoder) with random weights, as DALLE2-pytorch's config classes build them from FOLDER's JSON."""
    import open_clip
    from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig

    open_clip.add_model_config(folder / f"{CLIP_NAME}.json")
    prior = DiffusionPriorConfig(**json.loads((folder / "prior.json").read_text())["prior"]).create()
    decoder = DecoderConfig(**json.loads((folder / "decoder.json").read_text())["decoder"]).create()
    return prior.eval(), decoder.eval()


def make(folder: Path) -> None:
    import open_clip
    import torch

    torch.manual_seed(json.loads((folder / "seed.json").read_text())["seed"])
    prior, decoder = networks(folder)
    with torch.no_grad():
        for model in (prior, decoder):
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    clip = open_clip.create_model(CLIP_NAME)
    torch.save(clip.state_dict(), folder / "clip.pt")
    torch.save(prior.state_dict(), folder / "prior.pth")
    torch.save({"model": decoder.state_dict(), "version": "1.15.6", "step": 0}, folder / "decoder.pth")


def build(folder: str, threads: int = 2, warm: bool = True):
    import dalle2_pytorch
    import torch
    from dalle2_pytorch.dalle2_pytorch import OpenClipAdapter, freeze_model_and_make_eval_
    from dalle2_pytorch.tokenizer import tokenizer

    torch.set_num_threads(threads)
    folder = Path(folder)
    prior, decoder = networks(folder)
    prior.load_state_dict(torch.load(folder / "prior.pth"))
    decoder.load_state_dict(torch.load(folder / "decoder.pth")["model"])
    clip = OpenClipAdapter(CLIP_NAME, pretrained=str(folder / "clip.pt"))
    freeze_model_and_make_eval_(clip)
    prior.clip = clip  # what DiffusionPrior(clip=...) / Decoder(clip=...) keep; attached after loading so that
    decoder.clip = clip  # the saved state_dicts stay CLIP-free, as LAION's are
    info = {"dalle2_pytorch": getattr(dalle2_pytorch, "__version__", "1.15.6"), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "params": {"prior": sum(p.numel() for p in prior.net.parameters()),
                       **{("decoder" if i == 0 else f"sr{i - 1}"): sum(p.numel() for p in u.parameters())
                          for i, u in enumerate(decoder.unets)}}}
    n_unets = len(decoder.unets)

    def run(req: dict) -> dict:
        steps = req.get("steps") or [None] * (1 + n_unets)
        prior_guidance, decoder_guidance = req.get("guidance") or (1.0, 1.0)
        torch.manual_seed(int(req.get("seed", 0)))
        with torch.no_grad():
            t0 = time.perf_counter()
            tokens = tokenizer.tokenize([req.get("prompt", PROMPT)] * int(req.get("images", 1)))
            image_embed = prior.sample(tokens, num_samples_per_batch=2, cond_scale=prior_guidance,
                                       timesteps=steps[0])  # (n, D)
            t1 = time.perf_counter()
            decoder.sample_timesteps = tuple(steps[1:])
            images = decoder.sample(image_embed=image_embed,
                                    text=tokens if decoder.condition_on_text_encodings else None,
                                    cond_scale=(decoder_guidance,) + (1.0,) * (n_unets - 1))  # (n, 3, H, W)
            t2 = time.perf_counter()
        return {"seconds": t2 - t0, "stages": {"prior": t1 - t0, "decoder": t2 - t1}, "shape": list(images.shape)}

    if warm:
        run({"steps": [2] * (1 + n_unets)})
    return run, info


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(lambda: build(**json.loads(sys.argv[2])))
    else:
        sys.exit(f"usage: {sys.argv[0]} make FOLDER | serve JSON")
