"""int8 U-Nets, the experiment. The exporter now writes int8 variants itself (``export.all --int8 GRAPH``,
``export/int8.py``; measured in bench/RESULTS.md, "int8 variants from the exporter"): the bundled folder stays
fp32, the variants are an export option. What this experiment found first (2026-11-28, §A and §D):

Static QDQ quantisation of the decoder and SR graphs (per-channel int8 weights, uint8 activations, MinMax
ranges): at one image's guided batch the decoder ran 0.92× and SR 1.23× the fp32 speed at ~5 % error of
scale, so it buys nothing for one-image latency; in batches of 16 the whole pipeline went 0.21 → 0.14 s per
image at an equal fully-right rate (9.7 % vs 9.7 %, 600 captions), which is left for batch-throughput work.

    python -m bench.experiments.int8                      # speed and error on random inputs
    python -m bench.experiments.int8 --fidelity 600       # and fidelity, calibrated on real trajectories

``speed``: each graph calibrated and tested on random inputs (``bench.feeds``), fp32 and int8 sessions
interleaved. ``fidelity``: the decoder/SR of a loaded pipeline swapped for int8 graphs calibrated on the
inputs they saw while sampling other captions, scored on the same captions and seeds as fp32.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from export.int8 import Recorder, quantize

from ..feeds import graph_inputs
from ..profile_ort import graph_files, guided_batch, interleaved, session
from . import engine_folder, parser, write_json


def speed(manifest, graphs=("decoder", "sr0"), repeats: int = 5, log=print) -> dict:
    """Speed and output error of the int8 graphs, calibrated and tested on random inputs (rough scales:
    ``fidelity`` calibrates on real sampling trajectories and scores the images instead)."""
    out = {}
    for g in graphs:
        spec, plain, opt = graph_files(manifest, g)
        feeds = graph_inputs(spec, guided_batch(g), seed=7)
        with tempfile.TemporaryDirectory() as tmp:
            q = quantize(plain, [graph_inputs(spec, 2, seed=100 + i) for i in range(8)], Path(tmp) / "q.onnx")
            fp32, i8 = session(opt), session(q)
            ref, got = fp32.run(None, feeds)[0], i8.run(None, feeds)[0]
            ms = interleaved({"fp32": (fp32, feeds), "int8": (i8, feeds)}, repeats)
            out[g] = {"fp32_ms": 1e3 * ms["fp32"], "int8_ms": 1e3 * ms["int8"],
                      "rel_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
                      "rms_rel_err": float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))}
        if log:
            r = out[g]
            log(f"  {g}: fp32 {r['fp32_ms']:.1f} ms, int8 {r['int8_ms']:.1f} ms, max err {r['rel_err']:.3f} "
                f"of scale, rms {r['rms_rel_err']:.3f}")
    return out


class _SessionEngine:
    """An engine over an arbitrary ORT session (for swapping a quantised graph into a loaded Pipeline)."""

    def __init__(self, engine, sess):
        self.spec, self.name, self.max_batch = engine.spec, engine.name, engine.max_batch
        self.description = f"int8 {engine.name}"
        self._sess, self._outputs = sess, [t.name for t in engine.spec.outputs]

    def __call__(self, **arrays):
        feeds = {t.name: np.ascontiguousarray(arrays[t.name], dtype=t.dtype) for t in self.spec.inputs}
        return dict(zip(self._outputs, self._sess.run(self._outputs, feeds)))


def fidelity(pipe, captions: list[str], seeds=(0,), graphs=("decoder", "sr0"), calib_captions: int = 6,
                  threads: int = 2, baseline: dict | None = None, log=print) -> dict:
    """Fidelity with the decoder/SR swapped for int8 graphs calibrated on sampled trajectories (captions
    other than the evaluation ones), against the same captions and seeds in fp32 (``baseline`` =
    {"fully_right", "s_per_image"} when the caller already has it, e.g. the sweep's default point)."""
    from ..fidelity import eval_captions, generate_and_score

    original = dict(pipe.engines)
    recorders = {g: Recorder(original[g], every=3) for g in graphs}
    pipe.engines.update(recorders)
    calib = eval_captions(calib_captions // 2, calib_captions - calib_captions // 2, seed=99)
    pipe(calib, seed=123)
    pipe.engines.update(original)
    n = len(captions) * len(seeds)
    out = {"graphs": list(graphs), "captions": len(captions), "seeds": list(seeds),
           "calibration_batches": {g: len(r.kept) for g, r in recorders.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        swapped = {}
        for g in graphs:
            q = quantize(pipe.manifest.graphs[g].file, recorders[g].kept, Path(tmp) / f"{g}.int8.onnx")
            swapped[g] = _SessionEngine(original[g], session(q, threads=threads))
        if baseline is None:
            summary32, _, secs32 = generate_and_score(pipe, captions, seeds)
            baseline = {"fully_right": summary32.rate("fully_right"), "s_per_image": secs32 / n}
        pipe.engines.update(swapped)
        try:
            summary8, _, secs8 = generate_and_score(pipe, captions, seeds)
        finally:
            pipe.engines.update(original)
    out.update({"fp32": baseline, "int8": {"fully_right": summary8.rate("fully_right"), "s_per_image": secs8 / n}})
    if log:
        log(f"  int8 {'+'.join(graphs)}: fully right {out['int8']['fully_right']:.1%} vs fp32 "
            f"{out['fp32']['fully_right']:.1%}; {out['int8']['s_per_image']:.2f} vs {out['fp32']['s_per_image']:.2f} "
            "s/image (batches of 16)")
    return out


def main(argv=None) -> int:
    p = parser("python -m bench.experiments.int8", __doc__)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per graph and precision (default 7)")
    p.add_argument("--fidelity", type=int, metavar="CAPTIONS", default=0,
                   help="also score this many captions (half single-, half two-object) in fp32 and int8")
    p.add_argument("--graphs", nargs="+", default=["decoder", "sr0"], choices=["decoder", "sr0"],
                   help="which U-Nets to quantise (default both)")
    args = p.parse_args(argv)
    from dalle2_rt.runtime.manifest import load_manifest

    folder = engine_folder(args)
    res = {"speed": speed(load_manifest(folder), graphs=tuple(args.graphs), repeats=args.repeats)}
    if args.fidelity:
        from dalle2_rt.runtime.pipeline import Pipeline

        from ..fidelity import eval_captions

        pipe = Pipeline.load(folder, threads=args.threads)
        n = args.fidelity
        res["fidelity"] = fidelity(pipe, eval_captions(n // 2, n - n // 2), graphs=tuple(args.graphs),
                                   threads=args.threads)
    write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
