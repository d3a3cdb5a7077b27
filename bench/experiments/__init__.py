"""Decided experiments: measurements that chose a setting of the runtime, kept so that the choice can be
re-measured, and run by hand (``make bench`` runs only the regression benchmarks in ``bench/``).
Their recorded results are in ``bench/RESULTS.md``. One line each, what it decided:

- ``pools.py``: ONNX Runtime sessions share one process-wide, non-spinning thread pool in the CLI (142 ms vs
  170 ms for own sleeping pools and 233 ms for own spinning ones, one image at 5/10/3, 2 threads).
- ``prefix.py``: the prior runs as ``prior_prefix`` once + ``prior_step`` per step (prior stage 29 → 8 ms at
  5 steps, the whole image 130 → 110 ms), not the full ``prior`` graph at every step.
- ``steps_confirm.py``: default steps 5/5/3 (prior/decoder/SR), the fewest within 2 points of the best
  setting's fully-right rate on 1,200 paired images (9.7 % vs 11.5 % for 25/10/3).
- ``decoder_ranking.py``: the bundled model draws 3 decoder samples per image at 5 steps and keeps the one
  CLIP ranks closest to the text (two-object captions fully right 18 → ~31 %, single-object 94 → 100 %;
  guidance 1 loses what the halved cost would buy).
  Ranking by the prior's image embedding instead of the text (the 3-step student at 3,000 steps, 2026-12-07):
  no consistent difference (two-object 78.7 vs 78.3 % at k = 4, oracle 87.3 %); the runtime keeps the text.
- ``learned_ranker.py``: the runtime keeps ranking with CLIP: its image tower fine-tuned on 3,000 captions'
  decoder candidates labelled by the scorer kept 79 – 82 % of two-object captions at k = 4 against CLIP's 80 %
  (the 3-step student, 2026-12-07; oracle 88 %).
- ``int8.py``: the U-Nets stay fp32: static int8 is 0.92× (decoder) / 1.23× (SR) at one image's batch with
  ~5 % error of scale; 0.21 → 0.14 s per image in batches of 16 at equal fidelity is left for batch
  throughput work.
- ``sr_noise.py``: the defaults keep 2 SR steps: at 1 the scorer grades the images as well but they carry 2.1×
  the speckle (5.6 vs 2.7 levels of 255 against a 3×3 median; the world's renders 0.2).

Not kept: the allocator probe (arena and memory pattern on vs off; peak RSS of 8 images 603 → 295 MB, no
slower): the runtime now turns both off, so the probe had become three identical configurations.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every experiment takes: --engines, --threads, --json."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--engines", help="engine folder (default: the bundled engines/shapes-v2)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def engine_folder(args) -> Path:
    """The folder ``--engines`` names, else the bundled one (which must have been built: `make engines`)."""
    from ..engines import resolve

    return resolve(args.engines, allow_random=False)[0]


def write_json(result: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result, indent=1, default=str))
