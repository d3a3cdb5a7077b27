"""A Triton Inference Server model repository from an engine folder and its manifest alone (torch-free).

    python -m export.triton engines/shapes-v2 --out out/triton-repo                  # onnxruntime_onnx models
    python -m export.triton engines/shapes-v2 --out REPO --platform tensorrt --trt-key 10.7.0-sm90
    python -m export.triton engines/shapes-v2 --out REPO --platform python           # Python-backend stand-ins
    python -m export.triton engines/my-int8 --out REPO --kind cpu --int8   # a folder exported with export.all --int8

What it writes (Triton's layout: ``<model>/config.pbtxt`` + ``<model>/1/<file>``):

  <graph>/config.pbtxt      one model per graph of the manifest, named after the graph:
                            platform "onnxruntime_onnx" (1/model.onnx, the plain graph: the exporter's
                            *.opt.onnx is fused for the provider it was made on) or "tensorrt_plan"
                            (1/model.plan, the folder's plan for --trt-key), or backend "python"
                            (1/model.onnx + 1/model.py, ``dalle2_rt/triton/graph_model.py``: onnxruntime in
                            the Python backend, for servers without the onnxruntime backend);
                            inputs and outputs with the manifest's names, dtypes and dims;
                            with --int8 (CPU instances), 1/model.onnx is the graph's int8 variant where
                            the folder has one, named in the parameter dalle2_rt.int8_variant;
                            max_batch_size = the graph's profile.batch.max and dynamic_batching with
                            preferred sizes {opt, max} (rows are independent in every graph, so requests
                            may be merged); instance_group from --instances / --kind / --gpus
  unclip/config.pbtxt       the orchestrator, backend "python": the diffusion loop (the runtime's Pipeline on
                            the triton backend over BLS); inputs/outputs in ``dalle2_rt/triton/orchestrator_io.py``
  unclip/1/model.py         ``dalle2_rt/triton/orchestrator_model.py``
  unclip/1/engine/          manifest.json and the tokenizer file: schedules, defaults, tokenizer come from here
  unclip/1/dalle2_rt/       the runtime and ``dalle2_rt.triton``, vendored (the server's Python needs only
                            numpy, pillow, regex, ftfy; onnxruntime too for the stand-ins)

Files are copied (``--link``: hard-linked). A graph's external-data files (``<graph>.onnx.data``) go beside
``model.onnx`` under their own names, which the .onnx references. Every config records the manifest's sha256 (parameter
``dalle2_rt.manifest_sha256``), which the client backend checks. The folder is built aside and renamed into
place; an existing ``--out`` is replaced only with ``--force``.

Config facts (Triton's ``model_config.proto``): with ``max_batch_size > 0`` dims omit the batch axis; a tensor
that is only the batch axis (``t``, ``*_keep``) is ``dims: [1]`` + ``reshape: { shape: [] }``
(``dalle2_rt.runtime.backends.triton.config_dims``); dynamic axes are -1. ``check_config`` parses a written
config with tritonclient's generated ``model_config_pb2`` (unknown field or enum names fail to parse) and
compares it with the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import dalle2_rt
from dalle2_rt.runtime.backends.triton import (
    INT8_PARAMETER,
    MANIFEST_SHA_PARAMETER,
    TRITON_DTYPES,
    config_dims,
    config_parameter,
    is_batched,
)
from dalle2_rt.runtime.errors import Dalle2RTError
from dalle2_rt.runtime.manifest import (
    MANIFEST,
    NAME,
    GraphSpec,
    Manifest,
    graph_io_problems,
    load_manifest,
    verify_files,
)
from dalle2_rt.triton import orchestrator_io

PLATFORMS = ("auto", "onnxruntime", "tensorrt", "python")
KINDS = ("auto", "gpu", "cpu")
ORCHESTRATOR = "unclip"
PACKAGE_DIR = Path(dalle2_rt.__file__).resolve().parent
GRAPH_MODEL = PACKAGE_DIR / "triton" / "graph_model.py"
ORCHESTRATOR_MODEL = PACKAGE_DIR / "triton" / "orchestrator_model.py"


MAX_INSTANCES = 256  # per model: --instances, --orchestrator-instances
MAX_QUEUE_DELAY_US = 10_000_000


class RepositoryError(Dalle2RTError):
    """The repository cannot be written as asked (no plan for the key, --out exists, ...)."""


def _check_count(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RepositoryError(f"{name} must be an integer in {lo} … {hi}, got {value!r}")
    return value


def _model_dir(root: Path, name: str) -> Path:
    """``root/name`` for a model name that is a plain identifier; never a path that leaves ``root``."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RepositoryError(f"model name {name!r} is not a name ([A-Za-z0-9_.-], at most 64, not starting with .)")
    path = root / name
    if path.parent != root:
        raise RepositoryError(f"model name {name!r} leaves the repository")
    return path


def _is_repository(out: Path) -> bool:
    """Whether ``out`` looks like a model repository this writer made: a real folder (not a symlink) whose every
    entry is a model folder with a config.pbtxt. --force replaces only such a folder (or an empty one)."""
    if out.is_symlink() or not out.is_dir():
        return False
    return all(e.is_dir() and not e.is_symlink() and (e / "config.pbtxt").is_file() for e in out.iterdir())


def _check_graph(spec: GraphSpec, ort, file: Path | None = None) -> None:
    """The graph file's (``file``: the one that will be served, default ``spec.file``) own inputs and outputs
    (names, dtypes, fixed sizes) against what the config will declare."""
    file = spec.file if file is None else file
    try:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own classes for a file it cannot load
        raise RepositoryError(f"{file}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from None
    problems = graph_io_problems(spec, session.get_inputs(), session.get_outputs())
    if problems:
        raise RepositoryError(f"{file}: {'; '.join(problems)} (graphs.{spec.name} of the manifest)")


# --------------------------------------------------------------------------------------------------------
# config.pbtxt: a dict rendered in protobuf text format


class Enum(str):
    """A protobuf enum value: written bare (TYPE_FP32), not quoted."""


def _scalar(v) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a protobuf string literal: JSON's escapes are a subset of text format's


def render(message: dict, indent: str = "") -> str:
    """Protobuf text format of ``message``: dict = message, list of dicts = repeated message, list of scalars
    = repeated scalar (``[ a, b ]``), ``Enum`` = enum value."""
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key} {{", render(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                lines += [f"{indent}{key} {{", render(v, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def _parameters(values: dict) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _tensor(t, batched: bool) -> dict:
    dims, reshape = config_dims(t.shape, batched)
    entry = {"name": t.name, "data_type": Enum(f"TYPE_{TRITON_DTYPES[t.dtype.name]}"), "dims": dims}
    if reshape is not None:
        entry["reshape"] = {"shape": reshape}
    return entry


def _instances(count: int, kind: str, gpus: list[int] | None) -> list[dict]:
    group = {"count": int(count), "kind": Enum(f"KIND_{kind.upper()}")}
    if gpus and kind == "gpu":
        group["gpus"] = list(gpus)
    return [group]


def instance_kind(kind: str, platform: str) -> str:
    """``kind`` with auto resolved: CPU instances for the Python stand-in, GPU ones for every other platform."""
    if kind == "auto":
        return "cpu" if platform == "python" else "gpu"
    return kind


def graph_config(spec: GraphSpec, *, platform: str, manifest_sha256: str, instances: int = 1,
                 kind: str = "auto", gpus: list[int] | None = None, queue_delay_us: int | None = 100,
                 threads: int = 1) -> dict:
    """The config of one graph model as a dict (``render`` writes it). platform: onnxruntime | tensorrt |
    python; kind auto = GPU for onnxruntime/tensorrt, CPU for the Python stand-in."""
    batched = is_batched(spec)
    config: dict = {"name": spec.name}
    if platform == "python":
        config["backend"] = "python"
    else:
        config["platform"] = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[platform]
    config["max_batch_size"] = int(spec.max_batch) if batched else 0
    config["input"] = [_tensor(t, batched) for t in spec.inputs]
    config["output"] = [_tensor(t, batched) for t in spec.outputs]
    if batched and queue_delay_us is not None:
        batch = (spec.raw.get("profile") or {}).get("batch") or {}
        preferred = sorted({int(batch.get("opt", spec.max_batch)), int(spec.max_batch)})
        config["dynamic_batching"] = {"preferred_batch_size": preferred,
                                      "max_queue_delay_microseconds": int(queue_delay_us)}
    kind = instance_kind(kind, platform)
    if platform == "tensorrt" and kind != "gpu":
        raise RepositoryError(f"{spec.name}: a tensorrt_plan model runs on a GPU (--kind gpu)")
    config["instance_group"] = _instances(instances, kind, gpus)
    params = {MANIFEST_SHA_PARAMETER: manifest_sha256, "dalle2_rt.graph": spec.name}
    if platform == "python":
        params["dalle2_rt.threads"] = str(threads)
    config["parameters"] = _parameters(params)
    return config


def orchestrator_config(manifest: Manifest, *, name: str = ORCHESTRATOR, instances: int = 1) -> dict:
    size = int((manifest.data.get("output") or {}).get("image_size") or 0) or -1
    inputs = []
    for tname, dtype, dims, optional, _ in orchestrator_io.INPUTS:
        entry = {"name": tname, "data_type": Enum(dtype), "dims": dims}
        if optional:
            entry["optional"] = True
        inputs.append(entry)
    outputs = [{"name": n, "data_type": Enum(d), "dims": dims} for n, d, dims in orchestrator_io.outputs(size)]
    return {
        "name": name, "backend": "python", "max_batch_size": 0, "input": inputs, "output": outputs,
        "instance_group": _instances(instances, "cpu", None),
        "parameters": _parameters({MANIFEST_SHA_PARAMETER: manifest.sha256, "dalle2_rt.engine_dir": "engine",
                                   "dalle2_rt.engines": manifest.name}),
    }


# --------------------------------------------------------------------------------------------------------
# checks


def parse_config(text: str):
    """``text`` parsed as Triton's ModelConfig (tritonclient's generated ``model_config_pb2``); a field or enum
    name the schema does not have raises ``google.protobuf.text_format.ParseError``."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise RepositoryError(f"checking a config needs tritonclient[grpc] (pip install 'dalle2-rt[triton]'): {e}") \
            from None
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def check_config(text: str, spec: GraphSpec, manifest_sha256: str) -> list[str]:
    """What differs between a graph model's config.pbtxt and the manifest's graph (empty: consistent)."""
    from google.protobuf.json_format import MessageToDict

    config = MessageToDict(parse_config(text), preserving_proto_field_name=True)
    problems = []
    if config.get("name") != spec.name:
        problems.append(f"name {config.get('name')!r} is not the graph's {spec.name!r}")
    batched = is_batched(spec)
    if int(config.get("max_batch_size", 0)) != (spec.max_batch if batched else 0):
        problems.append(f"max_batch_size {config.get('max_batch_size', 0)} is not profile.batch.max {spec.max_batch}")
    for key, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        got = [(t["name"], t["data_type"], [int(d) for d in t.get("dims", [])],
                [int(d) for d in t["reshape"].get("shape", [])] if "reshape" in t else None)
               for t in config.get(key, [])]
        want = [(t.name, f"TYPE_{TRITON_DTYPES[t.dtype.name]}", *config_dims(t.shape, batched)) for t in tensors]
        if got != want:
            problems.append(f"{key}: {got} != manifest {want}")
    recorded = config_parameter(config, MANIFEST_SHA_PARAMETER)
    if recorded != manifest_sha256:
        problems.append(f"parameter {MANIFEST_SHA_PARAMETER} is {recorded!r}")
    if batched and "dynamic_batching" in config:
        sizes = [int(s) for s in config["dynamic_batching"].get("preferred_batch_size", [])]
        if any(not 1 <= s <= spec.max_batch for s in sizes):
            problems.append(f"preferred_batch_size {sizes} outside 1 … {spec.max_batch}")
    return problems


# --------------------------------------------------------------------------------------------------------
# the repository


def _place(src: Path, dst: Path, link: bool = False) -> None:
    """Copy ``src`` to ``dst``; ``link``: a hard link where the filesystem allows (no second copy of a large
    graph, but a write to either path then changes both: the engine folder's hashes would no longer match)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _plan_key(manifest: Manifest, trt_key: str | None, platform: str) -> str | None:
    keys = sorted({k for g in manifest.graphs.values() for k in g.trt})
    if trt_key is not None:
        if trt_key not in keys:
            raise RepositoryError(f"{manifest.folder} has no TensorRT plans for {trt_key!r} (has: "
                                  f"{', '.join(keys) or 'none; build them with python -m export.all --trt'})")
        return trt_key
    if platform == "tensorrt":
        if len(keys) != 1:
            raise RepositoryError(f"--platform tensorrt needs --trt-key: the folder has plans for "
                                  f"{', '.join(keys) or 'no key (python -m export.all --trt builds them)'}")
        return keys[0]
    return keys[0] if platform == "auto" and len(keys) == 1 else None


def _vendor_runtime(dst: Path) -> None:
    """dalle2_rt/__init__.py, dalle2_rt/runtime/ (with its backends/ package) and dalle2_rt/triton/ (.py files
    only) into ``dst/dalle2_rt``."""
    for sub in ("", "runtime", "runtime/backends", "triton"):
        for src in sorted((PACKAGE_DIR / sub).glob("*.py")):
            if sub == "" and src.name != "__init__.py":
                continue
            target = dst / "dalle2_rt" / sub / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _int8_files(manifest: Manifest, platform: str, kind: str, trt_key: str | None) -> dict[str, Path]:
    """{graph: its int8 variant} to serve in place of the fp32 graph; ``RepositoryError`` where that cannot be:
    a folder without variants, TensorRT plans, or GPU instances (QDQ graphs are for the CPU's int8 kernels)."""
    if platform == "tensorrt":
        raise RepositoryError("--int8 serves ONNX graphs on CPU instances; TensorRT plans are built from the fp32 "
                              "graphs")
    if instance_kind(kind, platform) == "gpu":
        raise RepositoryError("--int8 variants run on CPU instances: add --kind cpu")
    if trt_key:
        raise RepositoryError("--int8 serves ONNX graphs; --trt-key selects TensorRT plans")
    files = {g: spec.int8_file for g, spec in manifest.graphs.items() if spec.int8_file is not None}
    if not files:
        raise RepositoryError(f"{manifest.folder} has no int8 variants (python -m export.all --int8 GRAPH writes "
                              "them)")
    return files


def write_repository(engines: str | os.PathLike, out: str | os.PathLike, *, platform: str = "auto",
                     trt_key: str | None = None, instances: int = 1, kind: str = "auto",
                     gpus: list[int] | None = None, queue_delay_us: int | None = 100, threads: int = 1,
                     orchestrator: str | None = ORCHESTRATOR, orchestrator_instances: int = 1, force: bool = False,
                     verify: bool = True, link: bool = False, int8: bool = False) -> dict:
    """Write the model repository of ``engines`` to ``out``; returns {model: platform} of what was written.
    link: hard-link the graph and plan files instead of copying them (see ``_place``). int8: serve each graph's
    int8 variant (``graphs.<g>.int8``) where the folder has one, on CPU instances (the runtime's own choice on
    the CPU); a graph without one is served as usual."""
    if platform not in PLATFORMS:
        raise RepositoryError(f"unknown platform {platform!r}; choose from {', '.join(PLATFORMS)}")
    if kind not in KINDS:
        raise RepositoryError(f"unknown instance kind {kind!r}; choose from {', '.join(KINDS)}")
    _check_count("instances", instances, 1, MAX_INSTANCES)
    _check_count("orchestrator instances", orchestrator_instances, 1, MAX_INSTANCES)
    _check_count("threads", threads, 1, 1024)
    if queue_delay_us is not None:
        _check_count("queue delay (µs)", queue_delay_us, 0, MAX_QUEUE_DELAY_US)
    if gpus is not None:
        for g in gpus:
            _check_count("a GPU id", g, 0, 1023)
    manifest = load_manifest(engines)
    if verify:
        verify_files(manifest)
    served = _int8_files(manifest, platform, kind, trt_key) if int8 else {}  # graph -> the variant served instead
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise RepositoryError(f"{out} exists; pass --force to replace it")
        if not _is_repository(out):
            raise RepositoryError(f"{out} is not a model repository (every entry a model folder with a config.pbtxt); "
                                  "--force replaces only those: choose another --out")
    names = [*manifest.graphs, *([orchestrator] if orchestrator else [])]
    for name in names:
        _model_dir(out, name)
    if orchestrator in manifest.graphs:
        raise RepositoryError(f"the orchestrator's name {orchestrator!r} is also a graph's; choose another")
    key = None if served else _plan_key(manifest, trt_key, platform)  # --int8: ONNX models, never plans
    import onnxruntime as ort

    for spec in manifest.graphs.values():
        _check_graph(spec, ort, served.get(spec.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    written = {}
    try:
        for name, spec in sorted(manifest.graphs.items()):
            plat = platform
            if platform == "auto":
                plat = "tensorrt" if key and key in spec.trt else "onnxruntime"
            if plat == "tensorrt" and key not in spec.trt:
                raise RepositoryError(f"graph {name!r} has no TensorRT plan for {key}")
            version = _model_dir(tmp, name) / "1"
            if plat == "tensorrt":
                _place(spec.trt[key], version / "model.plan", link)
            else:
                _place(served.get(name, spec.file), version / "model.onnx", link)
                for data in [] if name in served else spec.raw.get("external_data", []):  # a variant has none
                    _place(manifest.path(data), version / Path(data).name, link)
                if plat == "python":
                    shutil.copy2(GRAPH_MODEL, version / "model.py")
            config = graph_config(spec, platform=plat, manifest_sha256=manifest.sha256, instances=instances,
                                  kind=kind, gpus=gpus, queue_delay_us=queue_delay_us, threads=threads)
            if name in served:
                config["parameters"] += _parameters({INT8_PARAMETER: served[name].name})  # what 1/model.onnx is
            (tmp / name / "config.pbtxt").write_text(render(config) + "\n", encoding="utf-8")
            written[name] = (config.get("platform") or f"backend {config['backend']}") + \
                (" (int8 variant)" if name in served else "")
        if orchestrator:
            version = _model_dir(tmp, orchestrator) / "1"
            version.mkdir(parents=True)
            shutil.copy2(ORCHESTRATOR_MODEL, version / "model.py")
            _place(manifest.folder / MANIFEST, version / "engine" / MANIFEST)
            tok = manifest.tokenizer["file"]
            _place(manifest.path(tok), version / "engine" / tok)
            _vendor_runtime(version)
            config = orchestrator_config(manifest, name=orchestrator, instances=orchestrator_instances)
            (tmp / orchestrator / "config.pbtxt").write_text(render(config) + "\n", encoding="utf-8")
            written[orchestrator] = "backend python (orchestrator)"
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.triton",
                                description="Write a Triton model repository from an engine folder.")
    p.add_argument("engines", help="engine folder (with manifest.json)")
    p.add_argument("--out", required=True, help="the repository folder to write")
    p.add_argument("--platform", choices=PLATFORMS, default="auto",
                   help="graph models: onnxruntime_onnx, tensorrt_plan, or python (onnxruntime in the Python "
                        "backend); auto = tensorrt where the folder has a plan for --trt-key, else onnxruntime")
    p.add_argument("--trt-key", help="TensorRT plans to serve, e.g. 10.7.0-sm90 (the folder's trt/<key>/)")
    p.add_argument("--instances", type=int, default=1, help="instances per graph model (default 1)")
    p.add_argument("--kind", choices=KINDS, default="auto", help="instance kind (auto: gpu, cpu for python)")
    p.add_argument("--gpus", help="comma-separated GPU ids for the instances (with --kind gpu)")
    p.add_argument("--queue-delay-us", type=int, default=100,
                   help="dynamic batching: max queue delay in µs (default 100)")
    p.add_argument("--no-dynamic-batching", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of each Python stand-in")
    p.add_argument("--orchestrator", default=ORCHESTRATOR, help=f"its model name (default {ORCHESTRATOR})")
    p.add_argument("--orchestrator-instances", type=int, default=1,
                   help="instances of the orchestrator (each runs one request's loop at a time; default 1)")
    p.add_argument("--no-orchestrator", action="store_true", help="graph models only")
    p.add_argument("--int8", action="store_true",
                   help="serve each graph's int8 variant where the folder has one (export.all --int8); CPU instances "
                        "only (--kind cpu, or --platform python)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--link", action="store_true",
                   help="hard-link the graph files instead of copying them (same filesystem; never edit them in place)")
    args = p.parse_args(argv)
    try:
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
        written = write_repository(
            args.engines, args.out, platform=args.platform, trt_key=args.trt_key, instances=args.instances,
            kind=args.kind, gpus=gpus, queue_delay_us=None if args.no_dynamic_batching else args.queue_delay_us,
            threads=args.threads, orchestrator=None if args.no_orchestrator else args.orchestrator,
            orchestrator_instances=args.orchestrator_instances, force=args.force, link=args.link, int8=args.int8)
    except (Dalle2RTError, ValueError) as e:
        print(f"export.triton: error: {e}", file=sys.stderr)
        return 1
    for model, what in written.items():
        print(f"{args.out}/{model}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
