"""Copy a training run's EMA weights into a small, committed checkpoint directory (the bundled model).

    python -m dalle2_rt.training.bundle runs/shapes-v2 checkpoints/shapes-v2 [--defaults FILE]

For every stage of the run, ``<run>/<stage>/model`` becomes ``<out>/<stage>/model`` with the weights stored
in fp16 (half the bytes; they are upcast to fp32 on load, and the exporter validates the graphs against
the upcast weights) and the config unchanged.

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

from dalle2_rt.models.registry import DEFAULTS, CheckpointError, read_defaults, read_defaults_file
from dalle2_rt.training.checkpoint import _write_atomic_dir, read_model_meta, resolve
from dalle2_rt.training.config import STAGES


def bundle(run: Path, out: Path, defaults: dict | None = None) -> list[str]:
    """Bundle every stage of ``run`` into ``out``; returns the stages written. ``defaults`` (None: read
    ``out/defaults.json``) is applied key by key over what the run's ``model.json`` says."""
    out = Path(out)
    if defaults is None:
        defaults = read_defaults(out)
    done = []
    for stage in STAGES:
        src = resolve(Path(run) / stage / "model")
        if not (src / "model.safetensors").exists():
            continue
        meta = read_model_meta(src)
        if stage in defaults:
            meta["defaults"] = {**meta.get("defaults", {}), **defaults[stage]}
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
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.defaults:
            given = read_defaults_file(args.defaults)
            out.mkdir(parents=True, exist_ok=True)
            (out / DEFAULTS).write_text(json.dumps(given, indent=2) + "\n")
        done = bundle(Path(args.run), out)
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
