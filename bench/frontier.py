"""The fidelity/latency frontier: fully-right rates against warm milliseconds per image, for the runtime's knobs.

    python -m bench.frontier                                    # the bundled engines, the standard grid
    python -m bench.frontier --engines engines/shapes-v2 --engines engines/shapes-v2-fast \\
        --single 200 --two 200 --png bench/frontier.png --json frontier.json
    python -m bench.frontier --point "k3@1 d4" decoder_steps=4,decoder_choice_step=1

Every point of every folder generates the same captions (``bench.fidelity.eval_captions``: distinct fresh
single- and two-object captions) with the same seeds, and the world's scorer grades every image; each rate comes
with its standard error √(p(1−p)/n). Latency is one image (one prompt, ``num_images=1``) timed warm, the median of
``--reps`` rounds that time every point once in turn (prompts cycling), after all the fidelity work, in this
process: a drift of the machine falls on every point alike. GFLOP per
image counts the dense algebra of every graph call the point's settings make (``bench.flops``, rows × per-row
FLOPs).

The rule that picks the defaults (``choose_default``, applied again whenever the model changes): among all points,
take the best single-object and the best two-object rate; a point qualifies when each of its two rates is below
that best rate by at most one standard error of the difference (√(se_best² + se_point²): both rates are
measured); the default is the fastest qualifying point. The run prints
it; the chosen settings then go into the checkpoints' ``defaults.json`` (README, "Speed"; bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.fidelity import eval_captions
from bench.machine import cpu_model
from dalle2_rt.runtime.pipeline import Pipeline
from dalle2_rt.runtime.settings import OPTIONS
from dalle2_rt.world import score

# (label, settings): the standard grid, run on every folder. "k3@1": 3 decoder candidates ranked after step 1.
GRID = [
    ("defaults", {}),
    ("k1", {"decoder_candidates": 1}),
    ("k3@1", {"decoder_candidates": 3, "decoder_choice_step": 1}),
    ("k3@2", {"decoder_candidates": 3, "decoder_choice_step": 2}),
    ("k5@2", {"decoder_candidates": 5, "decoder_choice_step": 2}),
    ("g3", {"decoder_guidance": 3.0}),
    ("k3@2 g3", {"decoder_candidates": 3, "decoder_choice_step": 2, "decoder_guidance": 3.0}),
    ("k3@2 d4", {"decoder_candidates": 3, "decoder_choice_step": 2, "decoder_steps": 4}),
    ("k3@2 p5", {"decoder_candidates": 3, "decoder_choice_step": 2, "prior_steps": 5}),
    ("k3@2 p5 sr2", {"decoder_candidates": 3, "decoder_choice_step": 2, "prior_steps": 5, "sr_steps": 2}),
    ("p5 sr2", {"prior_steps": 5, "sr_steps": 2}),
    ("g3 p5 sr2", {"decoder_guidance": 3.0, "prior_steps": 5, "sr_steps": 2}),
    ("k4 p5 sr2", {"decoder_candidates": 4, "prior_steps": 5, "sr_steps": 2}),
]
TIMING_PROMPTS = ["a red circle on the left", "a large blue square at the top, white background",
                  "a green star to the right of a yellow triangle", "a small purple cross below an orange circle",
                  "a cyan heart, black background"]


def parse_settings(text: str) -> dict:
    """``key=value,key=value`` -> settings, each value parsed as its option's kind (``settings.OPTIONS``)."""
    kinds = {o.name: o.kind for o in OPTIONS}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in kinds:
            raise SystemExit(f"bench.frontier: unknown setting {key!r}; known: {', '.join(kinds)}")
        out[key] = kinds[key](value)
    return out


def rate(right: list[bool]) -> tuple[float, float]:
    """(percent, standard error in points) of a 0/1 list. The standard error uses p̃ = (x + 1)/(n + 2) (Laplace's
    rule of succession), so that a point with every image right (p = 1) does not claim an error of zero, which
    would make the defaults rule accept that point alone."""
    n = len(right)
    if not n:
        return 0.0, 0.0
    p, smoothed = float(np.mean(right)), (float(np.sum(right)) + 1) / (n + 2)
    return 100 * p, 100 * float(np.sqrt(smoothed * (1 - smoothed) / n))


def graph_flops(pipe: Pipeline) -> dict[str, float]:
    """Dense-algebra FLOPs of one row of every graph the pipeline opened (``bench.flops`` at batch 1)."""
    from bench.flops import count_flops

    out = {}
    for name in pipe.engines:
        spec = pipe.manifest.graphs[name]
        out[name] = float(count_flops(spec.file, 1)["flops"])  # spec.file: resolved inside the folder already
    return out


def gflop_per_image(pipe: Pipeline, run: dict, flops: dict[str, float]) -> float:
    """GFLOP of one image under resolved settings ``run`` (``Pipeline.settings``): rows of each graph × its
    per-row FLOPs. Guidance doubles a stage's rows unless it is 1 or the stage is guidance-distilled."""
    st = pipe.manifest.stages

    def pair(plan, g):
        return 1 if plan.guidance_input or g is None or g == 1.0 else 2

    total = flops[st["text_encoder"]["graph"]]
    prior, dec = pipe.stages[0], pipe.stages[1]
    k, kd, at = run["candidates"], run["decoder_candidates"], run.get("decoder_choice_step")
    pg = pair(prior, run["prior"]["guidance"])
    if prior.prefix_graph:
        total += pg * flops[prior.prefix_graph] + run["prior"]["steps"] * k * pg * flops[prior.step_graph]
    else:
        total += run["prior"]["steps"] * k * pg * flops[prior.graph]
    s = run["decoder"]["steps"]
    rows = (at * kd + (s - at)) if at else s * kd
    total += rows * pair(dec, run["decoder"]["guidance"]) * flops[dec.graph]
    if kd > 1:
        total += kd * flops[st["image_encoder"]["graph"]]
    for plan in pipe.stages[2:]:
        total += run[plan.name]["steps"] * flops[plan.graph]
    return total / 1e9


def measure_fidelity(pipe: Pipeline, settings: dict, captions: list[str], n_single: int, seeds,
                     flops: dict[str, float], batch: int = 16) -> dict:
    """The fully-right rates of one point (every caption × seed, scored by the world's scorer) and its GFLOP."""
    run = pipe.settings(**settings)
    images, caps = [], []
    t0 = time.perf_counter()
    for seed in seeds:
        for i in range(0, len(captions), batch):
            chunk = captions[i:i + batch]
            images += [np.asarray(im) for im in pipe(chunk, seed=seed, **settings)]
            caps += chunk
    batch_s = time.perf_counter() - t0
    kind = {c: ("single" if i < n_single else "two") for i, c in enumerate(captions)}
    right = [bool(score(im, c)["fully_right"]) for im, c in zip(images, caps)]
    (s, s_se), (t, t_se) = (rate([r for r, c in zip(right, caps) if kind[c] == k]) for k in ("single", "two"))
    return {"settings": settings, "resolved": run, "single": s, "single_se": s_se, "two": t, "two_se": t_se,
            "n_single": sum(kind[c] == "single" for c in caps), "n_two": sum(kind[c] == "two" for c in caps),
            "batched_ms_per_image": 1000 * batch_s / len(images), "gflop": gflop_per_image(pipe, run, flops)}


def time_points(points: list[tuple[Pipeline, dict]], reps: int) -> list[list[float]]:
    """Warm milliseconds of one image for every point, interleaved: each of ``reps`` rounds times every point
    once (prompts cycling), so a drift of the machine falls on every point alike."""
    for pipe, settings in points:  # warm-up
        pipe(TIMING_PROMPTS[0], seed=0, **settings)
    out: list[list[float]] = [[] for _ in points]
    for r in range(reps):
        for i, (pipe, settings) in enumerate(points):
            t0 = time.perf_counter()
            pipe(TIMING_PROMPTS[r % len(TIMING_PROMPTS)], seed=r, **settings)
            out[i].append(1000 * (time.perf_counter() - t0))
    return out


def within_one_se(point: dict, best: dict, kind: str) -> bool:
    """``point``'s rate of ``kind`` is at most one standard error of the difference below ``best``'s: both
    rates are measured, so the error of their difference is √(se_best² + se_point²)."""
    return best[kind] - point[kind] <= float(np.hypot(best[f"{kind}_se"], point[f"{kind}_se"]))


def choose_default(points: list[dict]) -> dict:
    """The fastest point whose single- and two-object rates are each within one standard error of the best
    (of the difference between the two measured rates: ``within_one_se``)."""
    best_s = max(points, key=lambda p: p["single"])
    best_t = max(points, key=lambda p: p["two"])
    ok = [p for p in points if within_one_se(p, best_s, "single") and within_one_se(p, best_t, "two")]
    return min(ok, key=lambda p: p["ms"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2])
    p.add_argument("--engines", action="append", help="an engine folder (repeat for several; default the bundled)")
    p.add_argument("--single", type=int, default=200, help="single-object captions (default 200)")
    p.add_argument("--two", type=int, default=200, help="two-object captions (default 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per caption (default 0)")
    p.add_argument("--reps", type=int, default=7, help="timed single-image calls per point (default 7)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--point", nargs=2, action="append", metavar=("LABEL", "SETTINGS"),
                   help="measure this point instead of the standard grid, e.g. --point fast "
                        "decoder_steps=4,decoder_choice_step=1 (repeatable)")
    p.add_argument("--only", help="comma-separated labels of the standard grid to run (default all)")
    p.add_argument("--fp32-too", action="store_true",
                   help="also measure each folder that has int8 variants with its fp32 graphs only")
    p.add_argument("--png", help="write the two-object chart here, and the single-object one beside it "
                   "(NAME-single.png)")
    p.add_argument("--json", help="write every point here")
    p.add_argument("--from-json", metavar="JSON", help="measure nothing: apply the rule (and --png) to the points "
                   "of an earlier run's --json (standard errors recomputed from its counts)")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for r in saved["points"]:
            for k in ("single", "two"):
                x = round(r[k] * r[f"n_{k}"] / 100)
                r[k], r[f"{k}_se"] = rate([True] * x + [False] * (r[f"n_{k}"] - x))
        report(saved["points"], saved.get("cpu", cpu_model()), args.png)
        if args.json:
            Path(args.json).write_text(json.dumps(saved, indent=1, default=str))
        return 0
    grid = [(label, parse_settings(text)) for label, text in args.point] if args.point else GRID
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {label for label, _ in grid}
        if unknown:
            raise SystemExit(f"bench.frontier: no point labelled {', '.join(sorted(unknown))}")
        grid = [(label, s) for label, s in grid if label in wanted]
    captions = eval_captions(args.single, args.two)
    results, runs = [], []
    # a folder's int8 variants run whatever this CPU is (the runtime's default runs them only where it has int8
    # dot products), so that the label says what ran
    loads = [(folder, True) for folder in args.engines or [None]]
    if args.fp32_too:  # each folder with int8 variants also without them, as one more folder
        loads = [load for folder, _ in loads for load in ((folder, True), (folder, False))]
    for folder, int8 in loads:
        pipe = Pipeline.load(folder, threads=args.threads, int8=int8)
        variants = pipe.manifest.int8_graphs
        if int8 is False and not variants:
            continue
        name = pipe.manifest.name + (" (distilled)" if pipe.stages[1].guidance_input else "")
        name += (" fp32" if int8 is False else f" int8 {'+'.join(variants)}") if variants else ""
        flops = graph_flops(pipe)
        for label, settings in grid:
            try:
                pipe.settings(**settings)
            except Exception as e:  # a point this folder cannot run (e.g. a candidates count its graphs refuse)
                print(f"{name:28s} {label:14s} skipped: {e}", flush=True)
                continue
            r = {"folder": str(pipe.manifest.folder), "name": name, "label": label,
                 **measure_fidelity(pipe, settings, captions, args.single, args.seeds, flops)}
            results.append(r)
            runs.append((pipe, settings))
            print(f"{name:28s} {label:14s} single {r['single']:5.1f} ± {r['single_se']:.1f}  two {r['two']:5.1f} ± "
                  f"{r['two_se']:.1f}  {r['gflop']:6.2f} GFLOP", flush=True)
    print(f"timing: {args.reps} interleaved rounds of one image per point", flush=True)
    for r, ms in zip(results, time_points(runs, args.reps)):
        r["ms"], r["ms_all"] = statistics.median(ms), ms
        print(f"{r['name']:28s} {r['label']:14s} {r['ms']:7.1f} ms/image (median of {len(ms)})", flush=True)
    chosen = report(results, cpu_model(), args.png)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "captions": [args.single, args.two],
                                               "seeds": args.seeds, "points": results,
                                               "chosen": {k: chosen[k] for k in ("name", "label", "settings")}},
                                              indent=1, default=str))
    return 0


def report(results: list[dict], cpu: str, png: str | None) -> dict:
    """Print the table and the rule's choice, draw the chart; returns the chosen point."""
    print("\n| folder | point | single-object % | two-object % | ms / image | GFLOP |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['label']} | {r['single']:.1f} ± {r['single_se']:.1f} | {r['two']:.1f} ± "
              f"{r['two_se']:.1f} | {r['ms']:.0f} | {r['gflop']:.1f} |")
    chosen = choose_default(results)
    base = next((r for r in results if r["label"] == "defaults"), results[0])
    print(f"\nchosen by the rule: {chosen['name']} {chosen['label']} {json.dumps(chosen['settings'])}: "
          f"{chosen['ms']:.1f} ms/image, {base['ms'] / chosen['ms']:.2f}x faster than {base['name']} "
          f"{base['label']} ({base['ms']:.1f} ms); single {chosen['single']:.1f} ± {chosen['single_se']:.1f}, two "
          f"{chosen['two']:.1f} ± {chosen['two_se']:.1f}; CPU {cpu}")
    if png:
        for kind, path in (("two", Path(png)), ("single", single_png(png))):
            chart(results, chosen, kind, path, cpu)
    return chosen


def single_png(png: str | Path) -> Path:
    """Where the single-object chart goes beside ``png`` (the two-object one): NAME-single.png."""
    png = Path(png)
    return png.with_name(f"{png.stem}-single{png.suffix or '.png'}")


def chart(results: list[dict], chosen: dict, kind: str, path: Path, cpu: str) -> None:
    """One rate (``kind``: "single" or "two") against ms per image, every folder a colour, the chosen point ringed."""
    from bench.chart import scatter_chart

    words = {"single": "single-object", "two": "two-object"}[kind]
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(f"{r['name']} {words}", []).append((r["ms"], r[kind], r[f"{kind}_se"], r["label"]))
    scatter_chart(groups, path, title=f"{words.capitalize()} prompts fully right vs warm latency ({cpu})",
                  xlabel="ms per image (one image, warm)", ylabel="% fully right (±1 SE)",
                  chosen=(f"{chosen['name']} {words}", chosen["label"]))


if __name__ == "__main__":
    sys.exit(main())
