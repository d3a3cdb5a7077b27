"""``python -m export.package``: an exported engine folder -> the small copy the wheel carries.

    python -m export.package engines/shapes-v2 --out dalle2_rt/engines/shapes-v2     # make package-engines

The package copy holds the same graphs, stages and tokenizer as the exported folder, minus what is bulky and
derivable:

- Weights. Every float32 initializer whose values float16 represents exactly (all of the trained weights here:
  the checkpoints are stored in float16, and the export only widened them) is stored as float16, followed by
  a ``Cast`` back to float32 at the top of the graph. ONNX Runtime folds the Cast when the session is created,
  so the graph runs on the very float32 values of the exported one: equal outputs, half the bytes. A tensor
  that float16 would round (folded constants such as ``mean``/``std`` or frequency tables) stays float32.
- Shared weights. The prior's three graphs (whole, prefix, step) hold the same tensors: the copy stores each
  graph's weights as ONNX external data in one file per checkpoint (``<source>.weights``), every distinct
  tensor once, so the prior's weights are stored once instead of three times.
- ONNX Runtime's optimised copies (``*.opt.onnx``) and TensorRT plans are left out: the runtime makes the
  optimised copy at first use and keeps it in the user cache directory (``backends.py``), plans are per GPU.

Each graph of the copy is run against its source on the same inputs before the folder is written; any
difference beyond ``MAX_ABS_ERR`` is an error, and the figure measured is recorded in the manifest's
``package`` entry, beside the sha256 of the manifest it was made from (whose ``sources`` name the
checkpoints' sha256, as the copy's do). The folder is built aside and renamed into place.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dalle2_rt.runtime.errors import Dalle2RTError
from dalle2_rt.runtime.manifest import MANIFEST, load_manifest, sha256_file, verify_files

from .folder import swap_into_place

PACKAGE_REVISION = 1  # bump when a change here alters what a package copy holds (forces a rebuild)
REPO = Path(__file__).resolve().parents[1]
MIN_ELEMENTS = 64  # smaller float32 tensors stay as they are: a Cast node costs more than their bytes save
MAX_ABS_ERR = 0.0  # the copy must reproduce its source's outputs exactly (only exact float16 values are stored)
CHECK_BATCHES = (1, 2)
FP16_SUFFIX = "__fp16"
WEIGHTS_SUFFIX = ".weights"  # <source>.weights: one file of weights per checkpoint, shared by its graphs
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the graph
ALIGN = 64  # each tensor's offset in a weights file (a cache line; ONNX Runtime maps the file itself)


class PackageError(RuntimeError):
    """The source folder cannot be packaged as asked (stale, unreadable, or its copy would differ)."""


def narrow_weights(model: onnx.ModelProto) -> dict:
    """Store ``model``'s exactly representable float32 initializers as float16 + Cast (in place).

    Returns counts and bytes: {"float16": n, "float32": n kept, "bytes_before": b, "bytes_after": b}.
    """
    graph = model.graph
    graph_inputs = {v.name for v in graph.input}  # an initializer listed as input may be overridden: keep it
    casts, kept, narrowed, before, after = [], [], 0, 0, 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in graph_inputs:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        before += values.nbytes
        half = values.astype(np.float16)
        if values.size < MIN_ELEMENTS or not np.array_equal(half.astype(np.float32), values, equal_nan=True):
            kept.append(init)
            after += values.nbytes
            continue
        kept.append(numpy_helper.from_array(half, init.name + FP16_SUFFIX))
        casts.append(helper.make_node("Cast", [init.name + FP16_SUFFIX], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}{FP16_SUFFIX}_widen"))
        narrowed += 1
        after += half.nbytes
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # Casts first: the node list stays topologically sorted
    floats = sum(1 for i in kept if i.data_type == TensorProto.FLOAT)
    return {"float16": narrowed, "float32": floats, "bytes_before": before, "bytes_after": after}


class _Blob:
    """One weights file being written: its bytes, and where each distinct tensor content already is."""

    def __init__(self):
        self.data = bytearray()
        self.offsets: dict[bytes, int] = {}


def externalize(model: onnx.ModelProto, location: str, blob: _Blob) -> int:
    """Move ``model``'s initializers of ``EXTERNAL_MIN_BYTES`` or more into ``blob`` (saved as ``location``,
    beside the graph), storing equal contents once; return the bytes this model added to the blob."""
    added = 0
    for init in model.graph.initializer:
        if not init.HasField("raw_data"):  # typed fields (float_data, ...): rewrite as raw bytes first
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
        raw = init.raw_data
        if len(raw) < EXTERNAL_MIN_BYTES:
            continue
        key = hashlib.sha256(raw).digest()
        if key not in blob.offsets:
            blob.data.extend(b"\0" * (-len(blob.data) % ALIGN))
            blob.offsets[key] = len(blob.data)
            blob.data.extend(raw)
            added += len(raw)
        del init.external_data[:]
        for k, v in (("location", location), ("offset", blob.offsets[key]), ("length", len(raw))):
            init.external_data.add(key=k, value=str(v))
        init.data_location = TensorProto.EXTERNAL
        init.ClearField("raw_data")
    return added


def _sample(spec, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for ``spec`` at ``batch``: normal floats, small non-negative integers (token ids, timesteps
    below every vocabulary and schedule), booleans all True (no padding masked)."""
    feeds = {}
    for t in spec.inputs:
        shape = tuple(batch if isinstance(d, str) else int(d) for d in t.shape)
        if np.issubdtype(t.dtype, np.floating):
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        elif t.dtype == np.bool_:
            feeds[t.name] = np.ones(shape, dtype=bool)
        else:
            feeds[t.name] = rng.integers(0, 100, shape).astype(t.dtype)
    return feeds


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def max_abs_err(spec, source: Path, copy_file: Path, *, seed: int = 0) -> float:
    """Largest |difference| between the outputs of ``source`` and ``copy_file`` on the same inputs."""
    a, b = _session(source), _session(copy_file)
    names = [t.name for t in spec.outputs]
    worst = 0.0
    rng = np.random.default_rng(seed)
    for batch in CHECK_BATCHES:
        feeds = _sample(spec, batch, rng)
        for x, y in zip(a.run(names, feeds), b.run(names, feeds)):
            if x.shape != y.shape or not np.array_equal(np.isfinite(x), np.isfinite(y)):
                return float("inf")
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0)))
    return worst


def stale_sources(manifest: dict, root: Path) -> list[str]:
    """The sources whose checkpoint under ``root`` no longer has the sha256 the manifest records."""
    stale = []
    for name, src in manifest.get("sources", {}).items():
        folder = Path(src["path"]) if Path(src["path"]).is_absolute() else root / src["path"]
        weights = folder / "model.safetensors"
        if weights.is_file() and sha256_file(weights) != src["sha256"]:
            stale.append(name)
    return stale


def up_to_date(src, out: Path) -> bool:
    """Whether ``out`` is already the package copy of the folder ``src`` (same manifest, same revision, intact)."""
    try:
        made = load_manifest(out)
        verify_files(made)
    except Dalle2RTError:
        return False
    record = made.data.get("package") or {}
    return record.get("made_from") == src.sha256 and record.get("revision") == PACKAGE_REVISION


def package(source: Path, out: Path, *, root: Path = REPO, force: bool = False, log=print) -> dict | None:
    """Write the package copy of the engine folder ``source`` to ``out``; return its manifest (None: ``out`` was
    up to date and left alone, unless ``force``)."""
    src = load_manifest(source)
    verify_files(src)
    stale = stale_sources(src.data, root)
    if stale:
        raise PackageError(f"{source} was exported from other checkpoints than the current ones ({', '.join(stale)}); "
                           "rebuild it first (make engines)")
    out = Path(out)
    if not force and up_to_date(src, out):
        log(f"{out} is up to date (made from {source}'s manifest {src.sha256[:16]})")
        return None
    data = copy.deepcopy(src.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.package-", dir=out.parent))
    try:
        report, blobs, models = {}, {}, {}
        for name, spec in src.graphs.items():  # narrow every graph, its weights into its source's file
            model = onnx.load(str(spec.file), load_external_data=True)
            counts = narrow_weights(model)
            weights = f"{data['graphs'][name].get('source') or name}{WEIGHTS_SUFFIX}"
            counts["stored"] = externalize(model, weights, blobs.setdefault(weights, _Blob()))
            models[name] = (model, weights, counts)
        for weights, blob in blobs.items():
            (tmp / weights).write_bytes(blob.data)
        for name, (model, weights, counts) in models.items():
            spec, entry = src.graphs[name], data["graphs"][name]
            target = tmp / Path(entry["file"]).name
            onnx.save(model, str(target))
            err = max_abs_err(spec, spec.file, target)
            if not err <= MAX_ABS_ERR:
                raise PackageError(f"graph {name}: the float16-stored copy differs from {spec.file} by {err:g} "
                                   f"(allowed {MAX_ABS_ERR:g})")
            for key in ("optimized_file", "optimized_for"):
                entry.pop(key, None)
            entry.update(file=target.name, external_data=[weights], optimized_external_data=[], trt={})
            if spec.int8_file is not None:  # already small (int8 weights): copied as exported
                shutil.copyfile(spec.int8_file, tmp / spec.int8_file.name)
                entry["int8"]["file"] = spec.int8_file.name
            report[name] = {"source_sha256": src.files[Path(spec.file).relative_to(source).as_posix()],
                            "float16_initializers": counts["float16"], "float32_initializers": counts["float32"],
                            "max_abs_err": err}
            log(f"{name}: {counts['bytes_before'] / 1e6:.1f} -> {counts['bytes_after'] / 1e6:.1f} MB of weights "
                f"({counts['stored'] / 1e6:.1f} MB new in {weights}), {counts['float16']} tensors float16, "
                f"{counts['float32']} float32; max |diff| {err:g}")
        tokenizer = data["tokenizer"]["file"]
        shutil.copyfile(src.path(tokenizer), tmp / tokenizer)
        data["trt"] = {}
        data["package"] = {"made_from": src.sha256, "revision": PACKAGE_REVISION,
                           "weights": "float16 where exact, widened to float32 in the graph",
                           "max_abs_err": MAX_ABS_ERR, "graphs": report}
        data["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        load_manifest(tmp)  # the runtime's own checks, before the copy replaces anything
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.package", description=__doc__.split("\n\n")[0])
    p.add_argument("engines", type=Path, help="the exported engine folder (make engines)")
    p.add_argument("--out", type=Path, required=True, help="where the package copy goes (replaced)")
    p.add_argument("--force", action="store_true", help="rebuild even when --out was made from this folder")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if package(args.engines, args.out, force=args.force) is None:
            return 0
    except (PackageError, Dalle2RTError, OSError) as e:  # one line, not a traceback
        sys.stderr.write(f"export.package: error: {e}\n")
        return 1
    print(f"wrote {args.out} ({folder_bytes(args.out) / 1e6:.1f} MB, from {folder_bytes(args.engines) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
