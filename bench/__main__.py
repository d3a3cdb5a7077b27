"""``python -m bench`` (``make bench``): latency, cold start, memory, GFLOP/s, side-by-sides and fidelity.

    python -m bench                                  # everything, on engines/shapes-v2 (~20 min on 2 cores)
    python -m bench --quick                          # fewer repeats and rounds, no 1000-step run, small sweep
    python -m bench --parts latency,cold,profile     # some parts only
    python -m bench --engines DIR --out DIR

Parts: machine (CPU, sgemm rate), flops, latency (warm, per stage and graph, 1/4/8 images), cold (CLI
cold start and peak RSS), profile (ORT session settings, batching, op breakdown), backends (onnxruntime vs
torch backend), dalle2 (vs DALLE2-pytorch 1.15.6), diffusers (vs UnCLIPPipeline), fidelity (fidelity vs
steps sweep; only on a trained model). Without the bundled engines the timing parts run on random-weight
engines of the same sizes (``bench/engines.py``). Writes ``OUT/results.json`` and ``OUT/RESULTS.md`` (the
tables, with the machine and this command); numbers are printed as they come. The experiments that
decided a setting of the runtime are run by hand (``bench/experiments/``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import engines as eng
from . import machine, report
from .compare import steps_arg

PARTS = ("machine", "flops", "latency", "cold", "profile", "backends", "dalle2", "diffusers", "fidelity")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", help="engine folder (default: engines/shapes-v2, else a random-weight stand-in)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="fewer repeats/rounds, skip the 1000-step run")
    p.add_argument("--threads", type=int, default=2, help="threads per contender (default 2)")
    p.add_argument("--out", default=str(eng.OUT), help="where results.json and RESULTS.md go (default bench/out)")
    p.add_argument("--sweep-captions", type=int, default=None,
                   help="captions per fidelity point (default 200: ~15 min; 40 leaves a standard error of ~5 points)")
    p.add_argument("--counts", default=None, help="image counts for warm latency (default 1,4,8)")
    p.add_argument("--latency-steps", type=steps_arg, default=None, metavar="P,D,S",
                   help="prior,decoder,sr steps for the warm latency part (default: the manifest's)")
    p.add_argument("--steps", type=steps_arg, default=None, metavar="P,D,S",
                   help="prior,decoder,sr steps of the backends and DALLE2-pytorch side-by-sides (default: the "
                        "manifest's; the diffusers side-by-side always runs 25/25/7)")
    p.add_argument("--no-chart-copy", action="store_true", help="do not copy the chart to bench/fidelity_steps.png")
    p.add_argument("--dalle2-defaults", choices=("full", "estimate", "skip"), default="full",
                   help="DALLE2-pytorch at its 1000-step defaults: run it whole (default), or time the first "
                        "calls of each stage and extrapolate (busy machine)")
    p.add_argument("--fidelity-untrained", action="store_true",
                   help="run the fidelity sweep even on untrained engines (to test the harness)")
    return p


@dataclass
class Bench:
    """One ``python -m bench`` run: its options, the engine folder, and where the results go."""

    args: argparse.Namespace
    folder: Path
    trained: bool
    out: Path
    shared_threads: bool

    @property
    def quick(self) -> bool:
        return self.args.quick

    def log(self, msg: str) -> None:
        print(msg, flush=True)


def main(argv=None, *, shared_threads: bool = False) -> int:
    """``shared_threads``: the latency part runs the pipeline on onnxruntime's process-wide thread pool, as
    the CLI does; only for ``python -m bench`` (its own process), since afterwards onnxruntime refuses
    sessions with pools of their own anywhere in the process."""
    p = _parser()
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    folder, trained = eng.resolve(args.engines)
    b = Bench(args, folder, trained, Path(args.out), shared_threads)
    b.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    shown = os.path.relpath(folder, eng.REPO) if folder.resolve().is_relative_to(eng.REPO) else str(folder)
    results: dict = {"command": command.strip(), "engines": shown, "trained": trained, "quick": args.quick,
                     "threads": args.threads, "machine": machine.describe(), "parts": {}, "errors": {}}
    b.log(f"bench: {folder} ({'trained' if trained else 'RANDOM weights: timing only'}), "
          f"{results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"load {results['machine']['load_average']}")
    started = time.perf_counter()
    # Order: the latency part runs the pipeline as the CLI does, on onnxruntime's process-wide thread pool,
    # after which onnxruntime refuses sessions with pools of their own (the profile part's).
    for name in ORDER:
        if name in parts:
            _run_part(b, results, name)
    results["seconds"] = time.perf_counter() - started
    (b.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (b.out / "RESULTS.md").write_text(report.render(results))
    b.log(f"bench: done in {results['seconds'] / 60:.1f} min → {b.out / 'results.json'}, {b.out / 'RESULTS.md'}")
    return 1 if results["errors"] else 0


def _run_part(b: Bench, results: dict, name: str) -> None:
    """Run one part into ``results``; a part that fails is recorded as an error and the others still run."""
    b.log(f"[{name}]")
    t0 = time.perf_counter()
    try:
        results["parts"][name] = RUNNERS[name](b)
    except Exception as e:  # noqa: BLE001 - one broken part must not lose the others' numbers
        traceback.print_exc()
        results["errors"][name] = f"{type(e).__name__}: {e}"
    b.log(f"[{name}] {time.perf_counter() - t0:.0f} s")
    (b.out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def _machine(b: Bench) -> dict:
    return machine.sgemm_rates()


def _flops(b: Bench) -> dict:
    from .flops import count_flops, count_params

    manifest = json.loads((b.folder / "manifest.json").read_text())
    res = {}
    for name, g in manifest["graphs"].items():
        c = count_flops(b.folder / g["file"], 1)
        res[name] = {"gflop": c["flops"] / 1e9, "params": count_params(b.folder / g["file"]), "by_op": c["by_op"],
                     "probed": c["probed"]}
        b.log(f"  {name}: {res[name]['gflop']:.3f} GFLOP per row, {res[name]['params'] / 1e6:.2f} M params")
    return res


def _latency(b: Bench) -> dict:
    from dalle2_rt.runtime.pipeline import Pipeline

    from . import latency

    counts = tuple(int(c) for c in b.args.counts.split(",")) if b.args.counts else ((1, 4) if b.quick else (1, 4, 8))
    pipe = Pipeline.load(b.folder, threads=b.args.threads, shared_threads=b.shared_threads)
    steps = {}
    if b.args.latency_steps:
        steps = dict(zip(("prior_steps", "decoder_steps", "sr_steps"), b.args.latency_steps))
    return {"settings": pipe.settings(**steps),
            **latency.measure(pipe, counts=counts, repeats=2 if b.quick else 3, log=b.log, **steps)}


def _profile(b: Bench) -> dict:
    from dalle2_rt.runtime.manifest import load_manifest

    from . import profile_ort as po

    m = load_manifest(b.folder)
    reps = 3 if b.quick else 7
    res = {"settings": po.threads_and_levels(m, repeats=reps, log=b.log),
           "batching": po.batching(m, repeats=reps, log=b.log),
           "ops": po.op_breakdown(m, runs=3 if b.quick else 5)}
    b.log("  decoder op time: " + ", ".join(f"{k} {v:.0%}" for k, v in list(res["ops"]["share"].items())[:6]))
    return res


def _fidelity(b: Bench) -> dict:
    from dalle2_rt.runtime.pipeline import Pipeline

    from . import steps_sweep

    if not b.trained and not b.args.fidelity_untrained:
        return {"skipped": "random-weight engines: fidelity needs the trained model"}
    pipe = Pipeline.load(b.folder, threads=b.args.threads)
    res = steps_sweep.sweep(pipe, captions=b.args.sweep_captions or (8 if b.quick else 200),
                            sweeps=steps_sweep.QUICK_SWEEPS if b.quick else None, log=b.log)
    chart = b.out / "fidelity_steps.png"
    steps_sweep.chart(res, chart, engines=pipe.manifest.name)
    if not b.args.no_chart_copy and b.out.resolve() == eng.OUT.resolve():
        shutil.copyfile(chart, eng.REPO / "bench" / "fidelity_steps.png")
    res["chart"] = str(chart)
    b.log("  chosen: " + ", ".join(f"{s} {r['chosen']}" for s, r in res["sweeps"].items()))
    return res


def _cold(b: Bench) -> dict:
    from . import coldstart

    return coldstart.measure(b.folder, repeats=2 if b.quick else 3, threads=b.args.threads, log=b.log)


def _backends(b: Bench) -> dict:
    from . import compare

    return compare.backends(b.folder, rounds=3 if b.quick else 5, threads=b.args.threads, steps=b.args.steps,
                            log=b.log)


def _dalle2(b: Bench) -> dict:
    from . import compare

    return compare.dalle2(b.folder, rounds=2 if b.quick else 3, threads=b.args.threads, steps=b.args.steps,
                          defaults="skip" if b.quick else b.args.dalle2_defaults, log=b.log)


def _diffusers(b: Bench) -> dict:
    from . import compare

    return compare.diffusers(b.folder, rounds=2 if b.quick else 3, threads=b.args.threads, log=b.log)


RUNNERS = {"machine": _machine, "flops": _flops, "latency": _latency, "cold": _cold, "profile": _profile,
           "backends": _backends, "dalle2": _dalle2, "diffusers": _diffusers, "fidelity": _fidelity}
ORDER = ("machine", "flops", "profile", "fidelity", "latency", "cold", "backends", "dalle2", "diffusers")


if __name__ == "__main__":
    sys.exit(main(shared_threads=True))
