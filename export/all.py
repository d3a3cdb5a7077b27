"""``python -m export.all``: checkpoints -> a validated, self-describing engine folder.

    python -m export.all                                  # checkpoints/shapes-v1 -> engines/shapes-v1
    python -m export.all --checkpoints runs/x --out engines/x --trt --precision fp16

One ONNX graph per network (text_encoder, image_encoder, prior, decoder, sr0, sr1, …; ``specs.py``), each
checked against PyTorch in ONNX Runtime and saved with ONNX Runtime's optimised copy, the tokenizer, and
``manifest.json`` (``manifest.py``); with ``--trt`` also TensorRT plans for this GPU (``trt.py``).

Idempotent: a folder whose manifest has the same fingerprint (checkpoint digests, options, exporter and
library versions) is left alone ("up to date"), unless ``--force``. Otherwise the folder is built as a
hidden sibling and renamed into place, so an error or an interrupt leaves the old folder (or none), never
half of one. Graphs whose checkpoint and options did not change are carried over from the old folder
(files checked against its manifest's hashes) instead of being exported again, and so are their TensorRT
plans; ``--trt`` on an up-to-date folder only builds the plans this machine lacks.
"""
from __future__ import annotations

import argparse
import json
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

from dalle2_rt.runtime import trt_keys

from . import manifest as mf
from . import trt as trt_build
from .onnx_export import EXPORTER, ValidationError, export_onnx, optimize_for_ort, validate
from .sources import SourceError, Sources, find_sources, sha256_file
from .specs import GraphSpec, graph_specs, sample_inputs
from .tokenizer import write_tokenizer

DEFAULT_CHECKPOINTS = Path("checkpoints/shapes-v1")
# 18: opset 21 would write GroupNorm as GroupNormalization, which older TensorRT parsers and ORT kernels lack;
# at 18 it is Reshape + InstanceNormalization.
DEFAULT_OPSET = 18
MIN_OPSET = 18
OPSET_WHY = "torch's dynamo exporter writes opset-18 ops; its down-conversion to 17 leaves an invalid Split"
DEFAULT_MAX_BATCH = 8
VALIDATION_BATCHES = (1, 3)  # plus the graph's profile max


class ExportError(RuntimeError):
    """The export cannot proceed as asked (e.g. --out names a folder that is not an engine folder)."""


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
                  log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``checkpoints`` into the engine folder ``out`` (default ``engines/<checkpoints name>``).

    ``precision`` applies to TensorRT plans only (the ONNX graphs are fp32, the I/O contract). Raises
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

    sources = find_sources(checkpoints)
    candidates = int(mf.stage_defaults("prior", sources.prior)["candidates"])
    specs = graph_specs(sources, max_batch=max_batch, candidates=candidates)
    tools = mf.tool_versions(opset, EXPORTER)
    options = {"opset": opset, "max_batch": max_batch}
    fingerprint = mf.folder_fingerprint(name, sources, tools, options)

    trt_key, trt_message = None, None
    if trt:
        try:
            module, cc, _ = trt_build.probe()
            trt_build.check_precision(precision, module.__version__)
            trt_key = trt_keys.engine_key(module.__version__, cc)
        except trt_build.TrtUnavailable as e:
            trt_message = str(e)
            (log or print)(f"export: --trt: {trt_message}")

    _recover_stale(out)
    old = mf.read_manifest(out) if out.is_dir() else None
    if out.exists() and old is None and not _ours(out):
        # Never replace (and so delete) something that is not ours.
        raise ExportError(f"{out} exists and is not an engine folder (no readable {mf.MANIFEST}); "
                          "remove it or choose another --out")
    intact = _intact_files(out, old) if old else set()
    if not force and old and old.get("fingerprint") == fingerprint and intact == set(old["files"]) \
            and _trt_satisfied(old, trt_key, precision):
        say(f"{out}: up to date")
        return ExportResult(out, "up to date", old, reused=[s.name for s in specs], trt_message=trt_message)

    result = ExportResult(out, "built", {}, trt_message=trt_message)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-{os.getpid()}-", dir=out.parent if out.parent.exists()
                                else _mkdir(out.parent)))
    try:
        started = time.perf_counter()
        graphs = {}
        for spec in specs:
            src = _source_of(sources, spec)
            gfp = mf.graph_fingerprint(spec, src, tools)
            previous = (old or {}).get("graphs", {}).get(spec.name)
            if not force and previous and previous.get("fingerprint") == gfp and _graph_files(previous) <= intact:
                graphs[spec.name] = _carry_graph(out, tmp, previous)
                result.reused.append(spec.name)
                say(f"  {spec.name}: unchanged, carried over")
            else:
                graphs[spec.name] = _export_graph(spec, tmp, opset, gfp, say)
                result.exported.append(spec.name)
        tokenizer = write_tokenizer(tmp, context_length=sources.clip.config.context_length)
        trt_records = _carry_trt(out, tmp, old or {}, graphs, result.reused)
        if trt_key is not None:
            _build_trt(tmp, trt_key, precision, specs, graphs, trt_records, result, say)
        manifest = mf.build_manifest(
            name=name, tools=tools, options=options, fingerprint=fingerprint, sources=sources,
            tokenizer=tokenizer, graphs=graphs, stages=mf.stage_entries(sources, {s.name: s for s in specs}),
            output=mf.output_entry(sources), trt=trt_records, files=mf.file_table(tmp))
        mf.write_manifest(tmp, manifest)
        _fsync_tree(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the engine folder is an ordinary one
        _swap_into_place(tmp, out)
        result.manifest = manifest
        say(f"{out}: built in {time.perf_counter() - started:.1f} s (exported {', '.join(result.exported) or '-'}; "
            f"carried over {', '.join(result.reused) or '-'})")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ours(out: Path) -> bool:
    """An empty folder, or an engine folder of any schema version (one we may replace)."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        return json.loads((out / mf.MANIFEST).read_text(encoding="utf-8")).get("schema") == mf.SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def _source_of(sources: Sources, spec: GraphSpec):
    return next(s for s in sources.all() if s.stage == spec.source)


def _export_graph(spec: GraphSpec, tmp: Path, opset: int, fingerprint: str, say) -> dict:
    """Trace, optimise and validate one graph into ``tmp``; return its manifest entry."""
    started = time.perf_counter()
    module = spec.factory()
    file, opt_file = f"{spec.name}.onnx", f"{spec.name}.opt.onnx"
    export_onnx(spec, module, tmp / file, opset=opset)
    optimized_for = optimize_for_ort(tmp / file, tmp / opt_file)
    batches = sorted({*VALIDATION_BATCHES, spec.batch.max})
    check = validate(spec, module, {"plain": tmp / file, "optimized": tmp / opt_file}, batches)
    say(f"  {spec.name}: max abs err {check['max_abs_err']:.2e} = {check['rel_err']:.2e} of output scale "
        f"{check['output_scale']:.3g} (optimized {check['optimized']['rel_err']:.2e}) at batch {batches}, "
        f"{time.perf_counter() - started:.1f} s")
    return {
        "file": file, "optimized_file": opt_file, "optimized_for": optimized_for, "source": spec.source,
        **spec.io_entry(), "timestep_inputs": spec.timestep_inputs, "validation": check,
        "fingerprint": fingerprint, "trt": {},
    }


def _graph_files(entry: dict) -> set[str]:
    return {entry["file"], *([entry["optimized_file"]] if entry.get("optimized_file") else [])}


def _carry_graph(out: Path, tmp: Path, previous: dict) -> dict:
    for rel in _graph_files(previous):
        shutil.copy2(out / rel, tmp / rel)
    return {**previous, "trt": {}}  # plans are re-attached by _carry_trt


def _carry_trt(out: Path, tmp: Path, old: dict, graphs: dict, reused: list[str]) -> dict:
    """Copy the old folder's plans of carried-over graphs (same ONNX, so the same engine); keep their records."""
    records = {}
    for key, record in (old.get("trt") or {}).items():
        plans = {g: p for g, p in record.get("plans", {}).items() if g in reused and (out / p).is_file()}
        if not plans:
            continue
        (tmp / trt_keys.engine_dir(key)).mkdir(parents=True, exist_ok=True)
        for g, p in plans.items():
            shutil.copy2(out / p, tmp / p)
            graphs[g]["trt"][key] = p
        cache = out / record["timing_cache"]
        if cache.is_file():
            shutil.copy2(cache, tmp / record["timing_cache"])
        keep = set(plans)
        records[key] = {**record, "plans": plans,
                        **{k: {g: v for g, v in record.get(k, {}).items() if g in keep}
                           for k in ("fp32_layers", "validation", "build_seconds")}, "failed": {}}
    return records


def _build_trt(tmp: Path, key: str, precision: str, specs: list[GraphSpec], graphs: dict, records: dict,
               result: ExportResult, say) -> None:
    """Build the plans for ``key`` that the carried-over record does not already hold at ``precision``."""
    record = records.get(key)
    have = set(record["plans"]) if record and record.get("precision") == precision else set()
    need = [s.name for s in specs if s.name not in have]
    if not need:
        return
    by_name = {s.name: s for s in specs}

    def sample_for(graph: str):
        gen = torch.Generator().manual_seed(2)
        return lambda b: {k: v.numpy() for k, v in sample_inputs(by_name[graph], b, gen).items()}

    say(f"  building TensorRT {precision} plans for {key}: {', '.join(need)}")
    built_key, fresh, plans = trt_build.build_engines(tmp, graphs, precision=precision, sample_for=sample_for,
                                                      log=say, only=need)
    if built_key != key:
        raise RuntimeError(f"TensorRT key changed during the export ({key} -> {built_key})")
    if have:
        for k in ("plans", "fp32_layers", "validation", "build_seconds"):
            fresh[k] = {**{g: v for g, v in record.get(k, {}).items() if g in have}, **fresh[k]}
    for name, graph in graphs.items():
        graph["trt"].pop(key, None)
        if name in fresh["plans"]:
            graph["trt"][key] = fresh["plans"][name]
    records[key] = fresh
    result.trt_failed = dict(fresh["failed"])


def _trt_satisfied(old: dict, key: str | None, precision: str) -> bool:
    """No plans wanted, or the folder already has this machine's plans at this precision."""
    if key is None:
        return True
    record = (old.get("trt") or {}).get(key)
    return bool(record) and record.get("precision") == precision


def _intact_files(folder: Path, manifest: dict) -> set[str]:
    """The files of ``manifest.files`` present in ``folder`` with the recorded sha256."""
    ok = set()
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if path.is_file() and sha256_file(path) == want:
            ok.add(rel)
    return ok


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with two renames; between them the old folder waits as ``.<name>.old-<pid>``."""
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        if aside is not None:
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_stale(out: Path) -> None:
    """Clean up after an export that was killed (SIGKILL, power loss) and so could not clean up itself:
    its build folder is removed; an old folder set aside just before the final rename is put back."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("export", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)


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
    if args.from_diffusers is not None:
        from .diffusers_unclip import run_cli
        return run_cli(args)
    # SIGTERM unwinds like Ctrl-C, so the build folder is removed and the old engine folder stays.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with torch.no_grad():
            result = export_folder(args.checkpoints, args.out, name=args.name, precision=args.precision,
                                   trt=args.trt, opset=args.opset, max_batch=args.max_batch, force=args.force,
                                   quiet=args.quiet)
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
