"""A host written from the contract alone: ARCHITECTURE.md's "What a C or C++ host needs" and the tokenizer
file's format, with numpy + onnxruntime and no ``dalle2_rt`` code at all. It reproduces the runtime's pixels
(the golden images, which the runtime drew) for a prompt, the proof that another stack can run an engine folder.

Everything here is deliberately plain and close to what a C++ port would do; it follows the manifest, not the
bundled model: graphs, inputs, schedules, parameterisations, guidance form and defaults all come from it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import regex
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENGINES = REPO / "engines" / "shapes-v2"

pytestmark = pytest.mark.skipif(not (ENGINES / "manifest.json").exists(),
                                reason="engines/shapes-v2 not built (run `make engines`)")

# Stage keys this host implements; a manifest with others is refused instead of being run wrongly.
KNOWN = {
    "prior": {"graph", "parameterization", "schedule", "embed_dim", "embed_scale", "clip_x0", "guidance_on",
              "cond_input", "defaults", "prefix_cache"},
    "decoder": {"graph", "parameterization", "image_size", "channels", "schedule", "clip_x0", "guidance_on",
                "cond_inputs", "defaults", "guidance_input", "guidance", "guidance_range"},
    "sr": {"graph", "parameterization", "image_size", "low_res_size", "channels", "schedule", "clip_x0",
           "noise_aug_t", "defaults"},
}


class Tokenizer:
    """clip-bpe/1, steps 1-7 of the format. Step 1 (ftfy) is the identity on printable ASCII without '&'."""

    def __init__(self, folder: Path, entry: dict):
        f = json.loads((folder / entry["file"]).read_text(encoding="utf-8"))
        assert f["format"] == entry["format"] == "clip-bpe/1"
        assert entry["preprocess"] == ["ftfy.fix_text", "html.unescape", "html.unescape", "whitespace_clean", "lower"]
        self.ids = {s: i for i, s in enumerate(f["vocab"])}
        self.ranks = {(a, b): r for r, (a, b) in enumerate(f["merges"])}
        self.bytes = f["byte_alphabet"]
        self.suffix = f["end_of_word_suffix"]
        flags = 0
        for name in f["pattern_flags"]:
            flags |= getattr(regex, name)
        self.pattern = regex.compile(f["pattern"], flags)
        self.special = f["special_tokens"]
        self.entry = entry

    def _bpe(self, word: list[str]) -> list[str]:
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            ranked = [(r, i) for r, i in pairs if r is not None]
            if not ranked:
                break
            _, first = min(ranked)
            pair = (word[first], word[first + 1])
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> np.ndarray:
        assert re.fullmatch(r"[ -%'-~\t\n]*", text), "this host implements ftfy only for plain ASCII without '&'"
        text = " ".join(text.split()).lower()  # steps 2-4 (no entities in such text)
        ids = []
        for piece in self.pattern.findall(text):  # step 5
            if piece in self.special:
                ids.append(self.special[piece])
                continue
            word = [self.bytes[b] for b in piece.encode("utf-8")]
            word[-1] += self.suffix
            ids += [self.ids[s] for s in self._bpe(word)]  # step 6
        n, e = self.entry["context_length"], self.entry
        ids = [e["sot_id"], *ids[: n - 2], e["eot_id"]]  # step 7
        return np.array([ids + [e["pad_id"]] * (n - len(ids))], dtype=np.int64)


class Host:
    def __init__(self, folder: Path):
        self.folder = folder
        self.m = json.loads((folder / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sessions = {}
        self.opts = opts

    def run(self, graph: str, **feeds) -> dict[str, np.ndarray]:
        g = self.m["graphs"][graph]
        if graph not in self.sessions:
            file = g.get("optimized_file") or g["file"]
            self.sessions[graph] = ort.InferenceSession(str(self.folder / file), self.opts,
                                                        providers=["CPUExecutionProvider"])
        dtypes = {i["name"]: i["dtype"] for i in g["inputs"]}
        feeds = {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in feeds.items() if k in dtypes}
        outs = self.sessions[graph].run(None, feeds)
        return dict(zip((o["name"] for o in g["outputs"]), outs))

    @staticmethod
    def respace(schedule: dict, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t_i, ᾱ_i, ᾱ'_i) for i = 0 … S-1, trailing spacing (ARCHITECTURE.md step 3)."""
        assert schedule.get("spacing", "trailing") == "trailing" and "betas" not in schedule
        abar = np.asarray(schedule["alphas_cumprod"], dtype=np.float64)
        T = len(abar)
        t = np.array([round(T - i * T / steps) - 1 for i in range(steps)], dtype=np.int64).clip(0, T - 1)
        a = abar[t]
        return t, a, np.append(a[1:], 1.0)

    @staticmethod
    def to_x0(kind: str, x, pred, a):
        if kind == "eps":
            return (x - np.sqrt(1 - a) * pred) / np.sqrt(a)
        if kind == "v":
            return np.sqrt(a) * x - np.sqrt(1 - a) * pred
        assert kind == "x0", kind
        return pred

    def ddim(self, stage: dict, x: np.ndarray, steps: int, model, first: int = 0, stop: int | None = None):
        """DDIM, η = 0: no noise drawn. ``model(x, t_float32) -> x0`` already guided and clamped. Runs steps
        ``first`` … ``stop`` − 1 of the S-step schedule (default all); keeps the last clean estimate in
        ``self.last_x0`` (early candidate choice ranks on it)."""
        t, a, a_next = self.respace(stage["schedule"], steps)
        for i in range(first, steps if stop is None else stop):
            x64 = x.astype(np.float64)
            x0 = model(x, np.float32(t[i]), a[i]).astype(np.float64)
            lo_hi = stage.get("clip_x0")
            if lo_hi is not None:
                x0 = x0.clip(*lo_hi)
            self.last_x0 = x0
            eps = (x64 - np.sqrt(a[i]) * x0) / np.sqrt(1 - a[i])
            x = (np.sqrt(a_next[i]) * x0 + np.sqrt(1 - a_next[i]) * eps).astype(np.float32)
        return x

    def guided(self, stage: dict, graph: str, cond: dict, uncond: dict, g: float, rows: int):
        """A denoiser (x, t, ᾱ) -> x0 for a stage whose conditioning is ``cond`` / ``uncond`` per row."""
        distilled = stage.get("guidance_input") or ("guidance" if stage.get("guidance") == "input" else None)
        if distilled and "guidance_range" in stage:  # the scales it was trained on: refuse any other
            lo, hi = stage["guidance_range"]
            assert lo <= g <= hi, f"guidance {g} outside the trained range {stage['guidance_range']}"

        def model(x, t, a):
            if distilled:  # one pass per row, the scale as an input: no unconditional half
                pred = self.run(graph, x_t=x, t=np.full(rows, t), **cond, **{distilled: np.full(rows, g)})["pred"]
            else:  # conditional rows first, then unconditional (ARCHITECTURE.md step 4)
                both = {k: np.concatenate([cond[k], uncond[k]]) for k in cond}
                out = self.run(graph, x_t=np.concatenate([x, x]), t=np.full(2 * rows, t), **both)["pred"]
                c, u = out[:rows].astype(np.float64), out[rows:].astype(np.float64)
                pred = u + g * (c - u)
            return self.to_x0(stage["parameterization"], x.astype(np.float64), pred, a)
        return model

    def image(self, prompt: str, seed: int, index: int = 0) -> np.ndarray:
        m, st = self.m, self.m["stages"]
        for name in ("prior", "decoder"):
            extra = set(st[name]) - KNOWN[name]
            assert not extra, f"manifest stage {name} has keys this host does not implement: {extra}"
        for sr in st["sr"]:
            assert not set(sr) - KNOWN["sr"], set(sr) - KNOWN["sr"]

        def normal(rng, shape):
            return rng.standard_normal(shape, dtype=np.float32)

        tokens = Tokenizer(self.folder, m["tokenizer"]).encode(prompt)
        text = self.run(st["text_encoder"]["graph"], tokens=tokens)
        text_embed, text_enc = text["text_embed"], text["text_encodings"]

        # Prior: k candidates, x_T from stream [seed, index, 0], the prefix computed once per guidance half.
        p = st["prior"]
        d = p["defaults"]
        k = d.get("candidates", 1)
        rng = np.random.default_rng([seed, index, 0])
        x = normal(rng, (k, p["embed_dim"]))
        cond_in = {"text_embed": text_embed, "text_encodings": text_enc}
        pc = p.get("prefix_cache")
        if pc:
            halves = [self.run(pc["prefix_graph"], **cond_in, **{p["cond_input"]: np.full(1, keep)})
                      for keep in (1.0, 0.0)]
            cond, uncond = ({n: np.repeat(h[n], k, axis=0) for n in pc["cache"]} for h in halves)
            graph = pc["step_graph"]
        else:
            cond = {**{n: np.repeat(v, k, axis=0) for n, v in cond_in.items()}, p["cond_input"]: np.ones(k)}
            uncond = {**cond, p["cond_input"]: np.zeros(k)}
            graph = p["graph"]
        assert d["sampler"] == "ddim"
        x = self.ddim(p, x, d["steps"], self.guided(p, graph, cond, uncond, d["guidance"], k))
        emb = x.astype(np.float64) / p["embed_scale"]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        t_dir = text_embed[0].astype(np.float64) / np.linalg.norm(text_embed[0])
        image_embed = emb[int(np.argmax(emb @ t_dir))][None].astype(np.float32)

        # Decoder: k samples from stream [seed, index, 1], ranked by the image encoder.
        dec = st["decoder"]
        d = dec["defaults"]
        k = d.get("candidates", 1)
        size, ch = dec["image_size"], dec["channels"]
        rng = np.random.default_rng([seed, index, 1])
        x = normal(rng, (k, ch, size, size))
        keep = dec["cond_inputs"]
        cond = {"image_embed": np.repeat(image_embed, k, 0), "text_encodings": np.repeat(text_enc, k, 0),
                **{n: np.ones(k) for n in keep}}
        uncond = {**cond, **{n: np.zeros(k) for n in keep}}
        assert d["sampler"] == "ddim"

        def rank(samples):  # the image encoder's choice among the k (argmax: ties go to the lowest row)
            enc = st["image_encoder"]
            lo, hi = m["output"]["pixel_range"]
            ilo, ihi = enc["input_range"]
            rep = enc["image_size"] // size
            pix = (samples.clip(lo, hi).astype(np.float64) - lo) / (hi - lo) * (ihi - ilo) + ilo
            pix = pix.repeat(rep, axis=2).repeat(rep, axis=3).astype(np.float32)
            e = self.run(enc["graph"], pixels=pix)["image_embed"].astype(np.float64)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            return int(np.argmax(e @ t_dir))

        steps, s = d["steps"], d.get("choice_step")
        if k > 1 and s is not None and s < steps:  # early choice: rank the step-s estimates, finish the best
            x = self.ddim(dec, x, steps, self.guided(dec, dec["graph"], cond, uncond, d["guidance"], k), stop=s)
            best = rank(self.last_x0.astype(np.float32))
            one = {n: v[best:best + 1] for n, v in cond.items()}
            x = self.ddim(dec, x[best:best + 1], steps,
                          self.guided(dec, dec["graph"], one, {**one, **{n: np.zeros(1) for n in keep}},
                                      d["guidance"], 1), first=s)
        else:
            x = self.ddim(dec, x, steps, self.guided(dec, dec["graph"], cond, uncond, d["guidance"], k))
            if k > 1:
                x = x[rank(x)][None]

        # SR stages: stream [seed, index, 2 + m]: the augmentation noise, then x_T; unguided.
        lo, hi = m["output"]["pixel_range"]
        for j, sr in enumerate(st["sr"]):
            rng = np.random.default_rng([seed, index, 2 + j])
            low = x.clip(lo, hi)
            feeds = {}
            a_aug = sr.get("noise_aug_t")
            if a_aug is not None:
                abar = float(sr["schedule"]["alphas_cumprod"][a_aug])
                eps = normal(rng, low.shape).astype(np.float64)
                low = (np.sqrt(abar) * low.astype(np.float64) + np.sqrt(1 - abar) * eps).astype(np.float32)
                feeds["aug_t"] = np.full(1, float(a_aug))
            n = sr["image_size"]
            x = normal(rng, (1, sr["channels"], n, n))

            def model(x, t, a, sr=sr, low=low, feeds=feeds):
                pred = self.run(sr["graph"], x_t=x, t=np.full(1, t), low_res=low, **feeds)["pred"]
                return self.to_x0(sr["parameterization"], x.astype(np.float64), pred.astype(np.float64), a)
            assert sr["defaults"]["sampler"] == "ddim"
            x = self.ddim(sr, x, sr["defaults"]["steps"], model)

        pixels = np.rint((x[0].astype(np.float64) - lo) * 255 / (hi - lo)).clip(0, 255).astype(np.uint8)
        return pixels.transpose(1, 2, 0)


def test_the_host_imports_no_dalle2_rt_code():
    source = Path(__file__).read_text()
    assert not re.search(r"^\s*(from|import)\s+dalle2_rt", source, flags=re.M)
    assert not re.search(r"^\s*from\s+tests", source, flags=re.M)


def test_tokens_of_the_host_are_the_reference_ids():
    """Token ids of CLIP's BPE for a caption, spelled out (open_clip's for this text)."""
    tok = Tokenizer(ENGINES, json.loads((ENGINES / "manifest.json").read_text())["tokenizer"])
    ids = tok.encode("a large red circle on the left, black background")[0]
    assert ids[0] == 49406 and list(ids[1:11]) == [320, 3638, 736, 7117, 525, 518, 1823, 267, 1449, 5994]
    assert ids[11] == 49407 and not ids[12:].any()


def test_a_host_from_the_manifest_reproduces_the_runtimes_pixels():
    """The golden image of the demo prompt (drawn by the runtime at the defaults, seed 0) from this host."""
    want = np.asarray(Image.open(REPO / "tests" / "golden" / "a-large-red-circle-on-the-s0.png").convert("RGB"))
    got = Host(ENGINES).image("a large red circle on the left, black background", seed=0)
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2, f"max |diff| {diff.max()}, mean {diff.mean():.3f}"
