"""The one export driver: a source family's graphs, stages and tokenizer in, a validated engine folder out.

Two families feed it: our checkpoints (``all.py``) and diffusers ``UnCLIPPipeline`` folders
(``diffusers_unclip.py``). A family (``Family``) is opened on its source folder, which checks what can be
checked without exporting (configs, weight files, how the parts fit); it then hands the driver its graph
specs (``specs.py``), the manifest's stage entries, its tokenizer writer and the digests that identify the
folder and each graph. The driver owns the rest, the same for every family:

  1. the fingerprint check: a folder whose manifest has the same fingerprint and intact files is left alone
     ("up to date"), unless ``force`` (or ``trt`` wants plans it lacks);
  2. everything the folder's manifest will say about the sources (specs, stage entries, output) is computed
     before the first graph is exported, so a source problem fails the export before any work is done;
  3. the build in a hidden sibling folder: each graph exported, optimised and validated against PyTorch
     (``onnx_export.py``) or carried over from the old folder when its fingerprint and files are unchanged,
     the tokenizer, TensorRT plans (``trt.py``), the int8 variants asked for (``int8.py``, calibrated by
     sampling the folder itself), ``manifest.json`` (``manifest.py``); then one atomic swap
     (``folder.py``). An error or an interrupt removes the build folder: ``out`` is as it was;
  4. the command line's contract (``run_cli``): every failure of a source folder, a validation or the
     output folder is one line ``export: error: ...`` and exit status 1; SIGTERM unwinds like Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx
import torch

from dalle2_rt.runtime.manifest import MAX_BATCH as MANIFEST_MAX_BATCH

from . import manifest as mf
from . import trt as trt_build
from .folder import (
    ExportError,
    carry_graph,
    carry_trt,
    check_replaceable,
    ensure_dir,
    fsync_tree,
    graph_files,
    intact_files,
    previous_manifest,
    swap_into_place,
    trt_satisfied,
)
from .int8 import INT8_REVISION, add_int8_variants, quantizable
from .onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    ValidationError,
    export_onnx,
    external_data_files,
    optimize_for_ort,
    validate,
)
from .sources import SourceError
from .specs import GraphSpec

# 18: opset 21 would write GroupNorm as GroupNormalization, which older TensorRT parsers and ORT kernels lack;
# at 18 it is Reshape + InstanceNormalization.
DEFAULT_OPSET = 18
MIN_OPSET = 18
OPSET_WHY = "torch's dynamo exporter writes opset-18 ops; its down-conversion to 17 leaves an invalid Split"
MAX_OPSET = onnx.defs.onnx_opset_version()  # the newest the installed onnx knows
DEFAULT_MAX_BATCH = 8
# a denoiser graph takes 2 × max_batch rows (guided), and a manifest's batch profiles at most MANIFEST_MAX_BATCH
MAX_BATCH_BOUND = MANIFEST_MAX_BATCH // 2
VALIDATION_BATCHES = (1, 3)  # plus the graph's profile max

# What the command line reports as ``export: error:`` (exit 1) rather than a traceback: a source folder that
# cannot be exported, a graph that disagrees with PyTorch, an output folder that may not be replaced.
EXPECTED_ERRORS = (SourceError, ValidationError, ExportError)


class Family(Protocol):
    """One kind of source folder, opened (and checked) on its folder. Every method but ``tools``,
    ``fingerprint`` and ``all`` may load networks; all of them raise SourceError for a source problem."""

    folder: Path  # the source folder: its name is the default engine folder name

    def all(self) -> list:
        """The manifest's ``sources``: objects with stage, kind, folder, meta, sha256, meta_sha256."""

    def tools(self, opset: int) -> dict:
        """What makes the graphs (exporter, library versions, converter revision); enters every fingerprint."""

    def fingerprint(self, name: str, tools: dict, options: dict) -> str:
        """Identifies the whole folder short of TensorRT plans."""

    def graph_specs(self, max_batch: int) -> list[GraphSpec]: ...

    def graph_fingerprint(self, spec: GraphSpec, tools: dict) -> str:
        """Identifies one graph's files: equal fingerprints, equal graphs (so it is carried over)."""

    def stage_entries(self, specs: list[GraphSpec]) -> dict: ...

    def output_entry(self, stages: dict) -> dict: ...

    def write_tokenizer(self, folder: Path) -> dict:
        """Write the tokenizer file into ``folder``; the manifest's ``tokenizer`` entry."""


@dataclass(frozen=True)
class Options:
    """How to export; ``opset`` and ``max_batch`` shape the graphs (and enter the fingerprint), the others
    do not: ``precision`` is the TensorRT plans', ``external_data_threshold`` the file layout (a graph with
    more bytes of weights keeps them in ``<graph>.onnx.data``; ``force`` re-lays out an up-to-date folder)."""

    opset: int = DEFAULT_OPSET
    max_batch: int = DEFAULT_MAX_BATCH
    precision: str = "fp16"
    trt: bool = False
    force: bool = False
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    int8: tuple[str, ...] = ()  # graphs that also get an int8 variant (``int8.py``); part of the fingerprint

    def __post_init__(self):
        if self.precision not in trt_build.PRECISIONS:
            raise ValueError(f"precision must be one of {trt_build.PRECISIONS}, got {self.precision!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            why = f" ({OPSET_WHY})" if self.opset < MIN_OPSET else ""
            raise ValueError(f"opset must be in {MIN_OPSET} … {MAX_OPSET}, got {self.opset}{why}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) \
                or not 1 <= self.max_batch <= MAX_BATCH_BOUND:
            raise ValueError(f"max_batch must be an integer in 1 … {MAX_BATCH_BOUND}, got {self.max_batch!r}")
        if self.external_data_threshold < 0:
            raise ValueError(f"external_data_threshold must be >= 0 bytes, got {self.external_data_threshold}")
        bad = [g for g in self.int8 if not isinstance(g, str) or not quantizable(g)]
        if bad:
            raise ValueError(f"int8 variants are made for the decoder and sr0, sr1, …, not {', '.join(map(repr, bad))}")
        object.__setattr__(self, "int8", tuple(sorted(set(self.int8))))

    def shaping(self) -> dict:
        """The manifest's ``options`` (``int8`` only when asked for: the folders built without it keep their
        fingerprints)."""
        return {"opset": self.opset, "max_batch": self.max_batch, **({"int8": list(self.int8)} if self.int8 else {})}


@dataclass
class ExportResult:
    folder: Path
    status: str  # "up to date" | "built"
    manifest: dict
    exported: list[str] = field(default_factory=list)  # graphs traced and validated in this run
    reused: list[str] = field(default_factory=list)  # graphs carried over unchanged
    trt_message: str | None = None  # why no TensorRT plans were built, when --trt could not run
    trt_failed: dict[str, str] = field(default_factory=dict)


def build(family: Family, out: Path, *, name: str, options: Options, quiet: bool = False,
          log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``family`` into the engine folder ``out`` (the module docstring says how). Raises SourceError,
    ValidationError, ExportError or whatever an export step raised; in every such case ``out`` is as it was."""
    say = (lambda _msg: None) if quiet else (log or print)
    tools = family.tools(options.opset)
    # A change in how variants are quantized (INT8_REVISION) rebuilds the folders that carry one, no other.
    fingerprint = family.fingerprint(name, tools, {**options.shaping(),
                                                   **({"int8_revision": INT8_REVISION} if options.int8 else {})})
    trt_key, trt_message = trt_build.key_or_reason(options.trt, options.precision, log or print)
    old = previous_manifest(out)
    intact = intact_files(out, old) if old else set()
    if not options.force and old and old.get("fingerprint") == fingerprint and intact == set(old["files"]) \
            and trt_satisfied(old, trt_key, options.precision):
        say(f"{out}: up to date")
        return ExportResult(out, "up to date", old, reused=list(old["graphs"]), trt_message=trt_message)
    check_replaceable(out)  # the swap below deletes the old folder: only what an export wrote may be in it

    # Everything the sources decide, before the first (slow) graph export: a bad source fails here.
    specs = family.graph_specs(options.max_batch)
    for spec in specs:  # the prior's rows grow with the candidates too: the runtime would refuse the manifest
        if spec.batch.max > MANIFEST_MAX_BATCH:
            raise ExportError(f"graph {spec.name}: a batch of up to {spec.batch.max} rows at --max-batch "
                              f"{options.max_batch}, over the {MANIFEST_MAX_BATCH} an engine manifest may state; "
                              f"lower --max-batch (or the candidates)")
    missing = [g for g in options.int8 if g not in {s.name for s in specs}]
    if missing:
        raise ExportError(f"--int8 {', '.join(missing)}: this folder has no such graph "
                          f"(its graphs: {', '.join(s.name for s in specs)})")
    stages = family.stage_entries(specs)
    output = family.output_entry(stages)

    result = ExportResult(out, "built", {}, trt_message=trt_message)
    try:
        parent = out.parent if out.parent.is_dir() else ensure_dir(out.parent)
    except OSError as e:  # --out file/sub: a file where a folder must be
        raise ExportError(f"--out {out}: cannot make the folder {out.parent} ({e.strerror or e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-{os.getpid()}-", dir=parent))
    try:
        started = time.perf_counter()
        graphs = {}
        for spec in specs:
            gfp = family.graph_fingerprint(spec, tools)
            previous = (old or {}).get("graphs", {}).get(spec.name)
            if not options.force and previous and previous.get("fingerprint") == gfp \
                    and graph_files(previous) <= intact:
                graphs[spec.name] = carry_graph(out, tmp, previous)
                result.reused.append(spec.name)
                say(f"  {spec.name}: unchanged, carried over")
            else:
                graphs[spec.name] = {**export_graph(spec, tmp, options, say), "fingerprint": gfp}
                result.exported.append(spec.name)
        for entry in graphs.values():  # a carried-over graph's old int8 variant: made again below, or dropped
            old_int8 = entry.pop("int8", None)
            if isinstance(old_int8, dict):
                (tmp / old_int8["file"]).unlink(missing_ok=True)
        tokenizer = family.write_tokenizer(tmp)
        trt_records = carry_trt(out, tmp, old or {}, graphs, result.reused)
        if trt_key is not None:
            result.trt_failed = trt_build.build_missing(tmp, trt_key, options.precision, specs, graphs,
                                                        trt_records, say)

        def write_manifest() -> dict:
            made = mf.build_manifest(
                name=name, tools=tools, options=options.shaping(), fingerprint=fingerprint, sources=family,
                tokenizer=tokenizer, graphs=graphs, stages=stages, output=output, trt=trt_records,
                files=mf.file_table(tmp))
            mf.write_manifest(tmp, made)
            return made

        if options.int8:  # calibrated on the folder itself: after every graph, before the final manifest
            add_int8_variants(tmp, graphs, options.int8, write_manifest, say)
        manifest = write_manifest()
        fsync_tree(tmp)
        swap_into_place(tmp, out)
        result.manifest = manifest
        say(f"{out}: built in {time.perf_counter() - started:.1f} s from {family.folder} (exported "
            f"{', '.join(result.exported) or '-'}; carried over {', '.join(result.reused) or '-'})")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_graph(spec: GraphSpec, tmp: Path, options: Options, say: Callable[[str], None]) -> dict:
    """Trace, optimise and validate one graph into ``tmp``; its manifest entry (without the fingerprint)."""
    started = time.perf_counter()
    file, opt_file = f"{spec.name}.onnx", f"{spec.name}.opt.onnx"
    with torch.no_grad():
        module = spec.factory()
        export_onnx(spec, module, tmp / file, opset=options.opset,
                    external_data_threshold=options.external_data_threshold)
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
        **spec.io_entry(), "timestep_inputs": spec.timestep_inputs, "validation": check, "trt": {},
    }


def run_cli(export: Callable[[], ExportResult], *, quiet: bool) -> int:
    """Run ``export`` as the command line does; the exit status: 0, or 1 after one ``export: error:`` line
    (or after the TensorRT failure note, with the ONNX folder in place)."""
    # SIGTERM unwinds like Ctrl-C, so the build folder is removed and the old engine folder stays.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = export()
    except EXPECTED_ERRORS as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if quiet:
        print(f"{result.folder}: {result.status}")
    if result.trt_failed:
        print(f"export: TensorRT failed for {', '.join(sorted(result.trt_failed))} (the ONNX graphs and the other "
              "plans are in place; see the manifest's trt.<key>.failed)", file=sys.stderr)
        return 1
    return 0
