"""Copy a training run's EMA weights into a small, committed checkpoint directory (the bundled model).

    python -m dalle2_rt.training.bundle runs/shapes-v2 checkpoints/shapes-v2 --stages clip,prior,sr [--defaults FILE]
    python -m dalle2_rt.training.bundle runs/shapes-v2 checkpoints/shapes-v2-guided --stages decoder

For every stage of the run, ``<run>/<stage>/model`` becomes ``<out>/<stage>/model`` with the weights stored
in fp16 (half the bytes; they are upcast to fp32 on load, and the exporter validates the graphs against
the upcast weights) and the config unchanged. A distillation stage is written as the stage its model is
(``decoder_distill``, ``decoder_steps``, ``decoder_compact`` → ``decoder``; ``sr_steps`` → ``sr``):

    python -m dalle2_rt.training.bundle runs/shapes-v2-sr1 checkpoints/shapes-v2-sr1 --stages sr_steps

Over a stage distilled otherwise (the bundled step-distilled decoder, a guided one in the run) bundling is
refused unless ``--replace`` says that is meant. A step-distilled stage (``distilled_steps`` in its model.json)
must get defaults that sample it in those steps: bundling refuses other defaults before writing anything.

Sampling defaults: the model's chosen defaults live in ``<out>/defaults.json`` ({"prior": {...}, "decoder":
{...}, "sr": {...}}, see ``dalle2_rt.models.registry.read_defaults``), committed beside the checkpoints. Each
bundled stage's ``model.json`` gets its entry, so a retrained run keeps the defaults that were chosen for the
model (a run's own ``model.json`` has none). ``--defaults FILE`` replaces ``<out>/defaults.json`` with FILE
first. The exporter applies the same file again, so editing it and re-exporting is also enough.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from dalle2_rt.models.registry import DEFAULTS, CheckpointError, a_kind, read_defaults, read_defaults_file
from dalle2_rt.training.checkpoint import _write_atomic_dir, read_model_meta, resolve
from dalle2_rt.training.config import STAGES


def _distillation(meta: dict) -> tuple:
    """What a model.json says of distillation: (distilled steps, guidance as an input)."""
    return meta.get("distilled_steps"), bool(meta.get("config", {}).get("guidance_input"))


# The stages a model folder is exported as; a run's other stages (distillations) are written as their model's kind.
EXPORTED = ("clip", "prior", "decoder", "sr")


def sources_to_bundle(run: Path, out: Path, stages: tuple[str, ...] = STAGES, replace: bool = False) -> dict:
    """{stage written in ``out``: (the run's model folder, its model.json)} for the ``stages`` ``run`` has, a
    distillation stage under its model's kind. CheckpointError where two of them would be written as one stage,
    and (unless ``replace``) where ``out`` holds that stage distilled otherwise: the bundled decoder is guidance-
    and step-distilled, the recipe's own decoder is not, and the defaults in ``out`` are the former's."""
    sources, named = {}, {}
    for stage in stages:
        src = resolve(Path(run) / stage / "model")
        if not (src / "model.safetensors").exists():
            continue
        meta = read_model_meta(src)
        target = stage if stage in EXPORTED else meta.get("kind")
        if target not in EXPORTED:
            raise CheckpointError(f"{src}: a {meta.get('kind')!r} model; bundled stages are {', '.join(EXPORTED)}")
        if target in named:
            raise CheckpointError(f"{run} has {named[target]} and {stage}, both {a_kind(target)}: name one with "
                                  "--stages")
        old = out / target / "model" / "model.json"
        if not replace and old.is_file() and _distillation(read_model_meta(old.parent)) != _distillation(meta):
            raise CheckpointError(
                f"{out / target} holds {a_kind(target)} distilled otherwise (distilled steps, guidance as an input: "
                f"{_distillation(read_model_meta(old.parent))}) than {src} {_distillation(meta)}; bundle that stage "
                f"elsewhere (the recipe's guided decoder: checkpoints/shapes-v2-guided), leave it out (--stages), "
                f"or --replace it (and give its defaults)")
        named[target] = stage
        sources[target] = (src, meta)
    return sources


def with_defaults(run: Path, out: Path, defaults: dict, stages: tuple[str, ...] = STAGES,
                  replace: bool = False) -> dict:
    """``sources_to_bundle`` with each model.json's defaults updated from ``defaults``. CheckpointError (as there)
    where a step-distilled stage would get defaults that sample it in other steps than it was distilled to."""
    sources = sources_to_bundle(run, out, stages, replace)
    for stage, (src, meta) in sources.items():
        if stage in defaults:
            meta["defaults"] = {**meta.get("defaults", {}), **defaults[stage]}
        distilled, steps = meta.get("distilled_steps"), meta.get("defaults", {}).get("steps")
        if distilled is not None and steps != distilled:
            raise CheckpointError(f"{src} was distilled to sample in {distilled} steps, but the defaults it would get "
                                  f"say {steps}: give {stage} steps = {distilled} in {out / DEFAULTS} or --defaults")
    return sources


def bundle(run: Path, out: Path, defaults: dict | None = None, stages: tuple[str, ...] = STAGES,
           replace: bool = False) -> list[str]:
    """Bundle the ``stages`` of ``run`` (those it has) into ``out``; returns the stages written. ``defaults`` (None:
    read ``out/defaults.json``) is applied key by key over what the run's ``model.json`` says. Refuses as
    ``with_defaults`` does, before anything is written."""
    out = Path(out)
    if defaults is None:
        defaults = read_defaults(out)
    done = []
    for stage, (src, meta) in with_defaults(Path(run), out, defaults, stages, replace).items():
        state = load_file(str(src / "model.safetensors"))
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

        def write(tmp: Path, state=state, meta=meta) -> None:
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

        _write_atomic_dir(out / stage / "model", write)
        done.append(stage)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle2_rt.training.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training run folder (<out_dir> of the config)")
    p.add_argument("out", help="checkpoint directory to write, e.g. checkpoints/shapes-v2")
    p.add_argument("--defaults", metavar="FILE", help=f"JSON of per-stage sampling defaults; becomes <out>/{DEFAULTS}")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to bundle (default all: {','.join(STAGES)}); a distillation "
                        "stage is written as the stage its model is (sr_steps as sr)")
    p.add_argument("--replace", action="store_true",
                   help="write over a stage of OUT that is distilled otherwise (refused without it)")
    args = p.parse_args(argv)
    out = Path(args.out)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        print(f"bundle: error: --stages takes {', '.join(STAGES)}; got {args.stages!r}", file=sys.stderr)
        return 2
    try:
        if args.defaults:
            given = read_defaults_file(args.defaults)
            with_defaults(Path(args.run), out, given, stages, args.replace)  # refused before defaults are replaced
            out.mkdir(parents=True, exist_ok=True)
            (out / DEFAULTS).write_text(json.dumps(given, indent=2) + "\n")
        done = bundle(Path(args.run), out, stages=stages, replace=args.replace)
    except CheckpointError as e:
        print(f"bundle: error: {e}", file=sys.stderr)
        return 1
    if not done:
        print(f"bundle: no stage checkpoints under {args.run}", file=sys.stderr)
        return 1
    print(f"bundled {', '.join(done)} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
