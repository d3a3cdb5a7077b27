"""The unCLIP loop over an engine folder: prompt -> text encoder -> prior -> decoder -> SR stages -> images.

    pipe = Pipeline.load()                      # engines/shapes-v1 (or $DALLE2_RT_ENGINES), onnxruntime
    images = pipe("a red circle", seed=7, num_images=4)
    more = pipe.variations(images[0], num_images=2, seed=1)

The loop is written once against ``engine(**arrays) -> dict`` (``backends.py``); samplers come from
``samplers.py`` and guidance from ``parameterization.make_denoiser``: the conditional and unconditional
halves go through the graph as one batch of 2B (``*_keep`` = 1 for the first half, 0 for the second).
What a stage does beyond that (an empty-prompt unconditional branch, a text mask, a learned variance, a
different graph for the last step, a prefix cache, ...) is read from its manifest entry through ``stages.py``.

Prefix cache: a stage with ``prefix_cache`` (our prior) runs its ``prefix_graph`` once per image and guidance
half on the stage's conditioning and then only ``step_graph(x_t, t, cache...)`` in the loop; the result is
the full graph's to float rounding (``Pipeline.load(prefix_cache=False)`` runs the full graph instead).

Noise and seeds (the determinism contract)
------------------------------------------
Every random draw is made on the host with numpy. The draws for image j (0-based, per prompt) of a call
with seed s in stage k come from ``np.random.default_rng([s, j, k])``, with k = 0 for the prior, 1 for
the decoder and 2 + m for SR stage m. Within a stage the order is: (SR stages with a ``noise_aug_t``
only: the noise augmenting the low-res input, shape of low_res), the starting noise x_T (prior: the k
candidates' rows, in order), then whatever the sampler draws, step by step. Each draw is float32
``standard_normal`` of that image's rows.
So an image's pixels are a function of (prompt, s, j, settings, backend) alone: they do not depend on
num_images, on the other prompts of the call, on how the batch is chunked, or on other threads. Two
prompts called with the same seed start from the same noise, which makes prompts comparable.

A ``Pipeline`` holds only immutable state after ``load``; every call keeps its arrays local, so one
object may be called from several threads (ONNX Runtime sessions are thread-safe; the TensorRT backend
serialises each engine).
"""
from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import BACKENDS, open_backend
from .errors import EngineFolderError, InputError, NonFiniteError, PromptTruncatedWarning
from .images import open_image, to_pixels, to_uint8
from .manifest import Manifest, load_manifest, stage_alphas_cumprod, stage_betas, verify_files
from .parameterization import make_denoiser
from .samplers import SAMPLERS, sample
from .schedules import q_sample, respace
from .stages import embed_norm, image_embed_from_prior, sampler_options
from .tokenizer import Tokenizer

MAX_IMAGES = 64  # per prompt and call
MAX_CANDIDATES = 16
MAX_SEED = 2**64 - 1
DEFAULT_ENGINES = "shapes-v1"
PRIOR, DECODER = 0, 1  # noise-stream ids of the stages; SR stage m is 2 + m

# callback(stage, step, total, x0): after every sampling step (x0 = the step's clean estimate, batch order)
# and once after each encoder (step = total = 1, x0 None).
Callback = Callable[[str, int, int, "np.ndarray | None"], None]


def default_engines() -> Path:
    """``$DALLE2_RT_ENGINES`` if set, else ``<repo>/engines/shapes-v1`` next to the package."""
    env = os.environ.get("DALLE2_RT_ENGINES")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "engines" / DEFAULT_ENGINES


class NoiseStreams:
    """Per-image generators, each owning ``rows`` consecutive batch rows.

    Stands in for a ``np.random.Generator`` in the samplers (they only call ``standard_normal``): a draw of
    shape (n·rows, ...) is the concatenation of each image's own draw of (rows, ...).
    """

    def __init__(self, seed: int, indices: Sequence[int], stage: int, rows: int = 1):
        self.generators = [np.random.default_rng([seed, int(j), stage]) for j in indices]
        self.rows = rows

    def subset(self, images: slice) -> NoiseStreams:
        """The streams of some images (the same generator objects: their draws continue)."""
        sub = object.__new__(NoiseStreams)
        sub.generators, sub.rows = self.generators[images], self.rows
        return sub

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        size = tuple(size)
        if size[0] != self.rows * len(self.generators):
            raise ValueError(f"draw of {size[0]} rows from {len(self.generators)} images × {self.rows} rows")
        return np.concatenate([g.standard_normal((self.rows, *size[1:]), dtype=dtype) for g in self.generators])


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def select_candidates(pred: np.ndarray, text_embed: np.ndarray, k: int, norm: float | dict):
    """Pick, per image, the prior candidate most similar to its text.

    pred (N·k, D) prior outputs (rows n·k … n·k+k-1 belong to image n), text_embed (N, D). Each candidate
    becomes the decoder's image embedding (``norm``: the prior's embed_norm, or a float embed_scale; for our
    models the unit CLIP embedding normalize(pred / embed_scale)); its score is its cosine with the text
    embedding. Returns (image_embed (N, D) float32, chosen (N,) int, scores (N, k) float64).
    """
    n = text_embed.shape[0]
    emb = image_embed_from_prior(np.asarray(pred).reshape(n, k, -1), norm)  # (N, k, D)
    scores = np.einsum("nkd,nd->nk", normalize(emb), normalize(text_embed))
    chosen = np.argmax(scores, axis=1)
    return emb[np.arange(n), chosen].astype(np.float32), chosen, scores


@dataclass(frozen=True)
class _Diffusion:
    """A sampling stage of the manifest, resolved once at load."""

    name: str  # "prior", "decoder", "sr0", ...
    graph: str
    kind: str  # eps | x0 | v
    abar: np.ndarray  # (T,) float64 over the training timesteps
    spacing: str
    clip_x0: tuple[float, float] | None
    x_shape: tuple[int, ...]  # one row of x_t, from the graph's input spec
    output: str  # the graph's prediction output
    defaults: dict
    entry: dict
    variance: str = "small"  # small | large | learned_range (stages.py)
    last_graph: str | None = None  # the graph of the last sampling step, when it is another one
    uncond_text: str = "null_input"  # null_input | empty_prompt
    betas: np.ndarray | None = None  # (T,) the training β_t when the manifest records them
    prefix_graph: str | None = None  # prefix_cache: the graph computing the cache once per image and half
    step_graph: str | None = None  # … and the graph that replaces ``graph`` at every step, fed the cache
    cache: tuple[str, ...] = ()  # … the cache tensors' names (outputs of prefix_graph, inputs of step_graph)


def _diffusion(manifest: Manifest, name: str, entry: dict, prefix_cache: bool = True) -> _Diffusion:
    spec = manifest.graphs[entry["graph"]]
    x_spec = next((t for t in spec.inputs if t.name == "x_t"), None)
    if x_spec is None or not all(isinstance(d, int) for d in x_spec.shape[1:]):
        raise EngineFolderError(f"{manifest.folder}: graph {spec.name!r} needs an input x_t with a fixed row shape")
    clip = entry.get("clip_x0")
    cached = _prefix_cache(manifest, name, entry) if prefix_cache else {}
    return _Diffusion(
        name=name, graph=spec.name, kind=entry["parameterization"], abar=stage_alphas_cumprod(entry),
        spacing=entry["schedule"].get("spacing", "trailing"),
        clip_x0=(float(clip[0]), float(clip[1])) if clip else None,
        x_shape=tuple(x_spec.shape[1:]), output=spec.outputs[0].name, defaults=dict(entry.get("defaults") or {}),
        entry=entry, variance=entry.get("variance", "small"), last_graph=entry.get("last_step_graph"),
        uncond_text=entry.get("uncond_text", "null_input"), betas=stage_betas(entry), **cached,
    )


def _diffusions(manifest: Manifest, prefix_cache: bool) -> list[_Diffusion]:
    """The sampling stages in pipeline order: prior, decoder, sr0, sr1, …"""
    st = manifest.stages
    named = [("prior", st["prior"]), ("decoder", st["decoder"]),
             *((f"sr{m}", e) for m, e in enumerate(st.get("sr", [])))]
    return [_diffusion(manifest, name, entry, prefix_cache) for name, entry in named]


def _prefix_cache(manifest: Manifest, name: str, entry: dict) -> dict:
    """The checked ``prefix_cache`` of a stage entry as _Diffusion fields ({} when it has none)."""
    pc = entry.get("prefix_cache")
    if not pc:
        return {}
    try:
        prefix, step, cache = manifest.graphs[pc["prefix_graph"]], manifest.graphs[pc["step_graph"]], pc["cache"]
    except (KeyError, TypeError) as e:
        raise EngineFolderError(f"{manifest.folder}: stages.{name}.prefix_cache names no graph {e}") from None
    full = manifest.graphs[entry["graph"]]
    step_in, full_in = {t.name for t in step.inputs}, {t.name for t in full.inputs}
    problems = [f"{n!r} is not an output of {prefix.name}" for n in cache if n not in {t.name for t in prefix.outputs}]
    problems += [f"{n!r} is not an input of {step.name}" for n in cache if n not in step_in]
    problems += [f"{step.name} input {n!r} is neither x_t, t nor a cache tensor"
                 for n in step_in - {"x_t", "t", *cache}]
    problems += [f"{prefix.name} input {n!r} is not an input of {full.name}"
                 for n in {t.name for t in prefix.inputs} - full_in]
    if problems:
        raise EngineFolderError(f"{manifest.folder}: stages.{name}.prefix_cache: {'; '.join(problems)}")
    return {"prefix_graph": prefix.name, "step_graph": step.name, "cache": tuple(cache)}


# --------------------------------------------------------------------------------------------------------
# argument checks (InputError: one line a user can act on)


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value)


def _check_guidance(name: str, value) -> float:
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(g) or g < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return g


def _check_prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise InputError("no prompt given")
    for p in prompts:
        if not isinstance(p, str):
            raise InputError(f"a prompt must be a string, got {type(p).__name__}")
        if not p.strip():
            raise InputError("the prompt is empty")
    return prompts


def _check_sampler(value) -> str | None:
    if value is not None and value not in SAMPLERS:
        raise InputError(f"unknown sampler {value!r}; choose from {', '.join(SAMPLERS)}")
    return value


class Pipeline:
    """An engine folder loaded on one backend; call it with prompts to get ``PIL.Image`` s."""

    def __init__(self, manifest: Manifest, backend, engines: dict, tokenizer: Tokenizer,
                 diffusions: list[_Diffusion]):
        """Use ``Pipeline.load``. ``diffusions``: the prior, decoder and SR stages (``_diffusions``), whose
        graphs ``engines`` holds."""
        self.manifest, self.backend, self.engines, self.tokenizer = manifest, backend, engines, tokenizer
        stages = manifest.stages
        self.prior, self.decoder, *self.sr = diffusions
        self.embed_norm = embed_norm(stages["prior"])
        self.text_mask = stages["text_encoder"].get("text_mask")  # None | "tokens"
        self.pixel_range = tuple((manifest.data.get("output") or {}).get("pixel_range", (-1.0, 1.0)))

    @classmethod
    def load(cls, engines: str | os.PathLike | None = None, backend: str = "onnxruntime", *,
             providers: list[str] | None = None, threads: int | None = None, device_id: int = 0,
             verify: bool = True, prefix_cache: bool = True, shared_threads: bool = False) -> Pipeline:
        """Read ``engines`` (None: ``default_engines()``), check every file's sha256, open ``backend``.

        providers: onnxruntime execution providers to try, in order (default: TensorRT, CUDA, CPU as
        available). threads: intra-op threads per graph (default: the backend's choice). prefix_cache:
        use a stage's ``prefix_cache`` graphs where the folder has them (False: the full graph every step).
        shared_threads: onnxruntime sessions share one process-wide thread pool (faster; but afterwards
        onnxruntime refuses sessions with their own pools anywhere in the process, so only where you own
        the process: the CLI does it; see ``backends.py``).
        """
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if engines is None:
            folder = default_engines()
            if not (folder / "manifest.json").exists():
                raise EngineFolderError(f"the default engines are missing ({folder}); run `make engines` to build "
                                        "them, or pass --engines DIR / set DALLE2_RT_ENGINES")
        else:
            folder = Path(engines)
        manifest = load_manifest(folder)
        if verify:
            verify_files(manifest)
        try:
            tokenizer = Tokenizer.load(manifest.folder, manifest.tokenizer)
        except (ValueError, KeyError, OSError) as e:
            raise EngineFolderError(f"{manifest.folder}: tokenizer unusable ({e})") from None
        diffusions = _diffusions(manifest, prefix_cache)
        options = {"threads": threads, "device_id": device_id}
        if backend == "onnxruntime":
            options["providers"] = providers
            options["shared_pool"] = shared_threads
        runner = open_backend(backend, manifest, **options)
        graphs = {manifest.stages[s]["graph"] for s in ("text_encoder", "image_encoder") if s in manifest.stages}
        for st in diffusions:
            graphs |= {st.prefix_graph, st.step_graph} if st.step_graph else {st.graph}
            graphs |= {st.last_graph} if st.last_graph else set()
        engines_ = {g: runner.engine(g) for g in sorted(graphs)}
        return cls(manifest, runner, engines_, tokenizer, diffusions)

    # ----------------------------------------------------------------------------------------------------
    # public API

    def settings(self, prior_steps=None, decoder_steps=None, sr_steps=None, prior_guidance=None,
                 decoder_guidance=None, sampler=None, candidates=None) -> dict:
        """Per-stage {"steps", "guidance", "sampler"} (and "candidates"), checked, manifest defaults filled in.

        Raises ``InputError`` for a bad value; the CLI calls it to reject arguments before writing anything.
        """
        _check_sampler(sampler)
        run = {}
        given = {"prior": (prior_steps, prior_guidance), "decoder": (decoder_steps, decoder_guidance)}
        for st in [self.prior, self.decoder, *self.sr]:
            steps, guidance = given.get(st.name, (sr_steps, None))
            d = st.defaults
            steps = _check_int(f"{st.name} steps", d.get("steps", 25) if steps is None else steps, 1, len(st.abar))
            if guidance is None and st.name in given:  # SR stages have no conditioning to drop: unguided
                guidance = d.get("guidance")
            run[st.name] = {
                "steps": steps,
                "guidance": None if guidance is None else _check_guidance(f"{st.name} guidance", guidance),
                "sampler": _check_sampler(sampler or d.get("sampler", "ddim")),
            }
        k = self.prior.defaults.get("candidates", 1) if candidates is None else candidates
        run["candidates"] = _check_int("candidates", k, 1, MAX_CANDIDATES)
        return run

    def truncated(self, prompts: str | Sequence[str]) -> list[bool]:
        """Per prompt, whether it has more tokens than the text encoder reads (the tail would be dropped)."""
        return self.tokenizer.encode(_check_prompts(prompts))[1]

    def __call__(self, prompt: str | Sequence[str], *, seed: int | None = None, num_images: int = 1,
                 prior_steps: int | None = None, decoder_steps: int | None = None, sr_steps: int | None = None,
                 prior_guidance: float | None = None, decoder_guidance: float | None = None,
                 sampler: str | None = None, candidates: int | None = None,
                 callback: Callback | None = None) -> list[Image.Image]:
        """Images for each prompt, prompt-major: [p0 image 0, …, p0 image n-1, p1 image 0, …].

        Unset options take the manifest's per-stage defaults; ``sampler`` applies to every stage;
        ``sr_steps`` to every SR stage. ``seed`` None draws one (it is in each image's ``info["seed"]``).
        Guidance 1.0 runs the conditional branch only (the same prediction, half the work).
        """
        prompts = _check_prompts(prompt)
        n = _check_int("num_images", num_images, 1, MAX_IMAGES)
        seed = self._seed(seed)
        run = self.settings(prior_steps, decoder_steps, sr_steps, prior_guidance, decoder_guidance, sampler,
                             candidates)
        tokens, truncated = self.tokenizer.encode(prompts)
        for p, cut in zip(prompts, truncated):
            if cut:
                warnings.warn(f"prompt truncated to {self.tokenizer.context_length - 2} tokens: {p[:60]!r}",
                              PromptTruncatedWarning, stacklevel=2)
        text = self._text(prompts, tokens, callback)  # text_embed (P, D), text_encodings (P, L, W), [text_mask]
        empty = self._empty_text()  # the "" prompt's, when a stage's unconditional branch needs them
        rows = np.repeat(np.arange(len(prompts)), n)  # image row -> prompt
        index = np.tile(np.arange(n), len(prompts))  # image row -> j within its prompt
        text = {k: v[rows] for k, v in text.items()}
        image_embed = self._prior(text, empty, seed, index, run, callback)
        keep = np.ones(len(rows), np.float32)
        x = self._decode(image_embed, text, keep, empty, seed, index, run, callback)
        x = self._upsample(x, seed, index, run, callback)
        meta = [{"prompt": prompts[r], "seed": str(seed), "index": str(j)} for r, j in zip(rows, index)]
        return self._images(x, meta, run, with_prior=True)

    def variations(self, image, *, num_images: int = 1, seed: int | None = None,
                   decoder_steps: int | None = None, sr_steps: int | None = None,
                   decoder_guidance: float | None = None, sampler: str | None = None,
                   callback: Callback | None = None) -> list[Image.Image]:
        """Variations of ``image`` (PIL image or path): image encoder -> decoder (no text) -> SR stages."""
        if "image_encoder" not in self.manifest.stages:
            raise InputError(f"engine folder {self.manifest.folder} has no image_encoder; variations need one")
        source = open_image(image)
        n = _check_int("num_images", num_images, 1, MAX_IMAGES)
        seed = self._seed(seed)
        run = self.settings(None, decoder_steps, sr_steps, None, decoder_guidance, sampler, None)
        enc_stage = self.manifest.stages["image_encoder"]
        engine = self.engines[enc_stage["graph"]]
        size = int(enc_stage.get("image_size") or engine.spec.inputs[0].shape[-1])
        pixels = to_pixels(source, size, enc_stage.get("input_range", (0.0, 1.0)))[None]  # (1, 3, S, S)
        embed = self._call(engine, "image_encoder", pixels=pixels)
        embed = next(iter(embed.values()))  # (1, D)
        if callback is not None:
            callback("image_encoder", 1, 1, None)
        width = self._text_width()
        index = np.arange(n)
        text_enc = np.zeros((n, *width), np.float32)  # replaced by the learned null: text_keep = 0 below
        x = self._decode(np.repeat(normalize(embed), n, 0).astype(np.float32), {"text_encodings": text_enc},
                         np.zeros(n, np.float32), None, seed, index, run, callback)
        x = self._upsample(x, seed, index, run, callback)
        name = Path(image).name if isinstance(image, str | os.PathLike) else ""
        meta = [{"prompt": "", "variation_of": name, "seed": str(seed), "index": str(j)} for j in index]
        return self._images(x, meta, run, with_prior=False)

    # ----------------------------------------------------------------------------------------------------
    # the stages

    def _seed(self, seed) -> int:
        return secrets.randbelow(2**32) if seed is None else _check_int("seed", seed, 0, MAX_SEED)

    def _call(self, engine, stage: str, *, step: int | None = None, total: int | None = None,
              timestep: int | None = None, **arrays) -> dict[str, np.ndarray]:
        """One engine call; any non-finite output stops the run naming the stage and step."""
        outs = engine(**arrays)
        for name, value in outs.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise NonFiniteError(stage, name, step, total, timestep)
        return outs

    def _text(self, prompts: list[str], tokens: np.ndarray, callback) -> dict[str, np.ndarray]:
        """The text conditioning of each prompt: text_embed (P, D), text_encodings (P, L, W) and, when the
        manifest asks for it (``text_encoder.text_mask``), text_mask (P, L) float32."""
        engine = self.engines[self.manifest.stages["text_encoder"]["graph"]]
        parts = [self._call(engine, "text_encoder", tokens=tokens[c]) for c in _chunks(len(tokens), engine.max_batch)]
        if callback is not None:
            callback("text_encoder", 1, 1, None)
        text = {name: np.concatenate([p[name] for p in parts]) for name in ("text_embed", "text_encodings")}
        if self.text_mask == "tokens":
            text["text_mask"] = self.tokenizer.text_mask(prompts)
        return text

    def _empty_text(self) -> dict[str, np.ndarray] | None:
        """The text conditioning of the empty prompt (1 row), for stages with ``uncond_text: empty_prompt``."""
        if all(st.uncond_text != "empty_prompt" for st in (self.prior, self.decoder)):
            return None
        return self._text([""], self.tokenizer([""]), None)

    @staticmethod
    def _uncond(st: _Diffusion, empty: dict | None, n: int) -> dict | None:
        """The arrays that replace the conditional ones in the unconditional half of ``st`` (n rows), if any."""
        if st.uncond_text != "empty_prompt":
            return None
        return {k: np.repeat(v, n, 0) for k, v in empty.items()}

    def _text_width(self) -> tuple[int, ...]:
        spec = self.engines[self.decoder.graph].spec
        enc = next((t for t in spec.inputs if t.name == "text_encodings"), None)
        return tuple(enc.shape[1:]) if enc is not None else (0,)

    def _prior(self, text, empty, seed, index, run, callback) -> np.ndarray:
        """(N, D) image embeddings: k candidates per image in one batch, the best by text similarity."""
        k = run["candidates"]
        cond_name = self.prior.entry.get("cond_input", "cond_keep")
        cond = {name: np.repeat(v, k, 0) for name, v in text.items()}  # (N·k, ...)
        streams = NoiseStreams(seed, index, PRIOR, rows=k)
        pred = self._sample(self.prior, run["prior"], cond, {cond_name: 1.0}, {cond_name: 0.0}, streams,
                            callback, uncond=self._uncond(self.prior, empty, len(cond["text_embed"])))  # (N·k, D)
        return select_candidates(pred, text["text_embed"], k, self.embed_norm)[0]

    def _decode(self, image_embed, text, text_keep, empty, seed, index, run, callback) -> np.ndarray:
        cond = {"image_embed": image_embed, **text}
        keep_c = {"image_keep": 1.0, "text_keep": text_keep}
        keep_u = {"image_keep": 0.0, "text_keep": 0.0}
        return self._sample(self.decoder, run["decoder"], cond, keep_c, keep_u, NoiseStreams(seed, index, DECODER),
                            callback, uncond=self._uncond(self.decoder, empty, len(image_embed)))

    def _upsample(self, x, seed, index, run, callback) -> np.ndarray:
        for m, st in enumerate(self.sr):
            aug = st.entry["noise_aug_t"]
            low_size = tuple(next(t.shape[1:] for t in self.engines[st.graph].spec.inputs if t.name == "low_res"))
            if tuple(x.shape[1:]) != low_size:
                raise EngineFolderError(f"{st.name} takes low_res {low_size} but the previous stage made "
                                        f"{tuple(x.shape[1:])}")
            x = np.clip(x, *self.pixel_range).astype(np.float32)
            streams = NoiseStreams(seed, index, 2 + m)
            if aug is None:  # no noise augmentation: the previous image as it is, no draw
                cond = {"low_res": x}
            else:  # low_res = q_sample(previous, ᾱ[aug_t], ε), ε the first draw of this stage's streams
                aug_t = int(aug)
                noise = streams.standard_normal(x.shape)
                cond = {"low_res": q_sample(x, st.abar[aug_t], noise), "aug_t": np.full(len(x), aug_t, np.float32)}
            x = self._sample(st, run[st.name], cond, {}, None, streams, callback)
        return x

    def _sample(self, st: _Diffusion, opts: dict, cond: dict, keep_c: dict, keep_u: dict | None,
                streams: NoiseStreams, callback, uncond: dict | None = None) -> np.ndarray:
        """Run stage ``st`` for all N images, in chunks that fit the graph's batch profile.

        cond: per-row conditioning arrays (N·rows, ...), rows = ``streams.rows`` per image; keep_c / keep_u:
        the ``*_keep`` inputs (scalars or (N·rows,) arrays) of the conditional and unconditional halves;
        keep_u None = an unguided stage; uncond: per-row arrays that replace some of ``cond`` in the
        unconditional half (the empty prompt's text). Returns the samples (N·rows, *x_shape).
        """
        rows, n_images = streams.rows, len(streams.generators)
        prefix = self.engines[st.prefix_graph] if st.prefix_graph else None
        engine = self.engines[st.step_graph if prefix else st.graph]
        last_engine = self.engines[st.last_graph] if st.last_graph else engine
        names = {t.name for t in engine.spec.inputs}
        g = opts["guidance"]
        guided = keep_u is not None and g is not None and g != 1.0
        schedule = respace(st.abar, opts["steps"], st.spacing, betas=st.betas)
        total_steps = len(schedule)
        step_of = {int(t): i for i, t in enumerate(schedule.timesteps)}
        per_image = rows * (2 if guided else 1)
        limits = [(e.max_batch, per_image) for e in (engine, last_engine) if e.max_batch is not None]
        if prefix is not None and prefix.max_batch is not None:  # the prefix runs one row per image and half
            limits.append((prefix.max_batch, per_image // rows))
        if any(most < need for most, need in limits):
            hint = " (ask for fewer candidates)" if rows > 1 else ""
            raise InputError(f"{st.name}: {per_image} rows per image exceed the graph's max batch "
                             f"{min(most for most, _ in limits)}{hint}")
        image_chunks = _chunks(n_images, min((most // need for most, need in limits), default=None))
        results = []
        for c, sel in enumerate(image_chunks):
            row_sel = slice(sel.start * rows, sel.stop * rows)
            b = (sel.stop - sel.start) * rows
            feeds = {k: v[row_sel] for k, v in cond.items()}
            feeds.update({k: _rows(v, row_sel, b) for k, v in keep_c.items()})
            if guided:
                half = {k: v[row_sel] for k, v in {**cond, **(uncond or {})}.items()}
                half.update({k: _rows(v, row_sel, b) for k, v in keep_u.items()})
                feeds = {k: np.concatenate([feeds[k], half[k]]) for k in feeds}  # (2B, ...): cond, uncond
            if prefix is not None:
                # an image's rows share its conditioning: one row per image and half, the cache repeated
                pre_names = {t.name for t in prefix.spec.inputs}
                cache = self._call(prefix, st.name, **{k: v[::rows] for k, v in feeds.items() if k in pre_names})
                feeds = {k: np.repeat(cache[k], rows, axis=0) for k in st.cache}
            feeds = {k: v for k, v in feeds.items() if k in names}

            def model(x_in, t, feeds=feeds):
                i = step_of.get(int(t[0]))
                graph = last_engine if i == total_steps - 1 else engine
                out = self._call(graph, st.name, step=None if i is None else i + 1, total=total_steps,
                                 timestep=int(t[0]), x_t=x_in, t=t, **feeds)
                return out[st.output]

            denoise = make_denoiser(model, kind=st.kind, schedule=schedule, guidance_scale=g if guided else None,
                                    clip_x0=st.clip_x0, learned_variance=st.variance == "learned_range")
            rng = streams.subset(sel)
            x = rng.standard_normal((b, *st.x_shape))  # x_T

            def step_cb(i, x_i, x0, c=c):
                if callback is not None:
                    callback(st.name, c * total_steps + i + 1, len(image_chunks) * total_steps, x0)

            x = sample(opts["sampler"], denoise, x, schedule, rng=rng, callback=step_cb,
                       **sampler_options(opts["sampler"], st.variance))
            if not np.isfinite(x).all():
                raise NonFiniteError(st.name, "x", total_steps, total_steps)
            results.append(x)
        return np.concatenate(results)

    def _images(self, x: np.ndarray, meta: list[dict], run: dict, *, with_prior: bool) -> list[Image.Image]:
        stages = ([self.prior] if with_prior else []) + [self.decoder, *self.sr]
        samplers = {run[s.name]["sampler"] for s in stages}
        common = {
            "sampler": samplers.pop() if len(samplers) == 1 else " ".join(f"{s.name}={run[s.name]['sampler']}"
                                                                          for s in stages),
            "steps": " ".join(f"{s.name}={run[s.name]['steps']}" for s in stages),
            "guidance": " ".join(f"{s.name}={run[s.name]['guidance']}" for s in stages
                                 if run[s.name]["guidance"] is not None),
            **({"candidates": str(run["candidates"])} if with_prior else {}),
            "backend": self.backend.describe(),
            "engines": self.manifest.name,
            "manifest_sha256": self.manifest.sha256,
            "software": "dalle2-rt",
        }
        out = []
        for pixels, m in zip(to_uint8(x, self.pixel_range), meta):
            image = Image.fromarray(pixels)  # (H, W, 3) uint8 -> RGB
            image.info.update({**m, **common})
            out.append(image)
        return out


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if not size else size
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _rows(value, sel: slice, b: int) -> np.ndarray:
    """A ``*_keep`` input for the rows ``sel``: scalars broadcast to (b,), arrays sliced."""
    if np.ndim(value) == 0:
        return np.full(b, value, np.float32)
    return np.asarray(value, np.float32)[sel]
