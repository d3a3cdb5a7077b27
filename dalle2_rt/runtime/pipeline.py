"""The unCLIP loop over an engine folder: prompt -> text encoder -> prior -> decoder -> SR stages -> images.

    pipe = Pipeline.load()                      # the default engine folder (locate.py), onnxruntime
    images = pipe("a red circle", seed=7, num_images=4)
    more = pipe.variations(images[0], num_images=2, seed=1)

The same loop one public stage at a time (what benchmarks and operations compose; same seed contract, same
pixels as the call above for image j = indices[n]):

    text = pipe.encode_text(["a red circle"])                          # text_embed (1, D), text_encodings …
    embed = pipe.prior(text, seed=7, rows=[0, 0, 0, 0])                # (4, D): 4 images of prompt 0
    x = pipe.decode(embed, text, seed=7, rows=[0, 0, 0, 0])            # (4, 3, 32, 32) in the pixel range
    images = pipe.to_pil(pipe.upsample(x, seed=7))                     # (4, 3, 64, 64) -> PIL images

Every stage method takes the sampling options of ``settings.Settings`` as keywords (unset: the folder's
defaults), ``seed`` (one for every row, or one per row) and ``indices`` (the image index j of each row;
default 0 … N−1), so its noise is image j's of a call with that seed.

This file is the orchestration; each idea lives in its own module:
``plan.py`` (the sampling stages resolved once at load), ``settings.py`` (the call's options, checked),
``noise.py`` (noise streams and the seed contract), ``stage_runner.py`` (one stage over chunks, prefix
cache, last-step graph, NaN checks), ``parameterization.py`` (guidance stacking and the denoiser adapter),
``stages.py`` (what manifest keys ask for: candidate choice, SR low-res input), ``backends/`` (the
``engine(**arrays) -> dict`` call of every backend). Nothing here branches on a model's name.

A ``Pipeline`` holds only immutable state after ``load`` (its ``engines`` dict may be replaced or wrapped by
a caller; it is read at each call); every call keeps its arrays local, so one object may be called from
several threads (ONNX Runtime sessions are thread-safe; the TensorRT backend serialises each engine).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import operations
from .backends import BACKENDS, BackendOptions, open_backend
from .errors import EngineFolderError, InputError, PromptTruncatedWarning
from .images import open_image, to_pixels, to_uint8
from .locate import DEFAULT_ENGINES, default_engines, missing_message  # noqa: F401 - the lookup (locate.py)
from .manifest import Manifest, load_manifest, verify_files
from .noise import DECODER, PRIOR, NoiseStreams, new_seed, sr_stream
from .operations import Inversion
from .plan import StagePlan, graphs_to_open, resolve_stages
from .settings import (
    MAX_IMAGES,
    MAX_SEED,
    VARIATION_OPTIONS,
    Settings,
    check_int,
    check_prompts,
    describe,
    options_given,
)
from .stage_runner import Callback, Conditioning, call_chunked, guidance_halves, run_stage
from .stages import embed_norm, low_res_inputs, normalize, rank_pixels, select_candidates, select_samples
from .tokenizer import Tokenizer

OUTPUT_TYPES = ("pil", "np")  # list of PIL images with PNG metadata | uint8 (N, H, W, 3), the same pixels


class Pipeline:
    """An engine folder loaded on one backend; call it with prompts to get ``PIL.Image`` s, or run it one
    stage at a time (``encode_text``, ``encode_image``, ``prior``, ``decode``, ``upsample``, ``to_pil``)."""

    def __init__(self, manifest: Manifest, backend, engines: dict, tokenizer: Tokenizer, stages: list[StagePlan]):
        """Use ``Pipeline.load``. ``stages``: the prior, decoder and SR plans, whose graphs ``engines`` holds."""
        self.manifest, self.backend, self.engines, self.tokenizer = manifest, backend, engines, tokenizer
        self.stages = tuple(stages)
        self.prior_plan, self.decoder_plan, *self.sr_plans = stages
        self.embed_norm = embed_norm(manifest.stages["prior"])
        self.text_mask = manifest.stages["text_encoder"].get("text_mask")  # None | "tokens"
        self.pixel_range = tuple((manifest.data.get("output") or {}).get("pixel_range", (-1.0, 1.0)))

    @classmethod
    def load(cls, folder: str | os.PathLike | None = None, backend: str = "onnxruntime", *,
             providers: list[str] | None = None, threads: int | None = None, device_id: int | None = None,
             verify: bool = True, prefix_cache: bool = True, shared_threads: bool = False,
             engines: str | os.PathLike | None = None, url: str | None = None,
             int8: bool | None = None) -> Pipeline:
        """Read the engine folder ``folder`` (None: ``default_engines()``), check every file's sha256, resolve
        the sampling stages, open ``backend`` on the graphs they run.

        providers: onnxruntime execution providers to try, in order (default: TensorRT, CUDA, CPU as
        available). threads: intra-op threads per graph (default: the backend's choice). prefix_cache:
        use a stage's ``prefix_cache`` graphs where the folder has them (False: the full graph every step).
        shared_threads: onnxruntime sessions share one process-wide thread pool (faster; but afterwards
        onnxruntime refuses sessions with their own pools anywhere in the process, so only where you own
        the process: the CLI does it; see ``backends/onnxruntime.py``). engines: the former name of ``folder``, still
        accepted as a keyword (``self.engines`` is the dict of opened graphs). url: the server of the
        ``triton`` backend (``http://HOST:8000``, ``grpc://HOST:8001``; ``backends/triton.py``). int8: onnxruntime
        on the CPU runs a graph's int8 variant where the folder has one (``graphs.<g>.int8``): True always, None
        (the default) where the CPU has int8 dot products (AMX, VNNI; ``runtime/cpu.py``), False never: the fp32
        graphs only (False: accepted by every backend; triton refuses a repository written with
        ``--int8``). An option the backend does not use (``url`` for onnxruntime, ``threads`` for triton,
        ``int8=True`` for torch, …) is an ``InputError``.
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
        options = BackendOptions(threads=threads, device_id=device_id, providers=providers,
                                 shared_pool=shared_threads, url=url, int8=int8)
        runner = open_backend(backend, manifest, options)  # refuses an option it does not use, by name
        opened = {g: runner.engine(g) for g in graphs_to_open(manifest, stages)}
        return cls(manifest, runner, opened, tokenizer, stages)

    # ----------------------------------------------------------------------------------------------------
    # whole calls

    def settings(self, **options) -> dict:
        """The sampling options ``options`` (``Settings`` fields) resolved against the folder: per stage
        {"steps", "guidance", "sampler"}, "candidates", "decoder_candidates", "decoder_choice_step"; checked,
        the manifest's defaults filled in.

        Raises ``InputError`` for a bad value; the CLI calls it to reject arguments before writing anything.
        """
        return self._run(options)

    def truncated(self, prompts: str | Sequence[str]) -> list[bool]:
        """Per prompt, whether it has more tokens than the text encoder reads (the tail would be dropped)."""
        return self.tokenizer.encode(check_prompts(prompts))[1]

    def __call__(self, prompt: str | Sequence[str], *, seed: int | None = None, num_images: int = 1,
                 callback: Callback | None = None, output_type: str = "pil",
                 **options) -> list[Image.Image] | np.ndarray:
        """Images for each prompt, prompt-major: [p0 image 0, …, p0 image n-1, p1 image 0, …].

        ``options`` are the sampling options, ``settings.Settings`` 's fields (``settings.OPTIONS``: steps,
        guidance, sampler, candidates, …): unset ones take the manifest's per-stage defaults; ``sampler``
        applies to every stage; ``sr_steps`` to every SR stage; an unknown name is a ``TypeError``. ``seed``
        None draws one (it is in each image's ``info["seed"]``). Guidance 1.0 runs the conditional branch only
        (the same prediction, half the work). ``decoder_candidates`` k > 1 draws k decoder samples per image and
        keeps the one whose CLIP image embedding (the folder's image_encoder) is closest to the prompt's text
        embedding: k times the decoder's work, for images that follow the prompt more often (README,
        "Fidelity"). ``decoder_choice_step`` s < the decoder's steps ranks the k on their clean estimate after
        s steps and finishes only the best (early candidate choice: s·k + (S − s) decoder rows per image
        instead of S·k). ``output_type``: "pil" (images carrying their settings as PNG text) or "np" (uint8
        (N, H, W, 3)).
        """
        prompts = check_prompts(prompt)
        _check_output_type(output_type)
        s = Settings(num_images=num_images, seed=seed, **options_given(options))
        seed = new_seed() if s.seed is None else s.seed
        rows = [(p, j) for p in prompts for j in range(s.num_images)]
        return self._generate([p for p, _ in rows], seed, [j for _, j in rows], s, callback, output_type)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], indices: Sequence[int], *,
                 callback: Callback | None = None, output_type: str = "pil",
                 **options) -> list[Image.Image] | np.ndarray:
        """One image per row r: image ``indices[r]`` of ``self(prompts[r], seed=seeds[r], num_images=n)`` (any n
        > indices[r]), pixel for pixel and metadata alike, by the seed contract (noise.py). So images of
        several calls (a server's requests with their own seeds) share one pass through every stage; the
        text of each distinct prompt is encoded, and its prior prefix computed, once. ``options``: as
        ``__call__`` 's.
        """
        prompts = check_prompts(prompts)
        _check_output_type(output_type)
        seeds = [check_int("seed", v, 0, MAX_SEED) for v in seeds]
        indices = [check_int("index", j, 0, MAX_IMAGES - 1) for j in indices]
        if not len(prompts) == len(seeds) == len(indices):
            raise InputError(f"one seed and one index per prompt: got {len(prompts)} prompts, {len(seeds)} seeds, "
                             f"{len(indices)} indices")
        s = Settings(**options_given(options))
        return self._generate(prompts, seeds, indices, s, callback, output_type)

    def variations(self, image, *, num_images: int = 1, seed: int | None = None, callback: Callback | None = None,
                   output_type: str = "pil", **options) -> list[Image.Image] | np.ndarray:
        """Variations of ``image`` (PIL image or path): image encoder -> decoder (no text, one sample) -> SR
        stages. ``options``: the sampling options of ``settings.VARIATION_OPTIONS`` (decoder steps and
        guidance, SR steps, sampler)."""
        if "image_encoder" not in self.manifest.stages:
            raise InputError(f"engine folder {self.manifest.folder} has no image_encoder; variations need one")
        _check_output_type(output_type)
        options_given(options, VARIATION_OPTIONS, what="variations")
        source = open_image(image)
        s = Settings(num_images=num_images, seed=seed, decoder_candidates=1, **options)
        run = self._resolve(s)
        seed = new_seed() if s.seed is None else s.seed
        embed = self.encode_image(source, callback=callback)  # (1, D)
        index = np.arange(s.num_images)
        x = self._decode(np.repeat(embed, s.num_images, 0), None, None, run, seed, index, self._empty_text(),
                         callback)
        x = self._upsample(x, run, seed, index, callback)
        name = Path(image).name if isinstance(image, str | os.PathLike) else ""
        meta = [{"prompt": "", "variation_of": name, "seed": str(seed), "index": str(j)} for j in index]
        return self._output(x, meta, run, with_prior=False, output_type=output_type)

    # ----------------------------------------------------------------------------------------------------
    # the stages, one at a time

    def encode_text(self, prompts: str | Sequence[str], *, callback: Callback | None = None) -> dict[str, np.ndarray]:
        """The text conditioning of each prompt: text_embed (P, D), text_encodings (P, L, W) and, when the
        manifest asks for it (``text_encoder.text_mask``), text_mask (P, L) float32. A prompt longer than the
        text encoder reads is truncated with a ``PromptTruncatedWarning``."""
        prompts = check_prompts(prompts)
        return self._encode_text(prompts, callback, stacklevel=3)

    def encode_image(self, images, *, callback: Callback | None = None) -> np.ndarray:
        """Unit-norm CLIP image embeddings (N, D) float32 of one image or a sequence of them (PIL images, paths,
        or uint8 (H, W, 3) arrays; or one uint8 (N, H, W, 3) array), each centre-cropped and resized to the
        encoder's side as ``variations`` prepares its input."""
        if "image_encoder" not in self.manifest.stages:
            raise InputError(f"engine folder {self.manifest.folder} has no image_encoder")
        if isinstance(images, Image.Image | str | os.PathLike) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        stage = self.manifest.stages["image_encoder"]
        engine = self.engines[stage["graph"]]
        size, input_range = self._rank_size(), stage.get("input_range", (0.0, 1.0))
        pixels = np.stack([to_pixels(_as_pil(im), size, input_range) for im in images])  # (N, 3, S, S)
        embed = next(iter(call_chunked(engine, "image_encoder", {"pixels": pixels}).values()))  # (N, D)
        if callback is not None:
            callback("image_encoder", 1, 1, None)
        return normalize(embed).astype(np.float32)

    def prior(self, text: dict[str, np.ndarray], *, seed: int | Sequence[int], indices: Sequence[int] | None = None,
              rows: Sequence[int] | None = None, latents: np.ndarray | None = None,
              callback: Callback | None = None, **options) -> np.ndarray:
        """Image embeddings (N, D) float32 from the prior, one per row: ``rows[n]`` is the row of ``text``
        (``encode_text``) image n is conditioned on (None: one image per text row); the best of the prior's
        ``candidates`` per image is kept (closest to its text embedding). ``latents``: the starting noise
        (N·k, *x_shape), k = candidates, in place of the seed's draw (``stage_runner.run_stage``)."""
        run = self._run(options)
        rows = _rows(rows, len(text["text_embed"]))
        seed, index = _seeds_and_indices(seed, indices, len(rows))
        return self._prior(text, rows, run, seed, index, self._empty_text(), callback, latents,
                           negative=self._negative(run, callback))

    def decode(self, image_embed: np.ndarray, text: dict[str, np.ndarray] | None = None, *,
               seed: int | Sequence[int], indices: Sequence[int] | None = None, rows: Sequence[int] | None = None,
               latents: np.ndarray | None = None, keep_candidates: bool = False, callback: Callback | None = None,
               **options) -> np.ndarray:
        """Decoder samples (N, C, h, w) in the pixel range from image embeddings ``image_embed`` (N, D) and the
        text rows ``rows`` of ``text`` (None: row n for image n); ``text`` None decodes without text (as
        ``variations``: the learned null text).

        With ``decoder_candidates`` k > 1 each image draws k samples and keeps the one whose CLIP image
        embedding is closest to its text embedding (without text: to ``image_embed``), early when
        ``decoder_choice_step`` says so. ``keep_candidates``: return all N·k samples (rows n·k … n·k + k − 1)
        unranked, every one run to the end. ``latents``: the starting noise (N·k, C, h, w) in place of the
        seed's draw."""
        run = self._run(options)
        if text is None and run["negative_prompt"]:
            raise InputError("a negative prompt conditions the text: decode was given no text")
        image_embed = np.asarray(image_embed, np.float32)
        if text is not None:
            rows = _rows(rows, len(text["text_embed"]), len(image_embed))
        seed, index = _seeds_and_indices(seed, indices, len(image_embed))
        return self._decode(image_embed, text, rows, run, seed, index, self._empty_text(), callback, latents,
                            keep_candidates=keep_candidates, negative=self._negative(run, callback))

    def upsample(self, x: np.ndarray, *, seed: int | Sequence[int], indices: Sequence[int] | None = None,
                 callback: Callback | None = None, **options) -> np.ndarray:
        """Every SR stage on samples x (N, C, h, w) in the pixel range -> (N, C, H, W)."""
        run = self._run(options)
        seed, index = _seeds_and_indices(seed, indices, len(x))
        return self._upsample(np.asarray(x, np.float32), run, seed, index, callback)

    def clip_scores(self, x: np.ndarray, embed: np.ndarray) -> np.ndarray:
        """(M,) cosine of each sample's CLIP image embedding (x (M, C, h, w) in the pixel range, prepared as
        the decoder's candidates are ranked) with ``embed`` (M, D): the decoder's ranking score."""
        return self._rank(np.asarray(x, np.float32), np.asarray(embed), 1, None)[2][:, 0]

    def to_pil(self, x: np.ndarray, metadata: Sequence[dict] | None = None) -> list[Image.Image]:
        """Samples (N, 3, H, W) in the pixel range -> RGB images, each carrying ``metadata[n]`` and the folder's
        facts (backend, engines, manifest sha256) as PNG text."""
        common = {"backend": self.backend.describe(), "engines": self.manifest.name,
                  "manifest_sha256": self.manifest.sha256, "software": "dalle2-rt"}
        metadata = [{}] * len(x) if metadata is None else metadata
        out = []
        for pixels, m in zip(to_uint8(x, self.pixel_range), metadata):
            image = Image.fromarray(pixels)  # (H, W, 3) uint8 -> RGB
            image.info.update({**m, **common})
            out.append(image)
        return out

    # ----------------------------------------------------------------------------------------------------
    # unCLIP's operations on an image's (z_i, x_T) (operations.py, which composes the stages above)

    def invert(self, images, **options) -> Inversion:
        """Images as (CLIP image embedding, DDIM-inverted decoder latent); ``operations.invert``."""
        return operations.invert(self, images, **options)

    def reconstruct(self, image, **options) -> list[Image.Image]:
        """An image (or ``Inversion``) decoded from its own latent with η = 0; ``operations.reconstruct``."""
        return operations.reconstruct(self, image, **options)

    def interpolate(self, a, b, **options) -> list[Image.Image]:
        """Frames between two images or inversions along slerp of their embeddings; ``operations.interpolate``."""
        return operations.interpolate(self, a, b, **options)

    def edit(self, image, source: str, target: str, **options) -> list[Image.Image]:
        """The text diff of an image from caption ``source`` towards ``target``; ``operations.edit``."""
        return operations.edit(self, image, source, target, **options)

    # ----------------------------------------------------------------------------------------------------
    # private: the stages over resolved settings ``run`` and noise (seed, index) per image

    def _generate(self, prompts: list[str], seed: int | list[int], indices: list[int], s: Settings,
                  callback, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """Image r from prompt ``prompts[r]`` with noise (seed or seed[r], ``indices[r]``): text -> prior ->
        decoder -> SR."""
        run = self._resolve(s)
        distinct = list(dict.fromkeys(prompts))  # each prompt's text is encoded (and its prefix run) once
        position = {p: i for i, p in enumerate(distinct)}
        prompt_of = np.array([position[p] for p in prompts])  # image -> its prompt
        text = self._encode_text(distinct, callback, stacklevel=4)  # text_embed (P, D), text_encodings (P, L, W)
        empty = self._empty_text()  # the "" prompt's, when a stage's unconditional branch needs them
        negative = self._negative(run, callback)  # the negative prompt's, when one is given
        index = np.asarray(indices)
        image_embed = self._prior(text, prompt_of, run, seed, index, empty, callback, negative=negative)  # (N, D)
        x = self._decode(image_embed, text, prompt_of, run, seed, index, empty, callback,
                         negative=negative)  # (N, C, h, w)
        x = self._upsample(x, run, seed, index, callback)
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        meta = [{"prompt": p, "seed": str(v), "index": str(j)} for p, v, j in zip(prompts, seeds, indices)]
        return self._output(x, meta, run, with_prior=True, output_type=output_type)

    def _encode_text(self, prompts: list[str], callback, stacklevel: int) -> dict[str, np.ndarray]:
        tokens, truncated = self.tokenizer.encode(prompts)
        for p, cut in zip(prompts, truncated):
            if cut:
                warnings.warn(f"prompt truncated to {self.tokenizer.context_length - 2} tokens: {p[:60]!r}",
                              PromptTruncatedWarning, stacklevel=stacklevel)
        return self._text(prompts, tokens, callback)

    def _text(self, prompts: list[str], tokens: np.ndarray, callback) -> dict[str, np.ndarray]:
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
        if all(st.uncond_text != "empty_prompt" for st in (self.prior_plan, self.decoder_plan)):
            return None
        return self._text([""], self.tokenizer([""]), None)

    def _negative(self, run: dict, callback) -> dict[str, np.ndarray] | None:
        """The negative prompt's text conditioning (1 row), None without one."""
        if not run.get("negative_prompt"):
            return None
        return self._encode_text([run["negative_prompt"]], callback, stacklevel=5)

    def _prior(self, text, rows, run, seed, index, empty, callback, latents=None, *, negative=None) -> np.ndarray:
        """k candidates per image, conditioned by rows of prompts (the prefix runs once per text row)."""
        plan, k = self.prior_plan, run["candidates"]
        cond = guidance_halves(plan, text, {plan.cond_input: 1.0}, np.repeat(rows, k), empty, negative=negative,
                               text_keep=plan.cond_input)
        pred = run_stage(plan, self.engines, run["prior"], cond, NoiseStreams(seed, index, PRIOR, k), callback,
                         x_T=latents)  # (N·k, D)
        return select_candidates(pred, text["text_embed"][rows], k, self.embed_norm)[0]  # (N, D)

    def _decode(self, image_embed, text, rows, run, seed, index, empty, callback, latents=None, *,
                keep_candidates: bool = False, negative=None) -> np.ndarray:
        """kd samples per image (one conditioning row each); CLIP keeps the one closest to the text (or, without
        text, to the image embedding)."""
        n = len(image_embed)
        if text is None:  # no text: the learned null (text_keep = 0)
            cond = {"image_embed": image_embed, "text_encodings": np.zeros((n, *self._text_width()), np.float32)}
            keep, target = {"image_keep": 1.0, "text_keep": 0.0}, image_embed
        else:
            cond = {"image_embed": image_embed, **{name: v[rows] for name, v in text.items()}}
            keep, target = {"image_keep": 1.0, "text_keep": 1.0}, text["text_embed"][rows]  # (N, D)
        kd = run["decoder_candidates"]
        conditioning = guidance_halves(self.decoder_plan, cond, keep, np.repeat(np.arange(n), kd), empty,
                                       negative=None if text is None else negative, text_keep="text_keep")
        at = None if keep_candidates else run["decoder_choice_step"]  # None: rank the finished samples

        def choose(x0: np.ndarray, images: slice) -> np.ndarray:
            return self._rank(x0, target[images], kd, callback)[1]

        x = run_stage(self.decoder_plan, self.engines, run["decoder"], conditioning,
                      NoiseStreams(seed, index, DECODER, kd), callback, choose=choose if at else None, choose_at=at,
                      x_T=latents)  # (N·kd or N, C, h, w)
        if kd > 1 and not at and not keep_candidates:
            x = self._rank(x, target, kd, callback)[0]
        return x

    def _upsample(self, x: np.ndarray, run, seed, index, callback) -> np.ndarray:
        """Each SR stage on the previous stage's samples x (N, C, h, w), one conditioning row per image."""
        for m, plan in enumerate(self.sr_plans):
            streams = NoiseStreams(seed, index, sr_stream(m))
            cond = low_res_inputs(x, plan.noise_aug_t, plan.abar, streams, self.pixel_range)  # its first draw
            x = run_stage(plan, self.engines, run[plan.name], Conditioning(cond=cond, rows=np.arange(len(x))),
                          streams, callback)
        return x

    def _text_width(self) -> tuple[int, ...]:
        spec = self.manifest.graphs[self.decoder_plan.graph]
        enc = next((t for t in spec.inputs if t.name == "text_encodings"), None)
        return tuple(enc.shape[1:]) if enc is not None else (0,)

    def _run(self, options: dict) -> dict:
        """Sampling options (``settings.OPTIONS``) resolved; an unknown name is a TypeError, as for any
        function."""
        return self._resolve(Settings(**options_given(options)))

    def _resolve(self, s: Settings) -> dict:
        """``s`` resolved against the folder's stages; decoder candidates > 1 also need an image encoder whose
        side is a multiple of the decoder's (``InputError`` before any work)."""
        run = s.resolve(self.stages)
        for plan in (self.prior_plan, self.decoder_plan):
            g, trained = run[plan.name]["guidance"], plan.guidance_range
            if trained and g is not None and not trained[0] <= g <= trained[1]:
                raise InputError(f"{plan.name} guidance {g:g} is outside {trained[0]:g} … {trained[1]:g}, the scales "
                                 f"this guidance-distilled {plan.name} was trained on")
        if run["decoder_candidates"] > 1:
            if "image_encoder" not in self.manifest.stages:
                raise InputError(f"engine folder {self.manifest.folder} has no image_encoder; decoder candidates > 1 "
                                 "need one to rank them")
            if self._rank_size() % self.decoder_plan.x_shape[-1]:
                raise InputError(f"decoder candidates > 1: the image encoder's side {self._rank_size()} is not a "
                                 f"multiple of the decoder's {self.decoder_plan.x_shape[-1]}")
        return run

    def _rank_size(self) -> int:
        stage = self.manifest.stages["image_encoder"]
        return int(stage.get("image_size") or self.engines[stage["graph"]].spec.inputs[0].shape[-1])

    def _rank(self, x: np.ndarray, target: np.ndarray, k: int, callback):
        """The decoder sample per image (of its k, rows n·k …) whose CLIP image embedding is closest to
        ``target`` (N, D): the image encoder on each sample (``stages.rank_pixels``) -> ((N, C, h, w), the
        chosen row of each image's k (N,), the scores (N, k))."""
        stage = self.manifest.stages["image_encoder"]
        engine = self.engines[stage["graph"]]
        pixels = rank_pixels(x, self.pixel_range, self._rank_size(), stage.get("input_range", (0.0, 1.0)))
        embed = next(iter(call_chunked(engine, "image_encoder", {"pixels": pixels}).values()))  # (N·k, D)
        if callback is not None:
            callback("image_encoder", 1, 1, None)
        return select_samples(x, embed, target, k)

    def _output(self, x: np.ndarray, meta: list[dict], run: dict, *, with_prior: bool, output_type: str):
        """(N, 3, H, W) in the pixel range -> RGB images carrying ``meta`` and the run's settings as PNG text, or
        the uint8 (N, H, W, 3) pixels (``output_type`` "np")."""
        if output_type == "np":
            return to_uint8(x, self.pixel_range)
        stages = ([self.prior_plan] if with_prior else []) + [self.decoder_plan, *self.sr_plans]
        settings = describe(run, stages, candidates=with_prior)
        return self.to_pil(x, [{**m, **settings} for m in meta])


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"unknown output_type {output_type!r}; choose from {', '.join(OUTPUT_TYPES)}")


def _seeds_and_indices(seed, indices, n: int) -> tuple[int | list[int], np.ndarray]:
    """(seed: one int, or one per row), (n,) image indices (None: 0 … n−1), checked."""
    if isinstance(seed, int | np.integer) or seed is None:
        seed = check_int("seed", seed, 0, MAX_SEED)
    else:
        seed = [check_int("seed", v, 0, MAX_SEED) for v in seed]
        if len(seed) != n:
            raise InputError(f"one seed per row: got {len(seed)} seeds for {n} rows")
    index = np.arange(n) if indices is None else [check_int("index", j, 0, MAX_IMAGES - 1) for j in indices]
    if len(index) != n:
        raise InputError(f"one index per row: got {len(index)} indices for {n} rows")
    return seed, np.asarray(index, np.int64)


def _rows(rows, text_rows: int, n: int | None = None) -> np.ndarray:
    """The text row of each image (None: image n uses row n, so n images for ``text_rows`` rows)."""
    if rows is None:
        if n is not None and n != text_rows:
            raise InputError(f"{n} images for {text_rows} text rows: say which row each image uses (rows=)")
        return np.arange(text_rows)
    rows = np.asarray([check_int("text row", r, 0, text_rows - 1) for r in rows], np.int64)
    if n is not None and len(rows) != n:
        raise InputError(f"one text row per image: got {len(rows)} rows for {n} images")
    return rows


def _as_pil(image) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InputError(f"an image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    return open_image(image)
