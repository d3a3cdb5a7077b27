"""FLOPs of one call of an ONNX graph, counted from the graph itself.

Only the dense-algebra nodes are counted — Conv, ConvTranspose, MatMul, Gemm — as 2 FLOPs per
multiply-accumulate (bias adds, normalisations, activations and softmax are left out: a few % of a U-Net's
work, and not what a sgemm rate can be compared with). Shapes come from ``onnx.shape_inference`` with the
dynamic batch axis fixed; a node whose input shapes inference cannot resolve (a Reshape fed by computed
data) is counted from one ONNX Runtime run that exposes those tensors as outputs instead.

    python -m bench.flops engines/shapes-v2 --batch 2
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from .feeds import random_inputs

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def node_flops(node, shapes: dict[str, tuple[int, ...]]) -> int:
    """FLOPs (2 × MACs) of one Conv/ConvTranspose/MatMul/Gemm node, given its tensors' shapes."""
    op = node.op_type
    if op == "Conv":
        x, w, y = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
        # y (N, Cout, *out); w (Cout, Cin/group, *k): each output element is Cin/group · prod(k) MACs
        return 2 * math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = shapes[node.input[0]], shapes[node.input[1]]
        # w (Cin, Cout/group, *k): every input element scatters into Cout/group · prod(k) outputs
        return 2 * math.prod(x) * math.prod(w[1:])
    if op == "Gemm":
        a, b = shapes[node.input[0]], shapes[node.input[1]]
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * m * k * n
    if op == "MatMul":
        a, b = list(shapes[node.input[0]]), list(shapes[node.input[1]])
        if len(a) == 1:
            a = [1, a[0]]
        if len(b) == 1:
            b = [b[0], 1]
        m, k, n = a[-2], a[-1], b[-1]
        batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))  # (…) batch dims broadcast
        return 2 * math.prod(batch) * m * k * n
    raise ValueError(f"not a counted op: {op}")


def _fixed_batch(model, batch: int):
    """A copy of ``model`` whose symbolic input dims are all ``batch`` (our graphs' only dynamic axis)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for value in m.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param or not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = batch
    return m


def _static_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every tensor name with a fully known shape: inputs, initializers, inferred values, outputs."""
    import onnx

    shapes = {}
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    for value in [*g.input, *g.value_info, *g.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for init in g.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for node in g.node:  # Constant nodes: weights stored as nodes rather than initializers
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            shapes[node.output[0]] = tuple(int(d) for d in node.attribute[0].t.dims)
    return shapes


def _probe_feeds(model, batch: int) -> dict[str, np.ndarray]:
    """``feeds.random_inputs`` for the graph inputs of ``model`` that are not initializers, timesteps 0: the
    graph alone does not say its T (an imported DALLE2-pytorch chain of 50 steps indexes a 50-row table), and
    shapes do not depend on the value."""
    import onnx

    init = {i.name for i in model.graph.initializer}
    return random_inputs([(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                           [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
                          for v in model.graph.input if v.name not in init], batch, timesteps=1)


def _probe_shapes(model, names: list[str], batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one unoptimised ONNX Runtime run with them added as graph outputs."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(names, _probe_feeds(m, batch))
    return {n: tuple(o.shape) for n, o in zip(names, outs)}


def count_flops(path: str | Path, batch: int) -> dict:
    """{"flops": total, "by_op": {op: flops}, "nodes": n counted, "probed": n resolved by an ORT run}."""
    import onnx

    model = _fixed_batch(onnx.load(str(path)), batch)
    shapes = _static_shapes(model)
    nodes = [n for n in model.graph.node if n.op_type in COUNTED]
    missing = sorted({t for n in nodes for t in [*n.input[:2], n.output[0]] if t and t not in shapes})
    if missing:
        shapes.update(_probe_shapes(model, missing, batch))
    by_op: dict[str, int] = {}
    for n in nodes:
        by_op[n.op_type] = by_op.get(n.op_type, 0) + node_flops(n, shapes)
    return {"flops": sum(by_op.values()), "by_op": by_op, "nodes": len(nodes), "probed": len(missing),
            "batch": batch}


def count_params(path: str | Path) -> int:
    """Number of float parameters stored in the graph (initializers and Constant tensors of > 1 element)."""
    import onnx

    model = onnx.load(str(path))
    total = sum(math.prod(i.dims) for i in model.graph.initializer if math.prod(i.dims) > 1)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = node.attribute[0].t
            if t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) > 1:
                total += math.prod(t.dims)
    return int(total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("engines", help="engine folder")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    import json

    manifest = json.loads((Path(args.engines) / "manifest.json").read_text())
    for name, g in manifest["graphs"].items():
        c = count_flops(Path(args.engines) / g["file"], args.batch)
        print(f"{name:14s} {c['flops'] / 1e9:9.3f} GFLOP at batch {args.batch}  "
              f"{count_params(Path(args.engines) / g['file']) / 1e6:6.2f} M params  {c['by_op']}  "
              f"(probed {c['probed']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
