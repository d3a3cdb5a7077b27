"""The unCLIP loop over an engine folder: prompt -> text encoder -> prior -> decoder -> SR stages -> images.

    pipe = Pipeline.load()                      # the default engine folder (locate.py), onnxruntime
    images = pipe("a red circle", seed=7, num_images=4)
    more = pipe.variations(images[0], num_images=2, seed=1)

This file is the orchestration; each idea lives in its own module:
``plan.py`` (the sampling stages resolved once at load), ``settings.py`` (the call's options, checked),
``noise.py`` (noise streams and the seed contract), ``stage_runner.py`` (one stage over chunks, prefix
cache, last-step graph, NaN checks), ``parameterization.py`` (guidance stacking and the denoiser adapter),
``stages.py`` (what manifest keys ask for: candidate choice, SR low-res input), ``backends.py`` (the
``engine(**arrays) -> dict`` call of every backend). Nothing here branches on a model's name.

A ``Pipeline`` holds only immutable state after ``load`` (its ``engines`` dict may be replaced or wrapped by
a caller; it is read at each call); every call keeps its arrays local, so one object may be called from
several threads (ONNX Runtime sessions are thread-safe; the TensorRT backend serialises each engine).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import BACKENDS, open_backend
from .errors import EngineFolderError, InputError, PromptTruncatedWarning
from .images import open_image, to_pixels, to_uint8
from .locate import DEFAULT_ENGINES, default_engines, missing_message  # noqa: F401 - the lookup (locate.py)
from .manifest import Manifest, load_manifest, verify_files
from .noise import DECODER, PRIOR, NoiseStreams, new_seed, sr_stream
from .plan import StagePlan, graphs_to_open, resolve_stages
from .settings import MAX_CANDIDATES, MAX_IMAGES, MAX_SEED, Settings, check_int, check_prompts, describe  # noqa: F401
from .stage_runner import Callback, Conditioning, call_checked, call_chunked, guidance_halves, run_stage
from .stages import embed_norm, low_res_inputs, normalize, rank_pixels, select_candidates, select_samples
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class _Call:
    """What every stage of one call shares: the seed contract's (seed, j) per image, settings, callback."""

    seed: int | list[int]  # one for every image, or one per image (generate)
    index: np.ndarray  # (N,) image -> j within its prompt
    run: dict  # Settings.resolve: per-stage {"steps", "guidance", "sampler"}, "candidates"
    callback: Callback | None

    def streams(self, stage: int, rows: int = 1) -> NoiseStreams:
        """The noise streams of stream id ``stage`` (noise.py), ``rows`` rows per image."""
        return NoiseStreams(self.seed, self.index, stage, rows)


class Pipeline:
    """An engine folder loaded on one backend; call it with prompts to get ``PIL.Image`` s."""

    def __init__(self, manifest: Manifest, backend, engines: dict, tokenizer: Tokenizer, stages: list[StagePlan]):
        """Use ``Pipeline.load``. ``stages``: the prior, decoder and SR plans, whose graphs ``engines`` holds."""
        self.manifest, self.backend, self.engines, self.tokenizer = manifest, backend, engines, tokenizer
        self.stages = tuple(stages)
        self.prior, self.decoder, *self.sr = stages
        self.embed_norm = embed_norm(manifest.stages["prior"])
        self.text_mask = manifest.stages["text_encoder"].get("text_mask")  # None | "tokens"
        self.pixel_range = tuple((manifest.data.get("output") or {}).get("pixel_range", (-1.0, 1.0)))

    @classmethod
    def load(cls, folder: str | os.PathLike | None = None, backend: str = "onnxruntime", *,
             providers: list[str] | None = None, threads: int | None = None, device_id: int = 0,
             verify: bool = True, prefix_cache: bool = True, shared_threads: bool = False,
             engines: str | os.PathLike | None = None, url: str | None = None) -> Pipeline:
        """Read the engine folder ``folder`` (None: ``default_engines()``), check every file's sha256, resolve
        the sampling stages, open ``backend`` on the graphs they run.

        providers: onnxruntime execution providers to try, in order (default: TensorRT, CUDA, CPU as
        available). threads: intra-op threads per graph (default: the backend's choice). prefix_cache:
        use a stage's ``prefix_cache`` graphs where the folder has them (False: the full graph every step).
        shared_threads: onnxruntime sessions share one process-wide thread pool (faster; but afterwards
        onnxruntime refuses sessions with their own pools anywhere in the process, so only where you own
        the process: the CLI does it; see ``backends.py``). engines: the former name of ``folder``, still
        accepted as a keyword (``self.engines`` is the dict of opened graphs). url: the server of the
        ``triton`` backend (``http://HOST:8000``, ``grpc://HOST:8001``; ``triton_backend.py``).
        """
        if engines is not None:
            if folder is not None:
                raise InputError("give the engine folder once (folder or engines), not both")
            folder = engines
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if folder is None:
            folder = default_engines()
            if not (folder / "manifest.json").exists():
                raise EngineFolderError(missing_message(folder))
        manifest = load_manifest(Path(folder))
        if verify:
            verify_files(manifest)
        try:
            tokenizer = Tokenizer.load(manifest.folder, manifest.tokenizer)
        except (ValueError, KeyError, OSError) as e:
            raise EngineFolderError(f"{manifest.folder}: tokenizer unusable ({e})") from None
        stages = resolve_stages(manifest, prefix_cache)  # refuses a bad folder before any graph is opened
        if stages[1].defaults.get("candidates", 1) > 1 and "image_encoder" not in manifest.stages:
            raise EngineFolderError(f"{manifest.folder}: the decoder's default candidates "
                                    f"{stages[1].defaults['candidates']} need an image_encoder stage to rank them")
        options = {"threads": threads, "device_id": device_id}
        if backend == "onnxruntime":
            options.update(providers=providers, shared_pool=shared_threads)
        if backend == "triton":
            options["url"] = url
        runner = open_backend(backend, manifest, **options)
        opened = {g: runner.engine(g) for g in graphs_to_open(manifest, stages)}
        return cls(manifest, runner, opened, tokenizer, stages)

    # ----------------------------------------------------------------------------------------------------
    # public API

    def settings(self, prior_steps=None, decoder_steps=None, sr_steps=None, prior_guidance=None,
                 decoder_guidance=None, sampler=None, candidates=None, decoder_candidates=None,
                 decoder_choice_step=None) -> dict:
        """Per-stage {"steps", "guidance", "sampler"} (and "candidates", "decoder_candidates"), checked, manifest
        defaults filled in.

        Raises ``InputError`` for a bad value; the CLI calls it to reject arguments before writing anything.
        """
        return self._resolve(Settings(prior_steps=prior_steps, decoder_steps=decoder_steps, sr_steps=sr_steps,
                                      prior_guidance=prior_guidance, decoder_guidance=decoder_guidance,
                                      sampler=sampler, candidates=candidates, decoder_candidates=decoder_candidates,
                                      decoder_choice_step=decoder_choice_step))

    def truncated(self, prompts: str | Sequence[str]) -> list[bool]:
        """Per prompt, whether it has more tokens than the text encoder reads (the tail would be dropped)."""
        return self.tokenizer.encode(check_prompts(prompts))[1]

    def __call__(self, prompt: str | Sequence[str], *, seed: int | None = None, num_images: int = 1,
                 prior_steps: int | None = None, decoder_steps: int | None = None, sr_steps: int | None = None,
                 prior_guidance: float | None = None, decoder_guidance: float | None = None,
                 sampler: str | None = None, candidates: int | None = None, decoder_candidates: int | None = None,
                 decoder_choice_step: int | None = None, callback: Callback | None = None) -> list[Image.Image]:
        """Images for each prompt, prompt-major: [p0 image 0, …, p0 image n-1, p1 image 0, …].

        The options are ``settings.Settings`` 's fields: unset ones take the manifest's per-stage defaults;
        ``sampler`` applies to every stage; ``sr_steps`` to every SR stage. ``seed`` None draws one (it is in
        each image's ``info["seed"]``). Guidance 1.0 runs the conditional branch only (the same prediction,
        half the work). ``decoder_candidates`` k > 1 draws k decoder samples per image and keeps the one whose
        CLIP image embedding (the folder's image_encoder) is closest to the prompt's text embedding: k times
        the decoder's work, for images that follow the prompt more often (README, "Fidelity").
        ``decoder_choice_step`` s < the decoder's steps ranks the k on their clean estimate after s steps and
        finishes only the best (early candidate choice: s·k + (S − s) decoder rows per image instead of S·k).
        """
        prompts = check_prompts(prompt)
        s = Settings(num_images=num_images, seed=seed, prior_steps=prior_steps, decoder_steps=decoder_steps,
                     sr_steps=sr_steps, prior_guidance=prior_guidance, decoder_guidance=decoder_guidance,
                     sampler=sampler, candidates=candidates, decoder_candidates=decoder_candidates,
                     decoder_choice_step=decoder_choice_step)
        seed = new_seed() if s.seed is None else s.seed
        rows = [(p, j) for p in prompts for j in range(s.num_images)]
        return self._generate([p for p, _ in rows], seed, [j for _, j in rows], s, callback)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], indices: Sequence[int], *,
                 prior_steps: int | None = None, decoder_steps: int | None = None, sr_steps: int | None = None,
                 prior_guidance: float | None = None, decoder_guidance: float | None = None,
                 sampler: str | None = None, candidates: int | None = None, decoder_candidates: int | None = None,
                 decoder_choice_step: int | None = None, callback: Callback | None = None) -> list[Image.Image]:
        """One image per row r: image ``indices[r]`` of ``self(prompts[r], seed=seeds[r], num_images=n)`` (any n
        > indices[r]), pixel for pixel and metadata alike, by the seed contract (noise.py). So images of
        several calls (a server's requests with their own seeds) share one pass through every stage; the
        text of each distinct prompt is encoded, and its prior prefix computed, once.
        """
        prompts = check_prompts(prompts)
        seeds = [check_int("seed", v, 0, MAX_SEED) for v in seeds]
        indices = [check_int("index", j, 0, MAX_IMAGES - 1) for j in indices]
        if not len(prompts) == len(seeds) == len(indices):
            raise InputError(f"one seed and one index per prompt: got {len(prompts)} prompts, {len(seeds)} seeds, "
                             f"{len(indices)} indices")
        s = Settings(prior_steps=prior_steps, decoder_steps=decoder_steps, sr_steps=sr_steps,
                     prior_guidance=prior_guidance, decoder_guidance=decoder_guidance, sampler=sampler,
                     candidates=candidates, decoder_candidates=decoder_candidates,
                     decoder_choice_step=decoder_choice_step)
        return self._generate(prompts, seeds, indices, s, callback)

    def variations(self, image, *, num_images: int = 1, seed: int | None = None,
                   decoder_steps: int | None = None, sr_steps: int | None = None,
                   decoder_guidance: float | None = None, sampler: str | None = None,
                   callback: Callback | None = None) -> list[Image.Image]:
        """Variations of ``image`` (PIL image or path): image encoder -> decoder (no text) -> SR stages."""
        if "image_encoder" not in self.manifest.stages:
            raise InputError(f"engine folder {self.manifest.folder} has no image_encoder; variations need one")
        source = open_image(image)
        s = Settings(num_images=num_images, seed=seed, decoder_steps=decoder_steps, sr_steps=sr_steps,
                     decoder_guidance=decoder_guidance, sampler=sampler)
        run = s.resolve(self.stages)
        seed = new_seed() if s.seed is None else s.seed
        enc_stage = self.manifest.stages["image_encoder"]
        engine = self.engines[enc_stage["graph"]]
        size = int(enc_stage.get("image_size") or engine.spec.inputs[0].shape[-1])
        pixels = to_pixels(source, size, enc_stage.get("input_range", (0.0, 1.0)))[None]  # (1, 3, S, S)
        embed = next(iter(call_checked(engine, "image_encoder", pixels=pixels).values()))  # (1, D)
        if callback is not None:
            callback("image_encoder", 1, 1, None)
        call = _Call(seed, np.arange(s.num_images), run, callback)
        # one conditioning row for every image: the embedding, and no text (text_keep = 0: the learned null)
        cond = {"image_embed": normalize(embed).astype(np.float32),
                "text_encodings": np.zeros((1, *self._text_width()), np.float32)}
        keep = {"image_keep": 1.0, "text_keep": 0.0}
        decoder = guidance_halves(self.decoder, cond, keep, np.zeros_like(call.index), self._empty_text())
        x = self._upsample(self._sample(self.decoder, decoder, call, call.streams(DECODER)), call)
        name = Path(image).name if isinstance(image, str | os.PathLike) else ""
        meta = [{"prompt": "", "variation_of": name, "seed": str(seed), "index": str(j)} for j in call.index]
        return self._images(x, meta, run, with_prior=False)

    # ----------------------------------------------------------------------------------------------------
    # the stages

    def _generate(self, prompts: list[str], seed: int | list[int], indices: list[int], s: Settings,
                  callback) -> list[Image.Image]:
        """Image r from prompt ``prompts[r]`` with noise (seed or seed[r], ``indices[r]``): text -> prior ->
        decoder -> SR."""
        run = self._resolve(s)
        distinct = list(dict.fromkeys(prompts))  # each prompt's text is encoded (and its prefix run) once
        position = {p: i for i, p in enumerate(distinct)}
        prompt_of = np.array([position[p] for p in prompts])  # image -> its prompt
        tokens, truncated = self.tokenizer.encode(distinct)
        for p, cut in zip(distinct, truncated):
            if cut:
                warnings.warn(f"prompt truncated to {self.tokenizer.context_length - 2} tokens: {p[:60]!r}",
                              PromptTruncatedWarning, stacklevel=3)
        text = self._text(distinct, tokens, callback)  # text_embed (P, D), text_encodings (P, L, W), [text_mask]
        empty = self._empty_text()  # the "" prompt's, when a stage's unconditional branch needs them
        call = _Call(seed, np.asarray(indices), run, callback)
        k = run["candidates"]
        # prior: k candidates per image, conditioned by rows of prompts (its prefix runs once per prompt)
        prior = guidance_halves(self.prior, text, {self.prior.cond_input: 1.0}, np.repeat(prompt_of, k), empty)
        pred = self._sample(self.prior, prior, call, call.streams(PRIOR, rows=k))  # (N·k, D)
        image_embed = select_candidates(pred, text["text_embed"][prompt_of], k, self.embed_norm)[0]  # (N, D)
        cond = {"image_embed": image_embed, **{name: v[prompt_of] for name, v in text.items()}}
        keep = {"image_keep": 1.0, "text_keep": 1.0}
        # decoder: kd samples per image (one conditioning row each); CLIP keeps the one closest to the text
        kd = run["decoder_candidates"]
        decoder = guidance_halves(self.decoder, cond, keep, np.repeat(np.arange(len(prompts)), kd), empty)
        image_text = text["text_embed"][prompt_of]  # (N, D)
        at = run["decoder_choice_step"]  # None: rank the finished samples

        def choose(x0: np.ndarray, images: slice) -> np.ndarray:
            return self._rank(x0, image_text[images], kd, callback)[1]

        x = self._sample(self.decoder, decoder, call, call.streams(DECODER, rows=kd),
                         choose=choose if at else None, choose_at=at)  # (N·kd or N, C, h, w)
        if kd > 1 and not at:
            x = self._rank(x, image_text, kd, callback)[0]
        x = self._upsample(x, call)
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        meta = [{"prompt": p, "seed": str(v), "index": str(j)} for p, v, j in zip(prompts, seeds, indices)]
        return self._images(x, meta, run, with_prior=True)

    def _text(self, prompts: list[str], tokens: np.ndarray, callback) -> dict[str, np.ndarray]:
        """The text conditioning of each prompt: text_embed (P, D), text_encodings (P, L, W) and, when the
        manifest asks for it (``text_encoder.text_mask``), text_mask (P, L) float32."""
        out = call_chunked(self.engines[self.manifest.stages["text_encoder"]["graph"]], "text_encoder",
                           {"tokens": tokens})
        if callback is not None:
            callback("text_encoder", 1, 1, None)
        text = {name: out[name] for name in ("text_embed", "text_encodings")}
        if self.text_mask == "tokens":
            text["text_mask"] = self.tokenizer.text_mask(prompts)
        return text

    def _empty_text(self) -> dict[str, np.ndarray] | None:
        """The text conditioning of the empty prompt (1 row), for stages with ``uncond_text: empty_prompt``."""
        if all(st.uncond_text != "empty_prompt" for st in (self.prior, self.decoder)):
            return None
        return self._text([""], self.tokenizer([""]), None)

    def _text_width(self) -> tuple[int, ...]:
        spec = self.manifest.graphs[self.decoder.graph]
        enc = next((t for t in spec.inputs if t.name == "text_encodings"), None)
        return tuple(enc.shape[1:]) if enc is not None else (0,)

    def _sample(self, plan: StagePlan, conditioning: Conditioning, call: _Call, streams, **early) -> np.ndarray:
        return run_stage(plan, self.engines, call.run[plan.name], conditioning, streams, call.callback, **early)

    def _resolve(self, s: Settings) -> dict:
        """``s`` resolved against the folder's stages; decoder candidates > 1 also need an image encoder whose
        side is a multiple of the decoder's (``InputError`` before any work)."""
        run = s.resolve(self.stages)
        if run["decoder_candidates"] > 1:
            if "image_encoder" not in self.manifest.stages:
                raise InputError(f"engine folder {self.manifest.folder} has no image_encoder; decoder candidates > 1 "
                                 "need one to rank them")
            if self._rank_size() % self.decoder.x_shape[-1]:
                raise InputError(f"decoder candidates > 1: the image encoder's side {self._rank_size()} is not a "
                                 f"multiple of the decoder's {self.decoder.x_shape[-1]}")
        return run

    def _rank_size(self) -> int:
        stage = self.manifest.stages["image_encoder"]
        return int(stage.get("image_size") or self.engines[stage["graph"]].spec.inputs[0].shape[-1])

    def _rank(self, x: np.ndarray, text_embed: np.ndarray, k: int, callback) -> tuple[np.ndarray, np.ndarray]:
        """The decoder sample per image (of its k, rows n·k …) whose CLIP image embedding is closest to its text
        embedding (N, D): the image encoder on each sample (``stages.rank_pixels``) -> ((N, C, h, w), the
        chosen row of each image's k (N,))."""
        stage = self.manifest.stages["image_encoder"]
        engine = self.engines[stage["graph"]]
        pixels = rank_pixels(x, self.pixel_range, self._rank_size(), stage.get("input_range", (0.0, 1.0)))
        embed = next(iter(call_chunked(engine, "image_encoder", {"pixels": pixels}).values()))  # (N·k, D)
        if callback is not None:
            callback("image_encoder", 1, 1, None)
        return select_samples(x, embed, text_embed, k)[:2]

    def _upsample(self, x: np.ndarray, call: _Call) -> np.ndarray:
        """Each SR stage on the previous stage's samples x (N, C, h, w), one conditioning row per image."""
        for m, plan in enumerate(self.sr):
            streams = call.streams(sr_stream(m))
            cond = low_res_inputs(x, plan.noise_aug_t, plan.abar, streams, self.pixel_range)  # its first draw
            x = self._sample(plan, Conditioning(cond=cond, rows=np.arange(len(x))), call, streams)
        return x

    def _images(self, x: np.ndarray, meta: list[dict], run: dict, *, with_prior: bool) -> list[Image.Image]:
        """(N, 3, H, W) in the pixel range -> RGB images carrying ``meta`` and the run's settings as PNG text."""
        stages = ([self.prior] if with_prior else []) + [self.decoder, *self.sr]
        common = {**describe(run, stages, candidates=with_prior), "backend": self.backend.describe(),
                  "engines": self.manifest.name, "manifest_sha256": self.manifest.sha256, "software": "dalle2-rt"}
        out = []
        for pixels, m in zip(to_uint8(x, self.pixel_range), meta):
            image = Image.fromarray(pixels)  # (H, W, 3) uint8 -> RGB
            image.info.update({**m, **common})
            out.append(image)
        return out
