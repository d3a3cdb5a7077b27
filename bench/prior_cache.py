"""Experiment: the prior with its conditioning prefix computed once per prompt (a key/value cache).

The prior's transformer is causal over [text tokens (L), text embedding, timestep, x_t, query]. The first
L + 1 positions see only the text (or the learned nulls), so their keys and values in every layer are the
same at every sampling step and for every candidate: only the last 3 positions change. Split in two graphs,

    prior_prefix(text_embed, text_encodings, cond_keep) -> keys, values   (depth, B, H, L+1, d) each
    prior_step(x_t, t, keys, values) -> pred                              3 tokens attending over L+4

a sampling step costs ~3/81 of the linear layers of the full graph. This module builds both from the
same checkpoint (PyTorch modules around the trained ``DiffusionPrior``, nothing retrained), checks them
against the full graph, exports them to ONNX and times 25 guided steps both ways in ONNX Runtime.
It only measures the proposal; the runtime and the exporter are not changed here.

    python -m bench.prior_cache [ENGINES]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _modules(prior):
    import torch
    from torch import nn

    from dalle2_rt.models.layers import attention, keep_or_null, merge_heads, split_heads

    n_prefix = prior.cfg.context_length + 1  # text tokens + text embedding

    class Prefix(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = prior

        def forward(self, text_embed, text_encodings, cond_keep):
            p = self.p
            tokens = keep_or_null(p.text_tokens_proj(text_encodings), p.null_text_tokens, cond_keep)  # (B, L, d)
            temb = keep_or_null(p.text_embed_proj(text_embed), p.null_text_embed, cond_keep)  # (B, d)
            seq = torch.cat([tokens, temb[:, None]], dim=1) + p.pos[:n_prefix]  # (B, L+1, d)
            mask = p.causal_mask[:n_prefix, :n_prefix]
            keys, values = [], []
            for blk in p.blocks:
                q, k, v = blk.qkv(blk.norm1(seq)).chunk(3, dim=-1)
                k, v = split_heads(k, blk.heads), split_heads(v, blk.heads)  # (B, H, L+1, d_h)
                keys.append(k)
                values.append(v)
                seq = seq + blk.proj(merge_heads(attention(split_heads(q, blk.heads), k, v, mask)))
                seq = seq + blk.mlp(blk.norm2(seq))
            return torch.stack(keys), torch.stack(values)  # (depth, B, H, L+1, d_h)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = prior

        def forward(self, x_t, t, keys, values):
            p = self.p
            b = x_t.shape[0]
            seq = torch.cat([p.time_embed(t)[:, None], p.x_proj(x_t)[:, None], p.query.expand(b, 1, -1)],
                            dim=1) + p.pos[n_prefix:]  # (B, 3, d)
            mask = p.causal_mask[n_prefix:, :]  # (3, L+4): the cached prefix plus causal among the 3
            for i, blk in enumerate(p.blocks):
                q, k, v = blk.qkv(blk.norm1(seq)).chunk(3, dim=-1)
                k = torch.cat([keys[i], split_heads(k, blk.heads)], dim=2)  # (B, H, L+4, d_h)
                v = torch.cat([values[i], split_heads(v, blk.heads)], dim=2)
                seq = seq + blk.proj(merge_heads(attention(split_heads(q, blk.heads), k, v, mask)))
                seq = seq + blk.mlp(blk.norm2(seq))
            return p.out(p.norm(seq[:, -1]))

    return Prefix().eval(), Step().eval()


def _export(module, args: tuple, names_in, names_out, path: Path, dynamic: dict):
    import torch

    torch.onnx.export(module, args, str(path), input_names=names_in, output_names=names_out, opset_version=18,
                      dynamo=True, dynamic_shapes=dynamic, external_data=False, verbose=False)


def measure(engines, steps: int = 25, candidates: int = 2, threads: int = 2, repeats: int = 5, log=print) -> dict:
    import onnxruntime as ort
    import torch

    from dalle2_rt.runtime.manifest import load_manifest
    from dalle2_rt.runtime.torch_reference import load_source, resolve_source

    from .profile_ort import sample_feeds, session
    from .timing import median

    manifest = load_manifest(engines)
    _, prior = load_source(resolve_source(manifest, "prior"))
    prior = prior.float()
    prefix, step = _modules(prior)
    spec = manifest.graphs["prior"]
    rows = 2 * candidates  # one image: k candidates × (cond, uncond)
    feeds = sample_feeds(spec, rows, seed=3)
    feeds["cond_keep"] = np.repeat(np.array([1.0, 0.0], np.float32), candidates)
    for name in ("text_embed", "text_encodings"):  # one prompt: every row carries the same text
        feeds[name] = np.repeat(feeds[name][:1], rows, axis=0)
    tf = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        full = prior(**tf).numpy()
        keys, values = prefix(tf["text_embed"], tf["text_encodings"], tf["cond_keep"])
        split = step(tf["x_t"], tf["t"], keys, values).numpy()
    torch_err = float(np.abs(split - full).max() / np.abs(full).max())

    batch = torch.export.Dim("batch", min=1, max=64)
    with tempfile.TemporaryDirectory() as tmp:
        pre_path, step_path = Path(tmp) / "prefix.onnx", Path(tmp) / "step.onnx"
        _export(prefix, (tf["text_embed"], tf["text_encodings"], tf["cond_keep"]),
                ["text_embed", "text_encodings", "cond_keep"], ["keys", "values"], pre_path,
                {"text_embed": {0: batch}, "text_encodings": {0: batch}, "cond_keep": {0: batch}})
        _export(step, (tf["x_t"], tf["t"], keys, values), ["x_t", "t", "keys", "values"], ["pred"], step_path,
                {"x_t": {0: batch}, "t": {0: batch}, "keys": {1: batch}, "values": {1: batch}})
        # one prompt: its prefix once (1 row cond + 1 row null), broadcast to the k candidates of each half
        pre_feeds = {"text_embed": feeds["text_embed"][[0, candidates]],
                     "text_encodings": feeds["text_encodings"][[0, candidates]],
                     "cond_keep": np.array([1.0, 0.0], np.float32)}
        sessions = {n: (session(spec.optimized_file or spec.file, threads=n), session(pre_path, threads=n),
                        session(step_path, threads=n)) for n in sorted({1, threads})}
        s_full, s_pre, s_step = sessions[threads]
        k2, v2 = s_pre.run(None, pre_feeds)
        step_feeds = {"x_t": feeds["x_t"], "t": feeds["t"], "keys": np.repeat(k2, candidates, axis=1),
                      "values": np.repeat(v2, candidates, axis=1)}
        ort_err = float(np.abs(s_step.run(None, step_feeds)[0] - s_full.run(None, feeds)[0]).max()
                        / np.abs(full).max())

        def run_full(s_full, _pre, _step):
            for _ in range(steps):
                s_full.run(None, feeds)

        def run_cached(_full, s_pre, s_step):
            k_, v_ = s_pre.run(None, pre_feeds)
            sf = {"x_t": feeds["x_t"], "t": feeds["t"], "keys": np.repeat(k_, candidates, axis=1),
                  "values": np.repeat(v_, candidates, axis=1)}
            for _ in range(steps):
                s_step.run(None, sf)

        variants = {f"{kind}, {n} thread{'s' if n > 1 else ''}": (fn, sess) for n, sess in sessions.items()
                    for kind, fn in (("full graph", run_full), ("prefix + step", run_cached))}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn, sess in variants.values():
            fn(*sess)
        for _ in range(repeats):  # interleaved
            for name, (fn, sess) in variants.items():
                t0 = time.perf_counter()
                fn(*sess)
                times[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    full_ms = ms[f"full graph, {threads} threads"] if threads > 1 else ms["full graph, 1 thread"]
    out = {"steps": steps, "rows": rows, "ort": ort.__version__, "ms": ms, "torch_rel_err": torch_err,
           "ort_rel_err": ort_err, "speedup_vs_runtime": full_ms / min(v for k, v in ms.items() if "prefix" in k)}
    if log:
        log(f"  prior, {steps} guided steps × {rows} rows (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items())
            + f"; best split {out['speedup_vs_runtime']:.0f}× faster than the runtime's; max error {ort_err:.1e} "
              "of scale")
    return out


if __name__ == "__main__":
    from .engines import resolve

    folder, _ = resolve(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps(measure(folder), indent=1))
