"""``python -m export.all``: checkpoints -> a validated, self-describing engine folder.

    python -m export.all                                  # checkpoints/shapes-v2 -> engines/shapes-v2
    python -m export.all --checkpoints runs/x --out engines/x --trt --precision fp16

One ONNX graph per network (text_encoder, image_encoder, prior, decoder, sr0, sr1, …; ``specs.py``), each
checked against PyTorch in ONNX Runtime and saved with ONNX Runtime's optimised copy (a graph with more bytes
of weights than ``--external-data-threshold`` keeps them in ``<graph>.onnx.data``; ``onnx_export.py``), the
tokenizer, and ``manifest.json`` (``manifest.py``); with ``--trt`` also TensorRT plans for this GPU (``trt.py``).
This module is the family of our checkpoints (``CheckpointFamily``: ``sources.py`` opens and checks them) and
the command line; the export itself (fingerprint check, build folder, graph export and validation, the one-line
``export: error:`` contract) is the generic driver's (``driver.py``), which ``--from-diffusers``
(``diffusers_unclip.py``) feeds the same way. The folder handling (atomic swap, crash recovery, carrying files
over) is in ``folder.py``.

Idempotent: a folder whose manifest has the same fingerprint (checkpoint digests, options, exporter and
library versions) is left alone ("up to date"), unless ``--force``. Otherwise the folder is built as a
hidden sibling and renamed into place, so an error or an interrupt leaves the old folder (or none), never
half of one. Graphs whose checkpoint and options did not change are carried over from the old folder
(files checked against its manifest's hashes) instead of being exported again, and so are their TensorRT
plans; ``--trt`` on an up-to-date folder only builds the plans this machine lacks.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from . import manifest as mf
from . import trt as trt_build
from .driver import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPSET,
    MAX_BATCH_BOUND,
    MAX_OPSET,
    MIN_OPSET,
    OPSET_WHY,
    ExportError,
    ExportResult,
    Options,
    build,
    run_cli,
)
from .int8 import quantizable
from .onnx_export import EXPORTER, EXTERNAL_DATA_THRESHOLD
from .sources import SourceError, Sources, find_sources
from .specs import GraphSpec, graph_specs
from .tokenizer import write_tokenizer

__all__ = ["DEFAULT_CHECKPOINTS", "CheckpointFamily", "ExportError", "ExportResult", "SourceError", "export_folder",
           "main"]

DEFAULT_CHECKPOINTS = Path("checkpoints/shapes-v2")


class CheckpointFamily:
    """Our checkpoint directory as the driver's ``Family``: opening it checks every stage (``find_sources``)."""

    def __init__(self, checkpoints: str | Path):
        self.folder = Path(checkpoints)
        self.sources: Sources = find_sources(self.folder)

    def all(self) -> list:
        return self.sources.all()

    def tools(self, opset: int) -> dict:
        return mf.tool_versions(opset, EXPORTER)

    def fingerprint(self, name: str, tools: dict, options: dict) -> str:
        return mf.folder_fingerprint(name, self.sources, tools, options)

    def graph_specs(self, max_batch: int) -> list[GraphSpec]:
        candidates = int(mf.stage_defaults("prior", self.sources.prior)["candidates"])
        decoder_candidates = int(mf.stage_defaults("decoder", self.sources.decoder)["candidates"])
        return graph_specs(self.sources, max_batch=max_batch, candidates=candidates,
                           decoder_candidates=decoder_candidates)

    def graph_fingerprint(self, spec: GraphSpec, tools: dict) -> str:
        return mf.graph_fingerprint(spec, next(s for s in self.sources.all() if s.stage == spec.source), tools)

    def stage_entries(self, specs: list[GraphSpec]) -> dict:
        return mf.stage_entries(self.sources, {s.name: s for s in specs})

    def output_entry(self, stages: dict) -> dict:
        return mf.output_entry(self.sources)

    def write_tokenizer(self, folder: Path) -> dict:
        return write_tokenizer(folder, context_length=self.sources.clip.config.context_length)


def export_folder(checkpoints: str | Path = DEFAULT_CHECKPOINTS, out: str | Path | None = None, *,
                  name: str | None = None, precision: str = "fp16", trt: bool = False, opset: int = DEFAULT_OPSET,
                  max_batch: int = DEFAULT_MAX_BATCH, force: bool = False, quiet: bool = False,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, int8: tuple[str, ...] = (),
                  log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``checkpoints`` into the engine folder ``out`` (default ``engines/<checkpoints name>``).

    ``precision`` applies to TensorRT plans only (the ONNX graphs are fp32, the I/O contract).
    ``external_data_threshold``: a graph with more bytes of weights than this (default 1 GiB) keeps them in
    ``<graph>.onnx.data`` beside it; the layout is not part of the fingerprint (``force`` re-lays out an up-to-date
    folder). ``int8``: graphs (decoder, sr0, …) that also get an int8 variant (``int8.py``). Raises SourceError
    (bad checkpoints, before anything is exported), ValidationError (a graph disagrees with PyTorch, or an int8
    variant with its fp32 graph) or whatever the export raised; in every such case ``out`` is as it was before the call.
    """
    options = Options(opset=opset, max_batch=max_batch, precision=precision, trt=trt, force=force,
                      external_data_threshold=external_data_threshold, int8=tuple(int8))
    family = CheckpointFamily(checkpoints)
    out = Path(out) if out is not None else Path("engines") / family.folder.name
    return build(family, out, name=name or out.name, options=options, quiet=quiet, log=log)


# --------------------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump (``--max-batch abc``)
        self.exit(2, f"export: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m export.all",
                 description="Export unCLIP checkpoints into a validated, self-describing engine folder: ONNX "
                             "graphs, manifest.json, tokenizer (+ TensorRT plans).")
    ap.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS,
                    help="checkpoint directory with <stage>/model folders (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="engine folder (default: engines/<checkpoints name>)")
    ap.add_argument("--name", default=None, help="model name in the manifest (default: the folder name)")
    ap.add_argument("--precision", choices=trt_build.PRECISIONS, default="fp16",
                    help="TensorRT plan precision; ONNX graphs are always fp32 (default: %(default)s)")
    ap.add_argument("--trt", action="store_true", help="also build TensorRT plans for this GPU")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                    help=f"ONNX opset, {MIN_OPSET} … {MAX_OPSET} (default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                    help=f"most images per call, 1 … {MAX_BATCH_BOUND}; denoisers take 2x (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild everything even if up to date")
    ap.add_argument("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD, metavar="BYTES",
                    help="a graph with more weight bytes than this keeps them in <graph>.onnx.data beside it "
                         "(protobuf caps a file at 2 GB; default: %(default)s = 1 GiB)")
    ap.add_argument("--int8", action="append", default=[], metavar="GRAPH",
                    help="also write GRAPH's int8 variant (decoder, sr0, …; repeatable), calibrated by sampling the "
                         "folder; onnxruntime on the CPU runs it unless --fp32 (export/int8.py)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result line and problems")
    ap.add_argument("--from-diffusers", type=Path, default=None, metavar="PATH",
                    help="convert a diffusers UnCLIPPipeline folder (e.g. karlo-v1-alpha) instead of --checkpoints "
                         "(export/diffusers_unclip.py; needs the `diffusers` extra)")
    d2 = ap.add_argument_group("DALLE2-pytorch checkpoints (--from-dalle2-pytorch; export/dalle2_pytorch.py)")
    d2.add_argument("--from-dalle2-pytorch", action="store_true",
                    help="convert a DALLE2-pytorch 1.15.x DiffusionPrior + Decoder and an open_clip model")
    d2.add_argument("--prior", type=Path, help="DiffusionPrior weights: a state_dict or a trainer's saved dict")
    d2.add_argument("--prior-config", type=Path, help="its TrainDiffusionPriorConfig JSON (or its 'prior' entry)")
    d2.add_argument("--decoder", type=Path, help="Decoder weights: a state_dict or a trainer's saved dict")
    d2.add_argument("--decoder-config", type=Path, help="its TrainDecoderConfig JSON (or its 'decoder' entry)")
    d2.add_argument("--clip", help="open_clip architecture name, or an open_clip model-config .json")
    d2.add_argument("--clip-weights", type=Path, help="the open_clip model's weights file")
    d2.add_argument("--dalle2-weights", choices=("ema", "model"), default="ema",
                    help="from a trainer's saved dict: the EMA weights when present, or the online model's")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.opset < MIN_OPSET:
        print(f"export: error: --opset must be >= {MIN_OPSET}, got {args.opset} ({OPSET_WHY})", file=sys.stderr)
        return 2
    if args.opset > MAX_OPSET:
        print(f"export: error: --opset must be at most {MAX_OPSET} (the newest the installed onnx knows), got "
              f"{args.opset}", file=sys.stderr)
        return 2
    if not 1 <= args.max_batch <= MAX_BATCH_BOUND:
        print(f"export: error: --max-batch must be an integer in 1 … {MAX_BATCH_BOUND}, got {args.max_batch}",
              file=sys.stderr)
        return 2
    if args.external_data_threshold < 0:
        print(f"export: error: --external-data-threshold must be >= 0, got {args.external_data_threshold}",
              file=sys.stderr)
        return 2
    bad = [g for g in args.int8 if not quantizable(g)]
    if bad:
        print(f"export: error: --int8 takes the decoder or an sr graph (sr0, sr1, …), not {', '.join(bad)}",
              file=sys.stderr)
        return 2
    shared = dict(out=args.out, name=args.name, precision=args.precision, trt=args.trt, opset=args.opset,
                  max_batch=args.max_batch, force=args.force, quiet=args.quiet,
                  external_data_threshold=args.external_data_threshold, int8=tuple(args.int8))
    if args.from_diffusers is not None:
        # Imported here: the diffusers family needs the optional `diffusers` extra, ours does not.
        from .diffusers_unclip import export_diffusers
        return run_cli(lambda: export_diffusers(args.from_diffusers, **shared), quiet=args.quiet)
    if args.from_dalle2_pytorch:
        needed = ("prior", "prior_config", "decoder", "decoder_config", "clip", "clip_weights")
        missing = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
        if missing:
            print(f"export: error: --from-dalle2-pytorch needs {', '.join(missing)}", file=sys.stderr)
            return 2
        from .dalle2_pytorch import export_dalle2_pytorch
        return run_cli(lambda: export_dalle2_pytorch(**{n: getattr(args, n) for n in needed},
                                                     weights=args.dalle2_weights, **shared), quiet=args.quiet)
    return run_cli(lambda: export_folder(args.checkpoints, **shared), quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
