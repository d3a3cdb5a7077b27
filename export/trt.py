"""TensorRT engines for an engine folder (``--trt``), written against the TensorRT 10 Python API.

For each graph: parse the plain ``<graph>.onnx`` (not the ORT-optimised copy, whose com.microsoft ops
TensorRT does not know) with ``OnnxParser.parse_from_file``, so that the weights of a graph saved with
external data (``<graph>.onnx.data``, graphs over the exporter's threshold) are found beside it; add one
optimisation profile from the graph's batch range (``profile_shapes``: min/opt/max batch, every other axis
fixed, so the image size is fixed per stage), build with a shared timing cache and write
``trt/<key>/<graph>.plan``; ``key`` (``10.7.0-sm90``) names the TensorRT version and GPU compute capability
the plan is tied to (``dalle2_rt/runtime/trt_keys.py``, which the runtime uses to refuse a foreign plan).
Each plan is then checked against ONNX Runtime (CPU, fp32) on random inputs at the profile's min/opt/max
batch; the figures go into the manifest.

Precision. ``fp32`` builds with TF32 off (TensorRT enables TF32 by default, which keeps only 10 mantissa
bits in matmuls/convolutions). ``fp16`` sets the FP16 builder flag and pins some layers to fp32 with
``layer.precision`` / ``set_output_type`` under ``OBEY_PRECISION_CONSTRAINTS`` (``fp32_layers``):
  - NORMALIZATION (LayerNorm, and GroupNorm, which the exporter writes as InstanceNormalization): the mean
    and variance over C·H·W values lose precision and overflow in fp16;
  - SOFTMAX: exp of the attention logits;
  - REDUCE (the L2 norms of the CLIP embeddings): sums of squares;
  - the timestep embedding, found by following the graph from the timestep inputs (``t``, ``aug_t``) up
    to the first matrix multiply, plus the constants feeding it: t·freq reaches ~1000 rad, where fp16's
    spacing is 0.5, so sin/cos in fp16 would be noise.
Why not the strongly typed alternative: a strongly typed network runs each tensor in the type the ONNX graph
gives it, so fp16 would need an fp16 ONNX graph with explicit fp32 islands (an AutoCast pass over the
exported graph). That is the only mode TensorRT 11 keeps (weak typing is deprecated since 10.12), and
this module refuses ``fp16`` on TensorRT >= 11 with that explanation; on TensorRT 10 the weakly typed
build reads the same fp32 graph the other backends use and keeps one source of truth for the precision
rules here. (Some TensorRT 10.0 builds were reported to ignore layer precisions inside fused Myelin
regions, NVIDIA/TensorRT#3941; the validation figures recorded per plan are what shows whether it held.)

The pure logic (profile shapes, layer selection, manifest entry) takes plain data, so it is tested
without TensorRT (tests/test_trt_logic.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dalle2_rt.runtime import trt_keys
from dalle2_rt.runtime.manifest import BATCH_AXIS as BATCH  # not export.specs: this module stays torch-free

PRECISIONS = ("fp32", "fp16")
FP32_LAYER_TYPES = {
    "NORMALIZATION": "LayerNorm/GroupNorm statistics overflow and lose precision in fp16",
    "SOFTMAX": "exp of attention logits",
    "REDUCE": "sums of squares (embedding L2 norm)",
}
TIMESTEP_REASON = "timestep embedding: t·freq up to ~1e3 rad, fp16 spacing 0.5 there"
_STOP_TYPES = {"MATRIX_MULTIPLY", "CONVOLUTION"}  # the timestep walk ends at the first learned projection
# Relative errors above these (vs ONNX Runtime fp32) are reported as warnings, not failures.
WARN_REL_ERR = {"fp32": 1e-3, "fp16": 3e-2}


class TrtUnavailable(RuntimeError):
    """TensorRT cannot build here (not installed, no CUDA GPU, or an unsupported request)."""


# --------------------------------------------------------------------------------------------------------
# Pure logic


def profile_shapes(io_entry: Mapping) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input name: (min, opt, max) shape} from a graph's ``inputs`` and ``profile.batch`` (spec or manifest)."""
    batch = io_entry["profile"][BATCH]
    out = {}
    for t in io_entry["inputs"]:
        shapes = []
        for key in ("min", "opt", "max"):
            dims = tuple(int(batch[key]) if d == BATCH else d for d in t["shape"])
            if not all(isinstance(d, int) for d in dims):
                raise ValueError(f"input {t['name']!r}: only the {BATCH!r} axis may be dynamic, shape {t['shape']}")
            shapes.append(dims)
        out[t["name"]] = tuple(shapes)
    return out


@dataclass(frozen=True)
class LayerInfo:
    """What the selection needs of a network layer: TensorRT layer type name, tensor names, float outputs."""

    name: str
    type: str  # trt.LayerType member name: "NORMALIZATION", "SOFTMAX", "ELEMENTWISE", …
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: bool = True  # all outputs are fp32/fp16 tensors (shape/int layers are never pinned)


def fp32_layers(layers: list[LayerInfo], network_inputs: Iterable[str], timestep_inputs: Iterable[str]
                ) -> dict[str, str]:
    """{layer name: reason} of the layers an fp16 build must keep in fp32 (see the module docstring)."""
    producer = {o: layer for layer in layers for o in layer.outputs}
    consumers: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        for i in layer.inputs:
            consumers.setdefault(i, []).append(layer)

    chosen: dict[str, str] = {}
    for layer in layers:
        if layer.type in FP32_LAYER_TYPES and layer.float_outputs:
            chosen[layer.name] = FP32_LAYER_TYPES[layer.type]

    # Forward from the timestep inputs through float layers, up to (not into) the first projection.
    timestep: list[LayerInfo] = []
    frontier, seen = list(timestep_inputs), set()
    while frontier:
        tensor = frontier.pop()
        for layer in consumers.get(tensor, []):
            if layer.name in seen or layer.type in _STOP_TYPES or not layer.float_outputs:
                continue
            seen.add(layer.name)
            timestep.append(layer)
            frontier.extend(layer.outputs)

    # Backward from those through layers that depend on no network input (folded constants such as the
    # frequency table, or a chain computing it), so the operands are fp32 too.
    from_inputs, frontier = set(), list(network_inputs)
    while frontier:
        tensor = frontier.pop()
        for layer in consumers.get(tensor, []):
            if layer.name not in from_inputs:
                from_inputs.add(layer.name)
                frontier.extend(layer.outputs)
    stack = list(timestep)
    while stack:
        layer = stack.pop()
        if layer.name not in chosen:
            chosen[layer.name] = TIMESTEP_REASON
        for i in layer.inputs:
            p = producer.get(i)
            if p is not None and p.name not in from_inputs and p.name not in chosen and p.float_outputs:
                stack.append(p)
    return chosen


def check_precision(precision: str, trt_version: str) -> None:
    if precision not in PRECISIONS:
        raise TrtUnavailable(f"precision must be one of {PRECISIONS}, got {precision!r}")
    major = int(trt_keys.trt_version_key(trt_version).split(".")[0])
    if major < 10:
        raise TrtUnavailable(f"TensorRT {trt_version} found; the engine builder needs TensorRT 10")
    if precision == "fp16" and major >= 11:
        raise TrtUnavailable(
            f"TensorRT {trt_version} builds strongly typed networks only; an fp16 engine would need an fp16 ONNX "
            "graph with fp32 islands, which this exporter does not write yet. Use --precision fp32 or TensorRT 10")


def trt_entry(key: str, *, trt_version: str, cc: tuple[int, int], device: str, precision: str,
              plans: Mapping[str, str], fp32_counts: Mapping[str, int], validation: Mapping[str, dict],
              failed: Mapping[str, str], build_seconds: Mapping[str, float]) -> dict:
    """The manifest's ``trt.<key>`` entry (graphs list their plan under ``graphs.<g>.trt.<key>``)."""
    return {
        "tensorrt": trt_keys.trt_version_key(trt_version),
        "tensorrt_full": str(trt_version),
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "device": device,
        "precision": precision,
        "tf32": False,
        "dir": trt_keys.engine_dir(key),
        "timing_cache": f"{trt_keys.engine_dir(key)}/{trt_keys.TIMING_CACHE}",
        "plans": dict(plans),
        "fp32_layers": dict(fp32_counts),
        "validation": dict(validation),
        "failed": dict(failed),
        "build_seconds": {k: round(v, 2) for k, v in build_seconds.items()},
    }


# --------------------------------------------------------------------------------------------------------
# TensorRT


def probe() -> tuple[object, tuple[int, int], str]:
    """(tensorrt module, compute capability, device name), or TrtUnavailable with a message saying why."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TrtUnavailable("TensorRT is not installed (pip install 'dalle2-rt[trt]'); "
                             "the ONNX graphs are exported, no TensorRT engines were built") from None
    import torch

    if not torch.cuda.is_available():
        raise TrtUnavailable(f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible; "
                             "the ONNX graphs are exported, no TensorRT engines were built")
    return trt, torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0)


def _layer_infos(trt, network) -> list[LayerInfo]:
    floats = {trt.float32, trt.float16}
    infos = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = tuple(t.name for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        infos.append(LayerInfo(layer.name, layer.type.name, ins, tuple(t.name for t in outs),
                               all(t.dtype in floats for t in outs)))
    return infos


def _pin_fp32(trt, network, names: Mapping[str, str]) -> None:
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in names:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def build_plan(trt, logger, onnx_path: Path, io_entry: Mapping, timestep_inputs: list[str], precision: str,
               timing_cache: bytes) -> tuple[bytes, bytes, int]:
    """(serialized plan, updated timing cache, number of fp32-pinned layers) of one ONNX graph."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"ONNX parser: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        chosen = fp32_layers(_layer_infos(trt, network), inputs, timestep_inputs)
        _pin_fp32(trt, network, chosen)
        pinned = len(chosen)
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(io_entry)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(shapes):
        raise RuntimeError(f"network inputs {sorted(names)} differ from the manifest's {sorted(shapes)}")
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("build_serialized_network returned nothing (see the TensorRT log above)")
    return bytes(plan), bytes(cache.serialize()), pinned


def check_plan(trt, plan: bytes, onnx_path: Path, io_entry: Mapping, sample: Callable[[int], dict]) -> dict:
    """Run the plan and ONNX Runtime (CPU, fp32) on the same random inputs at the profile's min/opt/max
    batch; return {"batch_sizes", "max_abs_err", "output_scale", "rel_err"} (worst output)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))  # kept alive as long as the engine
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("the plan just built could not be deserialized")
    context = engine.create_execution_context()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = [t["name"] for t in io_entry["outputs"]]
    batch = io_entry["profile"][BATCH]
    sizes = sorted({int(batch[k]) for k in ("min", "opt", "max")})
    err, scale = 0.0, 0.0
    stream = torch.cuda.Stream()
    for b in sizes:
        feeds = sample(b)  # {name: numpy array}
        want = session.run(outputs, feeds)
        keep = []  # device copies stay alive until the run is done
        for name, array in feeds.items():
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            keep.append(torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).cuda())
            context.set_input_shape(name, tuple(array.shape))
            context.set_tensor_address(name, keep[-1].data_ptr())
        got = []
        for name in outputs:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(context.get_tensor_shape(name))
            got.append(torch.from_numpy(np.empty(shape, dtype=dtype)).cuda())
            context.set_tensor_address(name, got[-1].data_ptr())
        torch.cuda.synchronize()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed at batch {b}")
        stream.synchronize()
        for g, ref in zip(got, want):
            if tuple(g.shape) != ref.shape:
                raise RuntimeError(f"TensorRT output shape {tuple(g.shape)} at batch {b}, ONNX Runtime {ref.shape}")
            err = max(err, float(np.abs(g.cpu().numpy().astype(np.float64) - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    return {"batch_sizes": sizes, "max_abs_err": err, "output_scale": scale,
            "rel_err": err / scale if scale > 0 else float(err > 0)}


def machine_key(precision: str) -> str:
    """The engine key of this machine's TensorRT and GPU (``10.7.0-sm90``) for a ``precision`` build, or
    TrtUnavailable saying why there is none."""
    trt, cc, _ = probe()
    check_precision(precision, trt.__version__)
    return trt_keys.engine_key(trt.__version__, cc)


def key_or_reason(wanted: bool, precision: str, log: Callable[[str], None]) -> tuple[str | None, str | None]:
    """For ``--trt``: (this machine's engine key, None), or (None, why there is none; also logged);
    (None, None) when no plans are wanted."""
    if not wanted:
        return None, None
    try:
        return machine_key(precision), None
    except TrtUnavailable as e:
        log(f"export: --trt: {e}")
        return None, str(e)


def build_missing(folder: Path, key: str, precision: str, specs: list, graphs: dict, records: dict,
                  log: Callable[[str], None]) -> dict[str, str]:
    """Build into ``folder`` the plans for ``key`` that ``records[key]`` (carried over) does not already hold at
    ``precision``, for the graphs of ``specs`` (``specs.GraphSpec``: their sample inputs feed the checks).

    Updates ``graphs`` (each entry's ``trt.<key>``) and ``records[key]`` in place; returns {graph: error} of
    the builds that failed (empty when nothing needed building). The one path both exporters build by.
    """
    import torch

    from .specs import sample_inputs

    record = records.get(key)
    have = set(record["plans"]) if record and record.get("precision") == precision else set()
    need = [s.name for s in specs if s.name not in have]
    if not need:
        return {}
    by_name = {s.name: s for s in specs}

    def sample_for(graph: str):
        gen = torch.Generator().manual_seed(2)
        return lambda b: {k: v.numpy() for k, v in sample_inputs(by_name[graph], b, gen).items()}

    log(f"  building TensorRT {precision} plans for {key}: {', '.join(need)}")
    built_key, fresh, _ = build_engines(folder, graphs, precision=precision, sample_for=sample_for, log=log, only=need)
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
    return dict(fresh["failed"])


def build_engines(folder: Path, graphs: Mapping[str, dict], *, precision: str, sample_for: Callable,
                  log: Callable[[str], None], only: Iterable[str] | None = None) -> tuple[str, dict, dict]:
    """Build the plans of ``graphs`` ({name: manifest graph entry + "timestep_inputs"}) into ``folder``.

    Returns (key, the manifest's ``trt.<key>`` entry, {graph: plan path}). ``sample_for(graph)`` gives a
    function batch -> {input: numpy array}. A graph whose build fails is recorded under ``failed`` and the
    others still build; the caller decides what a failure means for the exit status.
    """
    trt, cc, device = probe()
    check_precision(precision, trt.__version__)
    key = trt_keys.engine_key(trt.__version__, cc)
    out_dir = folder / trt_keys.engine_dir(key)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_file = out_dir / trt_keys.TIMING_CACHE
    cache = cache_file.read_bytes() if cache_file.exists() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    plans, pinned, checks, failed, seconds = {}, {}, {}, {}, {}
    for name, entry in graphs.items():
        if only is not None and name not in only:
            continue
        started = time.perf_counter()
        try:
            plan, cache, pinned[name] = build_plan(trt, logger, folder / entry["file"], entry,
                                                   entry.get("timestep_inputs", []), precision, cache)
            checks[name] = check_plan(trt, plan, folder / entry["file"], entry, sample_for(name))
            rel = trt_keys.plan_path(key, name)
            (folder / rel).write_bytes(plan)  # only a plan that ran is kept
            plans[name] = rel
        except Exception as e:  # noqa: BLE001 - reported per graph; the ONNX graphs stand without a plan
            failed[name] = f"{type(e).__name__}: {e}"
            log(f"  trt {name}: FAILED ({failed[name]})")
            continue
        finally:
            seconds[name] = time.perf_counter() - started
        c = checks[name]
        warn = "  (above the expected bound!)" if c["rel_err"] > WARN_REL_ERR[precision] else ""
        log(f"  trt {name}: {precision}, {pinned[name]} layers pinned to fp32, {seconds[name]:.1f} s, "
            f"max abs err {c['max_abs_err']:.2e} = {c['rel_err']:.2e} of scale at batch {c['batch_sizes']}{warn}")
    cache_file.write_bytes(cache)
    entry = trt_entry(key, trt_version=trt.__version__, cc=cc, device=device, precision=precision, plans=plans,
                      fp32_counts=pinned, validation=checks, failed=failed, build_seconds=seconds)
    return key, entry, plans
