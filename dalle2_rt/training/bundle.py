"""Copy a training run's EMA weights into a small, committed checkpoint folder (the bundled model).

    python -m dalle2_rt.training.bundle runs/shapes-v2 checkpoints/shapes-v2 [--defaults defaults.json]

For every stage of the run, ``<run>/<stage>/model`` becomes ``<out>/<stage>/model`` with the weights stored
in fp16 (half the bytes; they are upcast to fp32 on load, and the exporter validates the graphs against
the upcast weights) and the config unchanged. ``--defaults`` (JSON: {"prior": {...}, "decoder": {...},
"sr": {...}}) records the sampling defaults the exporter writes into the manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from dalle2_rt.training.checkpoint import _write_atomic_dir, read_model_meta, resolve
from dalle2_rt.training.config import STAGES


def bundle(run: Path, out: Path, defaults: dict | None = None) -> list[str]:
    done = []
    for stage in STAGES:
        src = resolve(Path(run) / stage / "model")
        if not (src / "model.safetensors").exists():
            continue
        meta = read_model_meta(src)
        if defaults and stage in defaults:
            meta["defaults"] = defaults[stage]
        state = load_file(str(src / "model.safetensors"))
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

        def write(tmp: Path, state=state, meta=meta) -> None:
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

        _write_atomic_dir(Path(out) / stage / "model", write)
        done.append(stage)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle2_rt.training.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training run folder (<out_dir> of the config)")
    p.add_argument("out", help="checkpoint folder to write, e.g. checkpoints/shapes-v2")
    p.add_argument("--defaults", help="JSON file of per-stage sampling defaults")
    args = p.parse_args(argv)
    defaults = json.loads(Path(args.defaults).read_text()) if args.defaults else None
    done = bundle(Path(args.run), Path(args.out), defaults)
    if not done:
        print(f"bundle: no stage checkpoints under {args.run}", file=sys.stderr)
        return 1
    print(f"bundled {', '.join(done)} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
