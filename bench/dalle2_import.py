"""The speed of an imported DALLE2-pytorch model: DALLE2-pytorch's own sampling against this runtime on the
engine folder ``export.all --from-dalle2-pytorch`` made from the same checkpoints, side by side.

    python -m bench.dalle2_import                         # the default model, 5 rounds, 2 threads
    python -m bench.dalle2_import --rounds 1 --full skip  # a quick look
    python -m bench.dalle2_import --json bench/out/dalle2_import.json

1. The model. In DALLE2-pytorch's venv (bench/.venv-dalle2; ``python -m bench.dalle2_venv`` makes it) a
   ``DiffusionPrior`` and a ``Decoder`` are built from LAION-style config JSON by its own config classes, with
   random weights from ``--seed``, and saved as a user has them, with an open_clip model
   (``bench/dalle2_import_side.py``; the layout of LAION's released configs at a smaller scale):
   - CLIP (open_clip): embedding and text width ``--prior-dim``, ``--clip-layers`` text layers, 77 tokens;
   - prior: ``DiffusionPriorNetwork(dim=--prior-dim, depth=--prior-depth, heads=4, dim_head=64)``,
     x0-prediction, cosine schedule, conditioned on the text encodings;
   - decoder: a base ``Unet(dim=--unet-dim, dim_mults=(1, 2, 4))`` at 32×32 (conditioned on the image
     embedding and the text encodings, self-attention at its two lower levels, learned variance, eps) and an
     upsampler ``Unet(dim=--sr-dim, dim_mults=(1, 2, 4))`` to 64×64; cosine schedules;
   - ``--timesteps`` training steps in every stage (LAION's: 1000).
   Built once into ``--work`` (git-ignored) and reused while the configs are unchanged.
2. The import: ``python -m export.all --from-dalle2-pytorch`` into ``--work``/engines (max batch = the largest
   of ``--batches``); an up-to-date folder is left as it is. The build and the import run with ``--threads``
   threads as well (OMP_NUM_THREADS).
3. The timing. Each side runs warm in its own process with ``--threads`` threads and times each call itself
   (start-up excluded): DALLE2-pytorch as ``DALLE2.forward`` samples (its tokenizer, CLIP text encoder,
   ``prior.sample`` with 2 candidates per image, ``decoder.sample``; the upsampler unguided), ours as
   ``dalle2_rt.Pipeline`` (``bench.sides.build_ours``: tokenizer, text encoder, prior with 2 candidates,
   decoder, upsampler). One prompt; ``--batches`` images per call; the same steps on both sides: ``--steps``
   (DDIM, its ``p_sample_loop_ddim`` loops and our DDIM sampler: one network call per step, two separate ones
   per guided step on its side, one at twice the batch on ours; its prior's time grid starts at −1, so its
   prior makes one call fewer than the steps asked) at each ``--guidance`` (prior, decoder; 1 is
   DALLE2-pytorch's default and its configs': the conditional branch alone). Rounds alternate ours,
   theirs, ours, … so drifts of the machine fall on both; each side's median and min–max are reported.
   ``--full run`` adds its own defaults once: DDPM over all ``--timesteps`` steps in every stage at guidance 1,
   one image, ours (DDPM, the same steps) before and after (``skip`` leaves it out; it takes minutes).

Run it on a quiet machine: with other load on the cores, torch's OpenMP threads wait on each other at every
barrier (a small base U-Net on a busy 2-core machine: 2.9 s per call at 2 threads, 26 ms at 1), which
measures the scheduler, not the sampler; where the machine cannot be quiet, give ``--threads 1``. The default
run (build and import included) should take about a quarter of an hour on a quiet 2-core machine, most of it
the 1000-step row (an estimate from single network calls, not a measured run).

Prints a table of ms per image and the speed-up (theirs / ours), with the CPU, the date and the threads;
``--json`` writes everything. Exits 1 when a side fails (its error printed), 2 on a bad argument.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import dalle2_venv
from .compare import steps_arg
from .machine import describe
from .timing import REPO, SETTLE_S, Worker, alternate, median, spread

SIDE = REPO / "bench" / "dalle2_import_side.py"
WORK = REPO / "bench" / "out" / "dalle2-import"
CLIP_FILE = "tiny-clip.json"  # the file names tests/test_dalle2_pytorch_import.py's export helper reads
PROMPT_TOKENS = 77


def configs(prior_dim: int, prior_depth: int, unet_dim: int, sr_dim: int, timesteps: int, clip_layers: int) -> dict:
    """The three config files, as LAION's releases lay them out ({"prior": ...}, {"decoder": ...}) plus an
    open_clip model config (its vision tower minimal: sampling never runs it)."""
    clip = {"embed_dim": prior_dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": PROMPT_TOKENS, "vocab_size": 49408, "width": prior_dim, "heads": 4,
                         "layers": clip_layers}}
    prior = {"net": {"dim": prior_dim, "depth": prior_depth, "dim_head": 64, "heads": 4, "num_timesteps": timesteps,
                     "max_text_len": PROMPT_TOKENS},
             "image_embed_dim": prior_dim, "image_size": 32, "timesteps": timesteps, "cond_drop_prob": 0.1,
             "predict_x_start": True, "beta_schedule": "cosine", "condition_on_text_encodings": True}
    base = {"dim": unet_dim, "dim_mults": [1, 2, 4], "image_embed_dim": prior_dim, "text_embed_dim": prior_dim,
            "cond_dim": 2 * unet_dim, "cond_on_text_encodings": True, "self_attn": [False, True, True],
            "attn_dim_head": 32, "attn_heads": 4, "channels": 3}
    up = {"dim": sr_dim, "dim_mults": [1, 2, 4], "channels": 3}
    decoder = {"unets": [base, up], "image_sizes": [32, 64], "timesteps": timesteps,
               "learned_variance": [True, False], "beta_schedule": ["cosine", "cosine"]}
    return {CLIP_FILE: clip, "prior.json": {"prior": prior}, "decoder.json": {"decoder": decoder}}


def make_model(python: Path, work: Path, files: dict, seed: int, log=print) -> None:
    """Write the configs and let DALLE2-pytorch build and save the model, unless ``work`` already holds it."""
    files = {**files, "seed.json": {"seed": seed}}
    saved = ("prior.pth", "decoder.pth", "clip.pt")
    same = all((work / n).exists() and json.loads((work / n).read_text()) == c for n, c in files.items())
    if same and all((work / n).exists() for n in saved):
        log(f"  model: {work} (unchanged)")
        return
    work.mkdir(parents=True, exist_ok=True)
    for name in saved:
        (work / name).unlink(missing_ok=True)
    for name, content in files.items():
        (work / name).write_text(json.dumps(content, indent=1))
    log(f"  model: building it in DALLE2-pytorch → {work}")
    subprocess.run([str(python), str(SIDE), "make", str(work)], check=True, cwd=REPO)


def import_model(work: Path, max_batch: int, log=print) -> Path:
    """``export.all --from-dalle2-pytorch`` of ``work``'s files into ``work``/engines."""
    from tests.test_dalle2_pytorch_import import _export  # DALLE2-pytorch's site-packages on the exporter's path

    engines = work / "engines"
    log(f"  import: export.all --from-dalle2-pytorch → {engines}")
    t0 = time.perf_counter()
    done = _export(work, engines, "--max-batch", str(max_batch))
    if done.returncode != 0:
        raise RuntimeError(f"export.all --from-dalle2-pytorch failed: {done.stderr.strip()[-2000:]}")
    log(f"    {done.stdout.strip().splitlines()[-1] if done.stdout.strip() else 'done'} "
        f"({time.perf_counter() - t0:.0f} s)")
    return engines


def per_image(answers: list[dict], images: int) -> dict:
    """Spread (median, min, max, n) of ms per image."""
    return spread(1e3 * a["seconds"] / images for a in answers)


def run(args, log=print) -> dict:
    # every torch process below (the build, the export, its side) with the threads the sides get; more than
    # the free cores stall OpenMP's barriers (a busy 2-core machine: 26 ms -> 2.9 s per U-Net call at 2)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    python = dalle2_venv.ensure(log)
    files = configs(args.prior_dim, args.prior_depth, args.unet_dim, args.sr_dim, args.timesteps, args.clip_layers)
    make_model(python, args.work, files, args.seed, log)
    engines = import_model(args.work, max(args.batches), log)
    out = {"machine": describe(), "threads": args.threads, "rounds": args.rounds, "steps": list(args.steps),
           "timesteps": args.timesteps, "configs": files, "seed": args.seed, "cases": [],
           "model": (f"prior dim {args.prior_dim} depth {args.prior_depth}, base U-Net dim {args.unet_dim} at "
                     f"32×32, upsampler dim {args.sr_dim} to 64×64, CLIP text {args.clip_layers} layers, "
                     f"T = {args.timesteps}")}
    ours_argv = [sys.executable, "-m", "bench.worker", "ours",
                 json.dumps({"engines": str(engines), "threads": args.threads, "warm": False, "flops": False})]
    theirs_argv = [str(python), str(SIDE), "serve", json.dumps({"folder": str(args.work), "threads": args.threads})]
    with Worker("ours", ours_argv) as a, Worker("dalle2_pytorch", theirs_argv) as b:
        a.ask({"op": "run", "steps": [2, 2, 2], "sampler": "ddim"})  # warm: sessions' first runs allocate
        out["info"] = {"ours": a.info, "dalle2_pytorch": b.info}
        for guidance in args.guidance:
            for n in args.batches:
                log(f"  {n} image(s), steps {'/'.join(map(str, args.steps))} DDIM, guidance "
                    f"{guidance[0]:g}/{guidance[1]:g}, {args.rounds} round(s)")
                req = {"images": n, "steps": list(args.steps)}
                answers = alternate([a, b], {
                    "ours": {**req, "sampler": "ddim", "prior_guidance": guidance[0], "decoder_guidance": guidance[1]},
                    "dalle2_pytorch": {**req, "guidance": list(guidance)}}, args.rounds, log=log)
                out["cases"].append(case(f"{'/'.join(map(str, args.steps))} DDIM", guidance, n, answers, log))
        if args.full == "run":
            t = args.timesteps
            log(f"  its defaults: 1 image, {t}/{t}/{t} DDPM, guidance 1/1, once (ours, theirs, ours)")
            ours_req = {"op": "run", "images": 1, "steps": [t, t, t], "sampler": "ddpm",
                        "prior_guidance": 1.0, "decoder_guidance": 1.0}
            answers = {"ours": [], "dalle2_pytorch": []}
            for side, req in ((a, ours_req), (b, {"op": "run", "images": 1, "steps": None, "guidance": [1.0, 1.0]}),
                              (a, ours_req)):
                time.sleep(SETTLE_S)
                answers[side.name].append(side.ask(req, timeout=7200))
                log(f"    {side.name}: {answers[side.name][-1]['seconds']:.2f} s")
            out["cases"].append(case(f"{t}/{t}/{t} DDPM (its defaults)", (1.0, 1.0), 1, answers, log))
    return out


def case(steps: str, guidance, images: int, answers: dict, log=print) -> dict:
    ours, theirs = per_image(answers["ours"], images), per_image(answers["dalle2_pytorch"], images)
    c = {"steps": steps, "guidance": list(guidance), "images": images, "ours_ms": ours, "theirs_ms": theirs,
         "speedup": theirs["median"] / ours["median"],
         "theirs_stages_s": {k: median(a["stages"][k] for a in answers["dalle2_pytorch"])
                             for k in answers["dalle2_pytorch"][0]["stages"]}}
    log(f"    → ours {ours['median']:.0f} ms/image, DALLE2-pytorch {theirs['median']:.0f} ms/image: "
        f"{c['speedup']:.2f}×")
    return c


def table(out: dict) -> str:
    m = out["machine"]
    info = out["info"]["dalle2_pytorch"]
    head = (f"{m['cpu']} ({m['cores']} cores, load {m['load_average'][0]}), {m['date']}, {out['threads']} "
            f"thread(s) per side, {out['rounds']} round(s); DALLE2-pytorch {info['dalle2_pytorch']} (torch "
            f"{info['torch']}) vs dalle2_rt (onnxruntime {m['onnxruntime']})")
    graphs = out["info"]["ours"].get("networks", {})
    params = ", ".join(f"{k} {v / 1e6:.2f} M (its graph {graphs.get(k, {}).get('params', 0) / 1e6:.2f} M)"
                       for k, v in info["params"].items())
    rows = ["| steps (prior/decoder/SR) | guidance (prior/decoder) | images per call | ours, ms per image "
            "(min–max) | DALLE2-pytorch, ms per image (min–max) | speed-up |", "|---|---|---|---|---|---|"]
    for c in out["cases"]:
        o, t = c["ours_ms"], c["theirs_ms"]
        rows.append(f"| {c['steps']} | {c['guidance'][0]:g}/{c['guidance'][1]:g} | {c['images']} | "
                    f"{o['median']:.0f} ({o['min']:.0f}–{o['max']:.0f}) | {t['median']:.0f} "
                    f"({t['min']:.0f}–{t['max']:.0f}) | **{c['speedup']:.2f}×** |")
    return "\n".join([head, f"model: {out['model']}; parameters: {params}", "", *rows])


def _pair(text: str) -> tuple[float, float]:
    try:
        prior, decoder = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRIOR,DECODER guidance, got {text!r}") from None
    if prior < 1 or decoder < 1:
        raise argparse.ArgumentTypeError(f"guidance must be >= 1, got {text!r}")
    return prior, decoder


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.dalle2_import", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=_positive, default=5, help="alternating rounds per case (default: %(default)s)")
    ap.add_argument("--threads", type=_positive, default=2, help="threads of each side (default: %(default)s)")
    ap.add_argument("--batches", type=_positive, nargs="+", default=[1, 4], metavar="N",
                    help="images per call, one case each (default: 1 4)")
    ap.add_argument("--steps", type=steps_arg, default=(10, 10, 5), metavar="P,D,S",
                    help="DDIM steps of prior, decoder and upsampler on both sides (default: 10,10,5)")
    ap.add_argument("--guidance", type=_pair, nargs="+", default=[(1.0, 1.0), (4.0, 4.0)], metavar="P,D",
                    help="prior and base-decoder guidance, one case each; the upsampler is unguided "
                         "(default: 1,1 4,4)")
    ap.add_argument("--full", choices=("run", "skip"), default="run",
                    help="also its defaults, DDPM over all --timesteps, one image once (default: %(default)s)")
    model = ap.add_argument_group("the model (rebuilt when these change)")
    model.add_argument("--prior-dim", type=_positive, default=256,
                       help="prior width = CLIP embedding and text width (default: %(default)s)")
    model.add_argument("--prior-depth", type=_positive, default=6, help="prior layers (default: %(default)s)")
    model.add_argument("--unet-dim", type=_positive, default=64,
                       help="base U-Net width at 32×32, ×1/2/4 by level (default: %(default)s)")
    model.add_argument("--sr-dim", type=_positive, default=32,
                       help="upsampler width at 64×64, ×1/2/4 by level (default: %(default)s)")
    model.add_argument("--clip-layers", type=_positive, default=4, help="CLIP text layers (default: %(default)s)")
    model.add_argument("--timesteps", type=_positive, default=1000,
                       help="training steps of every stage (default: %(default)s, LAION's)")
    model.add_argument("--seed", type=int, default=0, help="the random weights' seed (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=WORK,
                    help="model and engine folder (default: bench/out/dalle2-import)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if max(args.steps) >= args.timesteps:
        print(f"bench.dalle2_import: error: --steps {args.steps} must be below --timesteps {args.timesteps} (its "
              "DDIM loops run only then)", file=sys.stderr)
        return 2
    args.work = args.work.resolve()
    try:
        out = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"bench.dalle2_import: error: {e}", file=sys.stderr)
        return 1
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
