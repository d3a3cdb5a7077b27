"""One export spec per graph, written as data (TensorRT demo ``model/base_model.py`` style).

A ``GraphSpec`` says everything the generic exporter (``onnx_export.py``), the TensorRT builder (``trt.py``)
and the manifest (``manifest.py``) need to know about a graph: its input and output names, dtypes and shapes
(axis 0 is the dynamic ``"batch"``; every other axis is fixed), how to draw a valid random input for it, the
batch range its engines are built for (min/opt/max) and the factory of the torch module to trace. The names
are the contract of ARCHITECTURE.md ("Graph I/O"); the module's ``forward`` takes the same keyword names.

Batch ranges (``max_batch`` = most images per call, default 8):
  text_encoder, image_encoder   1 … max_batch                  (one row per prompt / image)
  decoder                       1 … 2·max(max_batch, decoder_candidates) (rows: k samples per image, guided, CLIP
                                keeps one; a call holds at most max_batch guided samples, so the decoder's
                                memory stays that of k = 1 and k candidates take max_batch // k images a call)
  sr<i>                         1 … 2·max_batch                (conditional + unconditional halves)
  prior, prior_step             1 … 2·max_batch·candidates     (k candidate embeddings per image, guided)
  prior_prefix                  1 … 2·max_batch                (one text row per image and guidance half)
``opt`` is the batch of one guided image (what a TensorRT profile tunes its kernels for).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle2_rt.models.clip import ClipImageEncoder, ClipTextEncoder
from dalle2_rt.models.prior import PriorPrefix, PriorStep
from dalle2_rt.runtime.manifest import BATCH_AXIS

from .sources import Source, Sources

BATCH = BATCH_AXIS  # the name of the dynamic axis, in the ONNX graph and in the manifest

# How a random input is drawn (``fill``): float normal N(0,1); "unit": normal, L2-normalised over the last
# axis (CLIP embeddings); "uniform": [0, 1) (pixels); "signed": [-1, 1) (images in diffusion space);
# "timestep": integers 0 … high-1 as float32; "keep": 0.0 / 1.0 at random; "tokens": int64 CLIP token rows
# (<start>, random ids, <end> at a random place, zero padding), high = vocabulary size; "guidance": a
# classifier-free guidance scale, uniform in [1, 5).
FILLS = ("normal", "unit", "uniform", "signed", "timestep", "keep", "tokens", "guidance")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # (BATCH, d1, d2, …): str for the dynamic axis, int for fixed ones
    dtype: str = "float32"
    fill: str = "normal"
    high: int = 0  # for fill "timestep" (T) and "tokens" (vocabulary size)

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def entry(self) -> dict:
        """Manifest form: {"name", "dtype", "shape"}."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class GraphSpec:
    name: str  # graph (and file) name: text_encoder, image_encoder, prior, decoder, sr0, sr1, …
    source: str  # the checkpoint stage its weights come from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: BatchProfile
    factory: Callable[[], torch.nn.Module]  # builds the module to trace, weights loaded, eval mode

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def timestep_inputs(self) -> list[str]:
        """Inputs carrying diffusion timesteps (their sinusoidal embedding needs fp32; see trt.py)."""
        return [t.name for t in self.inputs if t.fill == "timestep"]

    def io_entry(self) -> dict:
        """The facts every consumer shares: I/O and batch profile (manifest ``graphs.<name>`` subset)."""
        return {
            "inputs": [t.entry() for t in self.inputs],
            "outputs": [t.entry() for t in self.outputs],
            "profile": {BATCH: {"min": self.batch.min, "opt": self.batch.opt, "max": self.batch.max}},
        }


def sample_inputs(spec: GraphSpec, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A fresh random input of ``batch`` rows for every input of ``spec``, drawn as its ``fill`` says."""
    return {t.name: _draw(t, batch, gen) for t in spec.inputs}


def _draw(t: TensorSpec, batch: int, gen: torch.Generator) -> torch.Tensor:
    shape = t.concrete(batch)
    if t.fill == "normal":
        return torch.randn(shape, generator=gen)
    if t.fill == "unit":
        return F.normalize(torch.randn(shape, generator=gen), dim=-1)
    if t.fill == "uniform":
        return torch.rand(shape, generator=gen)
    if t.fill == "signed":
        return torch.rand(shape, generator=gen) * 2 - 1
    if t.fill == "timestep":
        return torch.randint(0, t.high, shape, generator=gen).float()
    if t.fill == "keep":
        keep = (torch.rand(shape, generator=gen) < 0.5).float()
        keep.view(-1)[0] = 1.0  # both branches of keep_or_null at every batch size > 1
        if keep.numel() > 1:
            keep.view(-1)[1] = 0.0
        return keep
    if t.fill == "guidance":
        return 1.0 + 4.0 * torch.rand(shape, generator=gen)
    if t.fill == "tokens":
        rows, length = shape
        sot, eot = t.high - 2, t.high - 1  # CLIP: <start_of_text> 49406, <end_of_text> 49407 (the highest ids)
        tokens = torch.randint(1, sot, shape, generator=gen)
        tokens[:, 0] = sot
        ends = torch.randint(1, length, (rows,), generator=gen)
        for row, end in enumerate(ends.tolist()):
            tokens[row, end] = eot
            tokens[row, end + 1:] = 0
        return tokens
    raise ValueError(f"unknown fill {t.fill!r} for input {t.name!r}; known: {', '.join(FILLS)}")


# --------------------------------------------------------------------------------------------------------
# The graphs of an unCLIP checkpoint set


def _clip_graphs(src: Source, max_batch: int) -> list[GraphSpec]:
    c = src.config
    b = BatchProfile(1, 1, max_batch)
    text = GraphSpec(
        "text_encoder", src.stage,
        inputs=(TensorSpec("tokens", (BATCH, c.context_length), "int64", "tokens", c.vocab_size),),
        outputs=(TensorSpec("text_embed", (BATCH, c.embed_dim)),
                 TensorSpec("text_encodings", (BATCH, c.context_length, c.text_width))),
        batch=b, factory=lambda: ClipTextEncoder(src.build()).eval())
    image = GraphSpec(
        "image_encoder", src.stage,
        inputs=(TensorSpec("pixels", (BATCH, 3, c.image_size, c.image_size), fill="uniform"),),
        outputs=(TensorSpec("image_embed", (BATCH, c.embed_dim)),),
        batch=b, factory=lambda: ClipImageEncoder(src.build()).eval())
    return [text, image]


def _prior_graphs(src: Source, max_batch: int, candidates: int) -> list[GraphSpec]:
    """The full prior, and the same network split at its text prefix (a key/value cache; models/prior.py)."""
    p = src.config
    d, ctx = (BATCH, p.embed_dim), (BATCH, p.context_length, p.text_width)
    text = (TensorSpec("text_embed", d, fill="unit"), TensorSpec("text_encodings", ctx),
            TensorSpec("cond_keep", (BATCH,), fill="keep"))
    step = (TensorSpec("x_t", d), TensorSpec("t", (BATCH,), fill="timestep", high=p.num_timesteps))
    head_dim = p.dim // p.heads
    cache = tuple(TensorSpec(n, (BATCH, p.depth, p.heads, p.context_length + 1, head_dim)) for n in ("keys", "values"))
    rows = BatchProfile(1, 2 * candidates, 2 * max_batch * candidates)
    pred = (TensorSpec("pred", d),)
    return [
        GraphSpec("prior", src.stage, inputs=step + text, outputs=pred, batch=rows, factory=src.build),
        GraphSpec("prior_prefix", src.stage, inputs=text, outputs=cache, batch=BatchProfile(1, 2, 2 * max_batch),
                  factory=lambda: PriorPrefix(src.build()).eval()),
        GraphSpec("prior_step", src.stage, inputs=step + cache, outputs=pred, batch=rows,
                  factory=lambda: PriorStep(src.build()).eval()),
    ]


def _decoder_graph(src: Source, max_batch: int, candidates: int = 1) -> GraphSpec:
    """The decoder U-Net. A guidance-distilled one (``guidance_input``) takes the scale w as one more input
    (``guidance`` (B,)) and runs one row per sample; a classic one runs the guided pair (2 rows per sample)."""
    c = src.config
    img = (BATCH, c.unet.out_channels, c.image_size, c.image_size)
    distilled = bool(getattr(c, "guidance_input", False))
    per_sample = 1 if distilled else 2
    return GraphSpec(
        "decoder", src.stage,
        inputs=(TensorSpec("x_t", img), TensorSpec("t", (BATCH,), fill="timestep", high=c.num_timesteps),
                TensorSpec("image_embed", (BATCH, c.embed_dim), fill="unit"),
                TensorSpec("text_encodings", (BATCH, c.context_length, c.text_width)),
                TensorSpec("image_keep", (BATCH,), fill="keep"), TensorSpec("text_keep", (BATCH,), fill="keep"),
                *((TensorSpec("guidance", (BATCH,), fill="guidance"),) if distilled else ())),
        outputs=(TensorSpec("pred", img),),
        batch=BatchProfile(1, per_sample * candidates, 2 * max(max_batch, candidates)), factory=src.build)


def _sr_graph(src: Source, index: int, max_batch: int) -> GraphSpec:
    c = src.config
    channels = c.unet.out_channels
    img = (BATCH, channels, c.image_size, c.image_size)
    return GraphSpec(
        f"sr{index}", src.stage,
        inputs=(TensorSpec("x_t", img), TensorSpec("t", (BATCH,), fill="timestep", high=c.num_timesteps),
                TensorSpec("low_res", (BATCH, channels, c.low_res_size, c.low_res_size), fill="signed"),
                TensorSpec("aug_t", (BATCH,), fill="timestep", high=c.num_timesteps)),
        outputs=(TensorSpec("pred", img),),
        batch=BatchProfile(1, 1, 2 * max_batch), factory=src.build)


def graph_specs(sources: Sources, *, max_batch: int = 8, candidates: int = 2,
                decoder_candidates: int = 1) -> list[GraphSpec]:
    """The graphs of a checkpoint set, in pipeline order: encoders, prior, decoder, sr0, sr1, …
    ``candidates`` / ``decoder_candidates``: the prior's and the decoder's samples per image (batch ranges)."""
    if max_batch < 1 or candidates < 1 or decoder_candidates < 1:
        raise ValueError(f"max_batch and the candidates must be >= 1, got {max_batch}, {candidates}, "
                         f"{decoder_candidates}")
    return [
        *_clip_graphs(sources.clip, max_batch),
        *_prior_graphs(sources.prior, max_batch, candidates),
        _decoder_graph(sources.decoder, max_batch, decoder_candidates),
        *(_sr_graph(src, i, max_batch) for i, src in enumerate(sources.sr)),
    ]
