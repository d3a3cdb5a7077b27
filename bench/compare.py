"""Side by side: our onnxruntime pipeline against each contender, alternating A, B, A, B … in one run.

- ``backends``: our onnxruntime backend vs our torch backend (same weights, same loop, defaults).
- ``dalle2``: vs DALLE2-pytorch 1.15.6 at matched sizes (``dalle2_side.py``), at our step counts with the
  same guidance and 2 prior candidates; and at its defaults (1000-step DDPM in each stage: one image, one
  run, between two of ours).
- ``diffusers``: vs diffusers' UnCLIPPipeline at matched sizes (``sides.diffusers_pipeline``), 25/25/7
  steps, guidance 4/5, one prior sample per image on both sides (UnCLIPPipeline has no candidate pick).

Every contender runs in its own worker process with the same number of threads; all sides time one whole
text -> 64×64 image call (ours includes the text encoder; DALLE2-pytorch gets its text embeddings as
tensors, so its number excludes a text encoder).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import dalle2_venv
from .timing import REPO, SETTLE_S, Worker, alternate, median


def _ours(engines, backend: str, threads: int, name: str, prefix_cache: bool = True) -> Worker:
    args = json.dumps({"engines": str(engines), "backend": backend, "threads": threads, "prefix_cache": prefix_cache})
    return Worker(name, [sys.executable, "-m", "bench.worker", "ours", args])


def _summary(answers: dict, a: str, b: str) -> dict:
    secs = {k: [x["seconds"] for x in v] for k, v in answers.items()}
    med = {k: median(v) for k, v in secs.items()}
    return {"seconds": secs, "median": med, "ratio": med[b] / med[a], "a": a, "b": b}


def size_check(ours: dict, theirs: dict) -> dict:
    """Per network: params and FLOPs of both, and theirs/ours (matched = within ±20 %)."""
    out = {}
    for net in ("prior", "decoder", "sr0"):
        o, t = ours.get(net), theirs.get(net)
        if not o or not t:
            continue
        pr, fr = t["params"] / o["params"], t["flops"] / o["flops"]
        out[net] = {"ours_params": o["params"], "theirs_params": t["params"], "ours_flops": o["flops"],
                    "theirs_flops": t["flops"], "params_ratio": pr, "flops_ratio": fr,
                    "matched": bool(abs(pr - 1) <= 0.2 and abs(fr - 1) <= 0.2)}
    return out


FULL_PRIOR = "torch, full prior"


def backends(engines, rounds: int = 5, threads: int = 2, images: int = 1, steps=None, log=print) -> dict:
    """onnxruntime vs torch running the same graphs (the prior split at its text prefix on both), and torch
    running the prior's own ``forward`` at every step (what a plain PyTorch loop does) for reference. Where the
    folder has int8 variants and the CPU runs them, onnxruntime runs those (``int8`` in the result; set
    ``DALLE2_RT_INT8_DOT=none`` for the fp32 graphs) while torch runs the fp32 model.
    ``steps``: (prior, decoder, SR) sampling steps (None: the folder's defaults)."""
    steps = tuple(steps or default_steps(engines))
    log(f"  onnxruntime vs torch backend, {images} image(s), steps {steps}, {rounds} rounds")
    with _ours(engines, "onnxruntime", threads, "onnxruntime") as a, _ours(engines, "torch", threads, "torch") as b, \
            _ours(engines, "torch", threads, FULL_PRIOR, prefix_cache=False) as c:
        req = {"images": images, "steps": list(steps)}
        answers = alternate([a, b, c], {"onnxruntime": req, "torch": req, FULL_PRIOR: req}, rounds, log=log)
        out = _summary(answers, "onnxruntime", "torch")
        out["ratio_full_prior"] = out["median"][FULL_PRIOR] / out["median"]["onnxruntime"]
        out["steps"] = list(steps)
        out["sizes_torch_counter"] = b.info.get("networks")
        out["sizes_onnx_counter"] = a.info.get("networks")
        # a folder's int8 variants run on onnxruntime (where the CPU has int8 dot products), never on torch
        out["onnxruntime_backend"] = a.info.get("backend")
        out["int8"] = bool(a.info.get("int8"))
    if out["int8"]:
        log(f"  onnxruntime ran int8 variants ({out['onnxruntime_backend']}); torch runs the fp32 graphs' model")
    log(f"  → onnxruntime {out['median']['onnxruntime']:.3f} s, torch {out['median']['torch']:.3f} s: "
        f"{out['ratio']:.2f}× (torch with the full prior {out['median'][FULL_PRIOR]:.3f} s: "
        f"{out['ratio_full_prior']:.2f}×)")
    return out


def steps_arg(text: str) -> tuple[int, int, int]:
    """An argparse type: "PRIOR,DECODER,SR" sampling steps."""
    try:
        prior, decoder, sr = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRIOR,DECODER,SR step counts, got {text!r}") from None
    return prior, decoder, sr


def default_steps(engines) -> tuple[int, int, int]:
    """The engine folder's default (prior, decoder, SR) sampling steps."""
    from dalle2_rt.runtime.manifest import load_manifest

    st = load_manifest(engines).stages
    sr = st.get("sr") or [{}]
    return (int(st["prior"]["defaults"]["steps"]), int(st["decoder"]["defaults"]["steps"]),
            int(sr[0].get("defaults", {}).get("steps", 0)))


def dalle2(engines, rounds: int = 3, threads: int = 2, steps=None, defaults: str = "full",
           log=print) -> dict:
    """``steps``: the matched comparison's (prior, decoder, SR) steps, both sides (None: our defaults).
    ``defaults``: "full" (its 1000-step loops, one image, once), "estimate" (the first calls of each of its
    stages timed and extrapolated: for a busy machine) or "skip"; ours runs at our defaults there."""
    python = dalle2_venv.ensure(log)
    ours_defaults = default_steps(engines)
    steps = tuple(steps or ours_defaults)
    out = {"steps": list(steps), "ours_defaults": list(ours_defaults)}
    with _ours(engines, "onnxruntime", threads, "ours") as a:
        spec = json.dumps({"threads": threads, "target": a.info["networks"], "shape": unet_shapes(engines)})
        with Worker("dalle2_pytorch", [str(python), str(REPO / "bench" / "dalle2_side.py"), spec]) as b:
            out["info"] = b.info
            out["sizes"] = size_check(a.info["networks"], b.info["networks"])
            log(f"  vs DALLE2-pytorch {b.info['config']}, matched steps {steps}, {rounds} rounds")
            answers = alternate([a, b], {"ours": {"images": 1, "steps": list(steps), "candidates": 2},
                                         "dalle2_pytorch": {"steps": list(steps), "candidates": 2}}, rounds, log=log)
            out["matched"] = _summary(answers, "ours", "dalle2_pytorch")
            out["matched"]["calls"] = answers["dalle2_pytorch"][-1].get("calls")
            log(f"  → ours {out['matched']['median']['ours']:.3f} s, DALLE2-pytorch "
                f"{out['matched']['median']['dalle2_pytorch']:.3f} s: {out['matched']['ratio']:.1f}×")
            if defaults != "skip":
                log(f"  vs DALLE2-pytorch at its defaults (1000-step DDPM per stage, {defaults}): ours, theirs, ours")
                ours = [a.ask({"op": "run", "images": 1})["seconds"]]
                time.sleep(SETTLE_S)
                theirs = b.ask({"op": "run", "steps": None, "candidates": 2} if defaults == "full" else
                               {"op": "estimate", "calls": 40}, timeout=3600)
                time.sleep(SETTLE_S)
                ours.append(a.ask({"op": "run", "images": 1})["seconds"])
                out["defaults"] = {"ours_seconds": ours, "ours_median": median(ours),
                                   "theirs_seconds": theirs["seconds"], "theirs_stages": theirs.get("stages"),
                                   "calls": theirs.get("calls"), "ratio": theirs["seconds"] / median(ours),
                                   "estimated": bool(theirs.get("estimated")),
                                   "per_call_ms": theirs.get("per_call_ms")}
                log(f"  → ours {median(ours):.3f} s ({'/'.join(map(str, ours_defaults))}), DALLE2-pytorch "
                    f"{theirs['seconds']:.1f} s "
                    f"(1000/1000/1000): {out['defaults']['ratio']:.0f}×")
    return out


def source_configs(engines) -> dict:
    """The model configs (``model.json``) of the checkpoints the engine folder was exported from."""
    from dalle2_rt.runtime.manifest import load_manifest
    from dalle2_rt.runtime.torch_reference import resolve_source

    manifest = load_manifest(engines)
    return {name: json.loads((resolve_source(manifest, name) / "model.json").read_text())["config"]
            for name in ("clip", "prior", "decoder", "sr")}


def unet_shapes(engines) -> dict:
    c = source_configs(engines)
    dec, sr = c["decoder"]["unet"], c["sr"]["unet"]
    return {"decoder_mults": dec["channel_mults"], "decoder_blocks": dec["num_res_blocks"],
            "sr_mults": sr["channel_mults"], "sr_blocks": sr["num_res_blocks"]}


def diffusers(engines, rounds: int = 3, threads: int = 2, steps=(25, 25, 7), log=print) -> dict:
    log(f"  vs diffusers UnCLIPPipeline, steps {steps}, {rounds} rounds")
    args = json.dumps({"threads": threads, "configs": source_configs(engines)})
    with _ours(engines, "onnxruntime", threads, "ours") as a, \
            Worker("diffusers", [sys.executable, "-m", "bench.worker", "diffusers", args]) as b:
        req = {"images": 1, "steps": list(steps), "prior_guidance": 4.0, "decoder_guidance": 5.0}
        answers = alternate([a, b], {"ours": {**req, "candidates": 1}, "diffusers": req}, rounds, log=log)
        out = _summary(answers, "ours", "diffusers")
        out["info"] = b.info
        out["sizes"] = size_check(a.info["networks"], b.info["networks"])
    log(f"  → ours {out['median']['ours']:.3f} s, diffusers {out['median']['diffusers']:.3f} s: {out['ratio']:.2f}×")
    return out
