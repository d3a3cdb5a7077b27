"""DALLE2-pytorch 1.15.6 as a side-by-side worker. Runs inside bench/.venv-dalle2 (see ``dalle2_venv.py``).

    bench/.venv-dalle2/bin/python bench/dalle2_side.py '{"threads": 2, "target": ..., "shape": ...}'

Its networks are sized to match ours — the configuration whose parameters and FLOPs per call are closest
to our graphs' (``target``, counted by the parent), searched over its own knobs (``match``); both counts
are in ``info`` (torch's FLOP counter, which counts our graphs identically to ``bench.flops``) — with random
weights and no CLIP: the prior's text conditioning (text embedding + per-token encodings) and the
decoder's image embedding are passed in as tensors, through the entry points its ``sample`` methods use
once CLIP has embedded the text (``DiffusionPrior.p_sample_loop`` with ``text_cond``;
``Decoder.sample(image_embed=, text_encodings=)``).

- prior: ``DiffusionPriorNetwork(dim=128, depth=?, dim_head=64, heads=4)`` in ``DiffusionPrior``
  (x0-prediction, cosine, 1000 steps); its width must equal the CLIP dim (128), so depth is searched.
  Two candidates per image, the one closest to the text kept (its ``DiffusionPrior.sample`` logic),
  guidance 4.
- decoder: ``Decoder`` of two ``Unet``s with our channel multipliers and resnet blocks: the 32×32 base
  (text-conditioned, learned variance — its default for the first unet; base width and conditioning
  width searched) and the 64×64 upsampler (base width searched); guidance 5 on the base, none on the
  upsampler.

Requests: ``{"op": "run", "steps": [prior, decoder, sr] | null}``; null = its defaults (1000-step DDPM for
every stage; fewer steps switch it to its DDIM loops). Answers ``{"seconds", "stages": {...}, "calls": {...}}``.
``{"op": "estimate", "calls": N}``: its defaults timed on the first N network calls of each stage and
extrapolated (for a machine too busy for the whole 1000-step run; the answer says ``"estimated": true``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # its sampling loops draw progress bars

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import serve  # noqa: E402 - stdlib-only module, importable from this venv

EMBED, CONTEXT = 128, 77
GUIDANCE = {"prior": 4.0, "decoder": 5.0}


def _count(module, call):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return {"params": int(sum(p.numel() for p in module.parameters())), "flops": int(counter.get_total_flops())}


def _distance(got: dict, want: dict) -> float:
    """How far a network's (params, FLOPs) are from the target's, in log ratio."""
    import math

    return abs(math.log(got["params"] / want["params"])) + abs(math.log(got["flops"] / want["flops"]))


def _prior_net(depth: int):
    from dalle2_pytorch import DiffusionPriorNetwork

    return DiffusionPriorNetwork(dim=EMBED, depth=depth, dim_head=64, heads=4, num_timesteps=1000,
                                 max_text_len=CONTEXT)


def _unets(base: dict, sr: dict):
    from dalle2_pytorch import Decoder, Unet

    b = Unet(image_embed_dim=EMBED, text_embed_dim=EMBED, cond_on_text_encodings=True, channels=3,
             max_text_len=CONTEXT, attn_heads=4, attn_dim_head=32, **base)
    s = Unet(channels=3, attend_at_middle=False, **sr)
    decoder = Decoder(unet=(b, s), image_sizes=(32, 64), timesteps=1000).eval()
    return decoder  # its unets are new modules (learned variance, low-res conditioning set by the Decoder)


def _counts(prior_net, decoder):
    import torch

    t = torch.zeros(1, dtype=torch.long)
    enc = torch.randn(1, CONTEXT, EMBED)
    base, sr = decoder.unets
    out = {}
    if prior_net is not None:
        out["prior"] = _count(prior_net, lambda: prior_net(torch.randn(1, EMBED), t, text_embed=torch.randn(1, EMBED),
                                                           text_encodings=enc))
    out["decoder"] = _count(base, lambda: base(torch.randn(1, 3, 32, 32), t, image_embed=torch.randn(1, EMBED),
                                               text_encodings=enc))
    out["sr0"] = _count(sr, lambda: sr(torch.randn(1, 3, 64, 64), t, image_embed=None,
                                       lowres_cond_img=torch.randn(1, 3, 64, 64)))
    return out


def match(target: dict, shape: dict) -> dict:
    """Its configuration closest to ours in parameters and FLOPs per call (``target`` = our counts per network;
    ``shape`` = our U-Nets' channel multipliers and resnet blocks, which it keeps). Its prior's width must
    be the CLIP dim, so depth is searched; the U-Nets' base width (and the decoder's conditioning width)."""
    import torch

    with torch.device("meta"):  # shapes only: counting needs no real weights or arithmetic
        return _match(target, shape)


def _match(target: dict, shape: dict) -> dict:
    best_depth = min(range(1, 25), key=lambda d: _distance(_prior_only(d), target["prior"]))
    base_opts = [{"dim": d, "cond_dim": c, "dim_mults": tuple(shape["decoder_mults"]),
                  "num_resnet_blocks": shape["decoder_blocks"]} for d in (16, 24, 32, 40, 48, 56, 64, 80, 96)
                 for c in (64, 128, 256)]
    sr_opts = [{"dim": d, "resnet_groups": 4 if d % 8 else 8, "dim_mults": tuple(shape["sr_mults"]),
                "num_resnet_blocks": shape["sr_blocks"]} for d in (12, 16, 20, 24, 28, 32, 40, 48)]
    sr_fixed = sr_opts[0]
    base = min(base_opts, key=lambda o: _distance(_counts(None, _unets(o, sr_fixed))["decoder"], target["decoder"]))
    sr = min(sr_opts, key=lambda o: _distance(_counts(None, _unets(base_opts[0], o))["sr0"], target["sr0"]))
    return {"prior_depth": best_depth, "base_unet": base, "sr_unet": sr}


def _prior_only(depth: int) -> dict:
    import torch

    net = _prior_net(depth)
    t = torch.zeros(1, dtype=torch.long)
    return _count(net, lambda: net(torch.randn(1, EMBED), t, text_embed=torch.randn(1, EMBED),
                                   text_encodings=torch.randn(1, CONTEXT, EMBED)))


def build(threads: int = 2, seed: int = 0, warm: bool = True, target: dict | None = None, shape: dict | None = None,
          config: dict | None = None):
    """``config`` ({"prior_depth", "base_unet", "sr_unet"}) as given, else ``match(target, shape)``."""
    import dalle2_pytorch
    import torch
    from dalle2_pytorch import DiffusionPrior

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_match = time.perf_counter()
    config = config or match(target, shape)
    t_match = time.perf_counter() - t_match
    prior = DiffusionPrior(_prior_net(config["prior_depth"]), image_embed_dim=EMBED, timesteps=1000,
                           cond_drop_prob=0.1, condition_on_text_encodings=True).eval()
    decoder = _unets(config["base_unet"], config["sr_unet"])
    base, sr = decoder.unets
    info = {"dalle2_pytorch": getattr(dalle2_pytorch, "__version__", "1.15.6"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "config": config, "match_seconds": t_match,
            "networks": _counts(prior.net, decoder)}

    calls = {"prior": 0, "decoder": 0, "sr0": 0}
    limit: dict[str, int] = {}  # stage -> stop after this many network calls (``estimate``)

    def count_calls(module, name):
        # Its guidance wrappers call ``self.forward`` directly (no hooks fire): count at the forward itself.
        forward = module.forward

        def counted(*args, **kwargs):
            if name in limit and calls[name] >= limit[name]:
                raise _Enough(name)
            calls[name] += 1
            return forward(*args, **kwargs)

        module.forward = counted

    count_calls(prior.net, "prior")
    count_calls(base, "decoder")
    count_calls(sr, "sr0")

    def run(req: dict) -> dict:
        steps = req.get("steps")  # None: its defaults, 1000-step DDPM everywhere
        prior_steps, decoder_steps, sr_steps = steps if steps else (None, None, None)
        n, k = int(req.get("images", 1)), int(req.get("candidates", 2))
        torch.manual_seed(int(req.get("seed", 0)))
        for key in calls:
            calls[key] = 0
        with torch.no_grad():
            t0 = time.perf_counter()
            # CLIP's outputs stand-in: unit text embeddings and token encodings, k copies per image
            text_embed = torch.nn.functional.normalize(torch.randn(n, EMBED), dim=-1).repeat_interleave(k, 0)
            text_enc = torch.randn(n, CONTEXT, EMBED)
            cond = {"text_embed": text_embed, "text_encodings": text_enc.repeat_interleave(k, 0)}
            embeds = prior.p_sample_loop((n * k, EMBED), text_cond=cond, cond_scale=GUIDANCE["prior"],
                                         timesteps=prior_steps)  # (n·k, D), divided by its embed scale
            sims = torch.einsum("nkd,nkd->nk", torch.nn.functional.normalize(text_embed.view(n, k, -1), dim=-1),
                                torch.nn.functional.normalize(embeds.view(n, k, -1), dim=-1))
            image_embed = embeds.view(n, k, -1)[torch.arange(n), sims.argmax(1)]  # (n, D)
            t1 = time.perf_counter()
            decoder.sample_timesteps = (decoder_steps, sr_steps)
            images = decoder.sample(image_embed=image_embed, text_encodings=text_enc,
                                    cond_scale=(GUIDANCE["decoder"], 1.0))
            t2 = time.perf_counter()
        return {"seconds": t2 - t0, "stages": {"prior": t1 - t0, "decoder+sr": t2 - t1}, "calls": dict(calls),
                "shape": list(images.shape)}

    def estimate(req: dict) -> dict:
        """Its defaults (1000-step DDPM per stage) timed on the first ``calls`` network calls of each stage and
        extrapolated to the whole loop: prior 1000 steps × 2 calls (guidance runs cond and uncond as two
        forwards), base decoder 1000 × 2, upsampler 1000 × 1. For a machine too busy to run it whole."""
        n_calls, n, k = int(req.get("calls", 40)), 1, 2
        full = {"prior": 2 * prior.noise_scheduler.num_timesteps,
                "decoder": 2 * decoder.noise_schedulers[0].num_timesteps,
                "sr0": decoder.noise_schedulers[1].num_timesteps}
        per_call = {}
        text_embed = torch.nn.functional.normalize(torch.randn(n, EMBED), dim=-1).repeat_interleave(k, 0)
        text_enc = torch.randn(n, CONTEXT, EMBED)
        decoder.sample_timesteps = (None, None)
        stages = {
            "prior": lambda: prior.p_sample_loop(
                (n * k, EMBED), cond_scale=GUIDANCE["prior"],
                text_cond={"text_embed": text_embed, "text_encodings": text_enc.repeat_interleave(k, 0)}),
            "decoder": lambda: decoder.sample(image_embed=torch.randn(n, EMBED), text_encodings=text_enc,
                                              cond_scale=(GUIDANCE["decoder"], 1.0), stop_at_unet_number=1),
            "sr0": lambda: decoder.sample(image=torch.rand(n, 3, 32, 32), image_embed=torch.randn(n, EMBED),
                                          text_encodings=text_enc, cond_scale=(GUIDANCE["decoder"], 1.0),
                                          start_at_unet_number=2),
        }
        with torch.no_grad():
            for name, fn in stages.items():
                for key in calls:
                    calls[key] = 0
                limit.clear()
                limit[name] = n_calls
                t0 = time.perf_counter()
                try:
                    fn()
                except _Enough:
                    pass
                per_call[name] = (time.perf_counter() - t0) / max(calls[name], 1)
            limit.clear()
        stages_s = {name: per_call[name] * full[name] for name in full}
        return {"seconds": sum(stages_s.values()), "stages": stages_s, "calls": full, "estimated": True,
                "measured_calls_per_stage": n_calls, "per_call_ms": {k_: 1e3 * v for k_, v in per_call.items()}}

    if warm:
        run({"steps": [2, 2, 2]})
    return run, info, {"estimate": estimate}


class _Enough(Exception):
    """Raised from a counted forward to stop a sampling loop after enough timed calls."""


if __name__ == "__main__":
    serve(lambda: build(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")))
