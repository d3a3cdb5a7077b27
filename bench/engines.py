"""Which engine folder the benchmarks measure, and a stand-in for it before the bundled model exists.

Latency depends on the graphs' shapes, not on what their weights learned, so until ``engines/shapes-v2``
is built (``make engines``) the timing parts run on an export of *random-weight* checkpoints with the
bundled model's configs (``configs/shapes-v2.toml``): the same graph sizes with untrained weights.
Fidelity needs the trained model and is skipped on such a folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from dalle2_rt.runtime.pipeline import DEFAULT_ENGINES

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "engines" / DEFAULT_ENGINES
OUT = REPO / "bench" / "out"
RANDOM_FULL = OUT / "engines" / "random-full"
RECIPE = REPO / "configs" / "shapes-v2.toml"


def is_trained(folder: Path) -> bool:
    """Whether every checkpoint the folder was exported from had trained (its manifest's ``sources.*.step``)."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return all(int(s.get("step", 1)) > 0 for s in manifest.get("sources", {}).values())


def random_full_engines(out: Path = RANDOM_FULL, *, quiet: bool = True) -> Path:
    """Export random-weight checkpoints with the recipe's model configs to ``out`` (idempotent); return it."""
    from dalle2_rt.training.config import load_config
    from export.all import export_folder
    from tests.conftest import write_tiny_checkpoints

    out = Path(out)
    ckpt = out.parent / f"{out.name}-checkpoints"
    # The bundled model's sizes: the recipe's [model.*] overrides of the dataclass defaults. Every stage is
    # named so that the dict is never empty (empty would mean the tiny test configs).
    model = {"clip": {}, "prior": {}, "decoder": {}, "sr": {}, **load_config(RECIPE).model}
    stamp = ckpt / "recipe-model.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != model:
        write_tiny_checkpoints(ckpt, model=model)
        stamp.write_text(json.dumps(model, sort_keys=True))
    export_folder(ckpt, out, name=out.name, quiet=quiet)
    return out


def resolve(engines: str | None, *, allow_random: bool = True) -> tuple[Path, bool]:
    """(folder, trained): ``engines`` if given, else the bundled engines, else the random-weight stand-in."""
    if engines:
        folder = Path(engines)
    elif (BUNDLED / "manifest.json").exists():
        folder = BUNDLED
    elif allow_random:
        print(f"bench: {BUNDLED} is missing (run `make engines`); timing a random-weight export of the same sizes "
              f"instead ({RANDOM_FULL}, built once)", flush=True)
        folder = random_full_engines()
    else:
        raise SystemExit(f"{BUNDLED} is missing: run `make engines`")
    return folder, is_trained(folder)
