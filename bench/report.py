"""``results.json`` -> Markdown tables (``RESULTS.md``), each part with the machine and the command."""
from __future__ import annotations


def _t(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{1e3 * s:.0f} ms" if s < 1 else f"{s:.2f} s"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def render(r: dict) -> str:
    """The whole report: the machine and the command, then one section per part that ran, in ``SECTIONS``
    order, then the errors and the total time."""
    m = r["machine"]
    out = [
        "# dalle2-rt benchmark results",
        "",
        f"Machine: **{m['cpu']}**, {m['cores']} cores ({', '.join(m['flags'])}), {m['memory_gib']} GiB; "
        f"{m['date']}; load average at start {m['load_average']}. Python {m['python']}, numpy {m['numpy']}, "
        f"onnxruntime {m['onnxruntime']}. Threads per contender: {r['threads']}.",
        "",
        f"Command: `{r['command']}` — engines `{r['engines']}` "
        f"({'trained' if r['trained'] else 'untrained random weights: timing only'}).",
        "",
    ]
    for name, section in SECTIONS.items():
        if name in r["parts"]:
            out += section(r["parts"][name], r["parts"])
    if r.get("errors"):
        out += ["## Errors", "", *[f"- {k}: {v}" for k, v in r["errors"].items()], ""]
    out += [f"Total bench time: {r.get('seconds', 0) / 60:.1f} min.", ""]
    return "\n".join(out)


# Each section: (this part's results, every part's results) -> Markdown lines.


def _machine(s: dict, parts: dict) -> list[str]:
    return [f"## sgemm rate (fp32, n = {s['n']}, best of 5)", "",
            _t(["", "1 thread", "2 threads"],
               [[label, *[f"{_by_threads(s[key], n)} GFLOP/s" for n in (1, 2)]]
                for label, key in (("numpy (BLAS)", "numpy"), ("onnxruntime MatMul (MLAS)", "onnxruntime"))]),
            ""]


def _flops(f: dict, parts: dict) -> list[str]:
    return ["## Graphs: parameters and FLOPs per row (Conv/MatMul/Gemm, 2 per MAC, counted on the ONNX graph)", "",
            _t(["graph", "params", "GFLOP per row"], [[g, _m(v["params"]), f"{v['gflop']:.3f}"] for g, v in f.items()]),
            ""]


def _latency(lat: dict, parts: dict) -> list[str]:
    lat = dict(lat)
    run = lat.pop("settings", None)
    stages = list(next(iter(lat.values()))["stages"])
    rows = [[n, _ms(v["total"]), _ms(v["per_image"]), *[_ms(v["stages"][s]) for s in stages]] for n, v in lat.items()]
    steps = (f", steps prior/decoder/SR {run['prior']['steps']}/{run['decoder']['steps']}/"
             f"{run.get('sr0', {}).get('steps', '-')}, guidance {run['prior']['guidance']}/"
             f"{run['decoder']['guidance']}, {run['candidates']} prior candidates, "
             f"{run.get('decoder_candidates', 1)} decoder candidates") if run else ""
    out = [f"## Warm latency (median of repeats; per stage = its share of the call, host work included{steps})", "",
           _t(["images", "end to end", "per image", *stages], rows), ""]
    for n, v in lat.items():
        out += [f"Per graph, {n} image(s) (time inside `engine(**arrays)`: {_ms(v['in_graphs'])} of "
                f"{_ms(v['total'])}):", "",
                _t(["graph", "calls", "rows/call", "ms/call", "GFLOP total", "GFLOP/s",
                    "of sgemm 2 thr", "of sgemm 1 thr"], _graph_rows(v["graphs"], parts)), ""]
    return out


def _graph_rows(graphs: dict, parts: dict) -> list[list]:
    """Per graph of one latency call: calls, rows, ms, GFLOP, GFLOP/s and its share of the sgemm rates."""
    sgemm = {n: _sgemm(parts, n) for n in (2, 1)}
    return [[g, gv["calls"], f"{gv['rows_per_call']:.0f}", f"{gv['ms_per_call']:.1f}", f"{gv['gflop']:.1f}",
             f"{gv['gflops']:.0f}", *[f"{gv['gflops'] / rate:.0%}" if rate else "-" for rate in sgemm.values()]]
            for g, gv in graphs.items()]


def _cold(c: dict, parts: dict) -> list[str]:
    ph = c["phases"]
    load = ([["session creation per graph (fresh process)",
              ", ".join(f"{g} {_ms(v)}" for g, v in c["load"]["sessions"].items())],
             ["sha256 of every engine file, uncached", _ms(c["load"]["sha256_all_files"])]] if c.get("load") else [])
    return ["## Cold start and memory (`dalle2-rt` CLI in a fresh process, page cache warm)", "",
            _t(["", "value"],
               [["exec → first PNG written (median)", _ms(c["cold_s"])],
                ["runs", ", ".join(_ms(x) for x in c["cold_runs"])],
                ["first run of the series (cache warming)", _ms(c["first_run_s"])],
                ["bare `python -c pass`", _ms(c["python_start_s"])],
                ["split: import / Pipeline.load / first image",
                 f"{_ms(ph['import'])} / {_ms(ph['load'])} / {_ms(ph['first_image'])}"],
                *load,
                *[[f"peak RSS, -n {n}", f"{v:.0f} MB"] for n, v in c["max_rss_mb"].items()]]), ""]


def _profile(pr: dict, parts: dict) -> list[str]:
    graphs = list(pr["settings"])
    variants = list(pr["settings"][graphs[0]])
    out = ["## Session settings (ms per call at one image's guided batch: prior 4, decoder 2, SR 1; "
           "variants interleaved)", "",
           _t(["variant", *graphs], [[v, *[f"{pr['settings'][g][v]:.1f}" for g in graphs]] for v in variants]), ""]
    rows = [[g, *[f"{b['ms_per_call'].get(k, b['ms_per_call'].get(str(k), float('nan'))):.1f}"
                  for k in (1, 2, 4, 8, 16)],
             f"{b['stacked_2B_ms']:.1f}" if b["stacked_2B_ms"] else "-", f"{b['two_calls_of_B_ms']:.1f}"]
            for g, b in pr["batching"].items()]
    out += ["Batching (ms per call at batch 1/2/4/8/16; one call of 2B rows vs two calls of B, B = one image's "
            "rows per branch):", "",
            _t(["graph", "b1", "b2", "b4", "b8", "b16", "2B stacked", "2 × B"], rows), ""]
    ops = pr["ops"]
    return out + [f"ORT profiler, {ops['graph']} at batch {ops['batch']}, time per op type:", "",
                  _t(["op", "ms per call", "share"],
                     [[k, f"{v:.2f}", f"{ops['share'][k]:.0%}"] for k, v in list(ops["ms_per_call"].items())[:10]]),
                  ""]


def _backends(b: dict, parts: dict) -> list[str]:
    return ["## onnxruntime vs torch backend (same weights, same loop, 1 image, steps "
            f"{'/'.join(map(str, b.get('steps', (25, 25, 7))))}; alternated)", "",
            _t(["backend", "median", "runs"],
               [[k, _ms(b["median"][k]), ", ".join(_ms(x) for x in b["seconds"][k])] for k in b["median"]]),
            "", (f"Ratio torch / onnxruntime, onnxruntime running the folder's int8 variants "
                 f"({b['onnxruntime_backend']}) and torch the fp32 model, so not the same arithmetic: "
                 f"**{b['ratio']:.2f}×** (the ≥ 2× goal compares the same graphs: a folder without int8 "
                 "variants, or `DALLE2_RT_INT8_DOT=none`)." if b.get("int8") else
                 f"Ratio torch / onnxruntime, both running the same graphs (the prior split at its text "
                 f"prefix): **{b['ratio']:.2f}×** (goal ≥ 2×).")
            + (f" Torch running the prior's full `forward` at every step (a plain PyTorch loop): "
               f"{b['ratio_full_prior']:.2f}×." if "ratio_full_prior" in b else ""), ""]


def _dalle2(d: dict, parts: dict) -> list[str]:
    mt = d["matched"]
    matched, ours_at = ("/".join(map(str, d.get(k, (25, 25, 7)))) for k in ("steps", "ours_defaults"))
    rows = [[f"matched steps ({matched} on both sides, DDIM, guided prior and decoder, 2 candidates)",
             _ms(mt["median"]["ours"]), _ms(mt["median"]["dalle2_pytorch"]), f"**{mt['ratio']:.1f}×**", "≥ 2×"]]
    if d.get("defaults"):
        df = d["defaults"]
        rows.append([f"its defaults (1000-step DDPM ×3) vs ours at our defaults {ours_at}"
                     + (" — ESTIMATED from its first 40 calls per stage" if df.get("estimated") else ""),
                     _ms(df["ours_median"]), _ms(df["theirs_seconds"]), f"**{df['ratio']:.0f}×**", "≥ 50×"])
    out = ["## vs DALLE2-pytorch 1.15.6 (matched sizes, random weights, 1 image)", "", _sizes(d["sizes"]), "",
           _t(["", "ours (onnxruntime)", "DALLE2-pytorch", "ratio", "goal"], rows), ""]
    if mt.get("calls"):
        out += [f"DALLE2-pytorch network calls per image at matched steps: {mt['calls']} (its guidance runs "
                "the conditional and unconditional branches as two calls)."
                + (f" At its defaults: {d['defaults']['calls']}; stages {d['defaults']['theirs_stages']}."
                   if d.get("defaults") else ""), ""]
    return out


def _diffusers(d: dict, parts: dict) -> list[str]:
    return [f"## vs diffusers {d['info'].get('diffusers', '')} UnCLIPPipeline (matched sizes, 25/25/7, "
            "guidance 4/5, 1 candidate, 1 image)", "", _sizes(d["sizes"]), "",
            _t(["", "median", "runs"],
               [[k, _ms(d["median"][k]), ", ".join(_ms(x) for x in d["seconds"][k])] for k in d["median"]]), "",
            f"Ratio diffusers / ours: **{d['ratio']:.2f}×** (goal ≥ 2×).", ""]


def _fidelity(f: dict, parts: dict) -> list[str]:
    if "sweeps" not in f:
        return ["## Fidelity vs steps", "", f"Skipped: {f.get('skipped')}", ""]
    out = [f"## Fidelity vs steps ({f['captions']} captions × {len(f['seeds'])} seed per point, same captions "
           f"and seeds at every point; others at the defaults {f['defaults']})", "",
           "![fidelity vs steps](fidelity_steps.png)", ""]
    for stage, s in f["sweeps"].items():
        out += [_t([f"{stage} steps", "fully right", "single", "two", "vs best (paired SE), points", "seconds"],
                   [[p["steps"], f"{p['fully_right']:.1%}", f"{p['single']:.1%}", f"{p['two']:.1%}",
                     f"{100 * p['diff_vs_best']:+.1f} ± {100 * p['diff_se']:.1f}" if "diff_se" in p else "-",
                     f"{p['seconds']:.0f}"] for p in s["points"]]),
                "", f"Best {s['best']:.1%}; fewest steps within {100 * f['tolerance']:.0f} points: "
                    f"**{s['chosen']}**.", ""]
    return out


SECTIONS = {"machine": _machine, "flops": _flops, "latency": _latency, "cold": _cold, "profile": _profile,
            "backends": _backends, "dalle2": _dalle2, "diffusers": _diffusers, "fidelity": _fidelity}


def _by_threads(d: dict, n: int):
    """d[n] whether the keys are ints (in memory) or strings (read back from JSON)."""
    return d.get(n, d.get(str(n)))


def _sgemm(parts: dict, threads: int) -> float | None:
    s = parts.get("machine")
    return _by_threads(s["onnxruntime"], threads) if s else None


def _sizes(sizes: dict) -> str:
    rows = []
    for net, v in sizes.items():
        rows.append([net, _m(v["ours_params"]), _m(v["theirs_params"]), f"{v['params_ratio']:.2f}",
                     f"{v['ours_flops'] / 1e9:.3f}", f"{v['theirs_flops'] / 1e9:.3f}", f"{v['flops_ratio']:.2f}",
                     "yes" if v["matched"] else "NO"])
    return _t(["network", "params ours", "params theirs", "ratio", "GFLOP/call ours", "GFLOP/call theirs", "ratio",
               "within ±20 %"], rows)
