"""int8 variants of chosen graphs (``python -m export.all --int8 sr0``), calibrated on the folder's own sampling.

A CPU with int8 dot products (AVX-512 VNNI, AMX) runs a convolution-heavy U-Net faster in int8: the SR graph of
shapes-v2 1.68× at one thread, at an equal fully-right rate (bench/RESULTS.md). The variant is written beside
the fp32 graph, never instead of it: ``file`` stays the fp32 I/O contract (what TensorRT plans, Triton and the
optimised copy are made from), and the graph entry gains

    int8 {file, format, weights, activations, op_types, calibration {prompts, seed, calls, batches},
          validation {inputs, rms_rel_err, max_abs_err, output_scale, rel_err, tolerance}}

A host that runs ONNX on a CPU may run ``int8.file`` instead of ``file``: same inputs and outputs, static QDQ
(QuantizeLinear/DequantizeLinear pairs around Conv, Gemm and the MatMuls with a weight; per-channel symmetric int8
weights, asymmetric uint8 activations with MinMax ranges), standard ONNX any runtime can load. The products of two
activations (attention's scores and their weighted values) stay fp32: quantized, ONNX Runtime fuses the softmax
between them into a QLinearSoftmax that costs more than the whole fp32 attention (profiled on the 3-step decoder
at 4 rows, one thread, a Xeon with AMX: 17 of 67 ms, against 3 ms for the fp32 softmax), and their error is the
larger part of the graph's.

Calibration runs the folder being built: the runtime ``Pipeline`` at the folder's defaults over a fixed set of
the shapes world's captions, keeping the target graph's inputs as sampling feeds them (trajectories, not random
tensors: a denoiser's activations at t = 999 and t = 1 differ by orders of magnitude). Validation replays other
captions' inputs through the fp32 and int8 graphs and refuses the variant (``ValidationError``, the export
fails, ``--out`` is left as it was) when the output's RMS error exceeds ``RMS_TOLERANCE`` of its RMS. The rate
of fully right images is a property of the whole model, measured by ``bench.fidelity --fp32`` against the
default: whether a folder should ship a variant is decided there, not here.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .onnx_export import ValidationError

# The int8 output's RMS error, as a fraction of the fp32 output's RMS, on held-out inputs: twice what the trained
# shapes-v2 graphs measure (sr0 0.043-0.048 with MinMax, percentile or entropy ranges alike, most of it at the
# last, low-noise steps, whose prediction enters the image scaled by sqrt(1 - abar); decoder 0.02-0.06).
RMS_TOLERANCE = 0.1
INT8_REVISION = 2  # bump when what a variant holds changes: folders with variants rebuild (2: attention in fp32)
CALIBRATION_SEED = 99
CALIBRATION_PROMPTS = 16  # captions sampled once each (alternately single- and two-object)
VALIDATION_PROMPTS = 8
KEEP_EVERY = 1  # every call's inputs
OP_TYPES = ("Conv", "MatMul", "Gemm")  # a MatMul only where one operand is a weight (``activation_matmuls``)


def quantizable(name: str) -> bool:
    """The graphs an int8 variant is offered for: the decoder and the super-resolution U-Nets (sr0, sr1, …)."""
    return name == "decoder" or (name.startswith("sr") and name[2:].isdigit())


def world_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct canonical captions of the shapes world, alternately single- and two-object."""
    from dalle2_rt.world import caption_text, random_caption_spec

    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        text = caption_text(random_caption_spec(rng, two_object_prob=float(len(out) % 2)))
        if text not in out:
            out.append(text)
    return out


class Recorder:
    """An engine that keeps every ``every``-th call's inputs and answers as the engine it wraps."""

    def __init__(self, engine, every: int = 1):
        self._engine, self.every, self.calls, self.kept = engine, every, 0, []
        self.spec, self.name, self.max_batch, self.description = (engine.spec, engine.name, engine.max_batch,
                                                                  engine.description)

    def __call__(self, **arrays):
        if self.calls % self.every == 0:
            self.kept.append({t.name: np.array(arrays[t.name], dtype=t.dtype) for t in self.spec.inputs})
        self.calls += 1
        return self._engine(**arrays)


def record_inputs(pipe, graphs: list[str], prompts: list[str], seed: int) -> dict[str, list[dict]]:
    """The inputs each of ``graphs`` receives while ``pipe`` samples ``prompts`` (one image each); ``pipe``'s
    engines are left as they were."""
    original = dict(pipe.engines)
    recorders = {g: Recorder(original[g], KEEP_EVERY) for g in graphs}
    pipe.engines.update(recorders)
    try:
        for start in range(0, len(prompts), 4):
            pipe(prompts[start:start + 4], seed=seed + start)
    finally:
        pipe.engines.update(original)
    return {g: r.kept for g, r in recorders.items()}


class _Reader:
    """onnxruntime.quantization's calibration reader over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self._items = iter(feeds)

    def get_next(self):
        return next(self._items, None)


def activation_matmuls(model) -> list[str]:
    """The names of ``model``'s MatMul nodes none of whose inputs is a weight (an initializer or a Constant
    node's output): attention's query·key and weights·value products, left in fp32. Unnamed nodes get a name
    (``model`` is changed) so that the quantizer can exclude them."""
    weights = {i.name for i in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = {n.name for n in model.graph.node}
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "MatMul" and not any(x in weights for x in node.input):
            if not node.name:
                node.name = f"activation_matmul_{i}"
                while node.name in names:
                    node.name += "_"
                names.add(node.name)
            out.append(node.name)
    return out


def quantize(plain: Path, feeds: list[dict], out: Path) -> Path:
    """Static QDQ int8 of the ONNX graph ``plain`` calibrated on ``feeds``, written to ``out`` (returned)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.name + ".pre")
    try:
        quant_pre_process(str(plain), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        keep_fp32 = activation_matmuls(model)
        onnx.save(model, str(pre))
        quantize_static(str(pre), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(OP_TYPES), nodes_to_exclude=keep_fp32,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    return out


def compare(plain: Path, int8: Path, feeds: list[dict]) -> dict:
    """The int8 graph's error against the fp32 graph over ``feeds`` (first output)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp32 = ort.InferenceSession(str(plain), so, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"])
    sq_err = sq_ref = 0.0
    max_err = scale = 0.0
    for feed in feeds:
        ref = fp32.run(None, feed)[0].astype(np.float64)
        got = q.run(None, feed)[0].astype(np.float64)
        sq_err += float(np.sum((got - ref) ** 2))
        sq_ref += float(np.sum(ref ** 2))
        max_err, scale = max(max_err, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    rms = float(np.sqrt(sq_err / max(sq_ref, 1e-30)))
    return {"inputs": len(feeds), "rms_rel_err": rms, "max_abs_err": max_err, "output_scale": scale,
            "rel_err": max_err / max(scale, 1e-30), "tolerance": RMS_TOLERANCE}


def add_int8_variants(folder: Path, graphs: dict[str, dict], names: tuple[str, ...],
                      write_manifest: Callable[[], None], say: Callable[[str], None]) -> None:
    """Calibrate, write and validate ``<name>.int8.onnx`` for each of ``names`` in the build folder ``folder``
    (whose manifest ``write_manifest`` writes from ``graphs``), adding each entry's ``int8`` record.
    Raises ValidationError for a variant over the tolerance."""
    from dalle2_rt.runtime.pipeline import Pipeline

    for name in names:  # before any sampling
        if graphs[name].get("external_data"):
            raise ValidationError(f"{name}: an int8 variant of a graph with external weight data is not supported")
    write_manifest()  # the fp32 folder, for the calibration Pipeline
    pipe = Pipeline.load(folder, verify=False, int8=False)
    prompts = world_prompts(CALIBRATION_PROMPTS + VALIDATION_PROMPTS, CALIBRATION_SEED)
    calib = record_inputs(pipe, list(names), prompts[:CALIBRATION_PROMPTS], CALIBRATION_SEED)
    held_out = record_inputs(pipe, list(names), prompts[CALIBRATION_PROMPTS:], CALIBRATION_SEED + 1000)
    for name in names:
        entry = graphs[name]
        file = f"{name}.int8.onnx"
        quantize(folder / entry["file"], calib[name], folder / file)
        check = compare(folder / entry["file"], folder / file, held_out[name])
        say(f"  {name}: int8 variant, RMS error {check['rms_rel_err']:.3f} of the fp32 output's RMS over "
            f"{check['inputs']} held-out sampling inputs (tolerance {RMS_TOLERANCE}); "
            f"{os.path.getsize(folder / file) / 1e6:.1f} MB")
        if not check["rms_rel_err"] <= RMS_TOLERANCE:
            raise ValidationError(f"{name}: the int8 variant's RMS error is {check['rms_rel_err']:.3f} of the fp32 "
                                  f"output's RMS, over the tolerance {RMS_TOLERANCE}: export it without --int8 {name}")
        entry["int8"] = {
            "file": file, "format": "QDQ", "weights": "int8, per output channel, symmetric",
            "activations": "uint8, per tensor, MinMax ranges", "op_types": list(OP_TYPES),
            "fp32": "MatMul of two activations (no weight operand)",
            "calibration": {"prompts": CALIBRATION_PROMPTS, "seed": CALIBRATION_SEED,
                            "calls_kept": f"every {KEEP_EVERY}", "batches": len(calib[name])},
            "validation": check,
        }
