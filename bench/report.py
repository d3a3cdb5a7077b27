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
    m = r["machine"]
    parts = r["parts"]
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
    if "machine" in parts:
        s = parts["machine"]
        out += [f"## sgemm rate (fp32, n = {s['n']}, best of 5)", "",
                _t(["", "1 thread", "2 threads"],
                   [[label, *[f"{_by_threads(s[key], n)} GFLOP/s" for n in (1, 2)]]
                    for label, key in (("numpy (BLAS)", "numpy"), ("onnxruntime MatMul (MLAS)", "onnxruntime"))]),
                ""]
    sgemm2 = _sgemm(parts, 2)
    sgemm1 = _sgemm(parts, 1)
    if "flops" in parts:
        f = parts["flops"]
        out += ["## Graphs: parameters and FLOPs per row (Conv/MatMul/Gemm, 2 per MAC, counted on the ONNX graph)", "",
                _t(["graph", "params", "GFLOP per row"],
                   [[g, _m(v["params"]), f"{v['gflop']:.3f}"] for g, v in f.items()]), ""]
    if "latency" in parts:
        lat = dict(parts["latency"])
        run = lat.pop("settings", None)
        stages = list(next(iter(lat.values()))["stages"])
        rows = [[n, _ms(v["total"]), _ms(v["per_image"]), *[_ms(v["stages"][s]) for s in stages]]
                for n, v in lat.items()]
        steps = (f", steps prior/decoder/SR {run['prior']['steps']}/{run['decoder']['steps']}/"
                 f"{run.get('sr0', {}).get('steps', '-')}, guidance {run['prior']['guidance']}/"
                 f"{run['decoder']['guidance']}, {run['candidates']} prior candidates") if run else ""
        out += [f"## Warm latency (median of repeats; per stage = its share of the call, host work included{steps})",
                "",
                _t(["images", "end to end", "per image", *stages], rows), ""]
        for n, v in lat.items():
            rows = []
            for g, gv in v["graphs"].items():
                rows.append([g, gv["calls"], f"{gv['rows_per_call']:.0f}", f"{gv['ms_per_call']:.1f}",
                             f"{gv['gflop']:.1f}", f"{gv['gflops']:.0f}",
                             f"{gv['gflops'] / sgemm2:.0%}" if sgemm2 else "-",
                             f"{gv['gflops'] / sgemm1:.0%}" if sgemm1 else "-"])
            out += [f"Per graph, {n} image(s) (time inside `engine(**arrays)`: {_ms(v['in_graphs'])} of "
                    f"{_ms(v['total'])}):", "",
                    _t(["graph", "calls", "rows/call", "ms/call", "GFLOP total", "GFLOP/s",
                        "of sgemm 2 thr", "of sgemm 1 thr"], rows), ""]
    if "cold" in parts:
        c = parts["cold"]
        ph = c["phases"]
        out += ["## Cold start and memory (`dalle2-rt` CLI in a fresh process, page cache warm)", "",
                _t(["", "value"],
                   [["exec → first PNG written (median)", _ms(c["cold_s"])],
                    ["runs", ", ".join(_ms(x) for x in c["cold_runs"])],
                    ["first run of the series (cache warming)", _ms(c["first_run_s"])],
                    ["bare `python -c pass`", _ms(c["python_start_s"])],
                    ["split: import / Pipeline.load / first image",
                     f"{_ms(ph['import'])} / {_ms(ph['load'])} / {_ms(ph['first_image'])}"],
                    *([["session creation per graph (fresh process)",
                        ", ".join(f"{g} {_ms(v)}" for g, v in c["load"]["sessions"].items())],
                       ["sha256 of every engine file, uncached", _ms(c["load"]["sha256_all_files"])]]
                      if c.get("load") else []),
                    *[[f"peak RSS, -n {n}", f"{v:.0f} MB"] for n, v in c["max_rss_mb"].items()]]), ""]
        if c.get("memory_options"):
            mo = c["memory_options"]
            out += ["Allocator options (session options patched in a probe; peak RSS of the process and the warm "
                    "time of the same call):", "",
                    _t(["ORT session memory options", "peak RSS", "warm call"],
                       [[k, f"{v['max_rss_mb']:.0f} MB", _ms(v["warm_s"])] for k, v in mo.items()]), ""]
    if "profile" in parts:
        pr = parts["profile"]
        graphs = list(pr["settings"])
        variants = list(pr["settings"][graphs[0]])
        out += ["## Session settings (ms per call at one image's guided batch: prior 4, decoder 2, SR 1; "
                "variants interleaved)", "",
                _t(["variant", *graphs], [[v, *[f"{pr['settings'][g][v]:.1f}" for g in graphs]] for v in variants]),
                ""]
        rows = []
        for g, b in pr["batching"].items():
            rows.append([g, *[f"{b['ms_per_call'].get(k, b['ms_per_call'].get(str(k), float('nan'))):.1f}"
                              for k in (1, 2, 4, 8, 16)],
                         f"{b['stacked_2B_ms']:.1f}" if b["stacked_2B_ms"] else "-", f"{b['two_calls_of_B_ms']:.1f}"])
        out += ["Batching (ms per call at batch 1/2/4/8/16; one call of 2B rows vs two calls of B, B = one image's "
                "rows per branch):", "",
                _t(["graph", "b1", "b2", "b4", "b8", "b16", "2B stacked", "2 × B"], rows), ""]
        ops = pr["ops"]
        out += [f"ORT profiler, {ops['graph']} at batch {ops['batch']}, time per op type:", "",
                _t(["op", "ms per call", "share"],
                   [[k, f"{v:.2f}", f"{ops['share'][k]:.0%}"] for k, v in list(ops["ms_per_call"].items())[:10]]), ""]
        if pr.get("int8"):
            out += ["int8 (static QDQ, random calibration; error vs fp32 on random inputs):", "",
                    _t(["graph", "fp32 ms", "int8 ms", "speed-up", "max err / scale", "rms err / rms"],
                       [[g, f"{v['fp32_ms']:.1f}", f"{v['int8_ms']:.1f}", f"{v['fp32_ms'] / v['int8_ms']:.2f}×",
                         f"{v['rel_err']:.3f}", f"{v['rms_rel_err']:.3f}"] for g, v in pr["int8"].items()]), ""]
        if pr.get("thread_pools"):
            tp = pr["thread_pools"]
            names = list(next(iter(tp["steps"].values())))
            out += [f"ONNX Runtime thread pools (`bench/pools.py`; {tp['threads']} threads; median of {tp['images']} "
                    f"warm one-image calls per fresh process, {tp['rounds']} processes per variant, alternated):", "",
                    _t(["steps", *names], [[k, *(_ms(v[n]["median"]) for n in names)] for k, v in tp["steps"].items()]),
                    ""]
        if pr.get("prefix_cache"):
            pc = pr["prefix_cache"]
            out += ["The prior's prefix cache in the pipeline (`bench/prefix.py`; one image at the defaults, "
                    f"variants alternated, median of {pc['repeats']}):", "",
                    _t(["variant", "prior stage", "whole image", "prior graph calls"],
                       [[k, f"{v['prior_ms']:.0f} ms", f"{v['image_ms']:.0f} ms",
                         ", ".join(f"{g} × {n}" for g, n in v["prior_graph_calls"].items())]
                        for k, v in pc["variants"].items()]), ""]
    if "backends" in parts:
        b = parts["backends"]
        out += ["## onnxruntime vs torch backend (same weights, same loop, 1 image, steps "
                f"{'/'.join(map(str, b.get('steps', (25, 25, 7))))}; alternated)", "",
                _t(["backend", "median", "runs"],
                   [[k, _ms(b["median"][k]), ", ".join(_ms(x) for x in b["seconds"][k])] for k in b["median"]]),
                "", f"Ratio torch / onnxruntime, both running the same graphs (the prior split at its text "
                f"prefix): **{b['ratio']:.2f}×** (goal ≥ 2×)."
                + (f" Torch running the prior's full `forward` at every step (a plain PyTorch loop): "
                   f"{b['ratio_full_prior']:.2f}×." if "ratio_full_prior" in b else ""), ""]
    if "dalle2" in parts:
        d = parts["dalle2"]
        out += ["## vs DALLE2-pytorch 1.15.6 (matched sizes, random weights, 1 image)", "", _sizes(d["sizes"]), ""]
        mt = d["matched"]
        matched, ours_at = ("/".join(map(str, d.get(k, (25, 25, 7)))) for k in ("steps", "ours_defaults"))
        out += [_t(["", "ours (onnxruntime)", "DALLE2-pytorch", "ratio", "goal"],
                   [[f"matched steps ({matched} on both sides, DDIM, guided prior and decoder, 2 candidates)",
                     _ms(mt["median"]["ours"]), _ms(mt["median"]["dalle2_pytorch"]), f"**{mt['ratio']:.1f}×**", "≥ 2×"]]
                   + ([[f"its defaults (1000-step DDPM ×3) vs ours at our defaults {ours_at}"
                        + (" — ESTIMATED from its first 40 calls per stage" if d["defaults"].get("estimated") else ""),
                        _ms(d["defaults"]["ours_median"]),
                        _ms(d["defaults"]["theirs_seconds"]), f"**{d['defaults']['ratio']:.0f}×**", "≥ 50×"]]
                      if d.get("defaults") else [])), ""]
        if mt.get("calls"):
            out += [f"DALLE2-pytorch network calls per image at matched steps: {mt['calls']} (its guidance runs "
                    "the conditional and unconditional branches as two calls)."
                    + (f" At its defaults: {d['defaults']['calls']}; stages {d['defaults']['theirs_stages']}."
                       if d.get("defaults") else ""), ""]
    if "diffusers" in parts:
        d = parts["diffusers"]
        out += [f"## vs diffusers {d['info'].get('diffusers', '')} UnCLIPPipeline (matched sizes, 25/25/7, "
                "guidance 4/5, 1 candidate, 1 image)", "", _sizes(d["sizes"]), "",
                _t(["", "median", "runs"],
                   [[k, _ms(d["median"][k]), ", ".join(_ms(x) for x in d["seconds"][k])] for k in d["median"]]), "",
                f"Ratio diffusers / ours: **{d['ratio']:.2f}×** (goal ≥ 2×).", ""]
    if "fidelity" in parts and "sweeps" in parts["fidelity"]:
        f = parts["fidelity"]
        out += [f"## Fidelity vs steps ({f['captions']} captions × {len(f['seeds'])} seed per point, same captions "
                f"and seeds at every point; others at the defaults {f['defaults']})", "",
                "![fidelity vs steps](fidelity_steps.png)", ""]
        for stage, s in f["sweeps"].items():
            out += [_t([f"{stage} steps", "fully right", "single", "two", "vs best (paired SE), points", "seconds"],
                       [[p["steps"], f"{p['fully_right']:.1%}", f"{p['single']:.1%}", f"{p['two']:.1%}",
                         f"{100 * p['diff_vs_best']:+.1f} ± {100 * p['diff_se']:.1f}" if "diff_se" in p else "-",
                         f"{p['seconds']:.0f}"] for p in s["points"]]),
                    "", f"Best {s['best']:.1%}; fewest steps within {100 * f['tolerance']:.0f} points: "
                        f"**{s['chosen']}**.", ""]
        if f.get("int8"):
            i8 = f["int8"]
            out += [f"int8 {' + '.join(i8['graphs'])} (static QDQ calibrated on sampled trajectories of other "
                    f"captions), same {i8['captions']} captions, defaults:", "",
                    _t(["", "fully right", "s per image (batches of 16)"],
                       [[k, f"{i8[k]['fully_right']:.1%}", f"{i8[k]['s_per_image']:.2f}"] for k in ("fp32", "int8")]),
                    ""]
    elif "fidelity" in parts:
        out += ["## Fidelity vs steps", "", f"Skipped: {parts['fidelity'].get('skipped')}", ""]
    if r.get("errors"):
        out += ["## Errors", "", *[f"- {k}: {v}" for k, v in r["errors"].items()], ""]
    out += [f"Total bench time: {r.get('seconds', 0) / 60:.1f} min.", ""]
    return "\n".join(out)


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
