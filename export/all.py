"""``python -m export.all``: checkpoints -> a validated, self-describing engine folder.

    python -m export.all                                  # checkpoints/shapes-v1 -> engines/shapes-v1
    python -m export.all --checkpoints runs/x --out engines/x --trt --precision fp16

One ONNX graph per network (text_encoder, image_encoder, prior, decoder, sr0, sr1, …; ``specs.py``), each
checked against PyTorch in ONNX Runtime and saved with ONNX Runtime's optimised copy (a graph with more bytes
of weights than ``--external-data-threshold`` keeps them in ``<graph>.onnx.data``; ``onnx_export.py``), the
tokenizer, and ``manifest.json`` (``manifest.py``); with ``--trt`` also TensorRT plans for this GPU (``trt.py``).
The folder handling (atomic swap, crash recovery, carrying files over) is in ``folder.py``.

Idempotent: a folder whose manifest has the same fingerprint (checkpoint digests, options, exporter and
library versions) is left alone ("up to date"), unless ``--force``. Otherwise the folder is built as a
hidden sibling and renamed into place, so an error or an interrupt leaves the old folder (or none), never
half of one. Graphs whose checkpoint and options did not change are carried over from the old folder
(files checked against its manifest's hashes) instead of being exported again, and so are their TensorRT
plans; ``--trt`` on an up-to-date folder only builds the plans this machine lacks.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import manifest as mf
from . import trt as trt_build
from .folder import (
    ExportError,
    carry_graph,
    carry_trt,
    ensure_dir,
    fsync_tree,
    graph_files,
    intact_files,
    previous_manifest,
    swap_into_place,
    trt_satisfied,
)
from .onnx_export import (
    EXPORTER,
    EXTERNAL_DATA_THRESHOLD,
    ValidationError,
    export_onnx,
    external_data_files,
    optimize_for_ort,
    validate,
)
from .sources import SourceError, Sources, find_sources
from .specs import GraphSpec, graph_specs
from .tokenizer import write_tokenizer

DEFAULT_CHECKPOINTS = Path("checkpoints/shapes-v1")
# 18: opset 21 would write GroupNorm as GroupNormalization, which older TensorRT parsers and ORT kernels lack;
# at 18 it is Reshape + InstanceNormalization.
DEFAULT_OPSET = 18
MIN_OPSET = 18
OPSET_WHY = "torch's dynamo exporter writes opset-18 ops; its down-conversion to 17 leaves an invalid Split"
DEFAULT_MAX_BATCH = 8
VALIDATION_BATCHES = (1, 3)  # plus the graph's profile max


@dataclass
class ExportResult:
    folder: Path
    status: str  # "up to date" | "built"
    manifest: dict
    exported: list[str] = field(default_factory=list)  # graphs traced and validated in this run
    reused: list[str] = field(default_factory=list)  # graphs carried over unchanged
    trt_message: str | None = None  # why no TensorRT plans were built, when --trt could not run
    trt_failed: dict[str, str] = field(default_factory=dict)


def export_folder(checkpoints: str | Path = DEFAULT_CHECKPOINTS, out: str | Path | None = None, *,
                  name: str | None = None, precision: str = "fp16", trt: bool = False, opset: int = DEFAULT_OPSET,
                  max_batch: int = DEFAULT_MAX_BATCH, force: bool = False, quiet: bool = False,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log: Callable[[str], None] | None = None
                  ) -> ExportResult:
    """Export ``checkpoints`` into the engine folder ``out`` (default ``engines/<checkpoints name>``).

    ``precision`` applies to TensorRT plans only (the ONNX graphs are fp32, the I/O contract).
    ``external_data_threshold``: a graph with more bytes of weights than this (default 1 GiB) keeps them in
    ``<graph>.onnx.data`` beside it; the layout is not part of the fingerprint (``force`` re-lays out an up-to-date
    folder). Raises
    SourceError (bad checkpoints), ValidationError (a graph disagrees with PyTorch) or whatever the export
    raised; in every such case ``out`` is as it was before the call.
    """
    checkpoints = Path(checkpoints)
    out = Path(out) if out is not None else Path("engines") / checkpoints.name
    name = name or out.name
    say = (lambda _msg: None) if quiet else (log or print)
    if precision not in trt_build.PRECISIONS:
        raise ValueError(f"precision must be one of {trt_build.PRECISIONS}, got {precision!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset} ({OPSET_WHY})")
    if external_data_threshold < 0:
        raise ValueError(f"external_data_threshold must be >= 0 bytes, got {external_data_threshold}")

    sources = find_sources(checkpoints)
    candidates = int(mf.stage_defaults("prior", sources.prior)["candidates"])
    specs = graph_specs(sources, max_batch=max_batch, candidates=candidates)
    tools = mf.tool_versions(opset, EXPORTER)
    options = {"opset": opset, "max_batch": max_batch}
    fingerprint = mf.folder_fingerprint(name, sources, tools, options)

    trt_key, trt_message = trt_build.key_or_reason(trt, precision, log or print)
    old = previous_manifest(out)
    intact = intact_files(out, old) if old else set()
    if not force and old and old.get("fingerprint") == fingerprint and intact == set(old["files"]) \
            and trt_satisfied(old, trt_key, precision):
        say(f"{out}: up to date")
        return ExportResult(out, "up to date", old, reused=[s.name for s in specs], trt_message=trt_message)

    result = ExportResult(out, "built", {}, trt_message=trt_message)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-{os.getpid()}-", dir=out.parent if out.parent.exists()
                                else ensure_dir(out.parent)))
    try:
        started = time.perf_counter()
        graphs = {}
        for spec in specs:
            src = _source_of(sources, spec)
            gfp = mf.graph_fingerprint(spec, src, tools)
            previous = (old or {}).get("graphs", {}).get(spec.name)
            if not force and previous and previous.get("fingerprint") == gfp and graph_files(previous) <= intact:
                graphs[spec.name] = carry_graph(out, tmp, previous)
                result.reused.append(spec.name)
                say(f"  {spec.name}: unchanged, carried over")
            else:
                graphs[spec.name] = _export_graph(spec, tmp, opset, gfp, external_data_threshold, say)
                result.exported.append(spec.name)
        tokenizer = write_tokenizer(tmp, context_length=sources.clip.config.context_length)
        trt_records = carry_trt(out, tmp, old or {}, graphs, result.reused)
        if trt_key is not None:
            result.trt_failed = trt_build.build_missing(tmp, trt_key, precision, specs, graphs, trt_records, say)
        manifest = mf.build_manifest(
            name=name, tools=tools, options=options, fingerprint=fingerprint, sources=sources,
            tokenizer=tokenizer, graphs=graphs, stages=mf.stage_entries(sources, {s.name: s for s in specs}),
            output=mf.output_entry(sources), trt=trt_records, files=mf.file_table(tmp))
        mf.write_manifest(tmp, manifest)
        fsync_tree(tmp)
        swap_into_place(tmp, out)
        result.manifest = manifest
        say(f"{out}: built in {time.perf_counter() - started:.1f} s (exported {', '.join(result.exported) or '-'}; "
            f"carried over {', '.join(result.reused) or '-'})")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source_of(sources: Sources, spec: GraphSpec):
    return next(s for s in sources.all() if s.stage == spec.source)


def _export_graph(spec: GraphSpec, tmp: Path, opset: int, fingerprint: str, threshold: int, say) -> dict:
    """Trace, optimise and validate one graph into ``tmp``; return its manifest entry."""
    started = time.perf_counter()
    module = spec.factory()
    file, opt_file = f"{spec.name}.onnx", f"{spec.name}.opt.onnx"
    export_onnx(spec, module, tmp / file, opset=opset, external_data_threshold=threshold)
    data = external_data_files(tmp / file)
    optimized_for = optimize_for_ort(tmp / file, tmp / opt_file, external_data=bool(data))
    batches = sorted({*VALIDATION_BATCHES, spec.batch.max})
    check = validate(spec, module, {"plain": tmp / file, "optimized": tmp / opt_file}, batches)
    say(f"  {spec.name}: max abs err {check['max_abs_err']:.2e} = {check['rel_err']:.2e} of output scale "
        f"{check['output_scale']:.3g} (optimized {check['optimized']['rel_err']:.2e}) at batch {batches}, "
        f"{time.perf_counter() - started:.1f} s")
    return {
        "file": file, "optimized_file": opt_file, "optimized_for": optimized_for, "source": spec.source,
        "external_data": data, "optimized_external_data": external_data_files(tmp / opt_file),
        **spec.io_entry(), "timestep_inputs": spec.timestep_inputs, "validation": check,
        "fingerprint": fingerprint, "trt": {},
    }


# --------------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.all",
                                 description="Export unCLIP checkpoints into a validated, self-describing engine "
                                             "folder: ONNX graphs, manifest.json, tokenizer (+ TensorRT plans).")
    ap.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS,
                    help="checkpoint directory with <stage>/model folders (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="engine folder (default: engines/<checkpoints name>)")
    ap.add_argument("--name", default=None, help="model name in the manifest (default: the folder name)")
    ap.add_argument("--precision", choices=trt_build.PRECISIONS, default="fp16",
                    help="TensorRT plan precision; ONNX graphs are always fp32 (default: %(default)s)")
    ap.add_argument("--trt", action="store_true", help="also build TensorRT plans for this GPU")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                    help=f"ONNX opset, >= {MIN_OPSET} (default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                    help="most images per call; denoisers take 2x (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild everything even if up to date")
    ap.add_argument("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD, metavar="BYTES",
                    help="a graph with more weight bytes than this keeps them in <graph>.onnx.data beside it "
                         "(protobuf caps a file at 2 GB; default: %(default)s = 1 GiB)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result line and problems")
    ap.add_argument("--from-diffusers", type=Path, default=None, metavar="PATH",
                    help="convert a diffusers UnCLIPPipeline folder (e.g. karlo-v1-alpha) instead of --checkpoints "
                         "(export/diffusers_unclip.py; needs the `diffusers` extra)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.opset < MIN_OPSET:
        print(f"export: error: --opset must be >= {MIN_OPSET}, got {args.opset} ({OPSET_WHY})", file=sys.stderr)
        return 2
    if args.external_data_threshold < 0:
        print(f"export: error: --external-data-threshold must be >= 0, got {args.external_data_threshold}",
              file=sys.stderr)
        return 2
    if args.from_diffusers is not None:
        from .diffusers_unclip import run_cli
        return run_cli(args)
    # SIGTERM unwinds like Ctrl-C, so the build folder is removed and the old engine folder stays.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with torch.no_grad():
            result = export_folder(args.checkpoints, args.out, name=args.name, precision=args.precision,
                                   trt=args.trt, opset=args.opset, max_batch=args.max_batch, force=args.force,
                                   quiet=args.quiet, external_data_threshold=args.external_data_threshold)
    except (SourceError, ValidationError, ExportError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.quiet and result.status == "built":
        print(f"{result.folder}: built")
    elif args.quiet:
        print(f"{result.folder}: up to date")
    if result.trt_failed:
        print(f"export: TensorRT failed for {', '.join(sorted(result.trt_failed))} (the ONNX graphs and the other "
              "plans are in place; see the manifest's trt.<key>.failed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
