"""The one generic exporter: a ``GraphSpec`` in, a validated ONNX graph (+ ONNX Runtime's optimised copy) out.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), with the batch declared as a
symbolic ``torch.export.Dim``. Both of torch 2.14's exporters gave correct dynamic-batch graphs for every
network here (max error ~1e-6 of the output scale at batch 1, 3 and 16). The dynamo path was chosen because
it *proves* the batch is symbolic: a module that turns the batch into a Python int (and so would bake it
into a Reshape) fails to export instead of silently producing a fixed-batch graph; its graphs are also
leaner after onnxscript's optimizer (no Where/Equal/ConstantOfShape scaffolding), and the TorchScript path
is deprecated since torch 2.9. What it costs is export time (seconds per graph, ~20x the tracer's).

The trace input has batch ``TRACE_BATCH`` = 3: torch.export specialises sizes 0 and 1, and 3 equals no
fixed axis the networks treat as a batch.

Validation (``validate``) runs the exported graphs in ONNX Runtime (CPU) on fresh random inputs drawn by the
spec at several batch sizes and compares every output with the torch module's: the error is
``max |ort - torch|`` and the scale ``max |torch|`` over all batch sizes; the graph is rejected when
error > ``REL_TOL`` · scale.

External data. Protobuf caps a serialised message at 2 GB, and karlo's prior alone is ~4 GB in fp32. A graph
whose initializers exceed ``external_data_threshold`` bytes (default ``EXTERNAL_DATA_THRESHOLD``, 1 GiB) is saved
as ``<graph>.onnx`` (nodes, tensors under a few hundred bytes) + ``<graph>.onnx.data`` (the others, at offsets
the .onnx records, by a path relative to it). ONNX Runtime's optimised copy is then written the same way
(``<graph>.opt.onnx.data``, through the session config entries
``session.optimized_model_external_initializers_file_name`` / ``..._min_size_in_bytes``). Everything that reads
a graph reads it by path (ONNX Runtime sessions, ``onnx.checker``, TensorRT's ``parse_from_file``), so the data
file is found beside it. ``external_data_files`` lists the files a saved graph actually references (what the
manifest records), read from the graph itself rather than assumed: ONNX Runtime has been known to leave some
tensors of an optimised copy pointing into the original's data file (onnxruntime PR #17311), which would then
be listed too. Checked once outside the suite on a synthetic graph with 2.4 GB of weights: export, optimised
copy and validation of both (peak RSS 8.2 GB, ~3.4× the weights).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .specs import BATCH, GraphSpec, sample_inputs

TRACE_BATCH = 3
REL_TOL = 1e-4  # fp32: max abs error <= 1e-4 × max |torch output|
EXPORTER = "torch.onnx.export(dynamo=True)"
ORT_LEVEL = "extended"  # ORT_ENABLE_ALL adds layout (NCHWc) rewrites valid only on the CPU that made them
ORT_PROVIDER = "CPUExecutionProvider"
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which a graph keeps them in <graph>.onnx.data
EXTERNAL_TENSOR_MIN_BYTES = 1024  # ORT's optimised copy: smaller tensors stay inline


class ValidationError(RuntimeError):
    """An exported graph disagrees with its torch module beyond the tolerance."""


def export_onnx(spec: GraphSpec, module: torch.nn.Module, path: Path, *, opset: int, quiet: bool = True,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Trace ``module`` with the spec's names and dynamic batch into ``path``: one file, or ``path`` + its
    ``<name>.data`` when the initializers exceed ``external_data_threshold`` bytes (``external_data_files``)."""
    gen = torch.Generator().manual_seed(0)
    sample = sample_inputs(spec, TRACE_BATCH, gen)
    batch = torch.export.Dim(BATCH, min=1, max=1 << 16)
    dynamic = {name: {0: batch} for name in spec.input_names}
    out = io.StringIO()
    sink = contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext()
    with sink, warnings.catch_warnings(), torch.no_grad():
        if quiet:
            warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (), kwargs=sample, input_names=spec.input_names,
                                    output_names=spec.output_names, dynamic_shapes=dynamic,
                                    opset_version=opset, dynamo=True, optimize=True, external_data=False)
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    # torch writes <path.name>.data (relative) when asked, and by itself above 1.5 GB whatever is asked.
    program.save(path, external_data=weights > external_data_threshold)
    model = onnx.load(str(path), load_external_data=False)
    strip_debug_info(model)
    onnx.save(model, str(path))  # external tensors stay references to the same <name>.data
    _check_io(spec, model)
    onnx.checker.check_model(str(path), full_check=True)  # by path: resolves the external data


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop what the exporter records for debugging: doc strings and metadata of the graph, its nodes, values
    and functions (torch's stack traces, which name files by absolute path on the exporting machine, its module
    names, FX nodes and graph signature); the model's own metadata stays.

    Without them a graph is the same bytes wherever the same checkpoint is exported (the packaged copy's
    ``source_sha256`` is checked against a fresh export in another checkout) and carries no build paths."""
    def nodes(container) -> None:
        for node in container.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    graph(g)

    def values(container, *fields) -> None:
        for name in fields:
            for value in getattr(container, name, ()):
                value.doc_string = ""
                del value.metadata_props[:]

    def graph(g: onnx.GraphProto) -> None:
        g.doc_string = ""
        del g.metadata_props[:]
        values(g, "value_info", "input", "output")
        nodes(g)

    graph(model.graph)
    for function in model.functions:
        function.doc_string = ""
        del function.metadata_props[:]
        values(function, "value_info")
        nodes(function)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_tensors(g)


def external_data_files(path: Path) -> list[str]:
    """The external data files the graph at ``path`` references, as paths relative to its folder (sorted).

    Refuses a reference that leaves the folder or names a missing file: an engine folder must stay whole
    when copied.
    """
    model = onnx.load(str(path), load_external_data=False)
    found = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in tensor.external_data if e.key == "location")
    for rel in found:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not (path.parent / rel).is_file():
            raise RuntimeError(f"{path}: external data {rel!r} is not a file beside the graph")
    return sorted(Path(rel).as_posix() for rel in found)


def _check_io(spec: GraphSpec, model: onnx.ModelProto) -> None:
    """The graph's I/O must be exactly the spec's, in order, with the batch axis symbolic."""
    for kind, got, want in (("inputs", model.graph.input, spec.inputs), ("outputs", model.graph.output, spec.outputs)):
        names = [v.name for v in got]
        if names != [t.name for t in want]:
            raise RuntimeError(f"{spec.name}: exported {kind} {names} differ from the spec's {[t.name for t in want]}")
        for v, t in zip(got, want):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            expected = [d if d != BATCH else dims[0] for d in t.shape]
            if not isinstance(dims[0], str) or dims != expected:
                raise RuntimeError(f"{spec.name}.{v.name}: exported shape {dims}, spec {list(t.shape)} "
                                   "(axis 0 must be the dynamic batch)")


def optimize_for_ort(path: Path, out: Path, *, external_data: bool = False) -> dict:
    """Save ONNX Runtime's ``ORT_LEVEL`` optimisation of ``path`` to ``out``; return where it is valid.
    ``external_data``: its tensors of ``EXTERNAL_TENSOR_MIN_BYTES`` or more go to ``<out name>.data``.

    The extended level fuses into com.microsoft ops (FusedMatMul, QuickGelu, SkipLayerNormalization, …)
    whose kernels are chosen per execution provider, so the file is recorded as made for the CPU provider;
    other providers (CUDA, TensorRT) load the plain graph and optimise it themselves.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    if external_data:  # the file name is taken relative to ``out``'s folder
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.name}.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                      str(EXTERNAL_TENSOR_MIN_BYTES))
    ort.InferenceSession(str(path), opts, providers=[ORT_PROVIDER])
    return {"provider": ORT_PROVIDER, "level": ORT_LEVEL, "onnxruntime": ort.__version__}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # validation shares the machine; results do not depend on it
    return ort.InferenceSession(str(path), opts, providers=[ORT_PROVIDER])


def validate(spec: GraphSpec, module: torch.nn.Module, paths: dict[str, Path], batch_sizes: list[int],
             *, seed: int = 1) -> dict:
    """Compare each graph in ``paths`` ({label: file}) with ``module`` on fresh inputs at ``batch_sizes``.

    Returns the manifest's ``validation`` entry: for the first label (the plain graph) at top level,
    ``max_abs_err``, ``output_scale``, ``rel_err`` (worst output) and ``per_output``; each further label
    (e.g. "optimized") gets the same figures under its own key. Raises ValidationError beyond REL_TOL.
    """
    sessions = {label: _session(p) for label, p in paths.items()}
    err = {label: {n: 0.0 for n in spec.output_names} for label in paths}
    scale = {n: 0.0 for n in spec.output_names}
    gen = torch.Generator().manual_seed(seed)
    for batch in batch_sizes:
        feeds = sample_inputs(spec, batch, gen)
        with torch.no_grad():
            ref = module(**feeds)
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        arrays = {k: v.numpy() for k, v in feeds.items()}
        for name, r in zip(spec.output_names, ref):
            scale[name] = max(scale[name], float(np.abs(r).max()))
        for label, sess in sessions.items():
            outs = sess.run(spec.output_names, arrays)
            for name, got, r in zip(spec.output_names, outs, ref):
                if got.shape != r.shape:
                    raise ValidationError(f"{spec.name}.{name} ({label}) at batch {batch}: shape {got.shape}, "
                                          f"torch gives {r.shape}")
                err[label][name] = max(err[label][name], float(np.abs(got.astype(np.float64) - r).max()))
    figures = {label: _figures(err[label], scale) for label in paths}
    first, *rest = paths
    entry = {"provider": ORT_PROVIDER, "batch_sizes": list(batch_sizes), "tolerance": REL_TOL, **figures[first]}
    for label in rest:
        entry[label] = figures[label]
    for label, f in figures.items():
        if not f["rel_err"] <= REL_TOL:  # also catches NaN
            raise ValidationError(f"{spec.name} ({label} graph): max abs error {f['max_abs_err']:.3g} is "
                                  f"{f['rel_err']:.3g} of the output scale {f['output_scale']:.3g} "
                                  f"(tolerance {REL_TOL:g}) at batch sizes {batch_sizes}")
    return entry


def _figures(err: dict[str, float], scale: dict[str, float]) -> dict:
    per = {n: {"max_abs_err": err[n], "output_scale": scale[n], "rel_err": _rel(err[n], scale[n])} for n in err}
    worst = max(per, key=lambda n: (np.isnan(per[n]["rel_err"]), per[n]["rel_err"]))
    return {**per[worst], "per_output": per}


def _rel(err: float, scale: float) -> float:
    if scale > 0:
        return err / scale
    return 0.0 if err == 0 else float("inf")
