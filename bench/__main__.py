"""``python -m bench`` (``make bench``): latency, cold start, memory, GFLOP/s, side-by-sides and fidelity.

    python -m bench                                  # everything, on engines/shapes-v1 (~20 min on 2 cores)
    python -m bench --quick                          # fewer repeats and rounds, no 1000-step run, small sweep
    python -m bench --parts latency,cold,profile     # some parts only
    python -m bench --engines DIR --out DIR

Parts: machine (CPU, sgemm rate), flops, latency (warm, per stage and graph, 1/4/8 images), cold (CLI
cold start and peak RSS), profile (ORT settings experiments, op breakdown, int8), backends (onnxruntime vs
torch backend), dalle2 (vs DALLE2-pytorch 1.15.6), diffusers (vs UnCLIPPipeline), fidelity (fidelity vs
steps sweep; only on a trained model). Without the bundled engines the timing parts run on random-weight
engines of the same sizes (``bench/engines.py``). Writes ``OUT/results.json`` and ``OUT/RESULTS.md`` (the
tables, with the machine and this command); numbers are printed as they come.
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
from pathlib import Path

from . import engines as eng
from . import machine, report

PARTS = ("machine", "flops", "latency", "cold", "profile", "backends", "dalle2", "diffusers", "fidelity")


def main(argv=None, *, shared_threads: bool = False) -> int:
    """``shared_threads``: the latency part runs the pipeline on onnxruntime's process-wide thread pool, as
    the CLI does; only for ``python -m bench`` (its own process), since afterwards onnxruntime refuses
    sessions with pools of their own anywhere in the process."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", help="engine folder (default: engines/shapes-v1, else a random-weight stand-in)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="fewer repeats/rounds, skip the 1000-step run")
    p.add_argument("--threads", type=int, default=2, help="threads per contender (default 2)")
    p.add_argument("--out", default=str(eng.OUT), help="where results.json and RESULTS.md go (default bench/out)")
    p.add_argument("--sweep-captions", type=int, default=None,
                   help="captions per fidelity point (default 200: ~15 min; 40 leaves a standard error of ~5 points)")
    p.add_argument("--counts", default=None, help="image counts for warm latency (default 1,4,8)")
    p.add_argument("--latency-steps", default=None, metavar="P,D,S",
                   help="prior,decoder,sr steps for the warm latency part (default: the manifest's)")
    p.add_argument("--steps", default=None, metavar="P,D,S",
                   help="prior,decoder,sr steps of the backends and DALLE2-pytorch side-by-sides (default: the "
                        "manifest's; the diffusers side-by-side always runs 25/25/7)")
    p.add_argument("--no-chart-copy", action="store_true", help="do not copy the chart to bench/fidelity_steps.png")
    p.add_argument("--dalle2-defaults", choices=("full", "estimate", "skip"), default="full",
                   help="DALLE2-pytorch at its 1000-step defaults: run it whole (default), or time the first "
                        "calls of each stage and extrapolate (busy machine)")
    p.add_argument("--fidelity-untrained", action="store_true",
                   help="run the fidelity sweep even on untrained engines (to test the harness)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = args.quick

    def log(msg):
        print(msg, flush=True)

    folder, trained = eng.resolve(args.engines)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    shown = os.path.relpath(folder, eng.REPO) if folder.resolve().is_relative_to(eng.REPO) else str(folder)
    results: dict = {"command": command.strip(), "engines": shown, "trained": trained, "quick": q,
                     "threads": args.threads, "machine": machine.describe(), "parts": {}, "errors": {}}
    log(f"bench: {folder} ({'trained' if trained else 'RANDOM weights: timing only'}), {results['machine']['cpu']}, "
        f"{results['machine']['cores']} cores, load {results['machine']['load_average']}")
    started = time.perf_counter()

    def part(name, fn):
        if name not in parts:
            return
        log(f"[{name}]")
        t0 = time.perf_counter()
        try:
            results["parts"][name] = fn()
        except Exception as e:  # noqa: BLE001 - one broken part must not lose the others' numbers
            traceback.print_exc()
            results["errors"][name] = f"{type(e).__name__}: {e}"
        log(f"[{name}] {time.perf_counter() - t0:.0f} s")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    part("machine", lambda: machine.sgemm_rates())
    part("flops", lambda: _flops(folder))

    if {"latency", "profile", "fidelity"} & set(parts):
        from dalle2_rt.runtime.pipeline import Pipeline

        def latency():
            from . import latency as lat

            counts = tuple(int(c) for c in args.counts.split(",")) if args.counts else ((1, 4) if q else (1, 4, 8))
            pipe = Pipeline.load(folder, threads=args.threads, shared_threads=shared_threads)
            steps = {}
            if args.latency_steps:
                prior, decoder, sr = (int(x) for x in args.latency_steps.split(","))
                steps = {"prior_steps": prior, "decoder_steps": decoder, "sr_steps": sr}
            return {"settings": pipe.settings(**steps),
                    **lat.measure(pipe, counts=counts, repeats=2 if q else 3, log=log, **steps)}

        def profile():
            from dalle2_rt.runtime.manifest import load_manifest

            from . import profile_ort as po

            m = load_manifest(folder)
            reps = 3 if q else 7
            res = {"settings": po.threads_and_levels(m, repeats=reps, log=log),
                   "batching": po.batching(m, repeats=reps, log=log),
                   "ops": po.op_breakdown(m, runs=3 if q else 5)}
            log("  decoder op time: " + ", ".join(f"{k} {v:.0%}" for k, v in list(res["ops"]["share"].items())[:6]))
            res["int8"] = po.int8(m, repeats=reps, log=log)
            from . import prefix

            res["prefix_cache"] = prefix.measure(folder, threads=args.threads, repeats=3 if q else 7, log=log)
            from . import pools

            res["thread_pools"] = pools.measure(folder, threads=args.threads, rounds=1 if q else 3,
                                                images=3 if q else 10, log=log)
            return res

        def fidelity():
            from . import steps_sweep

            if not trained and not args.fidelity_untrained:
                return {"skipped": "random-weight engines: fidelity needs the trained model"}
            pipe = Pipeline.load(folder, threads=args.threads)
            res = steps_sweep.sweep(pipe, captions=args.sweep_captions or (8 if q else 200),
                                    sweeps=steps_sweep.QUICK_SWEEPS if q else None, log=log)
            chart = out / "fidelity_steps.png"
            steps_sweep.chart(res, chart, engines=pipe.manifest.name)
            if not args.no_chart_copy and Path(out).resolve() == eng.OUT.resolve():
                shutil.copyfile(chart, eng.REPO / "bench" / "fidelity_steps.png")
            res["chart"] = str(chart)
            log("  chosen: " + ", ".join(f"{s} {r['chosen']}" for s, r in res["sweeps"].items()))
            if not q:
                from . import profile_ort as po
                from .fidelity import eval_captions

                n, point = res["captions"], res["at_defaults"]
                res["int8"] = po.int8_fidelity(
                    pipe, eval_captions(n // 2, n - n // 2), seeds=res["seeds"], threads=args.threads, log=log,
                    baseline={"fully_right": point["fully_right"], "s_per_image": point["seconds"] / point["images"]})
            return res

        # Order: the latency part runs the pipeline as the CLI does, on onnxruntime's process-wide thread pool,
        # after which onnxruntime refuses sessions with pools of their own (the profile and int8 experiments).
        part("profile", profile)
        part("fidelity", fidelity)
        part("latency", latency)
    if "cold" in parts:
        from . import coldstart

        part("cold", lambda: coldstart.measure(folder, repeats=2 if q else 3, threads=args.threads, log=log))

    from . import compare

    side_steps = tuple(int(x) for x in args.steps.split(",")) if args.steps else None
    part("backends", lambda: compare.backends(folder, rounds=3 if q else 5, threads=args.threads, steps=side_steps,
                                              log=log))
    part("dalle2", lambda: compare.dalle2(folder, rounds=2 if q else 3, threads=args.threads, steps=side_steps,
                                          defaults="skip" if q else args.dalle2_defaults, log=log))
    part("diffusers", lambda: compare.diffusers(folder, rounds=2 if q else 3, threads=args.threads, log=log))

    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "RESULTS.md").write_text(report.render(results))
    log(f"bench: done in {results['seconds'] / 60:.1f} min → {out / 'results.json'}, {out / 'RESULTS.md'}")
    return 1 if results["errors"] else 0


def _flops(folder: Path) -> dict:
    from .flops import count_flops, count_params

    manifest = json.loads((folder / "manifest.json").read_text())
    res = {}
    for name, g in manifest["graphs"].items():
        c = count_flops(folder / g["file"], 1)
        res[name] = {"gflop": c["flops"] / 1e9, "params": count_params(folder / g["file"]), "by_op": c["by_op"],
                     "probed": c["probed"]}
        print(f"  {name}: {res[name]['gflop']:.3f} GFLOP per row, {res[name]['params'] / 1e6:.2f} M params")
    return res


if __name__ == "__main__":
    sys.exit(main(shared_threads=True))
